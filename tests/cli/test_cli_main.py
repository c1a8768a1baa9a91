"""The command line entry point: help, model listing, clean errors."""

import pytest

from tokenlab.cli import main


def test_help_lists_subcommands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    assert "models" in capsys.readouterr().out


def test_models_lists_counts(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "--filter", "fan_tiny_12*"]) == 0
    out = capsys.readouterr().out
    assert "fan_tiny_12_p16_224 " in out and "7.32M" in out
    assert "fan_tiny_12_p16_224_token" in out


def test_unknown_filter_is_a_clean_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "--filter", "nothing_like_this*"]) == 2
    assert capsys.readouterr().err.startswith("error: no model matches")


def test_an_aborted_training_is_a_message_not_a_traceback(monkeypatch, capsys: pytest.CaptureFixture[str]) -> None:
    from tokenlab import cli
    from tokenlab.engine.trainer import NonFiniteLossError, PeerFailureError

    for err in (NonFiniteLossError("3 non-finite losses in a row"), PeerFailureError("another rank stopped answering")):

        def boom(cfg, _err=err):
            raise _err

        monkeypatch.setattr("tokenlab.engine.train", boom)
        assert cli.main(["train", "--config", "cifar10_fan_baseline", "train.device=cpu"]) == 1
        assert capsys.readouterr().err.strip().endswith(f"error: {err}")


def _subparsers(parser):
    """(path, parser) of every leaf sub-command, e.g. ('segment eval', <parser>)."""
    import argparse

    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                inner = _subparsers(child)
                out += [(f"{name} {path}", p) for path, p in inner] if inner else [(name, child)]
    return out


def test_runtime_flags_are_the_same_everywhere() -> None:
    from tokenlab.cli import build_parser
    from tokenlab.utils.amp import AMP_CHOICES

    seen: dict[str, set[str]] = {}
    for path, parser in _subparsers(build_parser()):
        for action in parser._actions:
            flag = next((o for o in action.option_strings if o.startswith("--")), None)
            if flag not in ("--device", "--amp", "--batch-size", "--workers"):
                continue
            seen.setdefault(flag, set()).add(path)
            if flag == "--amp":
                assert tuple(action.choices) == AMP_CHOICES, path
            if flag == "--device":
                for good in ("auto", "cpu", "cuda", "cuda:1"):
                    assert action.type(good) == good, (path, good)
            if flag in ("--batch-size", "--workers"):
                assert action.type is int, (path, flag)
    # every evaluation command has the full set; the demo and `data synth` only what they use
    for path in ("eval", "tokens", "eval-ssl"):
        assert all(path in seen[f] for f in ("--device", "--amp", "--batch-size", "--workers")), path
    assert {"segment eval", "demo"} <= seen["--device"] and "segment eval" in seen["--amp"]
    assert "data synth" in seen["--workers"]


@pytest.mark.parametrize(
    "argv",
    [
        ["eval", "--checkpoint", "x", "--data", "y", "--device", "gpu"],
        ["eval-ssl", "r", "--amp", "fp32"],
        ["demo", "--device", "cuda:x"],
    ],
)
def test_bad_runtime_flag_is_a_usage_error(argv, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "invalid" in capsys.readouterr().err


def test_device_resolution(monkeypatch) -> None:
    import torch

    from tokenlab.cli.common import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu" and resolve_device("cpu") == "cpu"
    with pytest.raises(ValueError, match="no CUDA device"):
        resolve_device("cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda:0" and resolve_device("cuda:1") == "cuda:1"


def test_eval_ssl_fp16_on_cpu_is_one_error_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval-ssl", "some-run", "--amp", "fp16", "--device", "cpu"]) == 2
    assert capsys.readouterr().err.strip() == "error: amp=fp16 needs a CUDA device (use bf16 on CPU)"


def test_python_m_tokenlab_cli_help() -> None:
    import os
    import subprocess
    import sys
    from pathlib import Path

    import tokenlab

    env = dict(os.environ, PYTHONPATH=str(Path(tokenlab.__file__).parents[1]))
    proc = subprocess.run(
        [sys.executable, "-m", "tokenlab.cli", "--help"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "eval-ssl" in proc.stdout and "demo" in proc.stdout
    sub = subprocess.run(
        [sys.executable, "-m", "tokenlab.cli", "tokens", "--help"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert sub.returncode == 0 and "--amp {none,bf16,fp16}" in sub.stdout
