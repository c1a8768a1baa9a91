"""Corruptions: per-image seeding, small images, the on-disk cache and ImageNet-C tree reading."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from evalhelpers import make_tree
from PIL import Image
from torchvision import tv_tensors

from tokenlab.data.transforms import eval_transform_from_meta
from tokenlab.eval.corruptions import (
    ALL_CORRUPTIONS,
    UNCHANGED_THRESHOLD,
    corrupt_image,
    generate_corruptions,
    image_seed,
    model_resize,
    parse_work_size,
    read_corruption_tree,
    resolve_corruptions,
    resolve_severities,
)


def _img(size: int = 32) -> np.ndarray:
    return np.random.default_rng(1).integers(0, 255, size=(size, size, 3), dtype=np.uint8)


def test_resolve_names_and_groups():
    assert resolve_corruptions("noise,fog,gaussian_noise") == ["gaussian_noise", "shot_noise", "impulse_noise", "fog"]
    assert len(resolve_corruptions("all")) == 19 == len(ALL_CORRUPTIONS)
    with pytest.raises(ValueError, match="unknown corruption 'fogg'.*valid: gaussian_noise"):
        resolve_corruptions("fogg")
    assert resolve_severities("1-3,5") == [1, 2, 3, 5]
    with pytest.raises(ValueError, match="severities must be in 1..5"):
        resolve_severities([0, 6])


@pytest.mark.parametrize("name", ["gaussian_noise", "impulse_noise", "motion_blur", "frost", "spatter", "snow"])
def test_corruption_is_reproducible_per_seed(name):
    img = _img()
    a = corrupt_image(img, name, 3, seed=7)
    b = corrupt_image(img, name, 3, seed=7)
    c = corrupt_image(img, name, 3, seed=8)
    assert a.shape == img.shape and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_global_numpy_state_is_restored():
    np.random.seed(123)
    expected = np.random.rand()
    np.random.seed(123)
    corrupt_image(_img(), "gaussian_noise", 1, seed=5)
    assert np.random.rand() == expected


def test_small_images_are_upsized_and_work_size():
    tiny = _img(16)
    out = corrupt_image(tiny, "defocus_blur", 2, seed=0)  # the library alone refuses < 32 px
    assert out.shape == tiny.shape
    out64 = corrupt_image(_img(32), "pixelate", 5, seed=0, work_size=64)
    assert out64.shape == (32, 32, 3)


def test_seed_is_stable():
    assert image_seed(0, "fog", 1, 3) == image_seed(0, "fog", 1, 3) != image_seed(0, "fog", 1, 4)


def test_cache_is_reused_not_regenerated(image_tree: Path, tmp_path: Path):
    cache = tmp_path / "cache"
    first = generate_corruptions(image_tree, cache, "gaussian_noise,contrast", "1,2", workers=0, progress=False)
    assert len(first.generated_cells) == 4 and first.num_images == 6
    files = sorted(first.root.rglob("*.png"))
    assert len(files) == 4 * 6
    mtimes = {f: f.stat().st_mtime_ns for f in files}
    again = generate_corruptions(image_tree, cache, "gaussian_noise,contrast", "1,2", workers=0, progress=False)
    assert again.root == first.root and again.generated_cells == []
    assert {f: f.stat().st_mtime_ns for f in files} == mtimes
    # a superset only generates the missing cells
    more = generate_corruptions(image_tree, cache, "gaussian_noise,contrast", "1-3", workers=0, progress=False)
    assert sorted(more.generated_cells) == [("contrast", 3), ("gaussian_noise", 3)]
    # a different seed is a different cache
    other = generate_corruptions(image_tree, cache, "contrast", "1", seed=1, workers=0, progress=False)
    assert other.root != first.root
    assert json.loads((first.root / "manifest.json").read_text())["num_images"] == 6


def test_parallel_generation_matches_serial(image_tree: Path, tmp_path: Path):
    serial = generate_corruptions(image_tree, tmp_path / "a", "shot_noise", "2", workers=0, progress=False)
    par = generate_corruptions(image_tree, tmp_path / "b", "shot_noise", "2", workers=2, chunk_size=2, progress=False)
    for f in sorted(serial.root.rglob("*.png")):
        rel = f.relative_to(serial.root)
        np.testing.assert_array_equal(np.asarray(Image.open(f)), np.asarray(Image.open(par.root / rel)))


def test_unreadable_source_is_counted(image_tree: Path, tmp_path: Path):
    (image_tree / "cat" / "broken.png").write_bytes(b"not an image")
    res = generate_corruptions(image_tree, tmp_path / "c", "contrast", "1", workers=0, progress=False)
    assert res.num_images == 7 and len(res.unreadable) == 1 and res.unreadable[0].endswith("broken.png")
    assert len(list(res.root.rglob("*.png"))) == 6


def test_read_corruption_tree(image_tree: Path, tmp_path: Path):
    res = generate_corruptions(image_tree, tmp_path / "c", "fog,contrast", "1,2", workers=0, progress=False)
    cells = read_corruption_tree(res.root)
    assert sorted(cells) == ["contrast", "fog"] and sorted(cells["fog"]) == [1, 2]
    assert read_corruption_tree(res.root, "fog", "2") == {"fog": {2: res.root / "fog" / "2"}}
    with pytest.raises(FileNotFoundError, match="corruption 'snow' not in"):
        read_corruption_tree(res.root, "snow")
    with pytest.raises(FileNotFoundError, match="corruption tree not found"):
        read_corruption_tree(tmp_path / "nope")


def test_empty_source_dir_is_an_error(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class sub-directories"):
        generate_corruptions(tmp_path / "empty", tmp_path / "c", "fog", workers=0)
    with pytest.raises(FileNotFoundError, match="data directory not found"):
        generate_corruptions(tmp_path / "missing", tmp_path / "c", "fog", workers=0)


def test_parse_work_size():
    assert parse_work_size(None) == "model" and parse_work_size(None, default="source") == "source"
    assert parse_work_size("Source") == "source" and parse_work_size("64") == 64 == parse_work_size(64)
    for bad in ("big", "0", 0, -3):
        with pytest.raises(ValueError, match="work size"):
            parse_work_size(bad)


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_work_size_model_corrupts_after_the_model_resize(tmp_path: Path):
    src = make_tree(tmp_path / "big", per_class=2, size=96)
    meta = {"img_size": 32, "crop_pct": 0.8, "interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.5] * 3}
    kw = {"workers": 0, "progress": False}
    model = generate_corruptions(src, tmp_path / "c", "contrast", "2", work_size="model", model_meta=meta, **kw)
    stored = sorted(model.root.rglob("*.png"))
    assert model.work_size == "model" and len(stored) == 4
    # stored at the model's resize (short side floor(32 / 0.8) = 40); the eval transform only centre-crops it
    first = np.array(Image.open(src / "cat" / stored[0].name).convert("RGB"))
    resized = model_resize(meta)(tv_tensors.Image(torch.from_numpy(first).permute(2, 0, 1)))  # as the eval loader
    assert _png(stored[0]).shape == (40, 40, 3) == tuple(resized.permute(1, 2, 0).shape)
    expected = corrupt_image(resized.permute(1, 2, 0).numpy(), "contrast", 2, image_seed(0, "contrast", 2, 0))
    np.testing.assert_array_equal(_png(stored[0]), expected)
    assert eval_transform_from_meta(meta)(Image.open(stored[0]))["image"].shape == (3, 32, 32)
    # the work size is part of the cache key: source, model and N never share a tree
    source = generate_corruptions(src, tmp_path / "c", "contrast", "2", work_size="source", model_meta=meta, **kw)
    side = generate_corruptions(src, tmp_path / "c", "contrast", "2", work_size=48, **kw)
    assert len({model.root, source.root, side.root}) == 3
    assert _png(next(source.root.rglob("*.png"))).shape == (96, 96, 3) == _png(next(side.root.rglob("*.png"))).shape
    # another model with the same geometry reuses the model-size tree; another geometry does not
    same = generate_corruptions(src, tmp_path / "c", "contrast", "2", work_size="model", model_meta=dict(meta), **kw)
    assert same.root == model.root and same.generated_cells == []
    other = generate_corruptions(src, tmp_path / "c", "contrast", "2", work_size="model",
                                 model_meta={**meta, "img_size": 48}, **kw)  # fmt: skip
    assert other.root != model.root
    with pytest.raises(ValueError, match="work size 'model' needs the model's metadata"):
        generate_corruptions(src, tmp_path / "c", "contrast", "2", work_size="model", **kw)


def test_model_size_equals_source_size_when_the_resize_is_identity(image_tree: Path, tmp_path: Path):
    """Images already at the model's size (the demo's synthetic sets) get the same pixels either way."""
    meta = {"img_size": 32, "crop_pct": 1.0, "interpolation": "bicubic"}
    kw = {"workers": 0, "progress": False}
    a = generate_corruptions(
        image_tree, tmp_path / "c", "shot_noise,pixelate", "3", work_size="model", model_meta=meta, **kw
    )
    b = generate_corruptions(image_tree, tmp_path / "c", "shot_noise,pixelate", "3", **kw)
    assert a.root != b.root
    for f in sorted(b.root.rglob("*.png")):
        np.testing.assert_array_equal(_png(f), _png(a.root / f.relative_to(b.root)))


def test_warns_when_a_corruption_leaves_the_images_unchanged(tmp_path: Path, caplog):
    # smooth 224 px images shrunk to a 32 px model: pixelate severity 1 at the source size vanishes in the resize
    rng = np.random.default_rng(0)
    src = tmp_path / "smooth"
    for c in ("a", "b"):
        (src / c).mkdir(parents=True)
        for i in range(2):
            low = rng.integers(40, 200, (8, 8, 3)).astype(np.uint8)
            Image.fromarray(low).resize((224, 224), Image.Resampling.BICUBIC).save(src / c / f"{i}.png")
    meta = {"img_size": 32, "crop_pct": 1.0, "interpolation": "bicubic"}
    kw = {"workers": 0, "progress": False, "model_meta": meta}
    with caplog.at_level(logging.WARNING, logger="tokenlab.eval.corruptions"):
        weak = generate_corruptions(src, tmp_path / "c", "pixelate,contrast", "1", work_size="source", **kw)
    assert weak.unchanged == [("pixelate", 1)] and weak.change["pixelate/1"] < UNCHANGED_THRESHOLD
    assert weak.change["contrast/1"] > 10
    assert "pixelate severity 1" in caplog.text and "--work-size model" in caplog.text
    assert "contrast severity" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tokenlab.eval.corruptions"):  # cached: the warning is repeated
        again = generate_corruptions(src, tmp_path / "c", "pixelate,contrast", "1", work_size="source", **kw)
    assert again.generated_cells == [] and again.unchanged == [("pixelate", 1)] and "pixelate severity 1" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tokenlab.eval.corruptions"):
        strong = generate_corruptions(src, tmp_path / "c", "pixelate", "1", work_size="model", **kw)
    assert strong.unchanged == [] and strong.change["pixelate/1"] > 10 * weak.change["pixelate/1"]
    assert "unchanged" not in caplog.text
