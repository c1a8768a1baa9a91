"""`tokenlab detect data|train|eval` end to end on a tiny synthetic set, resumable, and its one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tokenlab.cli import main

TINY = [
    "model.kwargs.backbone_kwargs={patch_size: 4, embed_dim: 32, depth: 1, num_heads: 2}",
    "model.kwargs.min_size=32", "model.kwargs.max_size=32", "model.kwargs.fpn_dim=16",
    "model.kwargs.box_head_dim=32", "model.kwargs.mask_head_dim=8", "data.img_size=32", "data.batch_size=2",
    "data.val_subset=2", "schedule.max_steps=2", "train.device=cpu",
]  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("det") / "data"
    assert main(["detect", "data", "--out", str(root), "--train", "4", "--val", "2", "--img-size", "32"]) == 0
    return root


@pytest.mark.slow  # ~30 s on 2 shared cores: three short trainings, a clean and a corrupted evaluation
def test_train_resume_and_eval(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    assert main(["detect", "train", "--run-dir", str(run), f"data.root={data}", *TINY]) == 0
    assert "trained 2 steps" in capsys.readouterr().out
    meta = json.loads((run / "model.json").read_text())
    assert meta["model"] == "mask_rcnn" and meta["task"] == "detection" and meta["num_classes"] == 10
    # resumable through the engine: continue to step 3 from the checkpoint
    assert main(["detect", "train", "--run-dir", str(run), "--resume", "auto", f"data.root={data}", *TINY[:-2],
                 "schedule.max_steps=3", "train.device=cpu"]) == 0  # fmt: skip
    assert "trained 3 steps" in capsys.readouterr().out
    code = main(["detect", "eval", str(run), "--root", str(data), "--corruptions", "gaussian_noise",
                 "--severities", "1", "--cache-dir", str(tmp_path / "cache"), "--workers", "0"])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "box  AP" in out and "mPC" in out and "rPC" in out
    result = json.loads((run / "detection" / "detection.json").read_text())
    assert set(result["clean"]["box"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert result["corruptions"] == ["gaussian_noise"] and "mask" in result["mPC"]


def test_errors_are_one_line(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["detect", "train", "--run-dir", str(tmp_path / "r"), *TINY]) == 2  # no data.root
    assert "tokenlab detect data" in capsys.readouterr().err
    fake = tmp_path / "cls"
    fake.mkdir()
    (fake / "model.json").write_text(json.dumps({"model": "fan_nano_6_p16_224", "model_kwargs": {}}))
    (fake / "model.safetensors").write_bytes(b"")
    assert main(["detect", "eval", str(fake), "--root", str(data)]) == 2
    assert capsys.readouterr().err.startswith("error:")
    bad = tmp_path / "bad"
    (bad / "annotations").mkdir(parents=True)
    (bad / "annotations" / "instances_val.json").write_text("{}")
    assert main(["detect", "train", "--run-dir", str(tmp_path / "r2"), f"data.root={bad}", "data.train_split=val",
                 *TINY]) == 2  # fmt: skip
    assert "lacks the COCO list" in capsys.readouterr().err
