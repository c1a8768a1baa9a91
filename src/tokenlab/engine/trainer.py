"""The training engine's loop: one ``Trainer`` for every method, on one CPU, several processes or several GPUs.

The trainer knows only the method protocol (``tokenlab.methods.Method``): it never imports a concrete method.
Per optimizer step ``s`` (``accum_steps`` micro-batches, each with its own ``StepContext``):

    lr_g(s) = lr(s) * lr_scale_g,   lr(s) = warm-up + cosine or poly (``schedule.kind``), weight decay likewise
    loss    = method.training_step(batch, ctx)["loss"] / accum_steps  -> backward (AMP: bf16 autocast; fp16 + scaler)
    if any rank saw a non-finite loss: zero grads, count, skip (``train.max_nonfinite`` in a row stop the run)
    else: method.before_optimizer_step -> clip -> optimizer.step -> model EMA (timm ModelEmaV3) -> method.after_step

What the run is built from (device, data sets per data view, model and method, optimizer, schedules) lives in
``engine.builders``. Distributed: ``torchrun`` + DDP (gloo on CPU, NCCL on GPU) around the whole method (so
``training_step`` is the DDP forward), or FSDP2; the one training loader of ``data.sampler`` (resumable, seeded per
sample), metrics averaged over ranks, rank 0 writes. Checkpoints are atomic (``engine.checkpoint``) and hold
everything needed for an exact resume, including the sampler position inside an epoch and every rank's RNG states;
the data loader draws from its own generator so resuming never shifts the global RNG streams.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate

from tokenlab.data.sampler import ResumableSampler, ShardSampler, build_train_loader
from tokenlab.engine import builders as B
from tokenlab.engine import checkpoint as ckpt
from tokenlab.engine.config import cfg_dict
from tokenlab.errors import NonFiniteLossError, PeerFailureError, TrainingAborted
from tokenlab.methods import Method, StepContext, TrainPlan, get_method_class
from tokenlab.utils import distributed as D
from tokenlab.utils.amp import amp_dtype, autocast
from tokenlab.utils.device import resolve_device
from tokenlab.utils.metrics_log import MetricLogger

__all__ = ["NonFiniteLossError", "PeerFailureError", "RunResult", "Trainer", "train"]

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
        self.amp_dtype = amp_dtype(cfg.train.amp, self.device)
        self.scaler = torch.amp.GradScaler("cuda") if cfg.train.amp == "fp16" else None

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
        if cfg.train.channels_last:
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
        self.optimizer = B.build_optimizer(cfg, self.method.trainable_module())
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
        if cfg.train.compile:
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
        )  # fmt: skip

    # ---- state --------------------------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path | None:
        """Write a checkpoint of the current position (collective: every rank must call it)."""
        rngs = D.all_gather_objects(ckpt.capture_rng_state())
        weights = {"method": ckpt.method_state(self.method, self.fsdp)}
        if self.ema is not None:
            weights["ema"] = self.ema.module.state_dict()
        optim_state = ckpt.optimizer_state(self.method, self.optimizer, self.fsdp)
        path = None
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
                "method_extra": self.method.extra_state_dict(),
                "rng": rngs,
                "config": OmegaConf.to_yaml(self.cfg),
            }
            path = ckpt.save_checkpoint_dir(self.run_dir / "checkpoints", self.step, weights, state)
            ckpt.prune_checkpoints(self.run_dir / "checkpoints", self.cfg.checkpoint.keep)
            logger.info("checkpoint %s", path)
        D.barrier()
        return path

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore every piece of training state from a checkpoint directory."""
        weights, state = ckpt.load_checkpoint_dir(path)
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
        rngs = state["rng"]
        if len(rngs) != self.world:
            logger.warning("resuming %d-process state on %d processes: RNG streams are reassigned", len(rngs),
                           self.world)  # fmt: skip
        ckpt.restore_rng_state(rngs[self.rank % len(rngs)])
        logger.info("resumed from %s at step %d (epoch %d, batch %d)", path, self.step, self.epoch, self.batches_done)

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
        cfg = self.cfg
        resume = ckpt.resume_path(self.cfg.checkpoint.resume, self.run_dir)
        if resume is not None:
            self.load_checkpoint(resume)
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
                last = ckpt.latest_checkpoint(self.run_dir / "checkpoints")
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
                batches = [_to_device(next(it), self.device, cfg.train.channels_last) for _ in range(accum)]
                terms, applied = self._train_step(batches)
                self.batches_done += accum
                self.step += 1
                window_images += sum(_batch_size(b) for b in batches) * self.world
                window_steps += 1
                for k, v in terms.items():
                    window[k] = window.get(k, 0.0) + v
                if not applied and self.nonfinite_streak >= cfg.train.max_nonfinite:
                    last = ckpt.latest_checkpoint(self.run_dir / "checkpoints")
                    raise NonFiniteLossError(
                        f"{self.nonfinite_streak} non-finite losses in a row up to step {self.step - 1} (terms "
                        f"{terms}); stopping. Last good checkpoint: {last or 'none'}. Lower optim.lr, enable "
                        f"optim.clip_grad, or use train.amp=bf16 instead of fp16"
                    )
                if self.step % cfg.log.every_steps == 0 or self.step == self.stop_step:
                    self._log_window(log, window, window_steps, window_images, time.perf_counter() - t0)
                    window, window_steps, window_images, t0 = {}, 0, 0, time.perf_counter()
                if cfg.checkpoint.every_steps and self.step % cfg.checkpoint.every_steps == 0:
                    self.save_checkpoint()
            epoch_done = self.batches_done >= self.steps_per_epoch * accum
            if epoch_done:
                last_epoch = self.step >= self.plan.total_steps
                every = cfg.log.val_every_epochs
                if self.val_set is not None and (last_epoch or (every and (self.epoch + 1) % every == 0)):
                    self.validate(log)
                if self.is_main:
                    log.log("epoch", self.step, self.epoch, {"nonfinite_total": self.nonfinite_total})
                self.save_checkpoint()
        if self.val_set is not None and not self.last_val:
            self.validate(log)
        if self.batches_done < self.steps_per_epoch * accum:
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
            collate_fn=default_collate,
        )
        sums: dict[str, torch.Tensor] = {}
        with self._unsharded_root():
            for batch in loader:
                batch = _to_device(batch, self.device, self.cfg.train.channels_last)
                with autocast(self.device, self.amp_dtype):
                    out = self.method.validation_step(model, batch)
                for k, v in out.items():
                    sums[k] = sums.get(k, torch.zeros((), dtype=torch.float64, device=self.device)) + v.double()
            if self.fsdp:  # sharded blocks gather in every forward: every rank must run as many as rank 0 (the most)
                most = -(-len(range(0, num_val, self.world)) // batch_size)
                pad = _to_device(default_collate([self.val_set[0]]), self.device, self.cfg.train.channels_last)
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

    def export(self) -> Path | None:
        """Write ``RUN/model.safetensors`` + ``.json`` (rank 0) through ``tokenlab.models.save_exported``."""
        target = self.eval_module()
        # under FSDP a collective: every rank gathers, rank 0 gets an unsharded CPU copy
        model = B.unsharded_copy(self.cfg, self.method, target, self.is_main) if self.fsdp else target
        if not self.is_main:
            return None
        assert model is not None  # rank 0 always gets the copy
        from tokenlab.models import save_exported

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
        stem = save_exported(model, self.run_dir / "model", json.loads(json.dumps(meta, default=str)))
        logger.info("exported %s.safetensors", stem)
        return stem


def train(cfg: DictConfig) -> RunResult:
    """Build data (the method's data view), model and method from ``cfg`` and run the training (``tokenlab train``).

    Every method, segmentation included, goes through here: the engine builds the data sets the method's
    ``data_view`` names, and the ``Trainer`` builds the model, method, optimizer and schedules.
    """
    cls = get_method_class(cfg.method.name)  # an unknown method fails here, before any data is read
    options = cls.transform_options(cfg_dict(cfg.method.kwargs))
    train_set, val_set, meta = B.build_datasets(cfg, cls.data_view, options)
    try:
        return Trainer(cfg, train_set, val_set, data_meta=meta).fit()
    finally:
        D.cleanup_distributed()
