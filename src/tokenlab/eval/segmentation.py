"""Semantic-segmentation evaluation: mIoU, per-class IoU, pixel accuracy, inference modes, corruptions, overlays.

Metrics come from one confusion matrix ``M`` (rows: true class, columns: predicted class) accumulated over every
pixel whose label is not the ignore index:

    IoU_k     = M_kk / (sum_j M_kj + sum_i M_ik - M_kk)       (TP / (TP + FN + FP))
    mIoU      = mean of IoU_k over the classes with a non-empty union (a class that is neither present nor
                predicted anywhere in the set has no IoU and is left out, as in mmsegmentation / Cityscapes)
    pixel acc = sum_k M_kk / sum_ij M_ij

Inference is either whole-image (``mode="whole"``) or sliding-window (``mode="slide"``: overlapping
``crop x crop`` windows at ``stride``, logits averaged where windows overlap, the image zero-padded up to one crop
when smaller) for images too large for one pass.

Robustness follows the classification protocol (REFERENCE §3, Hendrycks & Dietterich 2019) with mIoU in place of
accuracy: every (corruption, severity) cell gets its mIoU, the robust mIoU is their mean and
``retention = robust mIoU / clean mIoU``. Corrupted images come from the evaluation issue's seeded corruption
function (``tokenlab.eval.corruptions``) and are applied to the uint8 image before normalisation; masks are left
untouched (the corruptions are photometric or small local warps).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

logger = logging.getLogger(__name__)

__all__ = [
    "SegMetrics",
    "SegRobustness",
    "ConfusionMeter",
    "colorize",
    "confusion_matrix",
    "corrupted_pairs",
    "evaluate_corruptions",
    "evaluate_run",
    "evaluate_segmentation",
    "metrics_from_confusion",
    "overlay_examples",
    "palette",
    "predict_logits",
    "robustness_summary",
    "save_overlays",
]

MODES = ("whole", "slide")


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
        return dict(zip(self.class_names, self.iou))

    def to_dict(self) -> dict[str, Any]:
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
        if pred.ndim == target.ndim + 1:
            pred = pred.argmax(dim=1)
        self.matrix += confusion_matrix(pred, target, self.num_classes, self.ignore_index)

    def compute(self) -> SegMetrics:
        return metrics_from_confusion(self.matrix, self.class_names)


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    images: torch.Tensor,
    num_classes: int,
    mode: str = "whole",
    crop_size: int | Sequence[int] = 512,
    stride: int | Sequence[int] = 341,
) -> torch.Tensor:
    """Logits ``(B, K, H, W)`` for a normalised batch, whole-image or by sliding window (see module docstring).

    In ``"whole"`` mode the image is zero-padded to a multiple of the model's patch size and the logits cropped
    back. In ``"slide"`` mode windows of ``crop_size`` move by ``stride``; the last window in each direction is
    aligned to the image border so every pixel is covered, and overlapping logits are averaged.
    """
    if mode not in MODES:
        raise ValueError(f"unknown inference mode {mode!r}; valid: {', '.join(MODES)}")
    B, _, H, W = images.shape
    patch = int(getattr(model, "patch_size", 1))
    if mode == "whole":
        padded = _pad_to(images, math.ceil(H / patch) * patch, math.ceil(W / patch) * patch)
        return model(padded)[..., :H, :W]
    ch, cw = (crop_size, crop_size) if isinstance(crop_size, int) else tuple(crop_size)
    sh, sw = (stride, stride) if isinstance(stride, int) else tuple(stride)
    if min(ch, cw, sh, sw) < 1 or ch % patch or cw % patch:
        raise ValueError(f"crop {ch}x{cw} must be a positive multiple of the patch size {patch}; stride {sh}x{sw} >= 1")
    padded = _pad_to(images, max(H, ch), max(W, cw))
    PH, PW = padded.shape[-2:]
    logits = padded.new_zeros(B, num_classes, PH, PW)
    count = padded.new_zeros(1, 1, PH, PW)
    for top in _starts(PH, ch, sh):
        for left in _starts(PW, cw, sw):
            out = model(padded[..., top : top + ch, left : left + cw])
            logits[..., top : top + ch, left : left + cw] += out.float()
            count[..., top : top + ch, left : left + cw] += 1
    return (logits / count)[..., :H, :W]


def _starts(size: int, crop: int, stride: int) -> list[int]:
    """Window offsets covering ``[0, size)``; the last window ends at ``size``."""
    starts = list(range(0, max(size - crop, 0) + 1, stride))
    if starts[-1] + crop < size:
        starts.append(size - crop)
    return starts


def _pad_to(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    H, W = x.shape[-2:]
    return F.pad(x, (0, w - W, 0, h - H)) if (h, w) != (H, W) else x


@torch.no_grad()
def evaluate_segmentation(
    model: nn.Module,
    loader: Iterable[dict[str, torch.Tensor]],
    num_classes: int,
    ignore_index: int = 255,
    mode: str = "whole",
    crop_size: int | Sequence[int] = 512,
    stride: int | Sequence[int] = 341,
    device: str | torch.device = "cpu",
    class_names: Sequence[str] | None = None,
    image_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    amp_dtype: torch.dtype | None = None,
) -> SegMetrics:
    """mIoU, per-class IoU and pixel accuracy of ``model`` over ``loader`` (batches with ``image`` and ``mask``).

    Args:
        model: Returns per-pixel logits ``(B, K, H, W)``.
        loader: Yields ``{"image": (B, 3, H, W) float, "mask": (B, H, W) long}``.
        num_classes: K.
        ignore_index: Label value that is not scored.
        mode / crop_size / stride: See ``predict_logits``.
        device: Where the model runs.
        class_names: Names for the per-class report.
        image_fn: Optional function applied to each image batch before the model (e.g. a corruption).
        amp_dtype: Autocast dtype (e.g. ``torch.bfloat16`` on a GPU); None for full precision.
    """
    device = torch.device(device)
    model = model.to(device).eval()
    meter = ConfusionMeter(num_classes, ignore_index, class_names)
    for batch in loader:
        images = batch["image"]
        if image_fn is not None:
            images = image_fn(images)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = predict_logits(model, images.to(device), num_classes, mode, crop_size, stride)
        meter.update(logits.argmax(dim=1).cpu(), batch["mask"])
    return meter.compute()


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
        masks / preds: ``(H, W)`` labels (the ignore index is drawn black in the ground truth).
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
    for img, gt, pr in zip(images, masks, preds):
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


def corrupted_pairs(
    pairs: Sequence[tuple[Path, Path]], source_root: str | Path, cell_dir: str | Path
) -> list[tuple[Path, Path]]:
    """Pair each clean mask with the corrupted copy of its image (same path relative to ``source_root``).

    The corruption cache writes ``cell/<relative path>`` with its own extension (png or jpg), so the match is by
    relative path without extension.
    """
    source_root, cell_dir = Path(source_root), Path(cell_dir)
    found = {p.relative_to(cell_dir).with_suffix(""): p for p in cell_dir.rglob("*") if p.is_file()}
    out = []
    for img, mask in pairs:
        rel = Path(img).relative_to(source_root).with_suffix("")
        if rel not in found:
            raise FileNotFoundError(f"corrupted copy of {img} missing in {cell_dir} (expected {rel}.png/.jpg)")
        out.append((found[rel], Path(mask)))
    return out


def evaluate_corruptions(
    model: nn.Module,
    dataset: Any,
    source_root: str | Path,
    cache_dir: str | Path,
    corruptions: str | Sequence[str] | None = "common",
    severities: str | Sequence[int] | None = None,
    seed: int = 0,
    batch_size: int = 16,
    workers: int | None = None,
    progress: bool = False,
    **predict_kwargs: Any,
) -> SegRobustness:
    """Clean and corrupted mIoU of ``model`` on ``dataset`` (a ``tokenlab.data.segmentation.SegmentationDataset``).

    Corrupted images come from the evaluation issue's cache (``tokenlab.eval.corruptions.generate_corruptions``)
    of the image tree ``source_root`` (``<group>/<image>``, e.g. the synthetic ``val`` split or a Cityscapes
    ``leftImg8bit/val``); each cell is paired with the clean masks and scored like the clean set.

    Args:
        model: Segmentation model (``(B, K, H, W)`` logits).
        dataset: The clean evaluation set; its transform, classes, label map and ignore index are reused.
        source_root: Root of the clean images the corruptions are generated from.
        cache_dir: Where the corruption cache lives (reused across runs).
        corruptions / severities: Names or groups / ``"1-5"`` (see ``tokenlab.eval.corruptions``).
        seed: Base seed of the per-image corruptions.
        batch_size: Evaluation batch size.
        workers: Corruption-generation processes.
        progress: Show the generation progress bar.
        **predict_kwargs: ``mode``, ``crop_size``, ``stride``, ``device``, ``amp_dtype`` of ``evaluate_segmentation``.
    """
    from torch.utils.data import DataLoader

    from tokenlab.data.segmentation import SegmentationDataset
    from tokenlab.eval.corruptions import generate_corruptions, read_corruption_tree

    def score(ds: Any) -> SegMetrics:
        loader = DataLoader(ds, batch_size=batch_size, shuffle=False)
        return evaluate_segmentation(model, loader, ds.num_classes, ds.ignore_index, class_names=ds.class_names,
                                     **predict_kwargs)  # fmt: skip

    clean = score(dataset)
    cache = generate_corruptions(source_root, cache_dir, corruptions, severities, seed=seed, workers=workers,
                                 progress=progress)  # fmt: skip
    cells = read_corruption_tree(cache.root, cache.corruptions, cache.severities)
    table: dict[str, dict[int, float]] = {}
    for corruption, sevs in cells.items():
        for severity, cell in sevs.items():
            ds = SegmentationDataset(
                corrupted_pairs(dataset.pairs, source_root, cell), dataset.class_names, dataset.transform,
                dataset.ignore_index, dataset.label_map,
            )  # fmt: skip
            table.setdefault(corruption, {})[severity] = score(ds).miou
            logger.info("%s severity %d: mIoU %.4f", corruption, severity, table[corruption][severity])
    return robustness_summary(clean, table)


@torch.no_grad()
def overlay_examples(
    model: nn.Module, dataset: Any, path: str | Path, count: int = 8, device: str | torch.device = "cpu",
    scale: int = 1, **predict_kwargs: Any,
) -> Path:
    """Write ``count`` evenly spaced examples of ``dataset`` as image | ground truth | prediction rows (PNG)."""
    from tokenlab.data.segmentation import denormalize

    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    model = model.to(device).eval()
    idx = np.linspace(0, len(dataset) - 1, num=min(count, len(dataset))).round().astype(int)
    images, masks, preds = [], [], []
    for i in idx:
        sample = dataset[int(i)]
        logits = predict_logits(model, sample["image"][None].to(device), dataset.num_classes, **predict_kwargs)
        images.append(denormalize(sample["image"], dataset.mean, dataset.std))
        masks.append(sample["mask"].numpy())
        preds.append(logits[0].argmax(dim=0).cpu().numpy())
    return save_overlays(images, masks, preds, path, dataset.num_classes, scale=scale)


def evaluate_run(
    run: str | Path,
    data: str,
    root: str | Path,
    split: str = "val",
    out_dir: str | Path | None = None,
    corruptions: str | Sequence[str] | None = None,
    severities: str | Sequence[int] | None = None,
    cache_dir: str | Path | None = None,
    mode: str = "whole",
    crop_size: int = 512,
    stride: int = 341,
    device: str = "cpu",
    batch_size: int = 16,
    overlays: int = 8,
    amp: str = "none",
    workers: int | None = None,
) -> dict[str, Any]:
    """Evaluate an exported segmentation run (``RUN/model``): clean metrics, optional corruptions, overlays.

    Writes ``out_dir/segmentation.json`` (and ``overlays.png``) when ``out_dir`` is given; returns the JSON dict.
    ``corruptions`` None skips the corrupted evaluation. The corrupted images are generated from the split's
    image tree (synthetic: ``root/<split>``; Cityscapes: ``root/leftImg8bit/<split>``; folder:
    ``root/images[/<split>]``) into ``cache_dir`` (default ``root/../corruption-cache``).
    """
    import tokenlab.models.segmentation  # noqa: F401  (registers segformer_fan)
    from tokenlab.data.segmentation import build_segmentation_dataset, build_segmentation_transforms
    from tokenlab.models import load_exported

    if amp not in ("none", "bf16"):
        raise ValueError(f"unknown amp {amp!r}; valid: none, bf16")
    model, meta = load_exported(run, device=device)
    if meta.get("task") != "segmentation" and "ignore_index" not in meta:
        logger.warning("%s was not trained by the segmentation method (meta task=%r)", run, meta.get("task"))
    ignore = int(meta.get("ignore_index", 255))
    mean, std = meta.get("mean", IMAGENET_MEAN), meta.get("std", IMAGENET_STD)
    size = int(meta.get("img_size", crop_size))
    tf = build_segmentation_transforms(False, size, ignore_index=ignore, mean=mean, std=std)
    ds = build_segmentation_dataset(data, root, split, tf, ignore_index=ignore, num_classes=int(meta["num_classes"]))
    predict_kw: dict[str, Any] = dict(mode=mode, crop_size=crop_size, stride=stride, device=device,
                                      amp_dtype=torch.bfloat16 if amp == "bf16" else None)  # fmt: skip
    result: dict[str, Any] = {"run": str(run), "data": data, "root": str(root), "split": split, "mode": mode,
                              "images": len(ds)}  # fmt: skip
    if corruptions is None:
        from torch.utils.data import DataLoader

        loader = DataLoader(ds, batch_size=batch_size, shuffle=False)
        result["clean"] = evaluate_segmentation(model, loader, ds.num_classes, ignore, class_names=ds.class_names,
                                                **predict_kw).to_dict()  # fmt: skip
    else:
        source = _image_tree(data, Path(root), split)
        cache = Path(cache_dir) if cache_dir is not None else Path(root).parent / "corruption-cache"
        rob = evaluate_corruptions(model, ds, source, cache, corruptions, severities, batch_size=batch_size,
                                   workers=workers, **predict_kw)  # fmt: skip
        result.update(rob.to_dict())
    if out_dir is not None:
        import json

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if overlays > 0:
            scale = max(1, 128 // max(1, min(ds.load(0)[1].shape)))
            path = overlay_examples(model, ds, out / "overlays.png", overlays, device=device, scale=scale,
                                    mode=mode, crop_size=crop_size, stride=stride)  # fmt: skip
            result["overlays"] = str(path)
        (out / "segmentation.json").write_text(json.dumps(result, indent=1, default=_json_float))
    return result


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _json_float(value: Any) -> Any:
    return float(value) if isinstance(value, (np.floating, torch.Tensor)) else str(value)


def _image_tree(data: str, root: Path, split: str) -> Path:
    """The ``<group>/<image>`` tree the corruption cache is generated from, per layout."""
    if data == "synthetic":
        return root / split
    if data == "cityscapes":
        return root / "leftImg8bit" / split
    if data == "folder":
        return root / "images" / split if (root / "images" / split).is_dir() else root / "images"
    raise ValueError(f"unknown segmentation data kind {data!r}; valid: synthetic, cityscapes, folder")
