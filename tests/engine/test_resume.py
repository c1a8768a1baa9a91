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
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _finish(p: subprocess.Popen) -> None:
    _, err = p.communicate(timeout=120)
    assert p.returncode == 0, err[-3000:]


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
    a, b = load_file(tmp_path / "ref" / "model.safetensors"), load_file(tmp_path / "run" / "model.safetensors")
    assert a.keys() == b.keys()
    diff = [k for k in a if not (a[k] == b[k]).all()]
    assert not diff, f"weights differ after resume: {diff[:5]}"
    ca = load_file(next((tmp_path / "ref" / "checkpoints").glob("step_000000016")) / "method.safetensors")
    cb = load_file(next((tmp_path / "run" / "checkpoints").glob("step_000000016")) / "method.safetensors")
    assert all((ca[k] == cb[k]).all() for k in ca)
