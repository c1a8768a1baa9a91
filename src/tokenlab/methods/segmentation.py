"""Semantic-segmentation fine-tuning on the engine's method protocol: per-pixel cross-entropy with an ignore index.

Loss over the labelled pixels ``P = {p : y_p != ignore}`` of a batch (optionally label-smoothed with eps):

    L = -(1/|P|) sum_{p in P} log softmax(z_p)_{y_p}

``z = model(x)`` are the ``(B, K, H, W)`` logits of a segmentation model (``tokenlab.models.segmentation``); a
batch with no labelled pixel gives a zero loss, not a NaN. The backbone can be initialised from a ``tokenlab``
classification run (``init_from``): the STL student, the supervised baseline or any exported FAN.

Learning-rate schedule: the engine's warm-up + cosine, or the polynomial decay of SegFormer / mmsegmentation
(``lr(s) = (lr0 - lr_min) * (1 - s / T) ** power + lr_min`` after the same linear warm-up), selected with
``method.kwargs.lr_schedule``. The engine has no poly schedule, so ``train_segmentation`` (used by
``tokenlab segment train``) installs it on the trainer; the plain ``tokenlab train`` path refuses ``poly`` with an
error instead of silently running a cosine.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from tokenlab.methods import Method, StepContext, TrainPlan, register_method

__all__ = ["Segmentation", "build_segmentation_datasets", "poly_schedule", "train_segmentation"]

logger = logging.getLogger(__name__)

SCHEDULES = ("cosine", "poly")


def poly_schedule(
    base: float, final: float, total_steps: int, power: float = 1.0, warmup_steps: int = 0, warmup_start: float = 0.0
) -> np.ndarray:
    """``lr(s) = (base - final) * (1 - (s - W) / (T - W)) ** power + final`` after a linear warm-up of W steps."""
    if total_steps < 1 or not 0 <= warmup_steps < max(total_steps, 2):
        raise ValueError(f"bad poly schedule lengths: total={total_steps}, warmup={warmup_steps}")
    warm = np.linspace(warmup_start, base, warmup_steps, endpoint=False) if warmup_steps else np.zeros(0)
    n = total_steps - warmup_steps
    t = np.arange(n, dtype=np.float64) / max(1, n)
    return np.concatenate([warm, (base - final) * (1.0 - t) ** power + final])


@register_method("segmentation")
class Segmentation(Method):
    """Per-pixel CE with an ignore index (see the module docstring).

    Args:
        model: A segmentation model returning ``(B, K, H, W)`` logits (e.g. ``segformer_fan``).
        ignore_index: Label value excluded from the loss.
        label_smoothing: eps of the per-pixel targets.
        init_from: A tokenlab classification run directory / exported model whose backbone weights initialise
            ``model.backbone`` (None: keep the random initialisation).
        lr_schedule: ``"cosine"`` (the engine's) or ``"poly"`` (installed by ``train_segmentation``).
        poly_power: Exponent of the poly schedule.
    """

    data_view = "segmentation"

    def __init__(
        self,
        model: nn.Module,
        ignore_index: int = 255,
        label_smoothing: float = 0.0,
        init_from: str | None = None,
        lr_schedule: str = "cosine",
        poly_power: float = 1.0,
    ) -> None:
        super().__init__(model)
        if lr_schedule not in SCHEDULES:
            raise ValueError(f"unknown lr_schedule {lr_schedule!r}; valid: {', '.join(SCHEDULES)}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.lr_schedule = lr_schedule
        self.poly_power = poly_power
        self.schedule_installed = False
        self.init_meta: dict[str, Any] | None = None
        if init_from:
            from tokenlab.models.segmentation import load_backbone_weights

            if not hasattr(model, "backbone"):
                raise ValueError(f"init_from needs a segmentation model with a .backbone, got {type(model).__name__}")
            self.init_meta = load_backbone_weights(model, init_from)

    def on_train_start(self, plan: TrainPlan) -> None:
        if self.lr_schedule == "poly" and not self.schedule_installed:
            raise ValueError(
                "method.kwargs.lr_schedule=poly is applied by `tokenlab segment train` (train_segmentation); "
                "the generic trainer only has the cosine schedule"
            )

    def _loss(self, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if logits.shape[-2:] != mask.shape[-2:]:
            raise ValueError(f"logits {tuple(logits.shape)} and mask {tuple(mask.shape)} differ in spatial size")
        if not (mask != self.ignore_index).any():
            return logits.sum() * 0.0  # keeps the graph (DDP) without a 0/0
        return F.cross_entropy(
            logits.float(), mask, ignore_index=self.ignore_index, label_smoothing=self.label_smoothing
        )

    def training_step(self, batch: dict[str, Any], ctx: StepContext) -> dict[str, torch.Tensor]:
        logits = self.model(batch["image"])  # (B, K, H, W)
        ce = self._loss(logits, batch["mask"])
        return {"loss": ce, "ce": ce.detach()}

    @torch.no_grad()
    def validation_step(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Sums of correct pixels (reported as ``acc1`` = pixel accuracy) and per-pixel CE over labelled pixels."""
        logits = model(batch["image"])
        mask = batch["mask"]
        valid = mask != self.ignore_index
        loss = F.cross_entropy(logits.float(), mask, ignore_index=self.ignore_index, reduction="sum")
        return {
            "correct": ((logits.argmax(dim=1) == mask) & valid).sum().float(),
            "loss": loss,
            "count": valid.sum().float(),
        }


def build_segmentation_datasets(cfg: DictConfig) -> tuple[Any, Any, dict[str, Any]]:
    """Training / validation ``SegmentationDataset``s and the exported-model meta from ``cfg.data``.

    ``data.name`` is the layout (``synthetic``, ``cityscapes``, ``folder``), ``data.img_size`` the training crop,
    ``data.dataset`` may hold ``ignore_index`` / ``num_classes`` and ``data.transform`` the augmentation options
    of ``build_segmentation_transforms``.
    """
    from tokenlab.data.segmentation import build_segmentation_dataset, build_segmentation_transforms

    d = cfg.data
    if d.root is None:
        raise ValueError(f"data.root is not set: point it at the {d.name!r} segmentation data (for the synthetic set, "
                         f"create one with `tokenlab data synth --out DIR`)")  # fmt: skip
    extra = dict(OmegaConf.to_container(d.dataset))
    unknown = sorted(set(extra) - {"ignore_index", "num_classes"})
    if unknown:
        raise ValueError(f"unknown data.dataset option(s) {unknown} for segmentation; valid: ignore_index, num_classes")
    ignore = int(extra.get("ignore_index", 255))
    tf = dict(OmegaConf.to_container(d.transform), ignore_index=ignore)
    kw = dict(ignore_index=ignore, num_classes=extra.get("num_classes"), seed=int(cfg.seed))
    train_set = build_segmentation_dataset(
        d.name, d.root, d.train_split, build_segmentation_transforms(True, d.img_size, **tf), **kw
    )
    val_set = None
    if d.val_split is not None:
        val_set = build_segmentation_dataset(
            d.name, d.root, d.val_split, build_segmentation_transforms(False, d.img_size, **tf), **kw
        )
    meta = {
        "classes": train_set.class_names, "num_classes": train_set.num_classes, "mean": train_set.mean,
        "std": train_set.std, "ignore_index": ignore, "task": "segmentation", "data": d.name,
    }  # fmt: skip
    return train_set, val_set, meta


def train_segmentation(cfg: DictConfig) -> Any:
    """Fine-tune a segmentation model through the engine's ``Trainer`` with segmentation data sets.

    Builds the data sets (``build_segmentation_datasets``), the model (``cfg.model``), the ``segmentation``
    method (``cfg.method.kwargs``), installs the poly schedule when asked, trains, and returns the ``RunResult``.
    """
    import tokenlab.models.segmentation  # noqa: F401  (registers segformer_fan with timm)
    from tokenlab.engine import Trainer, build_model
    from tokenlab.utils import distributed as D
    from tokenlab.methods import build_method

    if cfg.method.name != "segmentation":
        raise ValueError(f"method.name is {cfg.method.name!r}; segmentation recipes use method.name=segmentation")
    train_set, val_set, meta = build_segmentation_datasets(cfg)
    num_classes = cfg.model.num_classes or meta["num_classes"]
    if num_classes != meta["num_classes"]:
        raise ValueError(f"model.num_classes={num_classes} but the data set has {meta['num_classes']} classes")
    model = build_model(cfg.model.name, int(num_classes), OmegaConf.to_container(cfg.model.kwargs))
    kwargs = dict(OmegaConf.to_container(cfg.method.kwargs))
    kwargs.setdefault("ignore_index", meta["ignore_index"])
    method = build_method("segmentation", model=model, **kwargs)
    if method.init_meta is not None:
        meta["init_from"] = {"path": str(kwargs["init_from"]), "model": method.init_meta.get("model"),
                             "method": method.init_meta.get("method")}  # fmt: skip
    method.schedule_installed = method.lr_schedule == "poly"  # installed right below, after the plan is known
    try:
        trainer = Trainer(cfg, train_set, val_set, method=method, data_meta=meta)
        if method.lr_schedule == "poly":
            o, steps = cfg.optim, trainer.steps_per_epoch
            warmup = int(round(cfg.schedule.warmup_epochs * steps))
            trainer.lr_schedule = poly_schedule(
                o.lr, o.min_lr, steps * cfg.schedule.epochs, method.poly_power, warmup, o.warmup_lr
            )
            cool = steps * cfg.schedule.cooldown_epochs
            trainer.lr_schedule = np.concatenate([trainer.lr_schedule, np.full(cool, o.min_lr)])
        return trainer.fit()
    finally:
        D.cleanup_distributed()


def read_run_meta(run: str | Path) -> dict[str, Any]:
    """The exported ``model.json`` of a run directory (or export stem)."""
    run = Path(run)
    meta_file = (run / "model.json") if run.is_dir() else run.with_suffix(".json")
    if not meta_file.is_file():
        raise FileNotFoundError(f"no exported model at {run} (expected {meta_file})")
    return json.loads(meta_file.read_text())


# `tokenlab train --config seg_*.yaml` goes through the engine's generic entry point, which calls this hook
Segmentation.train_entry = staticmethod(train_segmentation)  # type: ignore[attr-defined]
