"""Fault injection on the trainer: non-finite steps and weights, broken / foreign / pickled checkpoints, reruns into
a used run directory, a second training into the same run directory, SIGINT inside a step, the best export.

Every test here reproduced its fault before the fix (``docs/reliability.md`` lists which promise each one shows).
"""

import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from engine_helpers import TinySet, tiny_config
from safetensors.torch import load_file, save_file
from torch import nn

from tokenlab.engine import checkpoint as ckpt
from tokenlab.engine.trainer import NonFiniteLossError, Trainer, TrainingInterrupted
from tokenlab.methods import StepContext, register_method
from tokenlab.methods.supervised import Supervised
from tokenlab.models import load_exported
from tokenlab.utils.metrics_log import read_metrics
from tokenlab.utils.runs import read_model_meta

NO_VAL = "data.val_split=null"


@register_method("nan_batchnorm")
class NaNBatchNorm(Supervised):
    """Supervised plus a BatchNorm inside the model; at ``steps`` the forward fills its running stats with NaN
    and the loss is NaN; at ``poison`` (after the optimizer step) a weight becomes NaN while the loss was finite."""

    def __init__(
        self, model: nn.Module, steps: tuple = (), poison: tuple = (), interrupt: tuple = (), signal: str = "SIGINT"
    ) -> None:
        model.probe_bn = nn.BatchNorm1d(4)
        super().__init__(model)
        self.bad, self.poison, self.interrupt, self.signal = set(steps), set(poison), set(interrupt), signal

    def training_step(self, batch: dict[str, Any], ctx: StepContext) -> dict[str, torch.Tensor]:
        out = super().training_step(batch, ctx)
        probe = torch.randn(8, 4)
        if ctx.step in self.bad:
            probe = probe * float("nan")
            out["loss"] = out["loss"] * float("nan")
        self.model.probe_bn(probe)
        if ctx.step in self.interrupt:
            os.kill(os.getpid(), getattr(signal, self.signal))  # Ctrl-C (or a pre-emption) in the middle of a step
        return out

    def after_step(self, ctx: StepContext) -> None:
        if ctx.step in self.poison:
            with torch.no_grad():
                next(self.model.parameters()).fill_(float("nan"))


def _all_finite(path: Path) -> bool:
    weights, state = ckpt.load_checkpoint_dir(path)
    return not ckpt.nonfinite_tensors(weights) and not ckpt.nonfinite_tensors(state["optimizer"])


def test_nan_forward_never_reaches_a_checkpoint_and_the_named_one_resumes(tmp_path):
    run = tmp_path / "run"
    cfg = tiny_config(run, "method.name=nan_batchnorm", "method.kwargs.steps=[3,4,5]", "train.max_nonfinite=3",
                      "checkpoint.every_steps=1", "checkpoint.keep=1", "train.ema.enabled=true", NO_VAL)  # fmt: skip
    with pytest.raises(NonFiniteLossError, match=r"Last good checkpoint: \S+step_000000005 \(resume it") as err:
        Trainer(cfg, TinySet(32), None).fit()
    named = Path(str(err.value).split("Last good checkpoint: ")[1].split(" ")[0])
    assert _all_finite(named)  # the BatchNorm statistics the NaN forward wrote were put back
    weights, _ = ckpt.load_checkpoint_dir(named)
    assert torch.isfinite(weights["method"]["model.probe_bn.running_mean"]).all()
    resumed = Trainer(tiny_config(run, "method.name=nan_batchnorm", "checkpoint.resume=auto", "schedule.max_steps=7",
                                  "train.ema.enabled=true", NO_VAL), TinySet(32), None).fit()  # fmt: skip
    assert resumed.step == 7
    assert read_model_meta(run)["step"] == 7


def test_nonfinite_weights_are_never_checkpointed_nor_rotated_away_nor_exported(tmp_path, caplog):
    run = tmp_path / "run"
    # step 2 poisons a weight after a finite loss: every later state is non-finite, the losses too
    cfg = tiny_config(run, "method.name=nan_batchnorm", "method.kwargs.poison=[2]", "train.max_nonfinite=3",
                      "checkpoint.every_steps=1", "checkpoint.keep=1", NO_VAL)  # fmt: skip
    with caplog.at_level(logging.WARNING), pytest.raises(NonFiniteLossError, match=r"step_000000002 \(resume"):
        Trainer(cfg, TinySet(32), None).fit()
    assert [p.name for p in ckpt.list_checkpoints(run / "checkpoints")] == ["step_000000002"]
    assert _all_finite(run / "checkpoints" / "step_000000002")
    assert "not writing a checkpoint at step 3" in caplog.text
    # a run that ends non-finite (too few in a row to stop it) exports nothing
    cfg = tiny_config(tmp_path / "end", "method.name=nan_batchnorm", "method.kwargs.poison=[3]",
                      "schedule.max_steps=5", "train.max_nonfinite=10", NO_VAL)  # fmt: skip
    with pytest.raises(NonFiniteLossError, match=r"not exporting \S+model.safetensors.*non-finite"):
        Trainer(cfg, TinySet(32), None).fit()
    assert not (tmp_path / "end" / "model.safetensors").exists()


def _trained(run: Path, *extra: str, steps: int = 4) -> Path:
    cfg = tiny_config(run, "checkpoint.every_steps=2", "checkpoint.keep=5", f"schedule.max_steps={steps}", NO_VAL,
                      *extra)  # fmt: skip
    Trainer(cfg, TinySet(32), None).fit()
    return run / "checkpoints"


def _resume(run: Path, resume: str | Path, *extra: str) -> Trainer:
    cfg = tiny_config(run, f"checkpoint.resume={resume}", "schedule.max_steps=6", NO_VAL, *extra)
    trainer = Trainer(cfg, TinySet(32), None)
    trainer.fit()
    return trainer


@pytest.mark.parametrize("damage", ["truncate_state", "empty_state", "empty_weights", "nan_weights"])
def test_resume_auto_falls_back_past_a_broken_newest_checkpoint(tmp_path, caplog, damage):
    root = _trained(tmp_path / "run")
    newest = root / "step_000000004"
    if damage == "truncate_state":
        data = (newest / "state.pt").read_bytes()
        (newest / "state.pt").write_bytes(data[: len(data) // 2])
    elif damage == "empty_state":
        (newest / "state.pt").write_bytes(b"")
    elif damage == "empty_weights":
        (newest / "method.safetensors").write_bytes(b"")
    else:
        sd = load_file(newest / "method.safetensors")
        save_file({k: v * float("nan") if v.is_floating_point() else v for k, v in sd.items()},
                  newest / "method.safetensors")  # fmt: skip
    with caplog.at_level(logging.WARNING):
        trainer = _resume(tmp_path / "run", "auto")
    skipped = [r.getMessage() for r in caplog.records if "skipping step_000000004" in r.getMessage()]
    assert len(skipped) == 1 and ("unreadable" in skipped[0] or "empty" in skipped[0] or "non-finite" in skipped[0])
    assert [r["event"] for r in read_metrics(tmp_path / "run", "event")] == ["start", "resume"]
    assert trainer.step == 6
    # the same checkpoint named explicitly: one line naming it, no fallback
    with pytest.raises(ckpt.CheckpointError, match=r"step_000000004") as err:
        _resume(tmp_path / "run", newest)
    assert "\n" not in str(err.value)


def test_resume_auto_with_no_usable_checkpoint_says_so(tmp_path):
    root = _trained(tmp_path / "run", steps=2)
    (root / "step_000000002" / "state.pt").write_bytes(b"junk")
    with pytest.raises(ckpt.CheckpointError, match=r"no usable checkpoint.*step_000000002.*--overwrite"):
        _resume(tmp_path / "run", "auto")


def test_checkpoint_of_another_architecture_is_refused_naming_both(tmp_path):
    root = _trained(tmp_path / "run", steps=2)
    with pytest.raises(ckpt.CheckpointError) as err:
        _resume(tmp_path / "run", "auto", "model.kwargs.embed_dim=16", "method.name=stl_labeler")
    msg = str(err.value)
    assert str(root / "step_000000002") in msg and "\n" not in msg
    assert "method.name=supervised" in msg and "method.name=stl_labeler" in msg and "another shape" in msg


class _Payload:
    """Unpickling this would create the file ``marker``: it must never happen."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (self.marker, "w"))


def test_checkpoint_with_pickled_objects_is_refused_and_never_run(tmp_path):
    root = _trained(tmp_path / "run", steps=2)
    state_file = root / "step_000000002" / "state.pt"
    state = torch.load(state_file, weights_only=True)
    marker = tmp_path / "pwned"
    state["method_extra"] = {"payload": _Payload(str(marker))}
    torch.save(state, state_file)
    with pytest.raises(ckpt.CheckpointError, match=r"state.pt holds pickled Python objects"):
        _resume(tmp_path / "run", root / "step_000000002")
    assert not marker.exists()


def test_a_run_directory_with_checkpoints_is_resumed_or_started_over_never_overwritten(tmp_path):
    run = tmp_path / "run"
    _trained(run, steps=4)
    before = (run / "checkpoints" / "step_000000004" / "method.safetensors").read_bytes()
    with pytest.raises(ValueError, match=r"already holds checkpoints.*--resume auto.*--overwrite") as err:
        _trained(run, steps=2)
    assert "\n" not in str(err.value)
    assert (run / "checkpoints" / "step_000000004" / "method.safetensors").read_bytes() == before
    _trained(run, "checkpoint.overwrite=true", steps=2)  # starts over: no old checkpoint left to resume by mistake
    assert [p.name for p in ckpt.list_checkpoints(run / "checkpoints")] == ["step_000000002"]
    assert [r["event"] for r in read_metrics(run, "event")] == ["start"]


def test_a_second_training_into_a_running_run_directory_fails_at_once(tmp_path):
    run = tmp_path / "run"
    second: dict[str, Any] = {}

    def start_another(ctx: StepContext) -> None:  # while this training runs, a second process starts one there
        if ctx.step == 0:
            code = f"from tokenlab.engine import load_config, train; train(load_config(None, ['run_dir={run}']))"
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
            second["proc"] = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)

    cfg = tiny_config(run, "schedule.max_steps=2", NO_VAL)
    trainer = Trainer(cfg, TinySet(16), None)
    trainer.method.before_optimizer_step = start_another
    trainer.fit()
    proc = second["proc"]
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "RunDirLocked" in last and f"in use by pid {os.getpid()} on host {socket.gethostname()} since" in last
    assert not (run / ".lock").exists()  # released at the end
    assert [r["event"] for r in read_metrics(run, "event")] == ["start"]  # the second run wrote nothing


@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM"])
def test_a_signal_in_a_step_writes_a_checkpoint_there_and_resume_continues(tmp_path, name):
    run = tmp_path / "run"
    cfg = tiny_config(run, "method.name=nan_batchnorm", "method.kwargs.interrupt=[2]", f"method.kwargs.signal={name}",
                      "schedule.max_steps=6", NO_VAL)  # fmt: skip
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingInterrupted, match=r"interrupted at step 3: newest checkpoint \S+step_000000003.*"
                                                  r"--resume auto") as err:  # fmt: skip
        Trainer(cfg, TinySet(32), None).fit()
    assert err.value.signum == getattr(signal, name)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before  # handlers restored
    assert [p.name for p in ckpt.list_checkpoints(run / "checkpoints")] == ["step_000000003"]
    assert not (run / ".lock").exists()
    trainer = _resume(run, "auto", "method.name=nan_batchnorm")
    assert trainer.step == 6


def test_best_weights_are_exported_with_their_selection_and_survive_resume(tmp_path):
    run = tmp_path / "run"
    common = ["checkpoint.best_metric=loss", "checkpoint.best_mode=min", "schedule.epochs=3", "train.ema.enabled=true"]
    trainer = Trainer(tiny_config(run, *common, "schedule.max_steps=16"), TinySet(32), TinySet(8, seed=1))
    trainer.fit()  # 8 steps per epoch: validation after epochs 1 and 2
    vals = [r["loss"] for r in read_metrics(run, "val")]
    model, meta = load_exported(run / "model_best")
    assert meta["selected_by"] == "loss" and meta["mode"] == "min" and meta["ema"] is True
    assert meta["value"] == pytest.approx(min(vals))
    assert meta["step"] == [8, 16][vals.index(min(vals))]
    _, state = ckpt.load_checkpoint_dir(ckpt.latest_checkpoint(run / "checkpoints"))
    assert state["best"]["value"] == pytest.approx(min(vals))
    resumed = Trainer(tiny_config(run, *common, "checkpoint.resume=auto"), TinySet(32), TinySet(8, seed=1))
    assert resumed.best is None
    resumed.fit()
    vals = [r["loss"] for r in read_metrics(run, "val")]
    _, meta = load_exported(run / "model_best")
    assert meta["value"] == pytest.approx(min(vals))  # the best of the three epochs, across the resume
    with pytest.raises(ValueError, match="'checkpoint.best_metric' is 'acc5'.*acc1"):
        Trainer(tiny_config(tmp_path / "x", "checkpoint.best_metric=acc5", "schedule.max_steps=8"), TinySet(32),
                TinySet(8, seed=1)).fit()  # fmt: skip
    with pytest.raises(ValueError, match="best_mode"):
        Trainer(tiny_config(tmp_path / "y", "checkpoint.best_mode=up"), TinySet(32), None)
