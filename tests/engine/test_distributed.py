"""Two CPU processes (gloo) launched with torchrun: DDP and FSDP2 train and checkpoint from rank 0, FSDP2 matches
DDP and resumes, and a rank that dies or hangs stops the run with a clear message and a usable checkpoint."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tokenlab.engine import checkpoint as ckpt
from tokenlab.utils import distributed as D
from tokenlab.utils.metrics_log import read_metrics

pytestmark = pytest.mark.slow  # subprocesses / whole pipelines: tens of seconds on 2 cores

SCRIPT = Path(__file__).with_name("train_tiny.py")
# 32 samples / 2 ranks / batch 4 = 4 steps per epoch
COMMON = [
    "method.name=slow_stl_labeler",
    "schedule.epochs=2",
    "checkpoint.every_steps=3",
    "checkpoint.keep=5",
    "train.dist_timeout_s=120",
    "train.device=cpu",
    "optim.clip_grad=1.0",
]


def _torchrun(
    run_dir: Path, *overrides: str, fail: str | None = None, val: int = 8, timeout: int = 200
) -> subprocess.CompletedProcess:
    torchrun = shutil.which("torchrun")
    cmd = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    cmd += ["--standalone", "--nproc_per_node=2", str(SCRIPT), str(run_dir), "--val", str(val), *COMMON, *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TINY_FAIL", None)
    if fail:
        env["TINY_FAIL"] = fail
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "model.safetensors")


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("ddp") / "run"
    proc = _torchrun(run)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run


def test_helpers_are_noops_in_one_process():
    t = torch.tensor([1.0, 2.0])
    assert D.all_reduce_mean(t) is t and D.all_gather_objects(3) == [3] and D.world_size() == 1 and D.rank() == 0
    D.broadcast_module(torch.nn.Linear(2, 2))  # no process group: nothing to do


@pytest.mark.timeout(300)
def test_two_process_gloo_run_trains_and_checkpoints(ddp_run: Path):
    names = [p.name for p in ckpt.list_checkpoints(ddp_run / "checkpoints")]
    assert names == ["step_000000003", "step_000000004", "step_000000006", "step_000000008"]
    _, state = ckpt.load_checkpoint_dir(ddp_run / "checkpoints" / "step_000000008")
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert not (state["rng"][0]["torch"] == state["rng"][1]["torch"]).all()  # per-rank seeds
    steps = read_metrics(ddp_run, "step")
    assert [s["step"] for s in steps] == list(range(1, 9))  # rank 0 alone writes
    assert steps[0]["images_per_s"] > 0 and (ddp_run / "model.safetensors").is_file()
    assert read_metrics(ddp_run, "val")[-1]["acc1"] >= 0


@pytest.mark.timeout(400)
def test_fsdp2_matches_ddp_resumes_and_refuses_a_ddp_checkpoint(ddp_run: Path, tmp_path: Path):
    fsdp = tmp_path / "fsdp"
    proc = _torchrun(fsdp, "train.distributed=fsdp")
    assert proc.returncode == 0, proc.stderr[-4000:]
    # FSDP2 shards rank 0's initial weights, reduce-scatters the same gradients: the same model as DDP
    a, b = _weights(ddp_run), _weights(fsdp)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    _, state = ckpt.load_checkpoint_dir(fsdp / "checkpoints" / "step_000000008")
    assert state["optimizer_layout"].startswith("fsdp") and state["optimizer"]["state"]  # full, name-keyed state

    # resume an FSDP2 checkpoint under FSDP2: exactly the uninterrupted run's weights. Its final validation has 9
    # samples in batches of 2: rank 0 runs 3 batches, rank 1 runs 2 and one discarded padding batch (else it hangs)
    resumed = tmp_path / "resumed"
    shutil.copytree(fsdp / "checkpoints" / "step_000000006", resumed / "checkpoints" / "step_000000006")
    proc = _torchrun(resumed, "train.distributed=fsdp", "checkpoint.resume=auto", "data.val_batch_size=2", val=9)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "resumed from" in proc.stderr
    assert read_metrics(resumed, "val")[-1]["step"] == 8
    c = _weights(resumed)
    assert all(torch.equal(b[k], c[k]) for k in b)

    # a DDP checkpoint keys its optimizer state differently: a clear refusal, not a KeyError deep in torch
    mixed = tmp_path / "mixed"
    shutil.copytree(ddp_run / "checkpoints" / "step_000000006", mixed / "checkpoints" / "step_000000006")
    proc = _torchrun(mixed, "train.distributed=fsdp", "checkpoint.resume=auto")
    assert proc.returncode != 0 and "resume it with train.distributed=ddp" in proc.stderr


@pytest.mark.timeout(300)
def test_a_hanging_rank_stops_the_run_within_the_timeout_and_resume_finishes(ddp_run: Path, tmp_path: Path):
    run = tmp_path / "run"
    t0 = time.monotonic()
    proc = _torchrun(run, "train.dist_timeout_s=8", fail="1:5:hang", timeout=150)  # rank 1 sleeps for an hour
    assert proc.returncode != 0 and time.monotonic() - t0 < 120
    assert "another rank stopped answering" in proc.stderr and "train.dist_timeout_s=8" in proc.stderr
    assert f"Last complete checkpoint: {run / 'checkpoints' / 'step_000000004'}" in proc.stderr
    ckpt.load_checkpoint_dir(run / "checkpoints" / "step_000000004")  # intact
    proc = _torchrun(run, "checkpoint.resume=auto")
    assert proc.returncode == 0, proc.stderr[-4000:]
    a, b = _weights(ddp_run), _weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed run differs from the uninterrupted one"


@pytest.mark.timeout(300)
def test_a_dying_rank_stops_the_others(tmp_path: Path):
    t0 = time.monotonic()
    proc = _torchrun(tmp_path / "run", fail="1:5:exit", timeout=150)  # rank 1 exits with code 3 mid-run
    assert proc.returncode != 0 and time.monotonic() - t0 < 120  # far below the 120 s collective timeout + start
    assert "exitcode  : 3" in proc.stderr  # torchrun names the rank that died
    ckpt.load_checkpoint_dir(tmp_path / "run" / "checkpoints" / "step_000000004")
