"""The training engine's loop: one ``Trainer`` for every method, on one CPU, several processes or several GPUs.

The trainer knows only the method protocol (``tokenlab.methods.Method``): it never imports a concrete method.
Per optimizer step ``s`` (``accum_steps`` micro-batches, each with its own ``StepContext``):

    lr_g(s) = lr(s) * lr_scale_g,   lr(s) = warm-up + cosine or poly (``schedule.kind``), weight decay likewise
    loss    = method.training_step(batch, ctx)["loss"] / accum_steps  -> backward (AMP: bf16 autocast; fp16 + scaler)
    if any rank saw a non-finite loss: zero grads, restore the floating buffers (BatchNorm statistics the forward
        pass filled with NaN), count, skip (``train.max_nonfinite`` in a row stop the run)
    else: method.before_optimizer_step -> clip -> optimizer.step -> model EMA (timm ModelEmaV3) -> method.after_step

What the run is built from (device, data sets per data view, model and method, optimizer, schedules) lives in
``engine.builders``. Distributed: ``torchrun`` + DDP (gloo on CPU, NCCL on GPU) around the whole method (so
``training_step`` is the DDP forward), or FSDP2; the one training loader of ``data.sampler`` (resumable, seeded per
sample), metrics averaged over ranks, rank 0 writes. Checkpoints are atomic (``engine.checkpoint``) and hold
everything needed for an exact resume, including the sampler position inside an epoch and every rank's RNG states;
the data loader draws from its own generator so resuming never shifts the global RNG streams.

Nothing is lost (``docs/reliability.md``): rank 0 holds the run directory's lock (``utils.runlock``) for the whole
run; a run directory that holds checkpoints is only resumed (``checkpoint.resume``) or started over
(``checkpoint.overwrite``), never silently overwritten; a checkpoint is written every ``checkpoint.every_minutes``
(and ``every_steps``), at every epoch end and on SIGINT / SIGTERM (then ``TrainingInterrupted``); a checkpoint or
export holding a non-finite tensor is never written; ``--resume auto`` falls back past unreadable checkpoints; the
best weights by ``checkpoint.best_metric`` are exported to ``RUN/model_best`` as validation finds them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader, Dataset

from tokenlab.data.sampler import ResumableSampler, ShardSampler, build_train_loader
from tokenlab.data.transforms import collate_for
from tokenlab.engine import builders as B
from tokenlab.engine import checkpoint as ckpt
from tokenlab.engine.config import cfg_dict
from tokenlab.errors import NonFiniteLossError, PeerFailureError, TrainingAborted, TrainingInterrupted
from tokenlab.methods import Method, StepContext, TrainPlan, get_method_class
from tokenlab.utils import distributed as D
from tokenlab.utils.amp import amp_dtype, autocast, resolve_fast
from tokenlab.utils.device import resolve_device
from tokenlab.utils.metrics_log import MetricLogger
from tokenlab.utils.runlock import run_dir_lock
from tokenlab.utils.runs import (
    BEST_MODEL_STEM,
    CHECKPOINT_DIR,
    METRICS_FILE,
    MODEL_STEM,
    TENSORBOARD_DIR,
    export_stem,
)

__all__ = ["NonFiniteLossError", "PeerFailureError", "RunResult", "Trainer", "TrainingInterrupted", "train"]

BEST_MODES = ("max", "min")

logger = logging.getLogger(__name__)


@dataclass
class RunResult:
    """What a finished run produced.

    Attributes:
        run_dir: The run directory.
        step: Optimizer steps done.
        nonfinite_steps: Steps skipped because of a non-finite loss.
        val: Last validation metrics (empty without validation).
        exported: Stem of the exported model, or None.
    """

    run_dir: Path
    step: int
    nonfinite_steps: int
    val: dict[str, float]
    exported: Path | None


def _to_device(obj: Any, device: torch.device, channels_last: bool = False) -> Any:
    if isinstance(obj, torch.Tensor):
        obj = obj.to(device, non_blocking=True)
        if channels_last and obj.ndim == 4 and obj.is_floating_point():
            obj = obj.contiguous(memory_format=torch.channels_last)
        return obj
    if isinstance(obj, Mapping):
        return {k: _to_device(v, device, channels_last) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device, channels_last) for v in obj)
    return obj


def _batch_size(batch: Mapping[str, Any]) -> int:
    for key in ("label", "image", "crops"):
        v = batch.get(key)
        if key == "image" and isinstance(v, list):  # the detection view's list of (3, H_i, W_i) images
            return len(v)
        if isinstance(v, torch.Tensor):
            return int(v.shape[0])
        if isinstance(v, (list, tuple)) and v and isinstance(v[0], torch.Tensor):
            return int(v[0].shape[0])
    return 0


class Trainer:
    """Runs one training run from a validated config (``engine.config.load_config``).

    Args:
        cfg: The resolved config.
        train_set: Training data set of dict samples (``docs/design.md``).
        val_set: Optional validation data set.
        method: A ready method (built from ``cfg`` when None).
        data_meta: ``classes``, ``mean``, ``std``, ``img_size`` etc. stored with the exported model.
    """

    def __init__(
        self,
        cfg: DictConfig,
        train_set: Dataset,
        val_set: Dataset | None = None,
        method: Method | None = None,
        data_meta: Mapping[str, Any] | None = None,
    ) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        self.train_set, self.val_set = train_set, val_set
        self.data_meta = dict(data_meta) if data_meta is not None else B.data_meta(train_set)
        self._setup_runtime()
        self._setup_method(method)
        self._setup_plan()
        self._setup_optimizer()
        self._setup_wrappers()
        self.step = 0
        self.epoch = 0
        self.batches_done = 0  # micro-batches of the current epoch already consumed (sampler position)
        self.nonfinite_total = 0
        self.nonfinite_streak = 0
        self.last_val: dict[str, float] = {}
        # best validation value so far: {"metric", "mode", "value", "step"} (kept in the checkpoints)
        self.best: dict[str, Any] | None = None
        self._stop_signal: int | None = None  # SIGINT / SIGTERM received: checkpoint after this step and stop
        self._saved_step = -1  # step of the newest checkpoint written by this process
        self._last_save = time.monotonic()

    # ---- set-up steps (in this order) ---------------------------------------------------------------------------
    def _setup_runtime(self) -> None:
        """Device, process group, output check, seeds, determinism and mixed precision."""
        cfg = self.cfg
        self.device = resolve_device(cfg.train.device, "train.device")
        self.distributed = D.init_distributed(self.device, cfg.train.dist_timeout_s)
        self.rank, self.world = D.rank(), D.world_size()
        self.is_main = self.rank == 0
        if self.is_main:
            ckpt.check_writable(self.run_dir, cfg.train.min_free_disk_mb)
        D.barrier()
        seed = cfg.seed + self.rank
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # train.fast (auto|on|off) decides the effective amp / channels-last / compile (tokenlab.utils.amp)
        t = cfg.train
        fsdp = t.distributed == "fsdp" and self.distributed
        self.fast = resolve_fast(t.fast, self.device, t.amp, t.channels_last, t.compile, fsdp)
        self.amp_dtype = amp_dtype(self.fast.amp, self.device)
        if cfg.checkpoint.best_mode not in BEST_MODES:
            raise ValueError(
                f"config key 'checkpoint.best_mode' is {cfg.checkpoint.best_mode!r}; valid: {', '.join(BEST_MODES)}"
            )
        if cfg.checkpoint.every_minutes < 0:
            raise ValueError(f"config key 'checkpoint.every_minutes' must be >= 0, got {cfg.checkpoint.every_minutes}")
        self.scaler = torch.amp.GradScaler("cuda") if self.fast.amp == "fp16" else None

    def _setup_method(self, method: Method | None) -> None:
        """The method (built from the config and the data's meta unless given), on the device."""
        cfg = self.cfg
        self.method = method if method is not None else B.build_method_from_config(cfg, self.data_meta)
        self.model = self.method.model
        if cfg.train.grad_checkpointing:
            set_grad_checkpointing = getattr(self.model, "set_grad_checkpointing", None)
            if set_grad_checkpointing is None:
                raise ValueError(f"train.grad_checkpointing: {type(self.model).__name__} has no set_grad_checkpointing")
            set_grad_checkpointing(True)
        self.method.to(self.device)
        if self.fast.channels_last:
            self.model.to(memory_format=torch.channels_last)

    def _setup_plan(self) -> None:
        """Sampler, optimizer steps per epoch from this rank's share of the data, and the per-step schedules."""
        cfg = self.cfg
        bs, accum = cfg.data.batch_size, cfg.optim.accum_steps
        self.sampler = ResumableSampler(
            B.dataset_len(self.train_set), self.world, self.rank, shuffle=True, seed=cfg.seed
        )
        self.steps_per_epoch = self.sampler.per_rank // (bs * accum)
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"data.batch_size={bs} x optim.accum_steps={accum} exceeds the {self.sampler.per_rank} training "
                f"samples per process; lower the batch size"
            )
        epochs = cfg.schedule.epochs + cfg.schedule.cooldown_epochs
        self.plan = TrainPlan(
            total_steps=self.steps_per_epoch * epochs,
            steps_per_epoch=self.steps_per_epoch,
            epochs=epochs,
            world_size=self.world,
            global_batch_size=bs * accum * self.world,
        )
        self.stop_step = min(self.plan.total_steps, cfg.schedule.max_steps or self.plan.total_steps)
        self._lr_schedule, self._wd_schedule = B.build_schedules(cfg, self.steps_per_epoch)

    @property
    def lr_schedule(self) -> np.ndarray:
        """Learning rate per optimizer step (read-only: built from ``schedule.*`` and ``optim.*`` only)."""
        return self._lr_schedule.copy()

    @property
    def wd_schedule(self) -> np.ndarray:
        """Weight decay per optimizer step (read-only)."""
        return self._wd_schedule.copy()

    def _setup_optimizer(self) -> None:
        """FSDP2 sharding (it swaps the parameters, so it comes first), then the optimizer and the model EMA."""
        cfg = self.cfg
        self.fsdp = cfg.train.distributed == "fsdp" and self.distributed
        if self.fsdp:
            B.shard_method(self.method, cfg.train.ema.enabled)
        self.optimizer = B.build_optimizer(cfg, self.method.trainable_module(), fused=self.fast.fused_optimizer)
        self.ema = None
        if cfg.train.ema.enabled:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.model, decay=cfg.train.ema.decay, use_warmup=cfg.train.ema.warmup)

    def _setup_wrappers(self) -> None:
        """DDP around the whole method (after the optimizer: DDP keeps the parameters), compile, method start."""
        cfg = self.cfg
        self.runner: nn.Module = self.method
        if self.distributed and not self.fsdp:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.runner = DDP(self.method, device_ids=ids, find_unused_parameters=cfg.train.find_unused_parameters)
        if self.fast.compile:
            self.runner.compile()
        self.method.on_train_start(self.plan)

    @contextlib.contextmanager
    def _unsharded_root(self) -> Iterator[None]:
        """With FSDP2, gather the root's parameters so that a submodule can run outside the method's ``forward``."""
        if not self.fsdp:
            yield
            return
        from torch.distributed.fsdp import FSDPModule

        root = self.method
        assert isinstance(root, FSDPModule)  # fully_shard made the method's class an FSDPModule
        root.unshard()
        try:
            yield
        finally:
            root.reshard()

    def _loader(self, epoch: int) -> DataLoader:
        return build_train_loader(
            self.train_set, self.cfg.data.batch_size, self.sampler, epoch, self.batches_done * self.cfg.data.batch_size,
            num_workers=self.cfg.data.num_workers, pin_memory=self.device.type == "cuda",
            collate_fn=collate_for(self.method.data_view),
        )  # fmt: skip

    # ---- state --------------------------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path | None:
        """Write a checkpoint of the current position (collective: every rank must call it).

        Returns:
            The checkpoint directory on rank 0; None on the other ranks, and when the state holds a non-finite
            tensor (weights, EMA, optimizer state or buffers): such a checkpoint could not resume, so it is not
            written and the older, finite ones are kept.
        """
        rngs = D.all_gather_objects(ckpt.capture_rng_state())
        weights = {"method": ckpt.method_state(self.method, self.fsdp)}
        if self.ema is not None:
            weights["ema"] = self.ema.module.state_dict()
        optim_state = ckpt.optimizer_state(self.method, self.optimizer, self.fsdp)
        path = None
        bad = ckpt.nonfinite_tensors(weights) + ckpt.nonfinite_tensors(optim_state, "optimizer")
        if bad:
            if self.is_main:
                last = ckpt.latest_checkpoint(self.run_dir / CHECKPOINT_DIR)
                logger.warning(
                    "not writing a checkpoint at step %d: %d non-finite tensors (%s); keeping %s",
                    self.step, len(bad), ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else ""), last or "none",
                )  # fmt: skip
            D.barrier()
            return None
        if self.is_main:
            state = {
                "step": self.step,
                "epoch": self.epoch,
                "batches_done": self.batches_done,
                "world_size": self.world,
                "optimizer_layout": ckpt.optimizer_layout(self.fsdp),
                "optimizer": optim_state,
                "scaler": self.scaler.state_dict() if self.scaler is not None else {},
                "nonfinite_total": self.nonfinite_total,
                "nonfinite_streak": self.nonfinite_streak,
                "best": dict(self.best) if self.best is not None else {},
                "method_extra": self.method.extra_state_dict(),
                "rng": rngs,
                "config": OmegaConf.to_yaml(self.cfg),
            }
            path = ckpt.save_checkpoint_dir(self.run_dir / CHECKPOINT_DIR, self.step, weights, state)
            ckpt.prune_checkpoints(self.run_dir / CHECKPOINT_DIR, self.cfg.checkpoint.keep)
            logger.info("checkpoint %s", path)
        self._saved_step, self._last_save = self.step, time.monotonic()
        D.barrier()
        return path

    def _check_architecture(self, path: Path, weights: Mapping[str, torch.Tensor], state: Mapping[str, Any]) -> None:
        """A checkpoint of another model or method fails with one line naming the file and both architectures."""
        mine = {k: tuple(v.shape) for k, v in self.method.state_dict().items()}
        theirs = {k: tuple(v.shape) for k, v in weights.items()}
        missing, unexpected = sorted(set(mine) - set(theirs)), sorted(set(theirs) - set(mine))
        shapes = [k for k in sorted(set(mine) & set(theirs)) if mine[k] != theirs[k]]
        if not (missing or unexpected or shapes):
            return
        old = OmegaConf.create(state.get("config", "{}"))
        arch = [f"{k}={OmegaConf.select(old, k)}" for k in ("model.name", "method.name")]
        here = f"model.name={self.cfg.model.name}, method.name={self.cfg.method.name}"
        parts = [f"{len(missing)} keys missing (e.g. {missing[0]})"] if missing else []
        parts += [f"{len(unexpected)} unexpected (e.g. {unexpected[0]})"] if unexpected else []
        parts += [f"{len(shapes)} of another shape (e.g. {shapes[0]}: {list(theirs[shapes[0]])} in the checkpoint, "
                  f"{list(mine[shapes[0]])} here)"] if shapes else []  # fmt: skip
        raise ckpt.CheckpointError(
            f"checkpoint {path} holds another architecture ({', '.join(arch)}; this run: {here}): "
            f"{'; '.join(parts)}. Resume with the checkpoint's config or start over with --overwrite"
        )

    def load_checkpoint(
        self, path: str | Path, loaded: tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]] | None = None
    ) -> None:
        """Restore every piece of training state from a checkpoint directory (``loaded``: already read from it).

        Raises:
            CheckpointError: the checkpoint is unreadable, holds non-finite tensors or another architecture.
        """
        path = Path(path)
        weights, state = loaded if loaded is not None else ckpt.load_checkpoint_dir(path)
        if loaded is None:
            self._check_usable(path, weights, state)
        self._check_architecture(path, weights["method"], state)
        layout = state.get("optimizer_layout", ckpt.optimizer_layout(False))
        if layout != ckpt.optimizer_layout(self.fsdp):
            raise ValueError(
                f"checkpoint {path} holds the optimizer state of a {layout} run, this run is "
                f"{ckpt.optimizer_layout(self.fsdp)}: resume it with train.distributed="
                f"{'fsdp' if layout == ckpt.optimizer_layout(True) else 'ddp'} (under torchrun)"
            )
        old = OmegaConf.create(state.get("config", "{}"))
        for key in ("method", "model", "optim", "schedule.epochs", "data.batch_size"):
            if OmegaConf.select(old, key) != OmegaConf.select(self.cfg, key):
                logger.warning("config key %r differs from the checkpoint's; the resumed run is not the same run", key)
        ckpt.load_method_and_optimizer(self.method, self.optimizer, weights["method"], state["optimizer"], self.fsdp)
        if self.ema is not None:
            if "ema" not in weights:
                raise ValueError(f"train.ema.enabled but checkpoint {path} holds no EMA weights")
            self.ema.module.load_state_dict(weights["ema"], strict=True)
        if self.scaler is not None and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.method.load_extra_state_dict(state["method_extra"])
        self.step, self.epoch, self.batches_done = state["step"], state["epoch"], state["batches_done"]
        self.nonfinite_total, self.nonfinite_streak = state["nonfinite_total"], state["nonfinite_streak"]
        best = state.get("best") or None
        wanted = (self.cfg.checkpoint.best_metric, self.cfg.checkpoint.best_mode)
        if best is not None and (best.get("metric"), best.get("mode")) != wanted:
            logger.warning("checkpoint %s kept the best %s (%s); this run selects by %s (%s): starting afresh",
                           path, best.get("metric"), best.get("mode"), *wanted)  # fmt: skip
            best = None
        self.best = dict(best) if best is not None else None
        self._saved_step = self.step
        rngs = state["rng"]
        if len(rngs) != self.world:
            logger.warning("resuming %d-process state on %d processes: RNG streams are reassigned", len(rngs),
                           self.world)  # fmt: skip
        ckpt.restore_rng_state(rngs[self.rank % len(rngs)])
        logger.info("resumed from %s at step %d (epoch %d, batch %d)", path, self.step, self.epoch, self.batches_done)

    @staticmethod
    def _check_usable(path: Path, weights: Mapping[str, Any], state: Mapping[str, Any]) -> None:
        """A checkpoint the trainer wrote, whole and finite (else a CheckpointError naming it)."""
        if "method" not in weights:
            raise ckpt.CheckpointError(f"checkpoint {path} has no method.safetensors (an incomplete copy?)")
        missing = [k for k in ("step", "epoch", "batches_done", "optimizer", "rng", "method_extra") if k not in state]
        if missing:
            raise ckpt.CheckpointError(
                f"checkpoint file {path / ckpt.STATE_FILE} lacks {', '.join(missing)}: not a tokenlab training state"
            )
        bad = ckpt.nonfinite_tensors(weights) + ckpt.nonfinite_tensors(state.get("optimizer", {}), "optimizer")
        if bad:
            raise ckpt.CheckpointError(
                f"checkpoint {path} holds {len(bad)} non-finite tensors (e.g. {', '.join(bad[:2])}): it cannot "
                f"resume; use an older checkpoint"
            )

    def _read_resume_checkpoint(self) -> Path | None:
        """Load the checkpoint ``checkpoint.resume`` names; under ``auto`` skip unreadable or non-finite ones.

        Raises:
            CheckpointError: the named checkpoint (or, under ``auto``, every one) cannot be used.
        """
        resume = self.cfg.checkpoint.resume
        candidates = ckpt.resume_candidates(resume, self.run_dir)
        skipped: list[str] = []
        for path in candidates:
            try:
                weights, state = ckpt.load_checkpoint_dir(path)
                self._check_usable(path, weights, state)
            except ckpt.CheckpointError as err:
                if resume != "auto":
                    raise
                logger.warning("--resume auto: skipping %s: %s", path.name, err)
                skipped.append(path.name)
                continue
            self.load_checkpoint(path, (weights, state))
            if skipped:
                logger.warning("--resume auto: resumed from %s (skipped newer %s)", path, ", ".join(skipped))
            return path
        if skipped:
            raise ckpt.CheckpointError(
                f"--resume auto: no usable checkpoint in {self.run_dir / CHECKPOINT_DIR} ({', '.join(skipped)} "
                f"unreadable or non-finite, see the warnings); start over with --overwrite"
            )
        if resume == "auto":
            logger.info("--resume auto: no checkpoint in %s, starting fresh", self.run_dir / CHECKPOINT_DIR)
        return None

    def _prepare_run_dir(self) -> None:
        """Refuse to train into a run directory that holds checkpoints unless resuming or ``checkpoint.overwrite``."""
        problem = prepare_run_dir(self.cfg) if self.is_main else None
        problem = D.broadcast_object(problem) if self.distributed else problem
        if problem:
            raise ValueError(problem)

    # ---- interruption -------------------------------------------------------------------------------------------
    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._stop_signal == signum:  # the same signal twice: stop at once, without a checkpoint
            raise KeyboardInterrupt
        if self._stop_signal is None:
            self._stop_signal = signum
            if self.is_main:
                print(
                    f"\n{signal.Signals(signum).name} received: writing a checkpoint after this step, then stopping "
                    f"(press Ctrl-C again to stop at once)",
                    file=sys.stderr,
                    flush=True,
                )

    @contextlib.contextmanager
    def _signals_checkpoint(self) -> Iterator[None]:
        """While training, SIGINT and SIGTERM ask for a checkpoint and a clean stop (main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _poll(self) -> None:
        """After a step: write the timed checkpoint when due; on SIGINT / SIGTERM write one and stop (every rank)."""
        minutes = self.cfg.checkpoint.every_minutes
        due = bool(minutes) and time.monotonic() - self._last_save >= 60.0 * minutes
        stop = self._stop_signal or 0
        if self.distributed:  # every rank must take the same decision: checkpointing is a collective
            flags = D.all_reduce_sum(torch.tensor([float(stop), float(due)], device=self.device))
            stop, due = (int(flags[0].item()) and (self._stop_signal or signal.SIGTERM)), bool(flags[1].item())
        if not (stop or due):
            return
        path = self.save_checkpoint() if self._saved_step != self.step else None
        if not stop:
            return
        path = ckpt.latest_checkpoint(self.run_dir / CHECKPOINT_DIR) if self.is_main else None
        raise TrainingInterrupted(
            f"interrupted at step {self.step}: "
            + (f"newest checkpoint {path}" if path is not None else "no checkpoint written (nothing finite to keep)")
            + "; continue it with checkpoint.resume=auto (tokenlab train: --resume auto)",
            checkpoint=path,
            signum=int(stop),
        )

    # ---- the loop -----------------------------------------------------------------------------------------------
    def _set_schedules(self) -> float:
        i = min(self.step, len(self._lr_schedule) - 1)
        lr, wd = float(self._lr_schedule[i]), float(self._wd_schedule[i])
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
            g["weight_decay"] = wd * g.get("wd_scale", 1.0)
        return lr

    def _context(self, lr: float, micro: int, accum: int) -> StepContext:
        wd = float(self._wd_schedule[min(self.step, len(self._wd_schedule) - 1)])
        return StepContext(
            step=self.step,
            epoch=self.epoch,
            plan=self.plan,
            device=self.device,
            amp_dtype=self.amp_dtype,
            lr=lr,
            values={"weight_decay": wd},
            micro_batch=micro,
            accum_steps=accum,
        )

    def _micro_context(self, micro: int) -> contextlib.AbstractContextManager:
        last = micro == self.cfg.optim.accum_steps - 1
        no_sync = getattr(self.runner, "no_sync", None)
        if not last and no_sync is not None:
            return no_sync()
        return contextlib.nullcontext()

    def _train_step(self, batches: Sequence[Mapping[str, Any]]) -> tuple[dict[str, float], bool]:
        """One optimizer step over ``accum_steps`` micro-batches; returns (mean terms, whether it was applied)."""
        lr = self._set_schedules()
        accum = len(batches)
        ctx = self._context(lr, accum - 1, accum)  # the step-level hooks see the last micro-batch's context
        terms: dict[str, torch.Tensor] = {}
        finite = torch.ones((), device=self.device)
        # the forward pass updates buffers (BatchNorm statistics) even when the step is then skipped: keep them
        buffers = [b for b in self.method.buffers() if b.is_floating_point()]
        saved = [b.detach().clone() for b in buffers]
        self.optimizer.zero_grad(set_to_none=True)
        for micro, batch in enumerate(batches):
            with self._micro_context(micro), autocast(self.device, self.amp_dtype):
                out = self.runner(batch, self._context(lr, micro, accum))
            if "loss" not in out:
                raise KeyError(f"method {self.method.name!r} returned no 'loss' (terms: {sorted(out)})")
            loss = out["loss"].float() / accum
            finite = finite * torch.isfinite(loss.detach()).float()
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            for k, v in out.items():
                terms[k] = terms.get(k, 0.0) + v.detach().float() / accum
        finite = D.all_reduce_sum(1.0 - finite)  # number of ranks with a non-finite loss
        applied = bool(finite.item() == 0)
        if applied:
            self.nonfinite_streak = 0
            self.method.before_optimizer_step(ctx)
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            if self.cfg.optim.clip_grad is not None:  # after unscaling (fp16); train.clip_mode: global | per_param
                params = self.method.trainable_module().parameters()
                norm = B.clip_gradients(params, self.cfg.optim.clip_grad, self.cfg.train.get("clip_mode", "global"))
                terms["grad_norm"] = norm.detach().float()
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            if self.ema is not None and (self.step + 1) % self.cfg.train.ema.every_steps == 0:
                self.ema.update(self.model, step=self.step)
            self.method.after_step(ctx)
        else:
            self.optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                for b, before in zip(buffers, saved, strict=True):
                    b.copy_(before)
            self.nonfinite_total += 1
            self.nonfinite_streak += 1
            shown = {k: float(v) for k, v in terms.items()}
            logger.warning(
                "non-finite loss at step %d (terms %s): step skipped (%d in a row, %d in total)",
                self.step,
                shown,
                self.nonfinite_streak,
                self.nonfinite_total,
            )
        return {k: float(v) for k, v in terms.items()} | {"lr": lr}, applied

    def fit(self) -> RunResult:
        """Train to the end (or ``schedule.max_steps``), checkpointing, validating and exporting on the way."""
        with run_dir_lock(self.run_dir) if self.is_main else contextlib.nullcontext(), self._signals_checkpoint():
            return self._fit()

    def _fit(self) -> RunResult:
        cfg = self.cfg
        self._prepare_run_dir()
        resume = self._read_resume_checkpoint()
        if cfg.checkpoint.best_metric is not None and self.val_set is None:
            logger.warning("checkpoint.best_metric=%s but no validation data (data.val_split): no %s export",
                           cfg.checkpoint.best_metric, BEST_MODEL_STEM)  # fmt: skip
        self._last_save = time.monotonic()
        if self.is_main:
            (self.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
        log = MetricLogger(
            self.run_dir,
            enabled=self.is_main,
            tensorboard=cfg.log.tensorboard,
            progress=cfg.log.progress,
            total_steps=self.stop_step,
            initial_step=self.step,
        )
        if self.is_main:
            log.log("event", self.step, self.epoch, {"event": "resume" if resume else "start", "plan": vars(self.plan)})
        try:
            self._loop(log)
        except RuntimeError as err:
            if self.distributed and not isinstance(err, TrainingAborted) and D.is_peer_failure(err):
                # (checkpoints are never non-finite, so the newest one resumes)
                last = ckpt.latest_checkpoint(self.run_dir / CHECKPOINT_DIR)
                raise PeerFailureError(
                    f"rank {self.rank}: another rank stopped answering (it died or hangs; no reply within "
                    f"train.dist_timeout_s={self.cfg.train.dist_timeout_s} s) at step {self.step}. Stopping this rank. "
                    f"Last complete checkpoint: {last or 'none'}; run the same command with --resume auto to continue. "
                    f"({type(err).__name__}: {str(err).splitlines()[0][:200]})"
                ) from err
            raise
        finally:
            log.close()
        exported = self.export() if cfg.checkpoint.export else None
        D.barrier()
        return RunResult(self.run_dir, self.step, self.nonfinite_total, self.last_val, exported)

    def _loop(self, log: MetricLogger) -> None:
        cfg = self.cfg
        accum = cfg.optim.accum_steps
        self.method.train()
        window: dict[str, float] = {}
        window_steps, window_images, t0 = 0, 0, time.perf_counter()
        while self.step < self.stop_step:
            if self.batches_done >= self.steps_per_epoch * accum:
                self.epoch, self.batches_done = self.epoch + 1, 0
            it = iter(self._loader(self.epoch))
            while self.batches_done < self.steps_per_epoch * accum and self.step < self.stop_step:
                try:
                    batches = [_to_device(next(it), self.device, self.fast.channels_last) for _ in range(accum)]
                except RuntimeError:
                    if self._stop_signal is None:
                        raise
                    self._poll()  # Ctrl-C also stopped the loader's workers: checkpoint the last complete step
                    raise
                terms, applied = self._train_step(batches)
                self.batches_done += accum
                self.step += 1
                log.tick(self.step)  # progress bar and its ETA every step
                window_images += sum(_batch_size(b) for b in batches) * self.world
                window_steps += 1
                for k, v in terms.items():
                    window[k] = window.get(k, 0.0) + v
                if not applied and self.nonfinite_streak >= cfg.train.max_nonfinite:
                    last = ckpt.latest_checkpoint(self.run_dir / CHECKPOINT_DIR)  # never non-finite: it resumes
                    raise NonFiniteLossError(
                        f"{self.nonfinite_streak} non-finite losses in a row up to step {self.step - 1} (terms "
                        f"{terms}); stopping. Last good checkpoint: {last or 'none'}"
                        + (" (resume it with --resume auto)" if last else "")
                        + ". Lower optim.lr, enable optim.clip_grad, or use train.amp=bf16 instead of fp16"
                    )
                if self.step % cfg.log.every_steps == 0 or self.step == self.stop_step:
                    self._log_window(log, window, window_steps, window_images, time.perf_counter() - t0)
                    window, window_steps, window_images, t0 = {}, 0, 0, time.perf_counter()
                if cfg.checkpoint.every_steps and self.step % cfg.checkpoint.every_steps == 0:
                    self.save_checkpoint()
                self._poll()
            epoch_done = self.batches_done >= self.steps_per_epoch * accum
            if epoch_done:
                last_epoch = self.step >= self.plan.total_steps
                every = cfg.log.val_every_epochs
                if self.val_set is not None and (last_epoch or (every and (self.epoch + 1) % every == 0)):
                    self._keep_best(self.validate(log))
                if self.is_main:
                    log.log("epoch", self.step, self.epoch, {"nonfinite_total": self.nonfinite_total})
                self.save_checkpoint()
                self._poll()
        if self.val_set is not None and not self.last_val:
            self._keep_best(self.validate(log))
        if self.batches_done < self.steps_per_epoch * accum and self._saved_step != self.step:
            self.save_checkpoint()  # stopped by max_steps mid-epoch

    def _log_window(self, log: MetricLogger, window: dict[str, float], steps: int, images: int, secs: float) -> None:
        names = sorted(window)
        vals = torch.tensor([window[k] / max(1, steps) for k in names], dtype=torch.float64)
        vals = D.all_reduce_mean(vals)
        metrics = dict(zip(names, vals.tolist(), strict=True))
        metrics["images_per_s"] = images / max(secs, 1e-9)
        metrics["nonfinite_total"] = self.nonfinite_total
        if self.is_main:
            log.log("step", self.step, self.epoch, metrics)
            log.progress(self.step, {k: metrics[k] for k in ("loss", "lr", "images_per_s") if k in metrics})

    def eval_module(self) -> nn.Module:
        """The module validated and exported: the model EMA when enabled, else the method's export module."""
        return self.ema.module if self.ema is not None else self.method.export_module()

    @torch.no_grad()
    def validate(self, log: MetricLogger | None = None) -> dict[str, float]:
        """Top-1 accuracy and mean CE (as defined by the method's ``validation_step``) over the validation set."""
        assert self.val_set is not None
        model = self.eval_module()
        D.broadcast_module(model, parameters=False)  # rank 0's BatchNorm statistics: validate what rank 0 exports
        was_training = model.training
        model.eval()
        batch_size = int(self.cfg.data.val_batch_size or self.cfg.data.batch_size)
        num_val = B.dataset_len(self.val_set)
        loader = DataLoader(
            self.val_set,
            batch_size=batch_size,
            sampler=ShardSampler(num_val, self.world, self.rank),
            num_workers=self.cfg.data.num_workers,
            collate_fn=collate_for(self.method.data_view),
        )
        sums: dict[str, torch.Tensor] = {}
        with self._unsharded_root():
            for batch in loader:
                batch = _to_device(batch, self.device, self.fast.channels_last)
                with autocast(self.device, self.amp_dtype):
                    out = self.method.validation_step(model, batch)
                for k, v in out.items():
                    sums[k] = sums.get(k, torch.zeros((), dtype=torch.float64, device=self.device)) + v.double()
            if self.fsdp:  # sharded blocks gather in every forward: every rank must run as many as rank 0 (the most)
                most = -(-len(range(0, num_val, self.world)) // batch_size)
                one = collate_for(self.method.data_view)([self.val_set[0]])
                pad = _to_device(one, self.device, self.fast.channels_last)
                for _ in range(most - len(loader)):
                    with autocast(self.device, self.amp_dtype):
                        self.method.validation_step(model, pad)  # result discarded
        names = sorted(sums)
        total = D.all_reduce_sum(torch.stack([sums[k] for k in names])) if names else torch.zeros(0)
        stats = dict(zip(names, total.tolist(), strict=True))
        count = stats.pop("count", 0.0) or 1.0
        metrics = {("acc1" if k == "correct" else k): v / count for k, v in stats.items()}
        model.train(was_training)
        self.last_val = metrics
        if log is not None and self.is_main:
            log.log("val", self.step, self.epoch, metrics)
        logger.info("validation at step %d: %s", self.step, {k: round(v, 4) for k, v in metrics.items()})
        return metrics

    def _keep_best(self, metrics: Mapping[str, float]) -> None:
        """Export the eval module to ``RUN/model_best`` when ``checkpoint.best_metric`` improved (every rank)."""
        key, mode = self.cfg.checkpoint.best_metric, self.cfg.checkpoint.best_mode
        if key is None:
            return
        if key not in metrics:
            raise ValueError(
                f"config key 'checkpoint.best_metric' is {key!r}, which validation does not report; "
                f"choose one of {', '.join(sorted(metrics))}"
            )
        value = float(metrics[key])
        if not math.isfinite(value):
            logger.warning("validation %s is %s at step %d: not a best", key, value, self.step)
            return
        if self.best is not None and not (value > self.best["value"] if mode == "max" else value < self.best["value"]):
            return
        self.best = {"metric": key, "mode": mode, "value": value, "step": self.step}
        if self.cfg.checkpoint.export:
            self.export("best")

    def export(self, which: str = "last") -> Path | None:
        """Write ``RUN/model.safetensors`` + ``.json`` on rank 0 through ``tokenlab.models.save_exported``.

        ``which="best"``: ``RUN/model_best.*``, the meta saying how it was selected (``selected_by``, ``value``, ...).

        Raises:
            NonFiniteLossError: the weights hold a non-finite tensor (nothing is written).
        """
        target = self.eval_module()
        # under FSDP a collective: every rank gathers, rank 0 gets an unsharded CPU copy
        model = B.unsharded_copy(self.cfg, self.method, target, self.is_main) if self.fsdp else target
        if not self.is_main:
            return None
        assert model is not None  # rank 0 always gets the copy
        from tokenlab.models import save_exported

        stem = export_stem(self.run_dir, which)
        bad = ckpt.nonfinite_tensors(model.state_dict())
        if bad:
            last = ckpt.latest_checkpoint(self.run_dir / CHECKPOINT_DIR)
            raise NonFiniteLossError(
                f"not exporting {stem}.safetensors: the weights hold {len(bad)} non-finite tensors (e.g. "
                f"{', '.join(bad[:2])}). Last good checkpoint: {last or 'none'}; lower optim.lr or enable "
                f"optim.clip_grad and resume it"
            )

        model_kwargs = cfg_dict(self.cfg.model.kwargs)
        model_kwargs["num_classes"] = int(getattr(model, "num_classes", self.cfg.model.num_classes or 0))
        name = getattr(model, "pretrained_cfg", {}).get("architecture") or self.cfg.model.name
        meta = {
            "model": name,
            "model_kwargs": model_kwargs,
            "num_classes": model_kwargs["num_classes"],
            "img_size": self.cfg.data.img_size,
            "method": self.cfg.method.name,
            "step": self.step,
            "ema": self.ema is not None,
            **{k: v for k, v in self.data_meta.items() if k not in ("num_classes",)},
            **self.method.export_meta(),
        }
        if getattr(self.method, "pretrained_from", None):  # model.pretrained: where the initial weights came from
            meta["pretrained"] = self.method.pretrained_from
        if which == "best":
            assert self.best is not None
            meta["selected_by"] = self.best["metric"]
            meta.update({k: self.best[k] for k in ("mode", "value", "step")})
        stem = save_exported(model, stem, json.loads(json.dumps(meta, default=str)))
        logger.info("exported %s.safetensors", stem)
        return stem


def prepare_run_dir(cfg: DictConfig) -> str | None:
    """Rank 0, under the run directory's lock: what stops a fresh run there (a message), or None.

    A fresh run (``checkpoint.resume`` null) into a directory that holds checkpoints is refused unless
    ``checkpoint.overwrite``, which removes what a training writes there (checkpoints, metrics, TensorBoard events,
    the exports) so no old checkpoint can be resumed into the new run later.
    """
    run_dir = Path(cfg.run_dir)
    if cfg.checkpoint.resume is not None:
        return None
    found = ckpt.list_checkpoints(run_dir / CHECKPOINT_DIR)
    if not found:
        return None
    if not cfg.checkpoint.overwrite:
        return (
            f"run directory {run_dir} already holds checkpoints (newest {found[-1].name}): continue it with "
            f"--resume auto (checkpoint.resume=auto), or start over with --overwrite (checkpoint.overwrite=true), "
            f"which deletes them"
        )
    logger.warning("--overwrite: deleting the checkpoints, metrics and exports in %s", run_dir)
    shutil.rmtree(run_dir / CHECKPOINT_DIR, ignore_errors=True)
    shutil.rmtree(run_dir / TENSORBOARD_DIR, ignore_errors=True)
    for stem in (MODEL_STEM, BEST_MODEL_STEM):
        for suffix in (".json", ".safetensors"):  # the meta first: it marks an export complete
            (run_dir / (stem + suffix)).unlink(missing_ok=True)
    (run_dir / METRICS_FILE).unlink(missing_ok=True)
    return None


def train(cfg: DictConfig) -> RunResult:
    """Build data (the method's data view), model and method from ``cfg`` and run the training (``tokenlab train``).

    Every method, segmentation included, goes through here: the engine builds the data sets the method's
    ``data_view`` names, and the ``Trainer`` builds the model, method, optimizer and schedules.
    """
    cls = get_method_class(cfg.method.name)  # an unknown method fails here, before any data is read
    options = cls.transform_options(cfg_dict(cfg.method.kwargs))
    main = int(os.environ.get("RANK", "0")) == 0  # the process group starts later, in the Trainer
    lock: contextlib.AbstractContextManager = contextlib.nullcontext()
    if main:  # a second training into the same run directory fails here, before reading any data
        ckpt.check_writable(cfg.run_dir, cfg.train.min_free_disk_mb)
        lock = run_dir_lock(cfg.run_dir)
    with lock:
        if main and (problem := prepare_run_dir(cfg)):
            raise ValueError(problem)
        train_set, val_set, meta = B.build_datasets(cfg, cls.data_view, options)
        try:
            result = Trainer(cfg, train_set, val_set, data_meta=meta).fit()
            D.barrier()  # leave the process group together: gloo can abort a rank torn down while a peer still works
            return result
        finally:
            D.cleanup_distributed()
