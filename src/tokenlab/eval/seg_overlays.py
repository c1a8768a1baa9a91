"""Segmentation pictures: a fixed colour per class, label maps drawn over images, image | truth | prediction rows."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

__all__ = ["colorize", "palette", "save_overlays"]


def palette(num_classes: int, ignore_color: tuple[int, int, int] = (0, 0, 0)) -> np.ndarray:
    """``(256, 3)`` uint8 colours: fixed well-separated colours per class (HSV golden-angle), black for others."""
    import colorsys

    pal = np.zeros((256, 3), dtype=np.uint8)
    pal[:] = ignore_color
    for k in range(min(num_classes, 255)):
        r, g, b = colorsys.hsv_to_rgb((k * 0.618034) % 1.0, 0.75 if k % 2 else 0.95, 0.95 if k % 3 else 0.7)
        pal[k] = (int(r * 255), int(g * 255), int(b * 255))
    return pal


def colorize(mask: np.ndarray | torch.Tensor, pal: np.ndarray) -> np.ndarray:
    """``(H, W)`` labels -> ``(H, W, 3)`` uint8 colours (values outside 0..255 become the ignore colour)."""
    m = np.asarray(mask, dtype=np.int64)
    return pal[np.where((m >= 0) & (m < 256), m, 255)]


def save_overlays(
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    preds: Sequence[np.ndarray],
    path: str | Path,
    num_classes: int,
    alpha: float = 0.5,
    scale: int = 1,
) -> Path:
    """One PNG with a row per example: image | ground truth over image | prediction over image.

    Args:
        images: ``(H, W, 3)`` uint8 images.
        masks: ``(H, W)`` ground-truth labels (the ignore index is drawn black).
        preds: ``(H, W)`` predicted labels.
        path: Output PNG.
        num_classes: K (fixes the palette).
        alpha: Opacity of the label colours.
        scale: Integer up-scaling (nearest) so tiny synthetic images are visible.
    """
    if not (len(images) == len(masks) == len(preds)) or not images:
        raise ValueError(f"need the same non-zero number of images, masks and predictions, got "
                         f"{len(images)}, {len(masks)}, {len(preds)}")  # fmt: skip
    pal = palette(num_classes)
    rows = []
    for img, gt, pr in zip(images, masks, preds, strict=True):
        img = np.asarray(img, dtype=np.float32)
        blend = [(1 - alpha) * img + alpha * colorize(m, pal).astype(np.float32) for m in (gt, pr)]
        rows.append(np.concatenate([img, *blend], axis=1))
    grid = np.concatenate(rows, axis=0).clip(0, 255).astype(np.uint8)
    if scale > 1:
        grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
    return path
