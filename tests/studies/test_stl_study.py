"""The STL study pipeline as `scripts/cifar10_stl.py` drives it, on a tiny synthetic set instead of CIFAR-10."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tokenlab.data import SynthConfig, generate
from tokenlab.eval.verdict import seed_statistics, wilson_interval
from tokenlab.studies.stl_study import (
    Stage,
    StlStudy,
    TrainStage,
    format_seed_table,
    run_stages,
)

pytestmark = pytest.mark.slow  # subprocesses / whole pipelines: tens of seconds on 2 cores

SCRIPT = Path(__file__).parents[2] / "scripts" / "cifar10_stl.py"
TINY = ["data.name=synthetic", "data.val_split=val", "model.kwargs.patch_size=8", "model.kwargs.depth=1",
        "model.kwargs.embed_dim=32", "model.kwargs.num_heads=2", "schedule.max_steps=2", "log.tensorboard=false",
        "train.min_free_disk_mb=0", "data.train_subset=24", "data.val_subset=8"]  # fmt: skip


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    generate(root, SynthConfig(img_size=32, counts={"train": 32, "val": 16, "rendition": 0, "shortcut": 0}), workers=1)
    return root


def _script():
    spec = importlib.util.spec_from_file_location("cifar10_stl", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cifar10_script_trains_three_stages_then_resume_keeps_them(synth: Path, tmp_path: Path, caplog) -> None:
    script = _script()
    out = tmp_path / "study"
    argv = ["--out", str(out), "--workers", "0", "--epochs", "1", "--batch-size", "8",
            "--override", f"data.root={synth}", *TINY]  # fmt: skip
    script.main(argv)
    results = json.loads((out / "results.json").read_text())
    assert list(results["runs"]) == ["labeler", "baseline", "student"]
    for name, run in results["runs"].items():
        assert (out / name / "model.safetensors").is_file()
        assert run["steps"] == 2 and run["loss_curve"] and run["val_curve"] and "acc1" in run["final_val"]
        assert run["config"]["run_dir"] == str(out / name) and run["config"]["schedule"]["epochs"] == 1
    assert results["runs"]["student"]["config"]["method"]["kwargs"]["labeler"] == str(out / "labeler")
    assert results["settings"]["batch_size"] == 8 and results["settings"]["device"] == "cpu"

    caplog.clear()
    with caplog.at_level("INFO", logger="cifar10_stl"):
        script.main([*argv, "--resume"])
    kept = [r.getMessage() for r in caplog.records if "finished earlier, kept" in r.getMessage()]
    assert len(kept) == 3
    again = json.loads((out / "results.json").read_text())
    assert again["runs"] == results["runs"]  # nothing retrained: same records


def test_a_stage_without_its_record_is_trained_again(synth: Path, tmp_path: Path) -> None:
    stage = TrainStage("baseline", "synthetic_fan_baseline", (f"data.root={synth}", "data.batch_size=8", *TINY))
    records: dict[str, object] = {}
    study = StlStudy(tmp_path, [stage], finished=lambda name: name in records)
    calls: list[tuple[str, bool]] = []

    def on_trained(s: TrainStage, trained) -> None:
        calls.append((s.name, trained is not None))
        if trained is not None:
            records[s.name] = trained.result.step

    reports = run_stages(study.training_stages(on_trained))
    assert calls == [("baseline", True)] and not reports[0].skipped and study.is_trained("baseline")
    reports = run_stages(study.training_stages(on_trained))
    assert calls[-1] == ("baseline", False) and reports[0].skipped
    records.clear()  # the model is there but its record is not: the stage counts as unfinished
    assert not study.is_trained("baseline")


def test_run_stages_reports_finished_stages_when_interrupted() -> None:
    seen: list[tuple[str, int, int]] = []

    def boom() -> bool:
        raise KeyboardInterrupt

    reports: list = []
    stages = [Stage("a", lambda: True), Stage("b", lambda: False), Stage("c", boom)]
    with pytest.raises(KeyboardInterrupt):
        run_stages(stages, lambda name, i, n, _t: seen.append((name, i, n)), reports)
    assert seen == [("a", 1, 3), ("b", 2, 3), ("c", 3, 3)]
    assert [(r.name, r.skipped) for r in reports] == [("a", False), ("b", True)]


def test_seed_statistics_pair_the_student_with_the_baseline_of_the_same_seed() -> None:
    per_seed = {
        0: {"baseline": {"clean_top1": 0.80, "token_iou": None}, "student": {"clean_top1": 0.82, "token_iou": 0.5}},
        1: {"baseline": {"clean_top1": 0.70, "token_iou": None}, "student": {"clean_top1": 0.74, "token_iou": 0.6}},
        2: {"baseline": {"clean_top1": 0.90, "token_iou": None}, "student": {"clean_top1": 0.90, "token_iou": 0.7}},
    }
    stats = seed_statistics(per_seed, ["clean_top1", "token_iou"])
    base = stats["models"]["baseline"]["clean_top1"]
    assert base["mean"] == pytest.approx(0.8) and base["sd"] == pytest.approx(0.1) and base["n"] == 3
    assert "token_iou" not in stats["models"]["baseline"]  # None values are left out
    d = stats["difference"]["clean_top1"]  # differences 0.02, 0.04, 0.00: mean 0.02, sd 0.02
    assert d["mean"] == pytest.approx(0.02) and d["sd"] == pytest.approx(0.02)
    half = 4.303 * 0.02 / 3**0.5
    assert d["ci95"] == pytest.approx([0.02 - half, 0.02 + half], abs=1e-4)
    assert "token_iou" not in stats["difference"]  # the baseline has no token IoU: nothing to pair
    table = format_seed_table(stats["models"])
    assert "80.0 ± 10.0" in table and "60.0 ± 10.0" in table
    lines = StlStudy("unused", []).seed_verdict_lines(stats)
    assert len(lines) == 1 and "within noise: the interval holds 0" in lines[0]


def test_verdict_calls_overlapping_intervals_within_noise() -> None:
    study = StlStudy("unused", [])
    metrics = {"baseline": {"clean_top1": 0.80, "shortcut_top1": 0.40},
               "student": {"clean_top1": 0.82, "shortcut_top1": 0.60}}  # fmt: skip
    lines = study.verdict_lines(metrics, {"val": 1000, "shortcut": 500})
    assert lines is not None and len(lines) == 2
    lo, hi = wilson_interval(0.82, 1000)  # about [79.5, 84.2]: holds 80 %
    assert lo < 0.80 < hi
    assert "within noise (the 95 % intervals overlap)" in lines[0] and f"[{100 * lo:.1f}, {100 * hi:.1f}]" in lines[0]
    assert "the STL student is ahead (the 95 % intervals do not overlap)" in lines[1]
    plain = study.verdict_lines(metrics)  # without counts: no interval, no noise call
    assert plain is not None and "no image count" in plain[0] and "within noise" not in plain[0]
