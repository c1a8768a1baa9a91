"""Shared fixtures: tiny image trees on disk."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image


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


@pytest.fixture
def image_tree(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "clean")
