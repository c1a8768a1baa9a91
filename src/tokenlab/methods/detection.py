"""Object detection / instance segmentation fine-tuning on the engine's method protocol (torchvision's losses).

The loss is torchvision's Mask R-CNN sum [0] (He et al., ICCV 2017, https://arxiv.org/abs/1703.06870), each term
as torchvision computes it:

    L = L_objectness + L_rpn_box + L_classifier + L_box + L_mask

(RPN binary CE and smooth-L1; RoI-head softmax CE, smooth-L1 on the class's box and per-pixel binary CE on the
class's 28x28 mask). ``training_step`` returns torchvision's loss dict plus ``"loss"``. The backbone can be
initialised from a tokenlab classification run (``init_from``): the STL student, the supervised baseline or any
exported FAN / iBOT ViT of the same architecture.

The method trains through ``engine.train`` like every other one: the engine builds the ``detection`` data view
(COCO-format sets, ``tokenlab.data.detection``) and batches it with the data layer's list collate. Validation
reports ``acc1`` = the share of ground-truth boxes found (a detection of the right class with IoU >= 0.5 and score
>= 0.5), a cheap progress signal; AP comes from ``tokenlab detect eval`` (``tokenlab.eval.detection``).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from torchvision.ops import box_iou

from tokenlab.methods import Method, StepContext, init_from_meta, register_method

__all__ = ["Detection"]

logger = logging.getLogger(__name__)


@register_method("detection")
class Detection(Method):
    """torchvision's detection losses (see the module docstring).

    Args:
        model: A detection model taking ``(images, targets)`` and returning a loss dict in training
            (``tokenlab.models.detection.TokenlabMaskRCNN``, timm name ``mask_rcnn``).
        init_from: A tokenlab classification run directory / exported model whose weights initialise the
            detector's backbone (None: keep the random initialisation).
        val_iou: IoU a detection needs to count as finding a ground-truth box in validation.
        val_score: Score a detection needs in validation.
    """

    data_view = "detection"

    def __init__(
        self, model: nn.Module, init_from: str | None = None, val_iou: float = 0.5, val_score: float = 0.5
    ) -> None:
        super().__init__(model)
        self.init_from = None if init_from is None else str(init_from)
        self.init_meta: dict[str, Any] | None = None
        self.val_iou, self.val_score = float(val_iou), float(val_score)
        if init_from:
            from tokenlab.models.detection import TokenlabMaskRCNN, load_backbone_weights

            if not isinstance(model, TokenlabMaskRCNN):
                raise ValueError(f"init_from needs a tokenlab detection model (mask_rcnn), got {type(model).__name__}")
            self.init_meta = load_backbone_weights(model, init_from)

    def export_meta(self) -> dict[str, Any]:
        """The task, and where the backbone was initialised from (recorded in the exported ``model.json``)."""
        return {"task": "detection", **init_from_meta(self.init_from, self.init_meta)}

    def training_step(self, batch: dict[str, Any], ctx: StepContext) -> dict[str, torch.Tensor]:
        """The torchvision loss dict of one micro-batch, plus their sum as ``"loss"``."""
        losses: dict[str, torch.Tensor] = self.model(batch["image"], batch["target"])
        total = torch.stack([v.float() for v in losses.values()]).sum()
        return {"loss": total, **{k: v.detach() for k, v in losses.items()}}

    @torch.no_grad()
    def validation_step(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Ground-truth boxes found (``correct``, reported as ``acc1``) out of all of them (``count``)."""
        preds = model(batch["image"])
        device = batch["image"][0].device
        found, count = torch.zeros((), device=device), torch.zeros((), device=device)
        for pred, target in zip(preds, batch["target"], strict=True):
            gt_boxes, gt_labels = target["boxes"], target["labels"]
            count = count + gt_boxes.shape[0]
            keep = pred["scores"] >= self.val_score
            boxes, labels = pred["boxes"][keep], pred["labels"][keep]
            if gt_boxes.numel() == 0 or boxes.numel() == 0:
                continue
            iou = box_iou(gt_boxes, boxes)  # (G, P)
            hit = (iou >= self.val_iou) & (gt_labels[:, None] == labels[None, :])
            found = found + hit.any(dim=1).sum()
        return {"correct": found.float(), "count": count.float()}
