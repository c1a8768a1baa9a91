"""A tiny synthetic data set shared by the segmentation tests (generated once per session)."""

from pathlib import Path

import pytest

from tokenlab.data.synthetic import SynthConfig, generate


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    generate(root, SynthConfig(img_size=32, counts={"train": 16, "val": 8, "rendition": 4}), workers=1)
    return root
