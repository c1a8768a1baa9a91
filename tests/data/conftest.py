"""Shared fixtures: one small synthetic data set per test session."""

from pathlib import Path

import pytest

from tokenlab.data.synthetic import SynthConfig, generate


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    generate(out, SynthConfig(seed=7, counts={"train": 120, "val": 40, "rendition": 30, "shortcut": 30}))
    return out
