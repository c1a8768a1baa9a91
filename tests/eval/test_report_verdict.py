"""`tokenlab report` for any runs: the verdict and noise statement (run by run, or paired across seeds), the OOD bar
chart with intervals, the per-class table and the mCE reference sentence, from hand-written eval.json files."""

from __future__ import annotations

import json
from pathlib import Path

from tokenlab.eval.report import write_report
from tokenlab.eval.verdict import wilson_interval

CLASSES = ["cat", "dog", "fish"]


def _set(top1: float, n: int, per_class: list[float | None]) -> dict:
    present = [a for a in per_class if a is not None]
    return {"top1": top1, "n": n, "per_class_accuracy": per_class, "balanced_accuracy": sum(present) / len(present),
            "majority_class": 0, "majority_rate": 0.4, "majority_true_rate": 0.4, "prediction_entropy": 0.9,
            "collapsed": False}  # fmt: skip


def _write(root: Path, name: str, clean: float, sketch: float, n: int = 1000, mce_ref: str | None = None) -> Path:
    run = root / name
    run.mkdir(parents=True)
    body = {
        "name": name, "model": "fan", "classes": CLASSES,
        "clean": {"official": _set(clean, n, [clean, clean, None])},
        "ood": {"sketch": {"subset": [0, 1, 2], "official": _set(sketch, n // 2, [sketch, 0.0, 1.0])}},
    }  # fmt: skip
    if mce_ref is not None:
        acc = {"fog": {"1": clean - 0.1}}
        body["corruptions"] = {"official": {"accuracy": acc, "per_corruption": {"fog": clean - 0.1},
                                            "per_severity": {"1": clean - 0.1}, "robust_accuracy": clean - 0.1,
                                            "retention": 0.9, "mce": 0.95, "ce": {"fog": 0.95},
                                            "reference": mce_ref}}  # fmt: skip
    (run / "eval.json").write_text(json.dumps(body))
    return run


def test_report_verdict_for_two_runs_without_seeds(tmp_path: Path) -> None:
    # the reference is the run named baseline even when it is listed second
    student = _write(tmp_path, "student", clean=0.82, sketch=0.60, mce_ref="baseline")
    baseline = _write(tmp_path, "baseline", clean=0.80, sketch=0.40)
    files = write_report([student, baseline], tmp_path / "rep")
    md = files.markdown.read_text()
    verdict = md[md.index("## Verdict") :]
    lo, hi = wilson_interval(0.82, 1000)
    assert f"- On clean top-1, student vs baseline: 82.0 % [{100 * lo:.1f}, {100 * hi:.1f}] vs 80.0 %" in verdict
    clean_line = next(line for line in verdict.splitlines() if line.startswith("- On clean top-1"))
    assert "within noise (the 95 % intervals overlap)" in clean_line
    sketch_line = next(line for line in verdict.splitlines() if line.startswith("- On top-1 on the sketch set"))
    assert "student is ahead (the 95 % intervals do not overlap)" in sketch_line and "(+20.0 points)" in sketch_line
    assert "One evaluation per run, compared with baseline" in verdict and "seed-to-seed variation" in verdict
    assert "`<model>_s<seed>`" in verdict  # how to get the paired comparison
    # the OOD chart with interval bars, and the per-class table (fish is absent from the clean set)
    chart = tmp_path / "rep" / "images" / "ood_bars.png"
    assert chart in files.images and chart.read_bytes()[:4] == b"\x89PNG"
    assert "## Per-class accuracy" in md
    assert "| fish | – | – |" in md and "| dog | 0.0 | 0.0 |" in md
    assert "| cat | 82.0 | 80.0 |" in md  # clean set, columns in run order (student, baseline)
    # the mCE reference in words
    assert "mCE: student relative to baseline" in md
    assert "<h2>Verdict</h2>" in files.html.read_text()


def test_report_verdict_pairs_runs_that_share_a_seed_list(tmp_path: Path) -> None:
    runs = []
    for seed, (b, s) in enumerate([(0.80, 0.82), (0.70, 0.74), (0.90, 0.90)]):
        runs.append(_write(tmp_path, f"student_s{seed}", clean=s, sketch=0.5 + 0.1 * seed + 0.05))
        runs.append(_write(tmp_path, f"baseline_s{seed}", clean=b, sketch=0.5 + 0.1 * seed))
    md = write_report(runs, tmp_path / "rep").markdown.read_text()
    verdict = md[md.index("## Verdict") :]
    clean_line = next(line for line in verdict.splitlines() if line.startswith("- On clean top-1"))
    # differences 0.02, 0.04, 0.00: mean +2.0 points, 95 % t interval holds 0
    assert "student - baseline = +2.0 points" in clean_line and "over 3 seeds (sd 2.0)" in clean_line
    assert "within noise: the interval holds 0" in clean_line
    sketch_line = next(line for line in verdict.splitlines() if "sketch" in line and line.startswith("- "))
    assert "student is ahead" in sketch_line  # +5 points on every seed: sd 0, the interval excludes 0
    assert "Runs paired by seed (0, 1, 2)" in verdict
    assert "| baseline | 80.0 ± 10.0 |" in verdict  # mean ± sd table, the reference model first
    assert "Wilson" not in verdict  # no run-by-run intervals when the runs are paired


def test_a_study_verdict_replaces_the_automatic_one(tmp_path: Path) -> None:
    runs = [_write(tmp_path, "baseline", 0.8, 0.4), _write(tmp_path, "student", 0.9, 0.5)]
    md = write_report(runs, tmp_path / "rep", verdict="study words\n\nsecond paragraph").markdown.read_text()
    assert md.count("## Verdict") == 1 and "study words" in md and "95 %" not in md[md.index("## Verdict") :]
    # one run: nothing to compare, no verdict section
    assert "## Verdict" not in write_report(runs[:1], tmp_path / "one").markdown.read_text()
