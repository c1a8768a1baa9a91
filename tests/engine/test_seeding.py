"""One seeding scheme for every training data set: a sample's augmentation comes only from the per-sample seed of
``SeededDataset`` (torch's default generator seeded from (seed, epoch, index)), whatever the data view.

Each data set is built the way ``engine.train`` builds it (``engine.builders.build_datasets`` with the recipe's
method data view) on a tiny generated synthetic set, and read through the one training loader.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

from tokenlab.data.sampler import ResumableSampler, build_train_loader
from tokenlab.data.synthetic import SynthConfig, generate
from tokenlab.engine.builders import build_datasets
from tokenlab.engine.config import load_config
from tokenlab.methods import get_method_class

# recipe, extra overrides: one per training data view
VIEWS = {
    "classification": ("synthetic_fan_baseline", []),
    "stl_paired": ("synthetic_stl_student", ["method.kwargs.labeler=unused"]),
    "multicrop": ("ibot_synthetic_vit_tiny", []),
    "segmentation": ("seg_synthetic", []),
}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    generate(root, SynthConfig(img_size=32, counts={"train": 10, "val": 10}), workers=1)
    return root


def _flat(batch: Any) -> list[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        return [batch]
    if isinstance(batch, dict):
        return [t for k in sorted(batch) for t in _flat(batch[k])]
    if isinstance(batch, (list, tuple)):
        return [t for v in batch for t in _flat(v)]
    return []


def _epoch(train_set, seed: int, epoch: int) -> list[torch.Tensor]:
    sampler = ResumableSampler(len(train_set), shuffle=False, seed=seed)  # same order: compare sample by sample
    return _flat(next(iter(build_train_loader(train_set, len(train_set), sampler, epoch))))


@pytest.mark.parametrize("view", sorted(VIEWS))
def test_same_seed_epoch_index_same_sample_next_epoch_differs(view: str, synthetic: Path, tmp_path: Path) -> None:
    recipe, extra = VIEWS[view]
    cfg = load_config(recipe, [f"data.root={synthetic}", f"run_dir={tmp_path}", "data.val_split=null", "seed=3",
                               *extra])  # fmt: skip
    cls = get_method_class(cfg.method.name)
    assert cls.data_view == view
    options = cls.transform_options(dict(OmegaConf.to_container(cfg.method.kwargs)))
    train_set, _, _ = build_datasets(cfg, cls.data_view, options)
    torch.manual_seed(0)
    first = _epoch(train_set, cfg.seed, 0)
    torch.manual_seed(1)  # the global RNG state does not matter, only (seed, epoch, index)
    again = _epoch(train_set, cfg.seed, 0)
    assert len(first) == len(again) and all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    nxt = _epoch(train_set, cfg.seed, 1)
    images = [(a, b) for a, b in zip(first, nxt, strict=True) if a.is_floating_point()]
    assert images and any(not torch.equal(a, b) for a, b in images), f"{view}: epoch 1 repeats epoch 0"
    other_seed = _epoch(train_set, cfg.seed + 1, 0)
    assert any(not torch.equal(a, b) for a, b in zip(first, other_seed, strict=True) if a.is_floating_point())
