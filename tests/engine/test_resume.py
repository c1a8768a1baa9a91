"""Kill (SIGKILL) + ``--resume auto`` reaches bitwise the same weights as an uninterrupted run (CPU, deterministic)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tokenlab.utils.metrics_log import read_metrics

SCRIPT = Path(__file__).with_name("train_tiny.py")
# drop path (torch RNG), Mixup/CutMix (numpy RNG), EMA, mid-epoch checkpoints and a mid-epoch kill
ARGS = [
    "method.name=slow_stl_labeler",
    "method.kwargs.mixup_alpha=0.8",
    "method.kwargs.cutmix_alpha=1.0",
    "model.kwargs.drop_path_rate=0.2",
    "train.ema.enabled=true",
    "train.ema.decay=0.9",
    "train.deterministic=true",
    "schedule.epochs=2",
    "schedule.warmup_epochs=0.5",
    "checkpoint.every_steps=3",
    "checkpoint.keep=10",
    "seed=3",
]


def _run(run_dir: Path, *extra: str, sleep: float = 0.0) -> subprocess.Popen:
    cmd = [sys.executable, str(SCRIPT), str(run_dir), "--sleep", str(sleep), *ARGS, *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # its own process group: a terminal's Ctrl-C reaches the process and its data-loader workers (os.killpg)
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip


def _finish(p: subprocess.Popen) -> None:
    _, err = p.communicate(timeout=120)
    assert p.returncode == 0, err[-3000:]


def _steps_logged(metrics: Path) -> int:
    return metrics.read_text().count('"kind": "step"') if metrics.is_file() else 0


def _same_weights(a_dir: Path, b_dir: Path) -> None:
    a, b = load_file(a_dir / "model.safetensors"), load_file(b_dir / "model.safetensors")
    assert a.keys() == b.keys()
    diff = [k for k in a if not (a[k] == b[k]).all()]
    assert not diff, f"weights differ after resume: {diff[:5]}"


@pytest.mark.timeout(240)
@pytest.mark.slow
def test_sigkill_then_resume_auto_is_bitwise_exact(tmp_path):
    ref = _run(tmp_path / "ref")
    victim = _run(tmp_path / "run", sleep=0.25)
    _finish(ref)
    target = tmp_path / "run" / "checkpoints" / "step_000000003"  # 8 steps per epoch: a mid-epoch checkpoint
    deadline = time.time() + 90
    while not target.is_dir() and time.time() < deadline and victim.poll() is None:
        time.sleep(0.05)
    assert target.is_dir(), "the victim run never wrote its first checkpoint"
    time.sleep(0.4)  # land somewhere after it, possibly in the middle of writing the next one
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (tmp_path / "run" / "model.safetensors").exists(), "the run finished before it was killed"
    _finish(_run(tmp_path / "run", "checkpoint.resume=auto"))
    events = [r["event"] for r in read_metrics(tmp_path / "run", "event")]
    assert events == ["start", "resume"]
    _same_weights(tmp_path / "ref", tmp_path / "run")
    ca = load_file(next((tmp_path / "ref" / "checkpoints").glob("step_000000016")) / "method.safetensors")
    cb = load_file(next((tmp_path / "run" / "checkpoints").glob("step_000000016")) / "method.safetensors")
    assert all((ca[k] == cb[k]).all() for k in ca)


@pytest.mark.timeout(240)
@pytest.mark.slow
def test_ctrl_c_with_loader_workers_writes_a_checkpoint_where_it_stopped_and_resume_is_exact(tmp_path):
    """No mid-epoch checkpoint interval: the only checkpoint before the epoch end is the one Ctrl-C writes.

    A terminal's Ctrl-C reaches the data-loader workers too, which stop; the step under way still completes.
    (SIGTERM and SIGINT inside a step without workers: ``test_reliability.py``.)
    """
    workers = ["data.num_workers=2"]
    no_interval = ["checkpoint.every_steps=0", "checkpoint.every_minutes=0"]
    victim = _run(tmp_path / "run", *no_interval, *workers, sleep=0.25)
    metrics, deadline = tmp_path / "run" / "metrics.jsonl", time.time() + 90
    while time.time() < deadline and victim.poll() is None and _steps_logged(metrics) < 3:
        time.sleep(0.05)
    os.killpg(victim.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the loader workers get it too
    _, err = victim.communicate(timeout=60)
    assert victim.returncode != 0 and "TrainingInterrupted" in err, err[-3000:]
    assert "--resume auto" in err.strip().splitlines()[-1]
    found = [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()]
    assert len(found) == 1 and found[0] < "step_000000008", found  # mid-epoch: written on the signal
    _finish(_run(tmp_path / "run", *no_interval, *workers, "checkpoint.resume=auto"))
    _finish(_run(tmp_path / "ref", *no_interval, *workers))
    assert [r["event"] for r in read_metrics(tmp_path / "run", "event")] == ["start", "resume"]
    _same_weights(tmp_path / "ref", tmp_path / "run")
