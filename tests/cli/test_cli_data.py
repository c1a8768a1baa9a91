"""`tokenlab data synth` and `tokenlab data show` end to end."""

from pathlib import Path

import pytest

from tokenlab.cli import main


def test_synth_then_show(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "synth"
    assert (
        main(
            [
                "data",
                "synth",
                "--out",
                str(out),
                "--train",
                "40",
                "--val",
                "20",
                "--rendition",
                "10",
                "--shortcut",
                "10",
            ]
        )
        == 0
    )
    assert "train" in capsys.readouterr().out and (out / "dataset.json").exists()
    png = tmp_path / "show" / "grid.png"
    assert main(["data", "show", str(out), "--out", str(png), "--count", "4", "--ibot"]) == 0
    for path in (png, png.with_name("grid_pairs.png"), png.with_name("grid_ibot.png")):
        assert path.stat().st_size > 1000 and path.read_bytes()[:4] == b"\x89PNG"


def test_show_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["data", "show", str(tmp_path / "nope"), "--out", str(tmp_path / "x.png")]) == 2
    assert "not found" in capsys.readouterr().err
