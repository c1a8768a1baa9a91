"""Segmentation scores: the confusion matrix, mIoU / per-class IoU / pixel accuracy, and their robustness summary.

Metrics come from one confusion matrix ``M`` (rows: true class, columns: predicted class) accumulated over every
pixel whose label is not the ignore index:

    IoU_k     = M_kk / (sum_j M_kj + sum_i M_ik - M_kk)       (TP / (TP + FN + FP))
    mIoU      = mean of IoU_k over the classes with a non-empty union (a class that is neither present nor
                predicted anywhere in the set has no IoU and is left out, as in mmsegmentation / Cityscapes)
    pixel acc = sum_k M_kk / sum_ij M_ij

Under corruptions (REFERENCE §3, Hendrycks & Dietterich 2019, with mIoU in place of accuracy) every (corruption,
severity) cell gets its mIoU; the robust mIoU is their mean and ``retention = robust mIoU / clean mIoU``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "ConfusionMeter",
    "SegMetrics",
    "SegRobustness",
    "confusion_matrix",
    "metrics_from_confusion",
    "robustness_summary",
]


def confusion_matrix(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = 255
) -> torch.Tensor:
    """``(K, K)`` int64 counts, rows = true class, columns = predicted class; ignored pixels are skipped.

    Args:
        pred: Predicted class per pixel, any shape, values in ``[0, K)``.
        target: True class per pixel, same shape, values in ``[0, K)`` or ``ignore_index``.
        num_classes: K.
        ignore_index: Label value excluded from every count.

    Raises:
        ValueError: shapes differ, or a label/prediction lies outside ``[0, K)`` (other than the ignore index).
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} differs from target shape {tuple(target.shape)}")
    keep = target != ignore_index
    t, p = target[keep].long(), pred[keep].long()
    for name, v in (("label", t), ("prediction", p)):
        if v.numel() and (int(v.min()) < 0 or int(v.max()) >= num_classes):
            bad = sorted({int(x) for x in v[(v < 0) | (v >= num_classes)].unique()[:10]})
            raise ValueError(
                f"{name} values {bad} outside [0, {num_classes}) (ignore index {ignore_index}); "
                f"check num_classes and the ignore index"
            )
    # (K * t + p) enumerates the cells row-major, so one bincount fills the matrix.
    return torch.bincount(t * num_classes + p, minlength=num_classes**2).reshape(num_classes, num_classes).cpu()


@dataclass
class SegMetrics:
    """Segmentation scores of one evaluation.

    Attributes:
        miou: Mean IoU over classes with a non-empty union (nan when there is none).
        iou: Per-class IoU; nan for a class absent from both labels and predictions.
        pixel_accuracy: Correct / labelled pixels.
        mean_accuracy: Mean over present classes of per-class recall ``M_kk / sum_j M_kj``.
        pixels: Number of labelled (not ignored) pixels counted.
        class_names: Names of the K classes.
        confusion: The ``(K, K)`` matrix as nested lists.
    """

    miou: float
    iou: list[float]
    pixel_accuracy: float
    mean_accuracy: float
    pixels: int
    class_names: list[str]
    confusion: list[list[int]] = field(repr=False, default_factory=list)

    def per_class(self) -> dict[str, float]:
        """``{class name: IoU}``."""
        return dict(zip(self.class_names, self.iou, strict=True))

    def to_dict(self) -> dict[str, Any]:
        """This result as plain JSON-ready data."""
        return {
            "miou": self.miou, "pixel_accuracy": self.pixel_accuracy, "mean_accuracy": self.mean_accuracy,
            "pixels": self.pixels, "iou": self.per_class(),
        }  # fmt: skip


def metrics_from_confusion(confusion: torch.Tensor, class_names: Sequence[str] | None = None) -> SegMetrics:
    """IoU per class, mIoU, pixel and mean accuracy from a ``(K, K)`` confusion matrix (see module docstring)."""
    cm = confusion.double()
    k = cm.shape[0]
    names = list(class_names) if class_names is not None else [str(i) for i in range(k)]
    if len(names) != k:
        raise ValueError(f"{len(names)} class names for a {k}-class confusion matrix")
    tp = cm.diagonal()
    gt, pr = cm.sum(dim=1), cm.sum(dim=0)
    union = gt + pr - tp
    iou = torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, math.nan))
    recall = torch.where(gt > 0, tp / gt.clamp_min(1), torch.full_like(tp, math.nan))
    total = cm.sum()
    return SegMetrics(
        miou=float(iou.nanmean()) if (union > 0).any() else math.nan,
        iou=[float(v) for v in iou],
        pixel_accuracy=float(tp.sum() / total) if total > 0 else math.nan,
        mean_accuracy=float(recall.nanmean()) if (gt > 0).any() else math.nan,
        pixels=int(total),
        class_names=names,
        confusion=confusion.long().tolist(),
    )


class ConfusionMeter:
    """Accumulates a confusion matrix over batches of logits ``(B, K, H, W)`` or class maps ``(B, H, W)``."""

    def __init__(self, num_classes: int, ignore_index: int = 255, class_names: Sequence[str] | None = None) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = class_names
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.long)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: ``pred`` logits ``(B, K, H, W)`` or classes ``(B, H, W)``, ``target`` ``(B, H, W)``."""
        if pred.ndim == target.ndim + 1:
            pred = pred.argmax(dim=1)
        self.matrix += confusion_matrix(pred, target, self.num_classes, self.ignore_index)

    def compute(self) -> SegMetrics:
        """The metrics of everything accumulated so far."""
        return metrics_from_confusion(self.matrix, self.class_names)


@dataclass
class SegRobustness:
    """mIoU under corruptions.

    Attributes:
        clean: Clean-set metrics.
        miou: ``{corruption: {severity: mIoU}}``.
        per_corruption: Mean mIoU over severities per corruption.
        robust_miou: Mean mIoU over every (corruption, severity) cell.
        retention: ``robust_miou / clean.miou``.
    """

    clean: SegMetrics
    miou: dict[str, dict[int, float]]
    per_corruption: dict[str, float]
    robust_miou: float
    retention: float

    def to_dict(self) -> dict[str, Any]:
        """This result as plain JSON-ready data."""
        return {
            "clean": self.clean.to_dict(), "miou": self.miou, "per_corruption": self.per_corruption,
            "robust_miou": self.robust_miou, "retention": self.retention,
        }  # fmt: skip


def robustness_summary(clean: SegMetrics, table: dict[str, dict[int, float]]) -> SegRobustness:
    """Per-corruption means, robust mIoU (mean over cells) and retention from a ``{c: {s: mIoU}}`` table."""
    cells = [v for sev in table.values() for v in sev.values()]
    if not cells:
        raise ValueError("empty corruption table: no corruption was evaluated")
    robust = sum(cells) / len(cells)
    return SegRobustness(
        clean=clean,
        miou=table,
        per_corruption={c: sum(s.values()) / len(s) for c, s in table.items()},
        robust_miou=robust,
        retention=robust / clean.miou if clean.miou > 0 else math.nan,
    )
