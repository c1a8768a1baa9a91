"""``tokenlab models convert``: a published checkpoint becomes an export that evaluation and the STL student take."""

import argparse
from pathlib import Path

import pytest
import timm
import torch

from tokenlab.cli import main
from tokenlab.data import eval_transform_from_meta
from tokenlab.methods import build_method
from tokenlab.models import load_exported

NAME = "fan_nano_6_p16_224_token"


def _saver_file(path: Path) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A timm CheckpointSaver-style file (model + EMA weights + pickled args) of a 3-class nano token FAN."""
    plain, ema = timm.create_model(NAME, num_classes=3).eval(), timm.create_model(NAME, num_classes=3).eval()
    torch.save(
        {
            "epoch": 5,
            "arch": NAME,
            "state_dict": plain.state_dict(),
            "state_dict_ema": ema.state_dict(),
            "args": argparse.Namespace(model=NAME, model_ema=True),
            "version": 2,
        },
        path,
    )
    return plain, ema


def test_convert_then_evaluate_and_label(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plain, ema = _saver_file(tmp_path / "labeler.pth.tar")
    assert main(["models", "convert", str(tmp_path / "labeler.pth.tar"), "--model", NAME, "--out",
                 str(tmp_path / "conv" / "model")]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "weights from 'state_dict_ema'" in out and "bicubic crop_pct 1.0" in out
    model, meta = load_exported(tmp_path / "conv")  # a run-directory-like export: eval / tokens read it so
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ema(x), rtol=0, atol=0)
    tf = eval_transform_from_meta(meta)
    assert (tf.img_size, tf.interpolation, tf.crop_pct) == (64, "bicubic", 1.0)
    student = timm.create_model(NAME, num_classes=3)
    method = build_method("stl_student", model=student, labeler=str(tmp_path / "conv"))
    torch.testing.assert_close(method.teacher.head.weight, ema.head.weight)

    assert main(["models", "convert", str(tmp_path / "labeler.pth.tar"), "--model", NAME, "--out",
                 str(tmp_path / "plain"), "--prefer", "model"]) == 0  # fmt: skip
    model, meta = load_exported(tmp_path / "plain")
    torch.testing.assert_close(model.head.weight, plain.head.weight)
    assert meta["source"]["entry"] == "state_dict"


def test_convert_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "convert", str(tmp_path / "missing.pth.tar"), "--model", NAME, "--out", "x"]) == 2
    assert capsys.readouterr().err.startswith("error: checkpoint not found")
    _saver_file(tmp_path / "labeler.pth.tar")
    args = ["models", "convert", str(tmp_path / "labeler.pth.tar"), "--model", "fan_nano_6_p16_224", "--out", "x"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "unexpected keys" in err and "aux_head.weight" in err
