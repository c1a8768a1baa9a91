"""Report on two tiny runs: Markdown + self-contained HTML, every referenced image exists."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest
from evalhelpers import make_masked_set, make_run, make_tree

from tokenlab.eval.report import write_report
from tokenlab.eval.robustness import evaluate_classifier_run
from tokenlab.eval.tokens import analyze_run
from tokenlab.eval.visualize import save_token_pictures


@pytest.mark.slow
def test_report_on_two_tiny_runs(tmp_path: Path):
    data = make_masked_set(tmp_path / "synth")
    make_tree(data / "rendition", classes=("dog",), per_class=2)
    runs = [make_run(tmp_path / "baseline", token=False), make_run(tmp_path / "stl", seed=1)]
    corr = dict(corruptions="contrast,fog", severities="1,2", cache_dir=tmp_path / "c", workers=0, progress=False)
    evaluate_classifier_run(runs[0], data, **corr)
    evaluate_classifier_run(runs[1], data, reference=runs[0], **corr)
    for r in runs:
        save_token_pictures(analyze_run(r, data, num_examples=2), r)
    files = write_report(runs, tmp_path / "report")
    md = files.markdown.read_text()
    refs = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(refs) == len(files.images) >= 7  # bars, severity, reliability, 2x2 token pictures, training
    for ref in refs:
        assert (files.markdown.parent / ref).is_file(), ref
    assert "| baseline |" in md and "| stl |" in md and "## Token labels" in md and "rendition" in md
    assert "## Class balance" in md and "| rendition |" in md.split("## Class balance")[1]
    page = files.html.read_text()
    assert "images/" not in page.split("<body>")[1].replace("images/png", "")  # nothing points outside the file
    blobs = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(blobs) == len(refs)
    assert all(base64.b64decode(b)[:8] == b"\x89PNG\r\n\x1a\n" for b in blobs)
    assert "<table>" in page


def test_report_errors(tmp_path: Path):
    with pytest.raises(ValueError, match="no run directory"):
        write_report([], tmp_path / "r")
    with pytest.raises(FileNotFoundError, match="run directory not found"):
        write_report([tmp_path / "missing"], tmp_path / "r")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="nothing to report"):
        write_report([tmp_path / "empty"], tmp_path / "r")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "eval.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        write_report([tmp_path / "bad"], tmp_path / "r")


def _balance(top1: float, bal: float, major: int, rate: float, true_rate: float, collapsed: bool) -> dict:
    entropy = 0.1 if collapsed else 0.9
    confusion = [[0] * 3 for _ in range(3)]
    for t in range(3):  # 10 images per class: the majority class takes rate * 30 of them, the rest are right
        confusion[t][major] += round(rate * 10)
        confusion[t][t] += 10 - round(rate * 10)
    return {"top1": top1, "balanced_accuracy": bal, "majority_class": major, "majority_rate": rate,
            "majority_true_rate": true_rate, "prediction_entropy": entropy, "collapsed": collapsed,
            "confusion": confusion}  # fmt: skip


def test_report_shows_class_balance_and_flags_a_collapse(tmp_path: Path):
    # two hand-written eval.json files: "student" collapsed onto class "cat" on the sketch set, "baseline" did not
    classes = ["cat", "dog", "fish"]
    runs = {
        "baseline": {"clean": _balance(0.9, 0.88, 1, 0.36, 0.33, False),
                     "ood": {"sketch": {"subset": [0, 1, 2], "official": _balance(0.4, 0.4, 2, 0.4, 0.33, False)}}},
        "student": {"clean": _balance(0.92, 0.9, 0, 0.34, 0.33, False),
                    "ood": {"sketch": {"subset": [0, 1, 2], "official": _balance(0.35, 0.33, 0, 0.97, 0.33, True)}}},
    }  # fmt: skip
    dirs = []
    for name, e in runs.items():
        (tmp_path / name).mkdir()
        body = {"model": "fan", "classes": classes, "clean": {"official": e["clean"]}, "ood": e["ood"]}
        (tmp_path / name / "eval.json").write_text(json.dumps(body))
        dirs.append(tmp_path / name)
    files = write_report(dirs, tmp_path / "report")
    md = files.markdown.read_text()
    assert "## Class balance" in md
    pictures = sorted(p.name for p in files.images if p.name.startswith("confusion_"))
    assert pictures == ["confusion_clean.png", "confusion_sketch.png"]
    assert all((tmp_path / "report" / "images" / p).read_bytes()[:4] == b"\x89PNG" for p in pictures)
    assert "| sketch | 40.0 / 40.0 (fish) | 33.0 / 97.0 (cat) |" in md
    assert "| clean | 88.0 / 36.0 (dog) | 90.0 / 34.0 (cat) |" in md
    flags = [line for line in md.splitlines() if line.startswith("COLLAPSED")]
    assert flags == [flags[0]] and "student predicts class cat for 97 % of the sketch set" in flags[0]
    # no collapse anywhere: said in words
    alone = {"model": "fan", "classes": classes, "clean": {"official": runs["student"]["clean"]}}
    (tmp_path / "student" / "eval.json").write_text(json.dumps(alone))
    md = write_report([tmp_path / "student"], tmp_path / "report2").markdown.read_text()
    assert "No run has collapsed" in md and "COLLAPSED" not in md
