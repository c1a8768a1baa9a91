"""The training engine: one loop for every method, on one CPU, several processes or several GPUs.

The trainer knows only the method protocol (``tokenlab.methods.Method``): it never imports a concrete method.
Per optimizer step ``s`` (``accum_steps`` micro-batches):

    lr_g(s) = lr(s) * lr_scale_g,   lr(s) = warm-up + cosine (``utils.schedules``), weight decay likewise
    loss    = method.training_step(batch, ctx)["loss"] / accum_steps  -> backward (AMP: bf16 autocast; fp16 + scaler)
    if any rank saw a non-finite loss: zero grads, count, skip (``train.max_nonfinite`` in a row stop the run)
    else: method.before_optimizer_step -> clip -> optimizer.step -> model EMA (timm ModelEmaV3) -> method.after_step

Optimizer: timm ``create_optimizer_v2`` over the method's trainable module, without weight decay on biases, norms
and the model's ``no_weight_decay()`` names; optional layer-wise lr decay. Distributed: ``torchrun`` + DDP (gloo
on CPU, NCCL on GPU) around the whole method (so ``training_step`` is the DDP forward), a resumable distributed
sampler seeded per epoch, metrics averaged over ranks, rank 0 writes. Checkpoints are atomic (``engine.checkpoint``)
and hold everything needed for an exact resume, including the sampler position inside an epoch and every rank's
RNG states; the data loader draws from its own generator so resuming never shifts the global RNG streams.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from tokenlab.engine import checkpoint as ckpt
from tokenlab.utils import distributed as D
from tokenlab.utils.metrics_log import MetricLogger
from tokenlab.utils.schedules import cosine_schedule
from tokenlab.errors import TrainingAborted
from tokenlab.methods import Method, StepContext, TrainPlan, build_method, get_method_class

__all__ = ["ResumableSampler", "RunResult", "Trainer", "build_model", "resolve_device", "train"]

logger = logging.getLogger(__name__)


class NonFiniteLossError(TrainingAborted):
    """Too many non-finite losses in a row."""


class PeerFailureError(TrainingAborted):
    """Another rank died or hangs: a collective got no answer within ``train.dist_timeout_s``."""


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


class ResumableSampler(Sampler[tuple[int, int]]):
    """Distributed sampler with a per-epoch permutation (``seed + epoch``) that can start mid-epoch.

    The permutation is padded (wrap-around) to a multiple of the world size, and every rank takes ``indices[rank::
    world]``; ``start`` skips the first samples of this rank's share (the batches done before a resume). It yields
    ``(index, sample_seed(seed, epoch, index))`` for the data layer's ``SeededDataset``, so each sample's augmentation
    depends only on (seed, epoch, index): the same with any number of workers and after a mid-epoch resume.
    """

    def __init__(self, length: int, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0):
        if length < 1:
            raise ValueError("the data set is empty")
        self.length, self.num_replicas, self.rank, self.shuffle, self.seed = length, num_replicas, rank, shuffle, seed
        self.epoch = 0
        self.start = 0
        self.per_rank = math.ceil(length / num_replicas)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def indices(self) -> list[int]:
        """This rank's sample indices for the current epoch, from ``start``."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.length, generator=g).tolist()
        else:
            order = list(range(self.length))
        total = self.per_rank * self.num_replicas
        order = (order * math.ceil(total / self.length))[:total]
        return order[self.rank :: self.num_replicas][self.start :]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        from tokenlab.data.loader import sample_seed

        return iter((i, sample_seed(self.seed, self.epoch, i)) for i in self.indices())

    def __len__(self) -> int:
        return self.per_rank - self.start


def _optimizer_layout(fsdp: bool) -> str:
    """How a checkpoint's optimizer state is keyed: FSDP2 saves it by parameter name, DDP / one process by index."""
    return "fsdp (keyed by parameter name)" if fsdp else "ddp or single-process (keyed by parameter index)"


class _ShardSampler(Sampler[int]):
    """Validation: every sample exactly once over all ranks (no padding, no shuffle)."""

    def __init__(self, length: int, num_replicas: int, rank: int):
        self.indices = list(range(rank, length, num_replicas))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA (this process's local rank) when available, else CPU; checks that CUDA exists."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"train.device={name!r} but no CUDA device is available; use cpu or auto")
        if name == "cuda":
            name = f"cuda:{D.local_rank()}"
    elif name != "cpu":
        raise ValueError(f"unknown train.device {name!r}; valid: auto, cpu, cuda, cuda:N")
    return torch.device(name)


def build_model(name: str, num_classes: int, kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """``tokenlab.models.create_model(name, num_classes=K, **kwargs)``; bad kwargs raise a ValueError naming them."""
    from tokenlab.models import create_model

    kwargs = dict(kwargs or {})
    try:
        return create_model(name, num_classes=num_classes, **kwargs)
    except TypeError as err:
        raise ValueError(f"model {name!r} does not accept model.kwargs {sorted(kwargs)}: {err}") from None


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


def _no_decay_names(module: nn.Module) -> set[str]:
    """Full parameter names listed by ``no_weight_decay()`` of ``module`` or any submodule."""
    names: set[str] = set()
    for prefix, sub in module.named_modules():
        fn = getattr(sub, "no_weight_decay", None)
        if callable(fn):
            names |= {f"{prefix}.{n}" if prefix else n for n in fn()}
    return names


def _param_groups(module: nn.Module, weight_decay: float, layer_decay: float | None) -> list[dict[str, Any]]:
    """Parameter groups with and without weight decay (1-d tensors, biases, ``no_weight_decay()``), or timm's
    layer-decay groups (``lr_scale``) when ``layer_decay`` is set."""
    skip = _no_decay_names(module)
    if layer_decay is not None:
        if not hasattr(module, "group_matcher"):
            raise ValueError(f"optim.layer_decay needs a model with group_matcher(); {type(module).__name__} has none")
        from timm.optim import param_groups_layer_decay

        groups = param_groups_layer_decay(module, weight_decay, no_weight_decay_list=skip, layer_decay=layer_decay)
    else:
        decay, no_decay = [], []
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            if p.ndim <= 1 or name.endswith(".bias") or name in skip:
                no_decay.append(p)
            else:
                decay.append(p)
        groups = [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]
        groups = [g for g in groups if g["params"]]
    for g in groups:
        g["wd_scale"] = 1.0 if g["weight_decay"] > 0 else 0.0
        g.setdefault("lr_scale", 1.0)
    return groups


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
        self.data_meta = dict(data_meta) if data_meta is not None else _data_meta(train_set)
        self.device = resolve_device(cfg.train.device)
        self.distributed = D.init_distributed(self.device, cfg.train.dist_timeout_s)
        self.rank, self.world = D.rank(), D.world_size()
        self.is_main = self.rank == 0
        if self.is_main:
            ckpt.check_writable(self.run_dir, cfg.train.min_free_disk_mb)
        D.barrier()
        self._seed_everything(cfg.seed + self.rank)
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        amp = cfg.train.amp
        if amp == "fp16" and self.device.type != "cuda":
            raise ValueError("train.amp=fp16 needs a CUDA device (use bf16 on CPU)")
        self.amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
        self.scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None

        if method is None:
            num_classes = cfg.model.num_classes
            if num_classes is None:
                num_classes = self.data_meta.get("num_classes") or len(self.data_meta.get("classes", ())) or None
            if num_classes is None:
                raise ValueError("model.num_classes is not set and the data set does not say how many classes it has")
            model = build_model(cfg.model.name, int(num_classes), OmegaConf.to_container(cfg.model.kwargs))
            method = build_method(cfg.method.name, model=model, **OmegaConf.to_container(cfg.method.kwargs))
        self.method = method
        self.model = method.model
        if cfg.train.grad_checkpointing:
            if not hasattr(self.model, "set_grad_checkpointing"):
                raise ValueError(f"train.grad_checkpointing: {type(self.model).__name__} has no set_grad_checkpointing")
            self.model.set_grad_checkpointing(True)
        self.method.to(self.device)
        if cfg.train.channels_last:
            self.model.to(memory_format=torch.channels_last)

        # Plan: optimizer steps per epoch from this rank's share of the data.
        bs, accum = cfg.data.batch_size, cfg.optim.accum_steps
        self.sampler = ResumableSampler(len(train_set), self.world, self.rank, shuffle=True, seed=cfg.seed)
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
        o = cfg.optim
        cosine_steps = self.steps_per_epoch * cfg.schedule.epochs
        warmup = int(round(cfg.schedule.warmup_epochs * self.steps_per_epoch))
        cooldown = self.steps_per_epoch * cfg.schedule.cooldown_epochs
        self.lr_schedule = cosine_schedule(o.lr, o.min_lr, cosine_steps, warmup, o.warmup_lr, cooldown)
        wd_end = o.weight_decay if o.weight_decay_end is None else o.weight_decay_end
        self.wd_schedule = cosine_schedule(o.weight_decay, wd_end, cosine_steps, 0, 0.0, cooldown)

        # FSDP2 replaces the parameters by sharded DTensors, so it must run before the optimizer collects them.
        self.fsdp = cfg.train.distributed == "fsdp" and self.distributed
        if self.fsdp:
            self._shard()
        from timm.optim import create_optimizer_v2

        groups = _param_groups(method.trainable_module(), o.weight_decay, o.layer_decay)
        self.optimizer = create_optimizer_v2(
            groups, opt=o.name, lr=o.lr, weight_decay=o.weight_decay, betas=tuple(o.betas), eps=o.eps
        )
        self.ema = None
        if cfg.train.ema.enabled:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.model, decay=cfg.train.ema.decay, use_warmup=cfg.train.ema.warmup)

        self.runner: nn.Module = self.method
        if self.distributed and not self.fsdp:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.runner = DDP(self.method, device_ids=ids, find_unused_parameters=cfg.train.find_unused_parameters)
        if cfg.train.compile:
            self.runner.compile()
        self.method.on_train_start(self.plan)

        self.step = 0
        self.epoch = 0
        self.batches_done = 0  # micro-batches of the current epoch already consumed (sampler position)
        self.nonfinite_total = 0
        self.nonfinite_streak = 0
        self.last_val: dict[str, float] = {}

    # ---- setup helpers ----------------------------------------------------------------------------------------
    @staticmethod
    def _seed_everything(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    def _shard(self) -> None:
        """FSDP2: shard every transformer block, then the method as the root (all remaining parameters).

        The method's ``forward`` (the training step) runs through the root's hooks; validation and export go through
        :meth:`_unsharded_root`, which gathers the root-level parameters (the blocks gather their own in their hooks).
        """
        from torch.distributed.fsdp import fully_shard

        if self.cfg.train.ema.enabled:
            raise ValueError("train.ema.enabled is not supported with train.distributed=fsdp (use ddp)")
        D.broadcast_module(self.method)  # one initialisation: each rank keeps its shard of rank 0's weights
        for block in getattr(self.model, "blocks", []):
            fully_shard(block)
        fully_shard(self.method)

    @contextlib.contextmanager
    def _unsharded_root(self) -> Iterator[None]:
        """With FSDP2, gather the root's parameters so that a submodule can run outside the method's ``forward``."""
        if not self.fsdp:
            yield
            return
        self.method.unshard()
        try:
            yield
        finally:
            self.method.reshard()

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _loader(self, epoch: int) -> DataLoader:
        self.sampler.set_epoch(epoch, self.batches_done * self.cfg.data.batch_size)
        gen = torch.Generator().manual_seed(self.cfg.seed * 100_003 + epoch * 1009 + self.rank)
        workers = self.cfg.data.num_workers
        from tokenlab.data.loader import SeededDataset

        return DataLoader(
            SeededDataset(self.train_set), batch_size=self.cfg.data.batch_size, sampler=self.sampler,
            num_workers=workers,
            collate_fn=default_collate, drop_last=True, generator=gen, pin_memory=self.device.type == "cuda",
            persistent_workers=False, prefetch_factor=2 if workers else None,
        )

    # ---- state --------------------------------------------------------------------------------------------------
    def _method_state(self) -> dict[str, torch.Tensor]:
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(self.method, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return self.method.state_dict()

    def _optimizer_state(self) -> dict[str, Any]:
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return get_optimizer_state_dict(self.method, self.optimizer, options=opts)
        return self.optimizer.state_dict()

    def save_checkpoint(self) -> Path | None:
        """Write a checkpoint of the current position (collective: every rank must call it)."""
        rngs = D.all_gather_objects(ckpt.capture_rng_state())
        weights = {"method": self._method_state()}
        if self.ema is not None:
            weights["ema"] = self.ema.module.state_dict()
        optim_state = self._optimizer_state()
        path = None
        if self.is_main:
            state = {
                "step": self.step,
                "epoch": self.epoch,
                "batches_done": self.batches_done,
                "world_size": self.world,
                "optimizer_layout": _optimizer_layout(self.fsdp),
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
        layout = state.get("optimizer_layout", _optimizer_layout(False))
        if layout != _optimizer_layout(self.fsdp):
            raise ValueError(
                f"checkpoint {path} holds the optimizer state of a {layout} run, this run is "
                f"{_optimizer_layout(self.fsdp)}: resume it with train.distributed="
                f"{'fsdp' if layout == _optimizer_layout(True) else 'ddp'} (under torchrun)"
            )
        old = OmegaConf.create(state.get("config", "{}"))
        for key in ("method", "model", "optim", "schedule.epochs", "data.batch_size"):
            if OmegaConf.select(old, key) != OmegaConf.select(self.cfg, key):
                logger.warning("config key %r differs from the checkpoint's; the resumed run is not the same run", key)
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
                set_optimizer_state_dict,
            )

            opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
            set_model_state_dict(self.method, weights["method"], options=opts)
            set_optimizer_state_dict(self.method, self.optimizer, state["optimizer"], options=opts)
        else:
            self.method.load_state_dict(weights["method"], strict=True)
            self.optimizer.load_state_dict(state["optimizer"])
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
            logger.warning("resuming %d-process state on %d processes: RNG streams are reassigned", len(rngs), self.world)
        ckpt.restore_rng_state(rngs[self.rank % len(rngs)])
        logger.info("resumed from %s at step %d (epoch %d, batch %d)", path, self.step, self.epoch, self.batches_done)

    def _resume_path(self) -> Path | None:
        resume = self.cfg.checkpoint.resume
        if resume is None:
            return None
        if resume == "auto":
            found = ckpt.latest_checkpoint(self.run_dir / "checkpoints")
            if found is None:
                logger.info("--resume auto: no checkpoint in %s, starting fresh", self.run_dir / "checkpoints")
            return found
        path = Path(resume)
        if path.is_dir() and not (path / ckpt.STATE_FILE).is_file():
            found = ckpt.latest_checkpoint(path) or ckpt.latest_checkpoint(path / "checkpoints")
            if found is None:
                raise FileNotFoundError(f"checkpoint.resume={resume}: no complete checkpoint there")
            return found
        return path

    # ---- the loop -----------------------------------------------------------------------------------------------
    def _set_schedules(self) -> float:
        i = min(self.step, len(self.lr_schedule) - 1)
        lr, wd = float(self.lr_schedule[i]), float(self.wd_schedule[i])
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
            g["weight_decay"] = wd * g.get("wd_scale", 1.0)
        return lr

    def _context(self, lr: float) -> StepContext:
        return StepContext(
            step=self.step, epoch=self.epoch, plan=self.plan, device=self.device, amp_dtype=self.amp_dtype, lr=lr,
            values={"weight_decay": float(self.wd_schedule[min(self.step, len(self.wd_schedule) - 1)])},
        )

    def _micro_context(self, micro: int) -> contextlib.AbstractContextManager:
        last = micro == self.cfg.optim.accum_steps - 1
        if not last and hasattr(self.runner, "no_sync"):
            return self.runner.no_sync()
        return contextlib.nullcontext()

    def _train_step(self, batches: Sequence[Mapping[str, Any]]) -> tuple[dict[str, float], bool]:
        """One optimizer step over ``accum_steps`` micro-batches; returns (mean terms, whether it was applied)."""
        lr = self._set_schedules()
        ctx = self._context(lr)
        accum = len(batches)
        terms: dict[str, torch.Tensor] = {}
        finite = torch.ones((), device=self.device)
        self.optimizer.zero_grad(set_to_none=True)
        for micro, batch in enumerate(batches):
            with self._micro_context(micro), self._autocast():
                out = self.runner(batch, ctx)
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
            if self.cfg.optim.clip_grad is not None:
                norm = torch.nn.utils.clip_grad_norm_(self.method.trainable_module().parameters(), self.cfg.optim.clip_grad)
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
                self.step, shown, self.nonfinite_streak, self.nonfinite_total,
            )
        return {k: float(v) for k, v in terms.items()} | {"lr": lr}, applied

    def fit(self) -> RunResult:
        """Train to the end (or ``schedule.max_steps``), checkpointing, validating and exporting on the way."""
        cfg = self.cfg
        resume = self._resume_path()
        if resume is not None:
            self.load_checkpoint(resume)
        if self.is_main:
            (self.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
        log = MetricLogger(
            self.run_dir, enabled=self.is_main, tensorboard=cfg.log.tensorboard, progress=cfg.log.progress,
            total_steps=self.stop_step, initial_step=self.step,
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
        metrics = dict(zip(names, vals.tolist()))
        metrics["images_per_s"] = images / max(secs, 1e-9)
        metrics["nonfinite_total"] = self.nonfinite_total
        if self.is_main:
            log.log("step", self.step, self.epoch, metrics)
            log.progress(self.step, {k: metrics[k] for k in ("loss", "lr", "images_per_s") if k in metrics})

    def eval_module(self) -> nn.Module:
        """The module validated and exported: the model EMA when enabled, else the method's export module."""
        return self.ema.module if self.ema is not None else self.method.export_module()

    def _gathered_eval_module(self) -> nn.Module | None:
        """FSDP2: an unsharded CPU copy of the export module (rank 0; ``None`` elsewhere); every rank must call it."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.method, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.is_main:
            return None
        target = self.eval_module()
        prefix = next(name for name, m in self.method.named_modules() if m is target)
        prefix = f"{prefix}." if prefix else ""
        num_classes = int(getattr(target, "num_classes", self.cfg.model.num_classes or 0))
        model = build_model(self.cfg.model.name, num_classes, OmegaConf.to_container(self.cfg.model.kwargs))
        model.load_state_dict({k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}, strict=True)
        return model

    @torch.no_grad()
    def validate(self, log: MetricLogger | None = None) -> dict[str, float]:
        """Top-1 accuracy and mean CE (as defined by the method's ``validation_step``) over the validation set."""
        assert self.val_set is not None
        model = self.eval_module()
        D.broadcast_module(model, parameters=False)  # rank 0's BatchNorm statistics: validate what rank 0 exports
        was_training = model.training
        model.eval()
        loader = DataLoader(
            self.val_set, batch_size=self.cfg.data.val_batch_size or self.cfg.data.batch_size,
            sampler=_ShardSampler(len(self.val_set), self.world, self.rank), num_workers=self.cfg.data.num_workers,
            collate_fn=default_collate,
        )
        sums: dict[str, torch.Tensor] = {}
        with self._unsharded_root():
            for batch in loader:
                batch = _to_device(batch, self.device, self.cfg.train.channels_last)
                with self._autocast():
                    out = self.method.validation_step(model, batch)
                for k, v in out.items():
                    sums[k] = sums.get(k, torch.zeros((), dtype=torch.float64, device=self.device)) + v.double()
            if self.fsdp:  # sharded blocks gather in every forward: every rank must run as many as rank 0 (the most)
                most = -(-len(range(0, len(self.val_set), self.world)) // loader.batch_size)
                pad = _to_device(default_collate([self.val_set[0]]), self.device, self.cfg.train.channels_last)
                for _ in range(most - len(loader)):
                    with self._autocast():
                        self.method.validation_step(model, pad)  # result discarded
        names = sorted(sums)
        total = D.all_reduce_sum(torch.stack([sums[k] for k in names])) if names else torch.zeros(0)
        stats = dict(zip(names, total.tolist()))
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
        model = self._gathered_eval_module() if self.fsdp else self.eval_module()  # collective under FSDP
        if not self.is_main:
            return None
        from tokenlab.models import save_exported

        model_kwargs = dict(OmegaConf.to_container(self.cfg.model.kwargs))
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
        }
        stem = save_exported(model, self.run_dir / "model", json.loads(json.dumps(meta, default=str)))
        logger.info("exported %s.safetensors", stem)
        return stem


_TRANSFORM_KINDS = {"classification": "train", "stl_paired": "stl_pair", "multicrop": "ibot"}


def build_datasets(
    cfg: DictConfig, data_view: str = "classification", transform_options: Mapping[str, Any] | None = None
) -> tuple[Dataset, Dataset | None, dict[str, Any]]:
    """Training and validation sets from ``cfg.data`` through the data layer (``tokenlab.data``).

    Args:
        cfg: The run config (``data.name`` is a data-set spec: a folder, a list file, a synthetic set or
            ``cifar10``).
        data_view: The method's sample layout (``Method.data_view``).
        transform_options: The method's extra transform kwargs (``Method.transform_options``).
    """
    from tokenlab.data import build_dataset, build_transforms

    if data_view not in _TRANSFORM_KINDS:
        raise ValueError(f"unknown data_view {data_view!r}; valid: {', '.join(_TRANSFORM_KINDS)}")
    d = cfg.data
    spec = d.root if d.root is not None else d.name
    extra_t = dict(OmegaConf.to_container(d.transform))
    train_tf = build_transforms(_TRANSFORM_KINDS[data_view], d.img_size, **dict(transform_options or {}), **extra_t)
    dataset_kwargs = OmegaConf.to_container(d.dataset)
    train_set = build_dataset(spec, split=d.train_split, transform=train_tf, **dataset_kwargs)
    val_set = None
    norm = {k: extra_t[k] for k in ("mean", "std") if k in extra_t}
    if d.val_split is not None:
        val_tf = build_transforms("eval", d.img_size, **norm)
        val_set = build_dataset(spec, split=d.val_split, transform=val_tf, classes=list(train_set.classes),
                                **dataset_kwargs)
    meta = _data_meta(train_set)
    train_set = _subset(train_set, d.train_subset, cfg.seed)
    if val_set is not None:
        val_set = _subset(val_set, d.val_subset, cfg.seed + 1)
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    meta.setdefault("mean", [float(v) for v in norm.get("mean", IMAGENET_DEFAULT_MEAN)])
    meta.setdefault("std", [float(v) for v in norm.get("std", IMAGENET_DEFAULT_STD)])
    return train_set, val_set, meta


def _subset(dataset: Dataset, size: int | None, seed: int) -> Dataset:
    """A fixed random subset of ``size`` samples (the whole set when ``size`` is None or not smaller)."""
    if size is None or size >= len(dataset):
        return dataset
    keep = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:size].sort().values
    return _Subset(dataset, keep.tolist())


class _Subset(Dataset):
    """Samples ``indices`` of ``dataset``. Unlike ``torch.utils.data.Subset`` it has no batched ``__getitems__``,
    which would bypass the per-sample seeding of ``SeededDataset`` (it forwards unknown attributes)."""

    def __init__(self, dataset: Dataset, indices: list[int]) -> None:
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        return self.dataset[self.indices[i]]


def _data_meta(dataset: Dataset) -> dict[str, Any]:
    """``classes``, ``num_classes``, ``mean`` and ``std`` of a data set that has them (stored with the model)."""
    meta = {k: getattr(dataset, k) for k in ("classes", "mean", "std") if hasattr(dataset, k)}
    for k in ("mean", "std"):
        if k in meta:
            meta[k] = [float(v) for v in meta[k]]
    if "classes" in meta:
        meta["classes"] = list(meta["classes"])
        meta["num_classes"] = len(meta["classes"])
    return meta


def train(cfg: DictConfig) -> RunResult:
    """Build data, model and method from ``cfg`` and run the training (``tokenlab train``)."""
    cls = get_method_class(cfg.method.name)  # an unknown method fails here, before any data is read
    custom = getattr(cls, "train_entry", None)
    if custom is not None:  # a method with its own data sets / schedule (e.g. segmentation) builds its Trainer itself
        return custom(cfg)
    options = cls.transform_options(dict(OmegaConf.to_container(cfg.method.kwargs)))
    train_set, val_set, meta = build_datasets(cfg, cls.data_view, options)
    try:
        return Trainer(cfg, train_set, val_set, data_meta=meta).fit()
    finally:
        D.cleanup_distributed()
