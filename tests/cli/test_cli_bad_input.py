"""Bad input to the evaluation commands: one ``error:`` line, exit 2, before any work (issue 16, items 3, 6, 11).

Unwritable locations are made with a path under a regular file: that blocks writes for every user, root included
(``chmod`` does not stop root, and these tests may run as root).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from evalhelpers import TINY_KW, make_masked_set, make_run

from tokenlab.cli import main
from tokenlab.models import save_exported


@pytest.fixture
def blocked(tmp_path: Path) -> Path:
    """A regular file: any path under it can be neither created nor written."""
    path = tmp_path / "a-file"
    path.write_text("not a directory")
    return path


@pytest.fixture
def no_work(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record (and refuse) any evaluation that starts: the checks must come first."""
    started: list[str] = []

    def refuse(name: str):
        def run(*args, **kwargs):
            started.append(name)
            raise AssertionError(f"{name} started although its output is unwritable")

        return run

    import tokenlab.eval.linear as linear
    import tokenlab.eval.robustness as robustness
    import tokenlab.eval.segmentation as segmentation
    import tokenlab.eval.tokens as tokens

    monkeypatch.setattr(robustness, "evaluate_classifier_run", refuse("eval"))
    monkeypatch.setattr(tokens, "analyze_run", refuse("tokens"))
    monkeypatch.setattr(linear, "evaluate_ssl_run", refuse("eval-ssl"))
    monkeypatch.setattr(segmentation, "evaluate_segmentation_run", refuse("segment eval"))
    return started


def _error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_unwritable_outputs_fail_before_any_work(tmp_path, blocked, no_work, capsys) -> None:
    data = make_masked_set(tmp_path / "synth")
    run = make_run(tmp_path / "run")
    ev = ["eval", "--checkpoint", str(run), "--data", str(data), "--workers", "0"]
    assert main([*ev, "--out", str(blocked / "eval.json")]) == 2
    assert f"--out directory {blocked} is a file" in _error(capsys)
    assert main([*ev, "--out", str(tmp_path)]) == 2  # a directory where the JSON file belongs
    assert "is a directory" in _error(capsys)
    assert main([*ev, "--corruptions", "pixelate", "--cache-dir", str(blocked / "cache")]) == 2
    assert f"--cache-dir {blocked / 'cache'} is not writable" in _error(capsys)
    assert main(["eval-ssl", str(run), "--data", str(data), "--out", str(blocked / "x" / "ssl.json")]) == 2
    assert "--out directory" in _error(capsys)
    assert main(["segment", "eval", str(run), "--root", str(data), "--out", str(blocked / "seg")]) == 2
    assert "--out" in _error(capsys)
    assert main(["segment", "eval", str(run), "--root", str(data), "--out", str(tmp_path / "seg"),
                 "--corruptions", "fog", "--cache-dir", str(blocked / "c")]) == 2  # fmt: skip
    assert "--cache-dir" in _error(capsys)
    assert no_work == []

    # the default output: RUN/eval.json, here blocked by a directory of that name
    (run / "eval.json").mkdir()
    assert main(ev) == 2
    assert f"{run / 'eval.json'} is a directory" in _error(capsys)
    assert no_work == []


def test_report_and_data_outputs_are_checked_up_front(tmp_path, blocked, monkeypatch, capsys) -> None:
    run = make_run(tmp_path / "run")
    assert main(["report", str(run), "--out", str(blocked / "rep")]) == 2
    assert f"report directory {blocked / 'rep'} is not writable" in _error(capsys)

    import tokenlab.data.synthetic as synthetic

    monkeypatch.setattr(synthetic, "generate", lambda *a, **k: pytest.fail("generation started"))
    assert main(["data", "synth", "--out", str(blocked / "set")]) == 2
    assert "--out" in _error(capsys)
    assert main(["data", "show", "cifar10", "--out", str(blocked / "grid.png")]) == 2
    assert "--out directory" in _error(capsys)


def test_tokens_checks_every_run_directory_first(tmp_path, blocked, no_work, capsys) -> None:
    data = make_masked_set(tmp_path / "synth")
    good = make_run(tmp_path / "good")
    # the second export's directory is a file's child: the first analysis must not even start
    assert main(["tokens", str(good), str(blocked / "model.json"), "--data", str(data)]) == 2
    assert "no exported model" in _error(capsys)
    assert no_work == []


def _ibot_export(run_dir: Path, classes: tuple[str, ...] = ("cat", "dog")) -> Path:
    """What an iBOT run exports: the backbone without a classifier, the data set's class names, method ibot."""
    model = timm.create_model("fan_nano_6_p16_224", num_classes=0, **TINY_KW)
    meta = {"model": "fan_nano_6_p16_224", "model_kwargs": {**TINY_KW, "num_classes": 0}, "num_classes": 0,
            "classes": list(classes), "img_size": 32, "method": "ibot", "backbone": "teacher"}  # fmt: skip
    save_exported(model, run_dir / "model", meta)
    return run_dir


def test_eval_and_tokens_refuse_a_backbone_export(tmp_path, no_work, capsys) -> None:
    data = make_masked_set(tmp_path / "synth")
    run = _ibot_export(tmp_path / "ibot")
    assert main(["eval", "--checkpoint", str(run), "--data", str(data), "--workers", "0"]) == 2
    err = _error(capsys)
    assert "without a classifier" in err and "method 'ibot'" in err and f"tokenlab eval-ssl {run}" in err
    assert main(["tokens", str(run), "--data", str(data)]) == 2
    assert "tokenlab eval-ssl" in _error(capsys)
    assert not (run / "eval.json").exists() and not (run / "tokens.json").exists()
    assert no_work == []


@pytest.mark.parametrize(
    "argv",
    [
        ["eval", "--checkpoint", "RUN", "--data", "DATA", "--device", "cuda"],
        ["tokens", "RUN", "--data", "DATA", "--device", "cuda:0"],
        ["eval-ssl", "RUN", "--data", "DATA", "--device", "cuda"],
        ["segment", "eval", "RUN", "--root", "DATA", "--device", "cuda"],
    ],
)
def test_cuda_without_a_gpu_is_one_error_line(argv, tmp_path, monkeypatch, no_work, capsys) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    run, data = make_run(tmp_path / "run"), make_masked_set(tmp_path / "synth")
    argv = [str(run) if a == "RUN" else str(data) if a == "DATA" else a for a in argv]
    assert main(argv) == 2
    assert "no CUDA device is available" in _error(capsys)
    assert no_work == []


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"", "is not valid JSON"),
        (b'{"model": "fan_nano_6_p16_224", "model_kw', "is not valid JSON"),  # truncated
        (b"\xff\xfe\x00\x01garbage", "is not valid JSON"),  # not text at all
        (b"[1, 2]", "does not hold a JSON object"),
        (b'{"num_classes": 2}', "names no model"),
        (b'{"model": "fan_nano_6_p16_224", "model_kwargs": [1]}', "'model_kwargs' must be a JSON object"),
        (b'{"model": "no_such_model_xyz"}', "unknown model 'no_such_model_xyz'"),
        (b'{"model": "fan_nano_6_p16_224", "model_kwargs": {"bogus": 1}}', "model_kwargs do not fit"),
    ],
)
def test_a_corrupt_model_json_is_named(content, problem, tmp_path, capsys) -> None:
    data = make_masked_set(tmp_path / "synth")
    run = make_run(tmp_path / "run")
    (run / "model.json").write_bytes(content)
    for argv in (
        ["eval", "--checkpoint", str(run), "--data", str(data), "--workers", "0"],
        ["tokens", str(run), "--data", str(data)],
        ["eval-ssl", str(run), "--data", str(data)],
    ):
        assert main(argv) == 2
        err = _error(capsys)
        assert str(run / "model.json") in err and problem in err, (argv[0], err)


def test_eval_on_a_split_folder_root_suggests_the_split(tmp_path, capsys) -> None:
    from evalhelpers import make_tree

    root = tmp_path / "imagefolder"
    for split in ("train", "val"):
        make_tree(root / split, per_class=1)
    run = make_run(tmp_path / "run")
    assert main(["eval", "--checkpoint", str(run), "--data", str(root), "--workers", "0"]) == 2
    err = _error(capsys)
    assert f"{root}:val" in err and "split" in err
    assert main(["eval", "--checkpoint", str(run), "--data", f"{root}:val", "--workers", "0", "--ood", "none"]) == 0
    assert json.loads((run / "eval.json").read_text())["data"] == str(root / "val")


def test_eval_skips_names_and_counts_an_image_above_the_pixel_limit(tmp_path, monkeypatch, caplog, capsys) -> None:
    import logging
    import warnings

    import numpy as np
    from evalhelpers import make_tree
    from PIL import Image

    tree = make_tree(tmp_path / "tree", per_class=2)  # 32x32 images
    Image.fromarray(np.zeros((48, 48, 3), np.uint8)).save(tree / "cat" / "huge.png")  # 2304 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1500)
    run = make_run(tmp_path / "run")
    with caplog.at_level(logging.WARNING, logger="tokenlab.data.images"), warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        assert main(["eval", "--checkpoint", str(run), "--data", str(tree), "--workers", "0", "--ood", "none"]) == 0
    assert "huge.png" in caplog.text
    clean = json.loads((run / "eval.json").read_text())["clean"]["official"]
    assert clean["skipped"] == 1 and clean["n"] == 4, clean
    assert "unreadable images skipped: 1 (named in the log)" in capsys.readouterr().out
