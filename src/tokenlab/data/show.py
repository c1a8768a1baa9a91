"""PNG grids that show what the model is fed: samples with mask overlays, STL teacher/student pairs, iBOT crops.

Used by ``tokenlab data show DIR --out PNG``. Images are un-normalised for display; masks are drawn as a
semi-transparent colour per class (background clear) with the class name above each tile.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from tokenlab.data.datasets import build_dataset  # noqa: E402
from tokenlab.data.images import denormalize  # noqa: E402
from tokenlab.data.transforms import build_transforms  # noqa: E402

logger = logging.getLogger(__name__)


def _picture(image: torch.Tensor) -> np.ndarray:
    """A normalised (3, H, W) tensor as an (H, W, 3) float picture in [0, 1] for matplotlib."""
    return denormalize(image).astype(np.float32) / 255


def mask_overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """Blend a per-class colour into ``image`` where ``mask > 0``."""
    palette = plt.get_cmap("tab10")
    colours = np.asarray([palette(k % 10)[:3] for k in range(max(1, int(mask.max())))])
    out = image.copy()
    on = mask > 0
    out[on] = (1 - alpha) * image[on] + alpha * colours[mask[on] - 1]  # class k is drawn in colour k
    return out


def _pick(length: int, count: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(length, generator=gen)[: min(count, length)].tolist()


def _save(fig: Any, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100, bbox_inches="tight")
    plt.close(fig)
    logger.info("wrote %s", out)
    return out


def samples_grid(spec: str | Path, split: str, out: Path, count: int = 16, seed: int = 0, img_size: int = 64) -> Path:
    """Rows of image / image with mask overlay (masks when the data set has them)."""
    dataset = build_dataset(spec, split, build_transforms("eval", img_size), verify="none")
    picks = _pick(len(dataset), count, seed)
    cols = min(8, len(picks))
    rows_per = 2 if dataset.has_masks else 1
    rows = -(-len(picks) // cols) * rows_per
    fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols, 1.45 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, index in enumerate(picks):
        sample = dataset[index]
        image = _picture(sample["image"])
        r, c = (i // cols) * rows_per, i % cols
        axes[r, c].imshow(image)
        axes[r, c].set_title(dataset.classes[sample["label"]], fontsize=7)
        if dataset.has_masks:
            axes[r + 1, c].imshow(mask_overlay(image, sample["mask"].numpy()))
    fig.suptitle(f"{spec} / {split}: samples" + (" and masks" if dataset.has_masks else ""), fontsize=9)
    return _save(fig, out)


def pairs_grid(
    spec: str | Path, split: str, out: Path, count: int = 8, seed: int = 0, img_size: int = 64, teacher: str = "spatial"
) -> Path:
    """Columns of original / teacher view / student view (/ student mask) for the paired STL transform."""
    dataset = build_dataset(spec, split, None, verify="none")
    paired = build_transforms("stl_paired", img_size, teacher=teacher, re_prob=0.3)
    picks = _pick(len(dataset), count, seed)
    columns = ["original", f"teacher ({teacher})", "student"] + (["student mask"] if dataset.has_masks else [])
    fig, axes = plt.subplots(len(picks), len(columns), figsize=(1.5 * len(columns), 1.5 * len(picks)), squeeze=False)
    state = torch.get_rng_state()
    torch.manual_seed(seed)
    try:
        for row, index in enumerate(picks):
            raw = dataset.raw(index)
            views = paired(raw)
            tiles = [raw["image"].permute(1, 2, 0).numpy(), _picture(views["teacher_image"]), _picture(views["image"])]
            if dataset.has_masks:
                tiles.append(mask_overlay(_picture(views["teacher_image"]), views["mask"].long().numpy()))
            for col, tile in enumerate(tiles):
                axes[row, col].imshow(tile)
                axes[row, col].axis("off")
                if row == 0:
                    axes[row, col].set_title(columns[col], fontsize=8)
    finally:
        torch.set_rng_state(state)
    fig.suptitle(f"{spec} / {split}: STL paired views", fontsize=9)
    return _save(fig, out)


def crops_grid(
    spec: str | Path,
    split: str,
    out: Path,
    count: int = 4,
    seed: int = 0,
    img_size: int = 64,
    patch_size: int = 8,
    num_local: int = 6,
) -> Path:
    """Rows of iBOT crops: 2 global crops with their token masks shaded, then the local crops."""
    dataset = build_dataset(spec, split, None, verify="none")
    multi = build_transforms("multicrop", img_size, patch_size=patch_size, num_local=num_local)
    picks = _pick(len(dataset), count, seed)
    cols = 2 + num_local
    fig, axes = plt.subplots(len(picks), cols, figsize=(1.3 * cols, 1.4 * len(picks)), squeeze=False)
    state = torch.get_rng_state()
    torch.manual_seed(seed)
    try:
        for row, index in enumerate(picks):
            views = multi(dataset.raw(index))
            for col, crop in enumerate(views["crops"]):
                tile = _picture(crop)
                if col < 2:
                    token_mask = views["masks"][col].repeat_interleave(patch_size, 0).repeat_interleave(patch_size, 1)
                    tile[token_mask.numpy()] *= 0.35
                axes[row, col].imshow(tile)
                axes[row, col].axis("off")
                if row == 0:
                    axes[row, col].set_title("global (masked)" if col < 2 else "local", fontsize=7)
    finally:
        torch.set_rng_state(state)
    fig.suptitle(f"{spec} / {split}: iBOT multi-crop", fontsize=9)
    return _save(fig, out)
