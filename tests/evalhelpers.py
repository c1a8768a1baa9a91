"""Builders of tiny on-disk fixtures for the eval and CLI tests: image trees, masked data sets, exported runs and
the overrides of a tiny training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image

from tokenlab.models import save_exported

#: The vendored key table of the twelve published FAN / STL checkpoints (names, shapes, parameter counts).
PUBLISHED_KEYS = Path(__file__).parent / "models" / "reference" / "fan_state_dict_keys.json"


def published_state_dict(name: str, seed: int) -> dict[str, torch.Tensor]:
    """Random weights with exactly the keys and shapes of the published ``name`` checkpoint (positive BN variances)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in sorted(json.loads(PUBLISHED_KEYS.read_text())[name]["state_dict"].items()):
        if key.endswith("num_batches_tracked"):
            out[key] = torch.tensor(0)
        elif key.endswith("running_var"):
            out[key] = torch.rand(shape, generator=g) + 0.5
        else:
            out[key] = torch.randn(shape, generator=g) * 0.02
    return out


def make_tree(root: Path, classes: tuple[str, ...] = ("cat", "dog"), per_class: int = 3, size: int = 32) -> Path:
    """Write ``root/<class>/<i>.png`` with seeded random pixels; class k images are tinted towards channel k."""
    rng = np.random.default_rng(0)
    for k, c in enumerate(classes):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.integers(0, 120, size=(size, size, 3), dtype=np.uint8)
            img[..., k % 3] += 120
            Image.fromarray(img).save(root / c / f"{i}.png")
    return root


TINY_KW = {"img_size": 32, "patch_size": 4, "depth": 1, "embed_dim": 32, "num_heads": 2}
# `tokenlab train` overrides for a tiny, quiet training on a 32 px synthetic set (the CLI tests)
TINY_TRAIN = [
    "data.img_size=32",
    "data.batch_size=8",
    "model.name=fan_nano_6_p16_224_token",
    "model.kwargs.patch_size=8",
    "model.kwargs.depth=1",
    "model.kwargs.embed_dim=32",
    "model.kwargs.num_heads=2",
    "log.progress=false",
    "log.tensorboard=false",
    "train.min_free_disk_mb=0",
    "data.train_subset=24",
]


def make_run(run_dir: Path, classes: tuple[str, ...] = ("cat", "dog"), token: bool = True, seed: int = 0) -> Path:
    """A tiny exported FAN run directory (random weights) with a short metrics.jsonl."""
    torch.manual_seed(seed)
    name = "fan_nano_6_p16_224_token" if token else "fan_nano_6_p16_224"
    model = timm.create_model(name, num_classes=len(classes), **TINY_KW)
    meta = {
        "model": name,
        "model_kwargs": {**TINY_KW, "num_classes": len(classes)},
        "num_classes": len(classes),
        "classes": list(classes),
        "img_size": 32,
        "mean": [0.5] * 3,
        "std": [0.5] * 3,
    }
    save_exported(model, run_dir / "model", meta)
    lines = []
    for step in range(1, 6):
        lines.append({"kind": "step", "step": step, "epoch": 0, "loss": 2.0 / step, "lr": 1e-3 * step})
    lines.append({"kind": "val", "step": 5, "epoch": 0, "top1": 0.5 + 0.1 * seed})
    (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return run_dir


def make_masked_set(root: Path, classes=("cat", "dog"), n: int = 2, size: int = 32) -> Path:
    """Synthetic-layout set: object square of class k, mask value k + 1."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps({"classes": list(classes)}))
    for k, c in enumerate(classes):
        for split in ("val", "val_masks"):
            (root / split / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
            mask = np.zeros((size, size), np.uint8)
            mask[8:24, 8:24] = k + 1
            img[mask > 0] = 200
            Image.fromarray(img).save(root / "val" / c / f"{i}.png")
            Image.fromarray(mask).save(root / "val_masks" / c / f"{i}.png")
    return root
