"""Corruptions: per-image seeding, small images, the on-disk cache and ImageNet-C tree reading."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tokenlab.eval.corruptions import (
    ALL_CORRUPTIONS,
    corrupt_image,
    generate_corruptions,
    image_seed,
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
