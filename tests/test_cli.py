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
