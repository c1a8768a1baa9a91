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
