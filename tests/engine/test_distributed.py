"""Two CPU processes (gloo) launched with torchrun train, reduce metrics and checkpoint from rank 0."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tokenlab.engine import checkpoint as ckpt
from tokenlab.engine import distributed as D
from tokenlab.engine.logging import read_metrics

SCRIPT = Path(__file__).with_name("train_tiny.py")


def test_helpers_are_noops_in_one_process():
    import torch

    t = torch.tensor([1.0, 2.0])
    assert D.all_reduce_mean(t) is t and D.all_gather_objects(3) == [3] and D.world_size() == 1 and D.rank() == 0


@pytest.mark.timeout(300)
def test_two_process_gloo_run_trains_and_checkpoints(tmp_path):
    torchrun = shutil.which("torchrun")
    cmd = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    cmd += ["--standalone", "--nproc_per_node=2", str(SCRIPT), str(tmp_path / "run"),
            "method.name=stl_labeler", "schedule.epochs=2", "checkpoint.every_steps=3", "checkpoint.keep=5",
            "train.dist_timeout_s=120", "train.device=cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = tmp_path / "run"
    # 32 samples / 2 ranks / batch 4 = 4 steps per epoch
    names = [p.name for p in ckpt.list_checkpoints(run / "checkpoints")]
    assert names == ["step_000000003", "step_000000004", "step_000000006", "step_000000008"]
    _, state = ckpt.load_checkpoint_dir(run / "checkpoints" / "step_000000008")
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert not (state["rng"][0]["torch"] == state["rng"][1]["torch"]).all()  # per-rank seeds
    steps = read_metrics(run, "step")
    assert [s["step"] for s in steps] == list(range(1, 9))  # rank 0 alone writes
    assert steps[0]["images_per_s"] > 0 and (run / "model.safetensors").is_file()
    assert read_metrics(run, "val")[-1]["acc1"] >= 0
