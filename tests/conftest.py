"""Shared test set-up: small thread count (CI has 2 cores) and a fixed seed for every test."""

from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny synthetic set with masks and a rendition split, generated once per session (segmentation tests)."""
    from tokenlab.data.synthetic import SynthConfig, generate

    root = tmp_path_factory.mktemp("synthetic")
    generate(root, SynthConfig(img_size=32, counts={"train": 16, "val": 8, "rendition": 4}), workers=1)
    return root
