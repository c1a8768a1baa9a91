"""`tokenlab eval`, `tokens` and `report` end to end on tiny runs; bad input gives one error line, exit 2."""

from __future__ import annotations

import json
from pathlib import Path

from evalhelpers import make_masked_set, make_run

from tokenlab.cli import main


def test_eval_tokens_report_cli(tmp_path: Path, capsys):
    data = make_masked_set(tmp_path / "synth")
    a, b = make_run(tmp_path / "a", token=False), make_run(tmp_path / "b", seed=1)
    common = ["--data", str(data), "--corruptions", "pixelate", "--severities", "1", "--cache-dir",
              str(tmp_path / "cache"), "--workers", "0"]  # fmt: skip
    assert main(["eval", "--checkpoint", str(a), *common]) == 0
    assert main(["eval", "--checkpoint", str(b), *common, "--reference", str(a), "--work-size", "source"]) == 0
    out = capsys.readouterr().out
    assert "official" in out and "cls" in out and "pixelate" in out
    assert "generated at the model's input size" in out and "generated at the source image size" in out
    ev = json.loads((b / "eval.json").read_text())
    assert ev["corruptions"]["official"]["reference"] == "a"
    # the console shows balanced accuracy and the majority rate, and says so when a model collapsed
    clean = ev["clean"]["official"]
    line = next(ln for ln in out.splitlines()[::-1] if ln.startswith("official "))
    assert f"{100 * clean['balanced_accuracy']:6.2f} {100 * clean['majority_rate']:6.2f}" in line
    assert ("COLLAPSED" in line) == clean["collapsed"]
    assert "bal." in out
    assert main(["tokens", str(a), str(b), "--data", str(data), "--examples", "2"]) == 0
    assert (b / "token_labels.png").is_file() and (b / "tokens.json").is_file()
    assert main(["report", str(a), str(b), "--out", str(tmp_path / "rep"), "--names", "base,stl"]) == 0
    assert (tmp_path / "rep" / "report.html").is_file()
    assert "| stl |" in (tmp_path / "rep" / "report.md").read_text()


def test_cli_bad_input(tmp_path: Path, capsys):
    data = make_masked_set(tmp_path / "synth")
    run = make_run(tmp_path / "r", classes=("x", "y"))
    assert main(["eval", "--checkpoint", str(run), "--data", str(data), "--workers", "0"]) == 2
    assert "checkpoint classes do not match" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(run), "--data", str(tmp_path / "none")]) == 2
    assert "data directory not found" in capsys.readouterr().err
    good = make_run(tmp_path / "g")
    assert main(["eval", "--checkpoint", str(good), "--data", str(data), "--corruptions", "fogg"]) == 2
    assert "unknown corruption 'fogg'" in capsys.readouterr().err
    assert (
        main(["eval", "--checkpoint", str(good), "--data", str(data), "--corruptions", "fog", "--work-size", "x"]) == 2
    )
    assert "bad work size 'x'" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 2
    assert "run directory not found" in capsys.readouterr().err
