"""The training progress bar spans the whole run and moves every step; the training time is estimated in the log."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from tokenlab.utils.metrics_log import ETA_STEPS, MetricLogger, format_duration


def test_bar_covers_the_run_and_the_log_estimates_the_training_time(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="tokenlab.utils.metrics_log")
    log = MetricLogger(tmp_path, tensorboard=False, progress=True, total_steps=500)
    bar = log._bar
    assert bar is not None and bar.total == 500  # every epoch up to the stop step, not one epoch
    for step in range(1, ETA_STEPS + 1):
        log.tick(step)
        assert bar.n == step  # moves every step, so tqdm has a rate (and an ETA) from the first steps
    assert not [r for r in caplog.records if "training time estimate" in r.getMessage()]  # step 1 is not timed
    log.tick(ETA_STEPS + 1)
    log.tick(ETA_STEPS + 2)
    estimates = [r.getMessage() for r in caplog.records if "training time estimate" in r.getMessage()]
    assert len(estimates) == 1  # said once
    assert f"(steps 2-{ETA_STEPS + 1})" in estimates[0]
    assert f"for the remaining {500 - ETA_STEPS - 1} of 500 steps" in estimates[0]
    assert "validation and checkpoints add to it" in estimates[0]
    assert re.search(r"22/500 \[[0-9:]+<[0-9:]+,", str(bar))  # the bar shows elapsed<remaining: an ETA
    log.close()


def test_resumed_run_times_from_where_it_resumed(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="tokenlab.utils.metrics_log")
    log = MetricLogger(tmp_path, tensorboard=False, progress=False, total_steps=100, initial_step=60)
    for step in range(61, 61 + ETA_STEPS + 1):
        log.tick(step)
    (msg,) = [r.getMessage() for r in caplog.records if "training time estimate" in r.getMessage()]
    assert f"(steps 62-{61 + ETA_STEPS})" in msg and f"remaining {100 - 61 - ETA_STEPS} of 100 steps" in msg
    log.close()
    MetricLogger(tmp_path, enabled=False, total_steps=10).tick(1)  # other ranks: nothing


@pytest.mark.parametrize(("seconds", "text"), [(45.2, "45 s"), (750, "12 min 30 s"), (7500, "2 h 05 min")])
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
