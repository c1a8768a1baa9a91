"""Semantic-segmentation evaluation: running a model (whole image or sliding window), corruptions, overlays.

Inference is either whole-image (``mode="whole"``) or sliding-window (``mode="slide"``: overlapping
``crop x crop`` windows at ``stride``, logits averaged where windows overlap, the image zero-padded up to one crop
when smaller) for images too large for one pass. Scores come from :mod:`tokenlab.eval.seg_metrics`.

Cityscapes-C (the published FAN robustness set) is the Cityscapes val split passed through the same seeded
corruption code as ImageNet-C (``tokenlab.eval.corruptions``): ``generate_corrupted_split`` writes it once
(published: 19 corruptions x severities 1-5, ``segmentation/tools/gen_city_c.py``) and ``evaluate_corruptions``
reads the same cache (the published test, ``tools/test_city_c.py``, scores severities 1-3 of each corruption).

Images are evaluated at their native size, normalised with the exported model's ``mean``/``std`` (the keys
``eval_transform_from_meta`` reads): a segmentation label map cannot be centre-cropped without dropping labelled
pixels, and the sliding window handles any size. Corrupted images come from the evaluation issue's seeded
corruption cache (``tokenlab.eval.corruptions``) of the split's image tree and are paired with the clean masks;
masks are left untouched (the corruptions are photometric or small local warps).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from tokenlab.data.images import denormalize
from tokenlab.data.transforms import eval_transform_from_meta
from tokenlab.eval.seg_metrics import ConfusionMeter, SegMetrics, SegRobustness, robustness_summary
from tokenlab.eval.seg_overlays import save_overlays
from tokenlab.utils.amp import autocast
from tokenlab.utils.runs import SEGMENTATION_FILE

logger = logging.getLogger(__name__)

__all__ = [
    "MODES",
    "SegmentationRunResult",
    "corrupted_pairs",
    "evaluate_corruptions",
    "evaluate_segmentation",
    "evaluate_segmentation_run",
    "generate_corrupted_split",
    "overlay_examples",
    "predict_logits",
]

MODES = ("whole", "slide")


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
    amp: str | torch.dtype | None = None,
) -> SegMetrics:
    """mIoU, per-class IoU and pixel accuracy of ``model`` over ``loader`` (batches with ``image`` and ``mask``).

    Args:
        model: Returns per-pixel logits ``(B, K, H, W)``.
        loader: Yields ``{"image": (B, 3, H, W) float, "mask": (B, H, W) long}``.
        num_classes: K.
        ignore_index: Label value that is not scored.
        mode: ``whole`` or sliding-window inference, see ``predict_logits``.
        crop_size: Window size, see ``predict_logits``.
        stride: Window stride, see ``predict_logits``.
        device: Where the model runs.
        class_names: Names for the per-class report.
        image_fn: Optional function applied to each image batch before the model (e.g. a corruption).
        amp: Autocast (``tokenlab.utils.amp``: ``none``/``bf16``/``fp16`` or a dtype); None for full precision.
    """
    device = torch.device(device)
    model = model.to(device).eval()
    meter = ConfusionMeter(num_classes, ignore_index, class_names)
    for batch in loader:
        images = batch["image"]
        if image_fn is not None:
            images = image_fn(images)
        with autocast(device, amp):
            logits = predict_logits(model, images.to(device), num_classes, mode, crop_size, stride)
        meter.update(logits.argmax(dim=1).cpu(), batch["mask"])
    return meter.compute()


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
        corruptions: Names or groups (see ``tokenlab.eval.corruptions``).
        severities: Severities, e.g. ``"1-5"``.
        seed: Base seed of the per-image corruptions.
        batch_size: Evaluation batch size.
        workers: Corruption-generation processes.
        progress: Show the generation progress bar.
        **predict_kwargs: ``mode``, ``crop_size``, ``stride``, ``device``, ``amp`` of ``evaluate_segmentation``.
    """
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


def default_cache_dir(root: str | Path) -> Path:
    """Where the corrupted copies of a data root go unless told otherwise: ``root/../corruption-cache``."""
    return Path(root).parent / "corruption-cache"


def generate_corrupted_split(
    data: str,
    root: str | Path,
    split: str = "val",
    cache_dir: str | Path | None = None,
    corruptions: str | Sequence[str] | None = "all",
    severities: str | Sequence[int] | None = "1-5",
    seed: int = 0,
    workers: int | None = None,
    progress: bool = True,
) -> Any:
    """Write the corrupted copies of a split's images, e.g. Cityscapes-C from ``leftImg8bit/val``.

    The split's image tree (``<group>/<image>``: Cityscapes ``<city>/<name>_leftImg8bit.png``) goes through
    ``tokenlab.eval.corruptions.generate_corruptions`` at native size into ``cache_dir`` (default
    ``default_cache_dir(root)``); ``evaluate_corruptions`` / ``tokenlab segment eval --corruptions`` with the same
    cache, seed and corruptions reuse it and pair every corrupted image with its clean mask. Returns the
    ``CorruptionCache`` (its ``root`` holds ``corruption/severity/<group>/<image>``).
    """
    from tokenlab.data.segmentation import pair_set
    from tokenlab.eval.corruptions import generate_corruptions

    ps = pair_set(data, root, split)
    assert ps.image_root is not None
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir(root)
    return generate_corruptions(ps.image_root, cache, corruptions, severities, seed=seed, workers=workers,
                                progress=progress)  # fmt: skip


@torch.no_grad()
def overlay_examples(
    model: nn.Module,
    dataset: Any,
    path: str | Path,
    count: int = 8,
    device: str | torch.device = "cpu",
    scale: int = 1,
    **predict_kwargs: Any,
) -> Path:
    """Write ``count`` evenly spaced examples of ``dataset`` as image | ground truth | prediction rows (PNG)."""
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


@dataclass
class SegmentationRunResult:
    """What :func:`evaluate_segmentation_run` measured; ``to_dict()`` is the ``segmentation.json`` schema.

    Attributes:
        run, data, root, split, mode: What was evaluated, and how.
        images: Pairs evaluated.
        clean: Clean-set metrics.
        robustness: Corrupted-set summary (None without corruptions).
        skipped: Unreadable images left out (``tokenlab.data.images``' policy).
        overlays: The overlay picture, when written.
    """

    run: str
    data: str
    root: str
    split: str
    mode: str
    images: int
    clean: SegMetrics
    robustness: SegRobustness | None = None
    skipped: int = 0
    overlays: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """This result as plain JSON-ready data."""
        out: dict[str, Any] = {"run": self.run, "data": self.data, "root": self.root, "split": self.split,
                               "mode": self.mode, "images": self.images, "skipped": self.skipped}  # fmt: skip
        if self.robustness is None:
            out["clean"] = self.clean.to_dict()
        else:
            out.update(self.robustness.to_dict())
        if self.overlays is not None:
            out["overlays"] = self.overlays
        return out


def evaluate_segmentation_run(
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
) -> SegmentationRunResult:
    """Evaluate an exported segmentation run (``RUN/model``): clean metrics, optional corruptions, overlays.

    Writes ``out_dir/segmentation.json`` (and ``overlays.png``) when ``out_dir`` is given. ``corruptions`` None
    skips the corrupted evaluation. The corrupted images are generated from the split's image tree (synthetic:
    ``root/<split>``; Cityscapes: ``root/leftImg8bit/<split>``; folder: ``root/images[/<split>]``) into
    ``cache_dir`` (default ``root/../corruption-cache``).

    Args:
        run: Run directory or export stem.
        data: Layout kind (``tokenlab.data.segmentation.KINDS``).
        root: Where the pairs are.
        split: Which split of ``root``.
        out_dir: Where the JSON and overlays go (None: nowhere).
        corruptions: Names or groups to evaluate (None: clean only), as in ``evaluate_corruptions``.
        severities: Severities, as in ``evaluate_corruptions``.
        cache_dir: Corruption cache (default ``root/../corruption-cache``).
        mode: Inference mode, as in ``evaluate_segmentation``.
        crop_size: Window size, as in ``evaluate_segmentation``.
        stride: Window stride, as in ``evaluate_segmentation``.
        device: Where the model runs.
        batch_size: Evaluation batch size.
        overlays: Images drawn in ``overlays.png`` (0: none).
        amp: ``none`` or ``bf16`` (``tokenlab.utils.amp``).
        workers: Corruption-generation processes.
    """
    import tokenlab.models.segmentation  # noqa: F401  (registers segformer_fan)
    from tokenlab.data.segmentation import SegmentationDataset, build_segmentation_transforms, pair_set
    from tokenlab.models import load_exported

    if amp not in ("none", "bf16"):
        raise ValueError(f"unknown amp {amp!r}; valid: none, bf16")
    model, meta = load_exported(run, device=device)
    if meta.get("task") != "segmentation" and "ignore_index" not in meta:
        logger.warning("%s was not trained by the segmentation method (meta task=%r)", run, meta.get("task"))
    ignore = int(meta.get("ignore_index", 255))
    size = int(meta.get("img_size", crop_size))
    norm = eval_transform_from_meta(meta, img_size=size)  # the export's normalisation (no crop: see the docstring)
    tf = build_segmentation_transforms(False, size, ignore_index=ignore, mean=norm.mean, std=norm.std)
    ps = pair_set(data, root, split, int(meta["num_classes"]))
    ds = SegmentationDataset(ps.pairs, ps.class_names, tf, ignore, ps.label_map)
    predict_kw: dict[str, Any] = dict(mode=mode, crop_size=crop_size, stride=stride, device=device, amp=amp)
    result = SegmentationRunResult(str(run), data, str(root), split, mode, len(ds), clean=None,  # type: ignore[arg-type]
                                   skipped=len(ps.skipped))  # fmt: skip
    if corruptions is None:
        loader = DataLoader(ds, batch_size=batch_size, shuffle=False)
        result.clean = evaluate_segmentation(model, loader, ds.num_classes, ignore, class_names=ds.class_names,
                                             **predict_kw)  # fmt: skip
    else:
        assert ps.image_root is not None
        cache = Path(cache_dir) if cache_dir is not None else default_cache_dir(root)
        result.robustness = evaluate_corruptions(model, ds, ps.image_root, cache, corruptions, severities,
                                                 batch_size=batch_size, workers=workers, **predict_kw)  # fmt: skip
        result.clean = result.robustness.clean
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if overlays > 0:
            scale = max(1, 128 // max(1, min(ds.load(0)[1].shape)))
            path = overlay_examples(model, ds, out / "overlays.png", overlays, device=device, scale=scale,
                                    mode=mode, crop_size=crop_size, stride=stride)  # fmt: skip
            result.overlays = str(path)
        (out / SEGMENTATION_FILE).write_text(json.dumps(result.to_dict(), indent=1, default=_json_float))
    return result


def _json_float(value: Any) -> Any:
    return float(value) if isinstance(value, (np.floating, torch.Tensor)) else str(value)
