"""The published FAN-hybrid Cityscapes recipes: their numbers, schedule and model, and a 2-step run of the recipe
on a tiny generated tree in the Cityscapes layout (the real data set cannot be downloaded here)."""

import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from tokenlab.engine import load_config, train
from tokenlab.engine.builders import build_schedules, param_groups
from tokenlab.engine.config import list_recipes
from tokenlab.models.segmentation import FANSegFormer

# NVlabs/FAN segmentation/local_configs/fan/fan_hybrid/fan_hybrid_{size}.1024x1024.city.160k.py
PUBLISHED = {
    "seg_cityscapes": ("fan_tiny_8_p4_hybrid", [128, 256, 192, 192], 7),
    "seg_cityscapes_fan_tiny_hybrid": ("fan_tiny_8_p4_hybrid", [128, 256, 192, 192], 7),
    "seg_cityscapes_fan_small_hybrid": ("fan_small_12_p4_hybrid", [128, 256, 384, 384], 9),
    "seg_cityscapes_fan_base_hybrid": ("fan_base_16_p4_hybrid", [128, 256, 448, 448], 15),
    "seg_cityscapes_fan_large_hybrid": ("fan_large_16_p4_hybrid", [128, 256, 480, 480], 18),
}


def test_every_cityscapes_recipe_is_pinned() -> None:
    assert {r for r in list_recipes() if r.startswith("seg_cityscapes")} == set(PUBLISHED)


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_cityscapes_recipe_has_the_published_numbers(name: str) -> None:
    cfg = load_config(name)
    backbone, in_channels, block = PUBLISHED[name]
    k = cfg.model.kwargs
    assert (cfg.model.name, k.backbone, k.taps, k.neck, k.decoder_dim, k.head_lr_mult) == (
        "segformer_fan", backbone, "hybrid", "none", 768, 10.0)  # fmt: skip
    assert k.decoder_dropout == 0.1 and k.backbone_kwargs.drop_path_rate == 0.0
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay, list(cfg.optim.betas)) == ("adamw", 6e-5, 0.01,
                                                                                             [0.9, 0.999])  # fmt: skip
    assert (cfg.schedule.kind, cfg.schedule.poly_power, cfg.optim.min_lr, cfg.optim.clip_grad) == ("poly", 1.0, 0.0,
                                                                                                   None)  # fmt: skip
    assert (cfg.data.name, cfg.data.img_size, cfg.data.batch_size) == ("cityscapes", 1024, 8)
    assert list(cfg.data.transform.scale_range) == [0.5, 2.0] and list(cfg.data.transform.base_size) == [1024, 2048]
    assert cfg.data.transform.cat_max_ratio == 0.75 and cfg.data.transform.hflip == 0.5
    assert list(cfg.data.transform.image_fill) == [124, 116, 104]
    # 160k iterations with a 1500-iteration warm-up: one process at batch 8 has 2975 // 8 = 371 steps per epoch
    lr, _ = build_schedules(cfg, 2975 // 8)
    assert len(lr) == 159_901 and int(np.argmax(lr)) == 1500 and lr.max() == pytest.approx(6e-5)
    assert lr[0] == pytest.approx(6e-11) and lr[-1] < 1e-9
    with torch.device("meta"):
        model = timm.create_model(cfg.model.name, num_classes=19, **k)
    assert [p.in_channels for p in model.decode_head.proj] == in_channels and model.indices == [block]
    head = {id(p) for p in model.decode_head.parameters()}
    for g in param_groups(model, cfg.optim.weight_decay, None):
        assert g["lr_scale"] == (10.0 if {id(p) for p in g["params"]} <= head else 1.0)


def _tiny_cityscapes(root, splits=(("train", 4), ("val", 1))) -> None:
    rng = np.random.default_rng(0)
    for split, frames in splits:
        for f in range(frames):
            stem = f"{'bonn' if f % 2 else 'jena'}_000000_{f:06d}"
            city = stem.split("_")[0]
            img = root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png"
            gt = root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png"
            for p in (img, gt):
                p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (64, 128, 3), dtype=np.uint8)).save(img)
            Image.fromarray(rng.choice(np.array([0, 7, 8, 11, 21, 23, 26], np.uint8), (64, 128))).save(gt)


def test_cityscapes_recipe_runs_two_steps_on_a_tiny_tree(tmp_path) -> None:
    root, run = tmp_path / "cityscapes", tmp_path / "run"
    _tiny_cityscapes(root)
    cfg = load_config("seg_cityscapes", [
        f"data.root={root}", f"run_dir={run}", "data.img_size=64", "data.batch_size=2", "data.num_workers=0",
        "data.transform.base_size=[64,128]", "model.kwargs.img_size=64", "model.kwargs.decoder_dim=16",
        "schedule.epochs=1", "schedule.warmup_epochs=0.5", "log.progress=false", "log.tensorboard=false",
        "log.val_every_epochs=1", "checkpoint.every_steps=0", "train.device=cpu",
    ])  # fmt: skip
    result = train(cfg)
    assert result.step == 2 and set(result.val) == {"acc1", "loss"}
    meta = json.loads((run / "model.json").read_text())
    assert meta["num_classes"] == 19 and meta["model_kwargs"]["taps"] == "hybrid"
    assert meta["classes"][0] == "road" and meta["ignore_index"] == 255


def test_hybrid_taps_on_a_vit_stem_recipe_is_refused() -> None:
    with pytest.raises(ValueError, match="hybrid-stem FAN"):
        FANSegFormer("fan_small_12_p16_224", num_classes=19, neck="none", taps="hybrid")
