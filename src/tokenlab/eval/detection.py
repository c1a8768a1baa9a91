"""Detection / instance-segmentation evaluation: COCO AP with pycocotools, clean and under corruptions.

Metrics (pycocotools' ``COCOeval``, the COCO protocol): ``AP`` = mean over the IoU thresholds 0.50:0.05:0.95 and
the categories of the area under the 101-point interpolated precision/recall curve; ``AP50`` / ``AP75`` at one
threshold; ``APs`` / ``APm`` / ``APl`` for ground truth of area < 32^2, 32^2-96^2, > 96^2 pixels (``None`` when a
split has no object of that size). Box AP compares boxes, mask AP the instance masks (``iouType="segm"``).

Robustness, the detection-robustness protocol (Michaelis et al., "Benchmarking Robustness in Object Detection:
Autonomous Driving when Winter is Coming", 2019, https://arxiv.org/abs/1907.07484):

    mPC = (1 / (N_c N_s)) sum_c sum_s AP_{c,s}        rPC = mPC / AP_clean

over the 15 ImageNet-C corruptions (``N_c`` = 15) and severities 1-5 (``N_s`` = 5), for box and mask AP alike.
The corrupted val images come from ``tokenlab.eval.corruptions``' cache (seeded per image, generated at the
images' own size, reused across runs); each cell is read with the clean annotation file.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from tokenlab.data.detection import CocoDetection, detection_collate
from tokenlab.utils.amp import autocast

logger = logging.getLogger(__name__)

__all__ = [
    "DETECTION_FILE",
    "METRIC_NAMES",
    "DetMetrics",
    "DetRobustness",
    "DetectionRunResult",
    "coco_metrics",
    "evaluate_detection",
    "evaluate_detection_corruptions",
    "evaluate_detection_run",
    "predict_coco",
]

DETECTION_FILE = "detection.json"
#: The first six ``COCOeval.stats`` entries, in order.
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
IOU_TYPES = {"box": "bbox", "mask": "segm"}


def _nan_to_none(v: float) -> float | None:
    return None if v is None or not math.isfinite(v) else float(v)


@dataclass
class DetMetrics:
    """Box and mask COCO metrics of one image set (``METRIC_NAMES``; NaN where COCO gives -1: no such objects)."""

    box: dict[str, float]
    mask: dict[str, float] | None
    images: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (NaN -> null)."""
        out: dict[str, Any] = {"images": self.images, "box": {k: _nan_to_none(v) for k, v in self.box.items()}}
        if self.mask is not None:
            out["mask"] = {k: _nan_to_none(v) for k, v in self.mask.items()}
        return out


def coco_gt(ann_file: str | Path) -> COCO:
    """The ``pycocotools.coco.COCO`` of an annotation file, without its prints."""
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(ann_file))


def coco_metrics(gt: COCO, results: list[dict[str, Any]], iou_type: str, image_ids: Sequence[int]) -> dict[str, float]:
    """``METRIC_NAMES`` of ``results`` (COCO result dicts) against ``gt`` on ``image_ids``.

    No detection at all gives AP 0 for every size that has ground truth (pycocotools refuses an empty result list).

    Raises:
        ValueError: an unknown ``iou_type`` (``bbox`` or ``segm``).
    """
    if iou_type not in IOU_TYPES.values():
        raise ValueError(f"unknown iou_type {iou_type!r}; valid: {', '.join(IOU_TYPES.values())}")
    if not results:
        return {name: (0.0 if _has_size(gt, image_ids, name) else float("nan")) for name in METRIC_NAMES}
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, iou_type)
        ev.params.imgIds = list(image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {name: (float(v) if v >= 0 else float("nan")) for name, v in zip(METRIC_NAMES, ev.stats[:6], strict=True)}


def _has_size(gt: COCO, image_ids: Sequence[int], name: str) -> bool:
    """Whether ``gt`` has non-crowd objects in the size range of metric ``name`` (every range for AP/AP50/AP75)."""
    lo, hi = {"APs": (0, 32**2), "APm": (32**2, 96**2), "APl": (96**2, float("inf"))}.get(name, (0, float("inf")))
    anns = gt.loadAnns(gt.getAnnIds(imgIds=list(image_ids), iscrowd=False))
    return any(lo <= a.get("area", a["bbox"][2] * a["bbox"][3]) < hi for a in anns)


@torch.no_grad()
def predict_coco(
    model: nn.Module,
    dataset: CocoDetection,
    device: str | torch.device = "cpu",
    batch_size: int = 8,
    amp: str = "none",
    masks: bool = True,
    progress: bool = False,
    desc: str = "detecting",
) -> list[dict[str, Any]]:
    """COCO result dicts (``image_id``, ``category_id``, ``bbox`` xywh, ``score`` and an RLE ``segmentation``)."""
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=detection_collate)
    results: list[dict[str, Any]] = []
    for batch in tqdm(loader, desc=desc, unit="batch", disable=not progress, leave=False):
        images = [im.to(device) for im in batch["image"]]
        with autocast(torch.device(device), amp):
            preds = model(images)
        for pred, target in zip(preds, batch["target"], strict=True):
            boxes = pred["boxes"].float().cpu()
            scores, labels = pred["scores"].float().cpu().tolist(), pred["labels"].cpu().tolist()
            binary = (pred["masks"][:, 0] > 0.5).cpu().numpy().astype(np.uint8) if masks and "masks" in pred else None
            for i, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
                r: dict[str, Any] = {
                    "image_id": int(target["image_id"]), "category_id": dataset.category_ids[int(labels[i]) - 1],
                    "bbox": [x0, y0, x1 - x0, y1 - y0], "score": float(scores[i]),
                }  # fmt: skip
                if binary is not None:
                    rle = mask_utils.encode(np.asfortranarray(binary[i]))
                    r["segmentation"] = {"size": list(rle["size"]), "counts": rle["counts"].decode()}
                results.append(r)
    return results


def evaluate_detection(
    model: nn.Module,
    dataset: CocoDetection,
    device: str | torch.device = "cpu",
    batch_size: int = 8,
    amp: str = "none",
    masks: bool = True,
    progress: bool = False,
    gt: COCO | None = None,
) -> DetMetrics:
    """Box (and mask) ``METRIC_NAMES`` of ``model`` on ``dataset`` (its annotation file is the ground truth)."""
    gt = gt or coco_gt(dataset.ann_file)
    results = predict_coco(model, dataset, device, batch_size, amp, masks, progress)
    ids = [int(im["id"]) for im, _ in dataset.entries]
    box = coco_metrics(gt, results, "bbox", ids)
    mask = coco_metrics(gt, results, "segm", ids) if masks else None
    return DetMetrics(box, mask, len(dataset))


@dataclass
class DetRobustness:
    """Clean and corrupted AP, and the robustness protocol's mPC / rPC (see the module docstring).

    Attributes:
        clean: Clean metrics.
        table: ``{corruption: {severity: {"box": AP, "mask": AP}}}``.
        mpc: ``{"box": mPC, "mask": mPC}`` (mean AP over every corruption and severity evaluated).
        rpc: ``{"box": mPC / clean AP, ...}`` (NaN when the clean AP is 0).
        corruptions / severities: What was evaluated (the protocol: 15 x 5).
    """

    clean: DetMetrics
    table: dict[str, dict[int, dict[str, float]]]
    mpc: dict[str, float] = field(default_factory=dict)
    rpc: dict[str, float] = field(default_factory=dict)
    corruptions: list[str] = field(default_factory=list)
    severities: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "clean": self.clean.to_dict(),
            "mPC": {k: _nan_to_none(v) for k, v in self.mpc.items()},
            "rPC": {k: _nan_to_none(v) for k, v in self.rpc.items()},
            "corruptions": self.corruptions, "severities": self.severities,
            "per_cell": {c: {str(s): {k: _nan_to_none(v) for k, v in d.items()} for s, d in sev.items()}
                         for c, sev in self.table.items()},
        }  # fmt: skip


def robustness_summary(clean: DetMetrics, table: dict[str, dict[int, dict[str, float]]]) -> DetRobustness:
    """The mPC and rPC of a ``{corruption: {severity: {kind: AP}}}`` table (NaN cells count as 0 AP)."""
    kinds = ["box"] + (["mask"] if clean.mask is not None else [])
    mpc, rpc = {}, {}
    for kind in kinds:
        values = [0.0 if not math.isfinite(d[kind]) else d[kind] for sev in table.values() for d in sev.values()]
        mpc[kind] = float(np.mean(values)) if values else float("nan")
        ref = (clean.box if kind == "box" else clean.mask or {})["AP"]
        rpc[kind] = mpc[kind] / ref if ref and math.isfinite(ref) and ref > 0 else float("nan")
    severities = sorted({s for sev in table.values() for s in sev})
    return DetRobustness(clean, table, mpc, rpc, list(table), severities)


def _staged_source(images: Path, cache_dir: Path) -> Path:
    """A ``<stage>/<images dir name>`` link to the image folder: the corruption cache reads ``root/<group>/<img>``.

    A COCO image folder is flat (``val2017/*.jpg``) and its parent holds other splits, so the cache gets a folder of
    its own whose one group is the split.
    """
    stage = cache_dir / f"{images.name}-source"
    link = stage / images.name
    stage.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() and Path(os.readlink(link)) != images.resolve():
        link.unlink()
    if not link.exists():
        link.symlink_to(images.resolve(), target_is_directory=True)
    return stage


def evaluate_detection_corruptions(
    model: nn.Module,
    dataset: CocoDetection,
    cache_dir: str | Path,
    corruptions: str | Sequence[str] | None = "common",
    severities: str | Sequence[int] | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    batch_size: int = 8,
    amp: str = "none",
    masks: bool = True,
    workers: int | None = None,
    progress: bool = False,
) -> DetRobustness:
    """Clean AP, AP per corruption cell, mPC and rPC of ``model`` on ``dataset``'s images (see the module docstring).

    Args:
        model: Detection model (eval mode gives prediction dicts).
        dataset: The clean evaluation set; its annotation file scores every cell.
        cache_dir: Where the corruption cache lives (reused across runs and models).
        corruptions: Names or groups (``common`` = the 15 of the protocol; see ``tokenlab.eval.corruptions``).
        severities: E.g. ``"1-5"`` (the protocol) or ``[1, 3, 5]``.
        seed: Base seed of the per-image corruptions.
        device: Where the model runs.
        batch_size: Evaluation batch size.
        amp: ``none`` or ``bf16``.
        masks: Score masks too.
        workers: Corruption-generation processes.
        progress: Progress bars.
    """
    from tokenlab.eval.corruptions import generate_corruptions, read_corruption_tree

    gt = coco_gt(dataset.ann_file)
    clean = evaluate_detection(model, dataset, device, batch_size, amp, masks, progress, gt)
    cache_dir = Path(cache_dir)
    source = _staged_source(dataset.images, cache_dir)
    cache = generate_corruptions(source, cache_dir, corruptions, severities, seed=seed, workers=workers,
                                 progress=progress)  # fmt: skip
    cells = read_corruption_tree(cache.root, cache.corruptions, cache.severities)
    table: dict[str, dict[int, dict[str, float]]] = {}
    total = sum(len(s) for s in cells.values())
    bar = tqdm(total=total, desc="corrupted cells", unit="cell", disable=not progress)
    for corruption, sevs in cells.items():
        for severity, cell in sevs.items():
            ds = _cell_dataset(dataset, cell / dataset.images.name)
            m = evaluate_detection(model, ds, device, batch_size, amp, masks, False, gt)
            table.setdefault(corruption, {})[severity] = {"box": m.box["AP"]} | (
                {"mask": m.mask["AP"]} if m.mask is not None else {})  # fmt: skip
            logger.info("%s severity %d: %s", corruption, severity, table[corruption][severity])
            bar.update(1)
    bar.close()
    return robustness_summary(clean, table)


def _cell_dataset(dataset: CocoDetection, images: Path) -> CocoDetection:
    """``dataset`` read from a corrupted copy of its image folder (same names; the cache may change extensions)."""
    ds = copy.copy(dataset)
    ds.entries = [(dict(im, file_name=_cell_name(images, im["file_name"])), anns) for im, anns in dataset.entries]
    ds.images = images
    return ds


def _cell_name(images: Path, name: str) -> str:
    if (images / name).is_file():
        return name
    for ext in (".png", ".jpg"):
        if (images / Path(name).with_suffix(ext)).is_file():
            return str(Path(name).with_suffix(ext))
    raise FileNotFoundError(f"corrupted copy of {name} missing in {images}")


@dataclass
class DetectionRunResult:
    """What ``evaluate_detection_run`` found and wrote (``detection.json``)."""

    run: str
    root: str
    split: str
    clean: DetMetrics
    robustness: DetRobustness | None = None
    skipped: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """This result as plain JSON-ready data."""
        out: dict[str, Any] = {"run": self.run, "root": self.root, "split": self.split, "skipped": self.skipped}
        out.update(self.robustness.to_dict() if self.robustness is not None else {"clean": self.clean.to_dict()})
        return out


def evaluate_detection_run(
    run: str | Path,
    root: str | Path,
    split: str = "val",
    out_dir: str | Path | None = None,
    corruptions: str | Sequence[str] | None = None,
    severities: str | Sequence[int] | None = None,
    cache_dir: str | Path | None = None,
    device: str = "cpu",
    batch_size: int = 8,
    amp: str = "none",
    workers: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> DetectionRunResult:
    """Evaluate an exported detection run (``RUN/model``) on ``root``'s ``split``: box/mask AP, optional mPC/rPC.

    Writes ``out_dir/detection.json`` when ``out_dir`` is given; ``corruptions`` None skips the corrupted images,
    which are generated into ``cache_dir`` (default ``root/../corruption-cache``).
    """
    import tokenlab.models.detection  # noqa: F401  (registers mask_rcnn)
    from tokenlab.data.detection import DetectionTransform, build_detection_dataset
    from tokenlab.models import load_exported

    if amp not in ("none", "bf16"):
        raise ValueError(f"unknown amp {amp!r}; valid: none, bf16")
    model, meta = load_exported(run, device=device)
    if meta.get("task") != "detection":
        raise ValueError(f"{run} is not a detection model (its model.json says task={meta.get('task')!r}); train "
                         f"one with `tokenlab detect train`")  # fmt: skip
    ds = build_detection_dataset(root, split, DetectionTransform(train=False))
    if ds.classes != list(meta.get("classes", ds.classes)):
        raise ValueError(f"the categories of {root} ({split}) differ from the ones {run} was trained on")
    detector: Any = getattr(model, "detector", None)
    masks = detector is not None and bool(detector.roi_heads.has_mask())
    result = DetectionRunResult(str(run), str(root), split, clean=None, skipped=ds.skips.to_dict())  # type: ignore[arg-type]
    if corruptions is None:
        result.clean = evaluate_detection(model, ds, device, batch_size, amp, masks, progress)
    else:
        cache = Path(cache_dir) if cache_dir is not None else Path(root).parent / "corruption-cache"
        result.robustness = evaluate_detection_corruptions(model, ds, cache, corruptions, severities, seed, device,
                                                           batch_size, amp, masks, workers, progress)  # fmt: skip
        result.clean = result.robustness.clean
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / DETECTION_FILE).write_text(json.dumps(result.to_dict(), indent=1))
    return result
