"""`tokenlab eval`, `tokens` and `report` end to end on tiny runs; bad input gives one error line, exit 2."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from evalhelpers import make_masked_set, make_run, make_tree
from PIL import Image

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


def _domains(root: Path) -> dict[str, Path]:
    """Two domains of one 3-class task without masks, "dog" the rare class: photo (as generated) and sketch (grey)."""
    out = {}
    for domain in ("photo", "sketch"):
        tree = make_tree(root / domain, classes=("cat", "dog", "fish"), per_class=4)
        for img in sorted((tree / "dog").glob("*.png"))[1:]:
            img.unlink()  # unbalanced: 4 cat, 1 dog, 4 fish
        if domain == "sketch":
            for img in tree.rglob("*.png"):
                Image.open(img).convert("L").convert("RGB").save(img)
        out[domain] = tree
    return out


def test_eval_of_several_runs_shares_one_cache_and_fills_the_reference(tmp_path: Path, capsys, caplog):
    caplog.set_level(logging.INFO)
    dom = _domains(tmp_path / "data")
    classes = ("cat", "dog", "fish")
    student = make_run(tmp_path / "student", classes=classes, token=False, seed=1)
    baseline = make_run(tmp_path / "baseline", classes=classes, token=False)
    cache = tmp_path / "cache"
    args = ["eval", str(student), str(baseline), "--data", str(dom["photo"]), "--ood", f"sketch={dom['sketch']}",
            "--corruptions", "pixelate", "--severities", "2", "--cache-dir", str(cache), "--workers", "1"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    # the run named baseline is the reference although listed second, and it is evaluated first
    messages = [r.getMessage() for r in caplog.records]
    order = [m for m in messages if m.startswith(("mCE reference", "wrote"))]
    assert order[0].startswith("mCE reference: ") and order[0].endswith("baseline (evaluated first)")
    assert order[1].endswith(str(baseline / "eval.json")) and order[2].endswith(str(student / "eval.json"))
    assert "mCE: this run is the reference of the others" in out and "relative to baseline" in out
    ev_b = json.loads((baseline / "eval.json").read_text())
    ev_s = json.loads((student / "eval.json").read_text())
    assert ev_b["reference"] == {"name": "baseline", "path": None, "this_run": True}
    assert ev_s["reference"]["name"] == "baseline" and not ev_s["reference"]["this_run"]
    assert ev_s["corruptions"]["official"]["reference"] == "baseline"
    assert ev_s["corruptions"]["official"]["mce"] is not None
    assert ev_s["ood"]["sketch"]["official"]["n"] == 9
    # one generation, reused: a single cache tree, generated once
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 1
    generated = [m for m in messages if m.startswith("generating ")]
    assert len(generated) == 1 and "2 runs evaluated on one corruption cache" in " ".join(messages)
    # --workers 1 is what the logs say
    assert "in this process (1 worker)" in generated[0] and "worker processes" not in generated[0]
    assert "at the model's resize" in generated[0]
    clean_logs = [m for m in messages if m.startswith("clean evaluation")]
    assert len(clean_logs) == 2 and all("9 images at 32 px" in m and "1 loader worker process" in m
                                        for m in clean_logs)  # fmt: skip
    # the report of the two runs: verdict and noise statement, the OOD chart, the per-class table
    assert main(["report", str(baseline), str(student), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "## Verdict" in md and "- On clean top-1, student vs baseline" in md and "Wilson" in md
    assert (tmp_path / "rep" / "images" / "ood_bars.png").is_file()
    assert "| dog |" in md and "mCE: student relative to baseline" in md and "baseline is the reference" in md
    # with --out, several runs are refused in one line
    assert main([*args, "--out", str(tmp_path / "e.json")]) == 2
    assert "with several runs each one is written into its run directory" in capsys.readouterr().err
