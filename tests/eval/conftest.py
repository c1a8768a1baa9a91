"""Shared fixtures of the eval tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from evalhelpers import make_tree


@pytest.fixture
def image_tree(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "clean")
