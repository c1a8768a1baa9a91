"""``tokenlab.data.images``: images above PIL's decompression-bomb limit are skipped, named and counted (issue 16)."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tokenlab.data import build_dataset
from tokenlab.data.images import READ_ERRORS, ImageTooLarge, check_image, load_rgb

LIMIT = 500  # pixels: 16x16 images pass, 24x24 (576) are above the limit, 32x32 (1024) above twice the limit


def bomb_tree(root: Path) -> Path:
    """``root/a`` and ``root/b`` with two readable 16x16 images each, plus a 24x24 and a 32x32 image in ``a``."""
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    Image.fromarray(np.zeros((24, 24, 3), np.uint8)).save(root / "a" / "big.png")
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(root / "a" / "huge.png")
    return root


@pytest.fixture
def small_limit(monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", LIMIT)
    return LIMIT


def test_images_above_the_limit_are_read_errors(tmp_path: Path, small_limit: int) -> None:
    root = bomb_tree(tmp_path / "tree")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with pytest.raises(ImageTooLarge, match=r"24x24 = 576 pixels is above .* limit of 500"):
            load_rgb(root / "a" / "big.png")  # PIL itself only warns here and would decode it
        with pytest.raises(READ_ERRORS):
            load_rgb(root / "a" / "huge.png")  # PIL raises DecompressionBombError
        assert "DecompressionBombError" in (check_image(root / "a" / "huge.png") or "")
        assert "ImageTooLarge" in (check_image(root / "a" / "big.png") or "")
    assert check_image(root / "a" / "0.png") is None and load_rgb(root / "a" / "0.png").size == (16, 16)


def test_training_skips_names_and_counts_oversized_images(tmp_path: Path, small_limit: int, caplog) -> None:
    root = bomb_tree(tmp_path / "tree")
    with caplog.at_level(logging.WARNING, logger="tokenlab.data.images"), warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        ds = build_dataset(root, split=None)
        assert len(ds) == 4 and sorted(p.name for p in ds.skipped) == ["big.png", "huge.png"]
        assert all(ds[i]["image"].shape[-2:] == (16, 16) for i in range(len(ds)))
    assert "huge.png" in caplog.text and "big.png" in caplog.text and "skipped 2 unreadable of 6" in caplog.text
