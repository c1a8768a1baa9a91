"""Ctrl-C in the middle of a study's training (as in `tokenlab demo`): rerunning the study resumes it."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tokenlab.data import SynthConfig, generate
from tokenlab.engine.trainer import Trainer
from tokenlab.studies.stl_study import StlStudy, TrainStage, run_stages
from tokenlab.utils.metrics_log import read_metrics

pytestmark = pytest.mark.slow  # two tiny trainings: ~10 s on 2 cores

TINY = ["data.name=synthetic", "data.val_split=val", "model.kwargs.patch_size=8", "model.kwargs.depth=1",
        "model.kwargs.embed_dim=32", "model.kwargs.num_heads=2", "schedule.max_steps=4", "log.tensorboard=false",
        "log.progress=false", "train.min_free_disk_mb=0", "data.train_subset=24", "data.val_subset=8",
        "data.batch_size=4"]  # fmt: skip


def test_ctrl_c_during_a_study_training_then_rerun_resumes_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    synth = tmp_path / "synth"
    generate(synth, SynthConfig(img_size=32, counts={"train": 32, "val": 16, "rendition": 0, "shortcut": 0}), workers=1)
    stage = TrainStage("baseline", "synthetic_fan_baseline", (f"data.root={synth}", *TINY))
    original = Trainer._train_step

    def ctrl_c_at_step_1(self: Trainer, batches):  # the user presses Ctrl-C during step 1
        if self.step == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, batches)

    monkeypatch.setattr(Trainer, "_train_step", ctrl_c_at_step_1)
    with pytest.raises(KeyboardInterrupt):
        run_stages(StlStudy(tmp_path / "runs", [stage]).training_stages())
    run = tmp_path / "runs" / "baseline"
    assert not (run / "model.json").exists() and (run / "checkpoints" / "step_000000002").is_dir()

    monkeypatch.setattr(Trainer, "_train_step", original)
    study = StlStudy(tmp_path / "runs", [stage])
    reports = run_stages(study.training_stages())  # the same call again: it continues from step 2
    assert not reports[0].skipped and study.is_trained("baseline")
    assert [r["event"] for r in read_metrics(run, "event")] == ["start", "resume"]
    assert read_metrics(run, "step")[-1]["step"] == 4
