"""The generic trainer: a real tiny run, outputs, accumulation, non-finite steps, output checks, schedules.

(The import rule "the engine never imports a concrete method" is part of ``tests/test_layers.py``.)"""

import math
from typing import Any

import numpy as np
import pytest
import torch
from engine_helpers import TinySet, tiny_config

from tokenlab.engine import checkpoint as ckpt
from tokenlab.engine.trainer import NonFiniteLossError, Trainer
from tokenlab.methods import StepContext, register_method
from tokenlab.methods.supervised import Supervised
from tokenlab.models import load_exported
from tokenlab.utils.metrics_log import read_metrics


def test_supervised_run_learns_and_writes_its_outputs(tmp_path):
    cfg = tiny_config(
        tmp_path / "run",
        "method.name=supervised",
        "schedule.epochs=3",
        "optim.clip_grad=1.0",
        "train.ema.enabled=true",
        "train.ema.decay=0.5",
        "log.tensorboard=true",
    )
    trainer = Trainer(cfg, TinySet(32), TinySet(16, seed=1))
    result = trainer.fit()
    run = tmp_path / "run"
    assert result.step == 24 and result.nonfinite_steps == 0
    for name in ("config.yaml", "metrics.jsonl", "model.safetensors", "model.json"):
        assert (run / name).is_file(), name
    assert list((run / "tb").iterdir())
    steps = read_metrics(run, "step")
    assert len(steps) == 24 and all({"loss", "lr", "images_per_s", "grad_norm"} <= set(s) for s in steps)
    assert np.mean([s["loss"] for s in steps[-4:]]) < np.mean([s["loss"] for s in steps[:4]])
    assert len(read_metrics(run, "val")) == 3 and result.val["acc1"] > 0.5
    model, meta = load_exported(run)
    assert meta["classes"] == ["c0", "c1", "c2", "c3"] and meta["ema"] is True and meta["method"] == "supervised"
    torch.testing.assert_close(model.head.weight, trainer.ema.module.head.weight)  # the EMA weights are exported
    assert len(ckpt.list_checkpoints(run / "checkpoints")) == 2  # checkpoint.keep


def test_gradient_accumulation_matches_the_big_batch(tmp_path):
    outs = []
    for name, extra in (("big", ["data.batch_size=8"]), ("acc", ["data.batch_size=4", "optim.accum_steps=2"])):
        # a ViT: no BatchNorm, so two half batches give the gradient of the whole batch exactly
        vit = ["model.name=vit_tiny_patch16_224", "model.kwargs.embed_dim=32", "model.kwargs.num_heads=2"]
        cfg = tiny_config(
            tmp_path / name,
            *vit,
            "method.name=supervised",
            "method.kwargs.label_smoothing=0.0",
            "schedule.max_steps=3",
            "data.val_split=null",
            "checkpoint.export=false",
            *extra,
        )
        trainer = Trainer(cfg, TinySet(32), None)
        trainer.fit()
        outs.append(trainer.model.state_dict())
    for k in outs[0]:
        torch.testing.assert_close(outs[0][k], outs[1][k], atol=2e-5, rtol=1e-4)


@register_method("nan_at_steps")
class NaNAtSteps(Supervised):
    """Supervised, but the loss is NaN at the given optimizer steps (test of the non-finite policy)."""

    def __init__(self, model: torch.nn.Module, steps: tuple = ()) -> None:
        super().__init__(model)
        self.bad = set(steps)

    def training_step(self, batch: dict[str, Any], ctx: StepContext) -> dict[str, torch.Tensor]:
        out = super().training_step(batch, ctx)
        if ctx.step in self.bad:
            out["loss"] = out["loss"] * float("nan")
        return out


def test_nan_loss_is_skipped_and_counted(tmp_path):
    cfg = tiny_config(
        tmp_path / "run",
        "method.name=nan_at_steps",
        "method.kwargs.steps=[2,3]",
        "schedule.max_steps=6",
        "data.val_split=null",
    )
    trainer = Trainer(cfg, TinySet(32), None)
    before = {}

    def snapshot(ctx: StepContext) -> None:
        before[ctx.step] = [p.detach().clone() for p in trainer.model.parameters()]

    trainer.method.before_optimizer_step = snapshot
    result = trainer.fit()
    assert result.nonfinite_steps == 2 and result.step == 6
    assert set(before) == {0, 1, 4, 5}  # optimizer ran on the finite steps only
    assert all(math.isfinite(p.sum().item()) for p in trainer.model.parameters())
    assert read_metrics(tmp_path / "run", "step")[-1]["nonfinite_total"] == 2


def test_too_many_nonfinite_in_a_row_stop_the_run(tmp_path):
    cfg = tiny_config(
        tmp_path / "run",
        "method.name=nan_at_steps",
        "method.kwargs.steps=[3,4,5,6]",
        "train.max_nonfinite=3",
        "checkpoint.every_steps=2",
        "data.val_split=null",
    )
    with pytest.raises(NonFiniteLossError, match=r"3 non-finite losses in a row up to step 5.*step_000000004"):
        Trainer(cfg, TinySet(32), None).fit()
    last = ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert last.name == "step_000000004"  # written after the skipped step 3: weights untouched by the NaN
    weights, state = ckpt.load_checkpoint_dir(last)
    assert all(torch.isfinite(v).all() for v in weights["method"].values() if v.is_floating_point())
    assert state["nonfinite_streak"] == 1


def test_unwritable_or_full_output_fails_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(PermissionError, match="not writable"):
        Trainer(tiny_config(blocker / "run"), TinySet(8), None)
    with pytest.raises(ValueError, match="min_free_disk_mb"):
        Trainer(tiny_config(tmp_path / "run", "train.min_free_disk_mb=1e12"), TinySet(8), None)


def test_bad_runtime_settings(tmp_path):
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        Trainer(tiny_config(tmp_path / "a", "train.amp=fp16", "train.device=cpu"), TinySet(8), None)
    with pytest.raises(ValueError, match="exceeds the 8 training samples"):
        Trainer(tiny_config(tmp_path / "b", "data.batch_size=16"), TinySet(8), None)
    with pytest.raises(ValueError, match="does not accept model.kwargs"):
        Trainer(tiny_config(tmp_path / "c", "model.kwargs.bogus=1"), TinySet(8), None)


def test_bf16_autocast_runs_on_cpu(tmp_path):
    cfg = tiny_config(
        tmp_path / "run",
        "method.name=stl_labeler",
        "train.amp=bf16",
        "schedule.max_steps=2",
        "data.val_split=null",
        "train.channels_last=true",
        "train.grad_checkpointing=true",
    )
    assert Trainer(cfg, TinySet(16), None).fit().step == 2


def test_incomplete_checkpoints_are_ignored(tmp_path):
    root = tmp_path / "checkpoints"
    ckpt.save_checkpoint_dir(root, 4, {"m": {"w": torch.ones(2)}}, {"step": 4})
    (root / "step_000000008.tmp").mkdir()  # a kill while writing step 8
    (root / "step_000000009").mkdir()  # no state.pt: never complete
    assert ckpt.latest_checkpoint(root).name == "step_000000004"
    weights, state = ckpt.load_checkpoint_dir(root / "step_000000004")
    assert state["step"] == 4 and torch.equal(weights["m"]["w"], torch.ones(2))


@register_method("records_contexts")
class RecordsContexts(Supervised):
    """Supervised, recording the (step, micro_batch, accum_steps, last) of every training-step context."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__(model)
        self.seen: list[tuple[int, int, int, bool]] = []
        self.after: list[tuple[int, bool]] = []

    def training_step(self, batch: dict[str, Any], ctx: StepContext) -> dict[str, torch.Tensor]:
        self.seen.append((ctx.step, ctx.micro_batch, ctx.accum_steps, ctx.last_micro_batch))
        return super().training_step(batch, ctx)

    def after_step(self, ctx: StepContext) -> None:
        self.after.append((ctx.step, ctx.last_micro_batch))


def test_every_micro_batch_gets_its_own_context(tmp_path):
    cfg = tiny_config(
        tmp_path / "run",
        "method.name=records_contexts",
        "data.batch_size=2",
        "optim.accum_steps=3",
        "schedule.max_steps=2",
        "data.val_split=null",
        "checkpoint.export=false",
    )
    trainer = Trainer(cfg, TinySet(32), None)
    trainer.fit()
    assert trainer.method.seen == [
        (0, 0, 3, False),
        (0, 1, 3, False),
        (0, 2, 3, True),
        (1, 0, 3, False),
        (1, 1, 3, False),
        (1, 2, 3, True),
    ]
    assert trainer.method.after == [(0, True), (1, True)]  # step hooks see the step's last micro-batch


def test_schedule_kind_poly_is_built_by_the_trainer(tmp_path):
    cfg = tiny_config(
        tmp_path / "run",
        "schedule.kind=poly",
        "schedule.poly_power=2.0",
        "schedule.epochs=2",
        "schedule.warmup_epochs=1",
        "optim.min_lr=0.0",
        "optim.warmup_lr=0.0",
        "data.val_split=null",
    )
    trainer = Trainer(cfg, TinySet(32), None)
    steps = trainer.steps_per_epoch  # 8: 32 samples / batch 4
    expected = np.concatenate(
        [np.linspace(0.0, 0.002, steps, endpoint=False), 0.002 * (1 - np.arange(steps) / steps) ** 2]
    )
    np.testing.assert_allclose(trainer.lr_schedule, expected)
    with pytest.raises(AttributeError):
        trainer.lr_schedule = np.zeros(16)  # the schedule comes from the config only
    trainer.lr_schedule[:] = 5.0  # a copy: the trainer's own schedule is untouched
    assert trainer.lr_schedule.max() == pytest.approx(0.002)
    with pytest.raises(ValueError, match="schedule.kind.*valid: cosine, poly"):
        tiny_config(tmp_path / "bad", "schedule.kind=step")
