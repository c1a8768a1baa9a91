"""`tokenlab demo` at a tiny budget: the same code path as the real demo, in seconds."""

import json
import math
import re
from pathlib import Path

import pytest

from tokenlab.cli import main
from tokenlab.studies.demo import Demo, DemoConfig

pytestmark = pytest.mark.slow  # subprocesses / whole pipelines: tens of seconds on 2 cores

MODELS = ("labeler", "baseline", "student")


def _check_report(out: Path) -> None:
    md = (out / "report" / "report.md").read_text()
    for name in MODELS:
        assert name in md
    images = re.findall(r"\]\(([^)]+\.png)\)", md)
    assert images, "the report shows no pictures"
    for rel in images:
        assert (out / "report" / rel).is_file(), rel
    assert "## Verdict" in md and "STL student" in md
    html = (out / "report" / "report.html").read_text()
    assert "data:image/png;base64," in html and "Verdict" in html


def test_demo_cli_tiny_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--preset", "tiny", "--no-progress", "--ibot"]) == 0
    printed = capsys.readouterr().out
    assert "[1/8] data" in printed and "[5/8] ibot" in printed and "report:" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["metrics"]) == set(MODELS)
    for name, row in summary["metrics"].items():
        for key in ("clean_top1", "corrupted_top1", "retention", "rendition_top1", "shortcut_top1", "token_iou"):
            assert row[key] is not None, (name, key)
            # retention = corrupted / clean is undefined for a two-step model that got no val image right
            assert math.isfinite(row[key]) or (key == "retention" and row["clean_top1"] == 0), (name, key)
    assert summary["metrics"]["student"]["mce_vs_baseline"] is not None
    assert set(summary["ibot_knn"]) == {"pretrained", "random"}
    _check_report(out)


def test_interrupt_then_resume_and_same_numbers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = DemoConfig.tiny(seed=3)
    calls = {"n": 0}
    original = Demo.evaluate

    def interrupted(self: Demo) -> bool:
        calls["n"] += 1
        raise KeyboardInterrupt

    monkeypatch.setattr(Demo, "evaluate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        Demo(tmp_path / "a", cfg, progress=False).run()
    assert calls["n"] == 1
    assert (tmp_path / "a" / "runs" / "student" / "model.json").is_file()
    assert not (tmp_path / "a" / "report").exists()

    monkeypatch.setattr(Demo, "evaluate", original)
    resumed = Demo(tmp_path / "a", cfg, progress=False)
    summary = resumed.run()
    skipped = {r.name for r in resumed.reports if r.skipped}
    assert {"data", *MODELS} <= skipped  # finished stages are not redone
    _check_report(tmp_path / "a")

    fresh = Demo(tmp_path / "b", cfg, progress=False).run()
    assert fresh["metrics"] == summary["metrics"]  # same seed, same numbers, interrupted or not


def test_other_settings_in_same_dir_refused(tmp_path: Path) -> None:
    Demo(tmp_path, DemoConfig.tiny(), progress=False)._check_settings()
    with pytest.raises(ValueError, match="other settings \\(seed\\)"):
        Demo(tmp_path, DemoConfig.tiny(seed=9), progress=False)._check_settings()
    with pytest.raises(ValueError, match="--minutes must be positive"):
        DemoConfig(minutes=0).train_epochs()
    with pytest.raises(ValueError, match="--seeds must be at least 1"):
        DemoConfig(seeds=0).validate()
    # more seeds and another device are no other settings: a one-seed demo grows into a multi-seed one
    Demo(tmp_path, DemoConfig.tiny(seeds=3, device="cpu"), progress=False)._check_settings()


def test_budget_draws_fresh_images_then_repeats_them() -> None:
    cfg = DemoConfig(steps=400, batch_size=64, max_train_images=32768)
    assert (cfg.train_steps(), cfg.train_epochs(), cfg.train_images()) == (400, 1, 400 * 64)
    assert cfg.synth_config().counts == {"train": 400 * 64, **cfg.counts}
    longer = DemoConfig(steps=400, batch_size=64, max_train_images=32768, minutes=30)  # 2000 steps
    assert longer.train_epochs() == 4 and longer.train_steps() == 2000
    assert longer.train_images() == 500 * 64 <= longer.max_train_images


def test_data_settings_reach_the_generator() -> None:
    synth = DemoConfig(object_scale=(0.8, 0.9), max_fragments=2, distractor_shapes=1, shortcut_p=0.6).synth_config()
    assert (synth.object_scale, synth.max_fragments, synth.distractor_shapes, synth.shortcut_p) == (
        (0.8, 0.9),
        2,
        1,
        0.6,
    )


def test_cue_settings_reach_the_generator_and_labeler_options_only_the_labeler(tmp_path: Path) -> None:
    cfg = DemoConfig(shortcut_cue="colour", val_tied=True, labeler_kwargs={"aux_max_weight": 0.5})
    synth = cfg.synth_config()
    assert (synth.shortcut_cue, synth.val_tied) == ("colour", True)
    stages = {s.name: s.overrides for s in Demo(tmp_path, cfg, progress=False).study.stages}
    assert "method.kwargs.aux_max_weight=0.5" in stages["labeler"]
    assert not any(o.startswith("method.kwargs.aux_max") for o in stages["baseline"] + stages["student"])


def test_two_seeds_give_mean_sd_and_a_paired_interval(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--preset", "tiny", "--no-progress", "--seeds", "2", "--seed", "5"]) == 0
    printed = capsys.readouterr().out
    assert "seed 6" in printed and "mean ± sd over seeds 5, 6" in printed
    summary = json.loads((out / "summary.json").read_text())
    stats = summary["seeds"]
    assert stats["seeds"] == [5, 6] and (out / "seeds" / "6" / "summary.json").is_file()
    for name in MODELS:
        assert stats["models"][name]["clean_top1"]["n"] == 2
    clean = stats["difference"]["clean_top1"]
    per_seed = [stats["per_seed"][s]["student"]["clean_top1"] - stats["per_seed"][s]["baseline"]["clean_top1"]
                for s in ("5", "6")]  # fmt: skip
    assert clean["mean"] == pytest.approx(sum(per_seed) / 2)
    lo, hi = clean["ci95"]
    assert lo <= clean["mean"] <= hi
    assert "Over 2 seeds (5, 6), paired by seed" in summary["verdict"] and "95 % interval" in summary["verdict"]
    assert summary["metrics"]["baseline"]["clean_top1"] == stats["per_seed"]["5"]["baseline"]["clean_top1"]
    _check_report(out)
