"""Semantic-segmentation fine-tuning on the engine's method protocol: per-pixel cross-entropy with an ignore index.

Loss over the labelled pixels ``P = {p : y_p != ignore}`` of a batch (optionally label-smoothed with eps):

    L = -(1/|P|) sum_{p in P} log softmax(z_p)_{y_p}

``z = model(x)`` are the ``(B, K, H, W)`` logits of a segmentation model (``tokenlab.models.segmentation``); a
batch with no labelled pixel gives a zero loss, not a NaN. The backbone can be initialised from a ``tokenlab``
classification run (``init_from``): the STL student, the supervised baseline or any exported FAN.

The method trains through ``engine.train`` like every other one: the engine builds the ``segmentation`` data view
and the learning-rate schedule (``schedule.kind: poly`` gives the SegFormer / mmsegmentation decay).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tokenlab.methods import Method, StepContext, init_from_meta, register_method

__all__ = ["Segmentation"]

logger = logging.getLogger(__name__)


@register_method("segmentation")
class Segmentation(Method):
    """Per-pixel CE with an ignore index (see the module docstring).

    Args:
        model: A segmentation model returning ``(B, K, H, W)`` logits (e.g. ``segformer_fan``).
        ignore_index: Label value excluded from the loss.
        label_smoothing: eps of the per-pixel targets.
        init_from: A tokenlab classification run directory / exported model whose backbone weights initialise
            ``model.backbone`` (None: keep the random initialisation).
    """

    data_view = "segmentation"

    def __init__(
        self,
        model: nn.Module,
        ignore_index: int = 255,
        label_smoothing: float = 0.0,
        init_from: str | None = None,
    ) -> None:
        super().__init__(model)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.init_from = None if init_from is None else str(init_from)
        self.init_meta: dict[str, Any] | None = None
        if init_from:
            from tokenlab.models.segmentation import FANSegFormer, load_backbone_weights

            if not isinstance(model, FANSegFormer):
                raise ValueError(f"init_from needs a segmentation model with a .backbone, got {type(model).__name__}")
            self.init_meta = load_backbone_weights(model, init_from)

    @classmethod
    def data_kwargs(cls, meta: dict[str, Any]) -> dict[str, Any]:
        """The data set's ignore index, unless the recipe sets one."""
        return {"ignore_index": meta["ignore_index"]} if "ignore_index" in meta else {}

    def export_meta(self) -> dict[str, Any]:
        """Where the backbone was initialised from (recorded in the exported ``model.json``)."""
        return init_from_meta(self.init_from, self.init_meta)

    def _loss(self, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if logits.shape[-2:] != mask.shape[-2:]:
            raise ValueError(f"logits {tuple(logits.shape)} and mask {tuple(mask.shape)} differ in spatial size")
        if not (mask != self.ignore_index).any():
            return logits.sum() * 0.0  # keeps the graph (DDP) without a 0/0
        return F.cross_entropy(
            logits.float(), mask, ignore_index=self.ignore_index, label_smoothing=self.label_smoothing
        )

    def training_step(self, batch: dict[str, Any], ctx: StepContext) -> dict[str, torch.Tensor]:
        """Per-pixel cross-entropy of one micro-batch."""
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
