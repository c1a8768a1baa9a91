"""Object-detection / instance-segmentation data: COCO-format sets and a synthetic one written in the same format.

Layout (the COCO 2017 one; ``split`` is e.g. ``train2017`` / ``val2017``, or ``train`` / ``val`` for the synthetic
set)::

    ROOT/annotations/instances_<split>.json    COCO instances JSON (images, annotations, categories)
    ROOT/<split>/<file_name>                    the images the JSON names

``CocoDetection`` returns ``{"image": float (3, H, W) in [0, 1], "target": {...}, "index": i}`` with the target
torchvision's detection models take: ``boxes`` ``(n, 4)`` float xyxy in pixels, ``labels`` ``(n,)`` int64 in
``1..K`` (0 is torchvision's background; category ids are mapped to contiguous labels in sorted-id order),
``masks`` ``(n, H, W)`` uint8 and ``image_id`` (the JSON's id). Batches are lists: ``detection_collate``.

Bad annotation files, what happens:

- not a file, not JSON, not an object, lacking ``images`` / ``annotations`` / ``categories``, an image without
  ``id`` / ``file_name`` / ``width`` / ``height``, duplicate image ids, an annotation naming an unknown image or
  category, a malformed ``bbox``: a ``ValueError`` / ``FileNotFoundError`` naming the file and the entry.
- images listed but missing on disk: skipped, counted (``CocoDetection.skips.missing_images``) and named in one
  warning; all missing is an error.
- images without (usable) annotations: kept by default (COCO evaluation counts their false positives); skipped and
  counted with ``skip_empty=True`` (training).
- boxes partly outside the image are clipped to it (counted as ``boxes_clipped``); boxes with no area inside it
  are dropped (``boxes_dropped``); crowd annotations are left out of the training targets (``crowd_ignored``;
  COCO evaluation treats them as "ignore" regions itself).

The synthetic set (``generate_detection_set``): several shapes of ``data.synthetic``'s ten classes per image on its
procedural textures, later shapes occluding earlier ones; each instance's mask is its visible part (RLE in the
JSON), its box the mask's extent. Rendering is vectorised with torch from generators seeded by
``(seed, split, chunk)``, so the files are identical for a seed; a few hundred 64 px images take seconds.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from tokenlab.data.images import READ_ERRORS, load_rgb_array
from tokenlab.data.synthetic import (
    SHAPES,
    TEXTURES,
    _band_colours,
    _fill,
    _generator,
    _lerp_colour,
    _object_frame,
    _paint,
    _rand,
    _shapes,
    _texture,
)

logger = logging.getLogger(__name__)

__all__ = [
    "CocoDetection",
    "DetectionSkips",
    "DetectionTransform",
    "annotation_file",
    "build_detection_dataset",
    "build_detection_transforms",
    "detection_collate",
    "generate_detection_set",
    "image_dir",
    "read_coco",
]

FORMAT = "tokenlab-synthetic-detection"


def annotation_file(root: str | Path, split: str) -> Path:
    """``ROOT/annotations/instances_<split>.json``."""
    return Path(root) / "annotations" / f"instances_{split}.json"


def image_dir(root: str | Path, split: str) -> Path:
    """``ROOT/<split>``: the folder the split's ``file_name`` entries are relative to."""
    return Path(root) / split


# ---------------------------------------------------------------------------------------------------------------
# Reading COCO JSON


def read_coco(path: str | Path) -> dict[str, Any]:
    """Load and check a COCO instances JSON; returns the parsed object (see the module docstring for the checks).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not JSON, not an object, missing sections / keys, duplicates, dangling ids, bad boxes.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"COCO annotation file not found: {path} (expected ROOT/annotations/"
                                f"instances_<split>.json)")  # fmt: skip
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not valid UTF-8 JSON: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, not a COCO object with images/annotations/"
                         f"categories")  # fmt: skip
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data.get(k), list)]
    if missing:
        raise ValueError(f"{path} lacks the COCO list(s) {missing} (a COCO instances file has images, annotations "
                         f"and categories)")  # fmt: skip
    if not data["categories"]:
        raise ValueError(f"{path} has no categories")
    cat_ids = set()
    for c in data["categories"]:
        if not isinstance(c, dict) or "id" not in c or "name" not in c:
            raise ValueError(f"{path}: category entry {c!r} needs 'id' and 'name'")
        cat_ids.add(c["id"])
    image_ids = set()
    for im in data["images"]:
        lacking = [k for k in ("id", "file_name", "width", "height") if not isinstance(im, dict) or k not in im]
        if lacking:
            raise ValueError(f"{path}: image entry {str(im)[:120]} lacks {lacking}")
        if im["id"] in image_ids:
            raise ValueError(f"{path}: image id {im['id']} appears twice")
        image_ids.add(im["id"])
    for a in data["annotations"]:
        if not isinstance(a, dict) or "image_id" not in a or "category_id" not in a:
            raise ValueError(f"{path}: annotation {str(a)[:120]} needs 'image_id' and 'category_id'")
        aid = a.get("id", "?")
        if a["image_id"] not in image_ids:
            raise ValueError(f"{path}: annotation {aid} names image id {a['image_id']}, which is not in 'images'")
        if a["category_id"] not in cat_ids:
            raise ValueError(f"{path}: annotation {aid} names category id {a['category_id']}, which is not in "
                             f"'categories' ({sorted(cat_ids)[:10]})")  # fmt: skip
        box: Any = a.get("bbox")
        ok = isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)
        if not ok or box[2] < 0 or box[3] < 0:
            raise ValueError(f"{path}: annotation {aid} has bbox {box!r}; expected [x, y, width, height] with "
                             f"width, height >= 0")  # fmt: skip
    return data


@dataclass
class DetectionSkips:
    """What reading a COCO split left out or changed (logged once, stored with the data set)."""

    missing_images: int = 0
    empty_images: int = 0
    boxes_clipped: int = 0
    boxes_dropped: int = 0
    crowd_ignored: int = 0

    def to_dict(self) -> dict[str, int]:
        """The counts as a JSON-ready dict."""
        return asdict(self)


class DetectionTransform:
    """Joint image + boxes + masks transform (``torchvision.transforms.v2``): optional horizontal flip, then float.

    Resizing (and the published multi-scale training) is the detector's own ``GeneralizedRCNNTransform``
    (``min_size`` / ``max_size`` of ``tokenlab.models.detection``), so the data view only flips. The flip draws from
    torch's default generator (seeded per sample by the training loader).

    Args:
        train: Flip (True) or only convert (False).
        hflip: Probability of a horizontal flip in training.
    """

    def __init__(self, train: bool = True, hflip: float = 0.5) -> None:
        if not 0.0 <= hflip <= 1.0:
            raise ValueError(f"hflip must be a probability in [0, 1], got {hflip}")
        self.train = train
        ops: list[Any] = [v2.RandomHorizontalFlip(hflip)] if train and hflip > 0 else []
        ops.append(v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True))
        self.ops = v2.Compose(ops)

    def __call__(self, image: torch.Tensor, target: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        """``image`` (3, H, W) uint8 and its target -> float image in [0, 1] and the transformed target."""
        h, w = image.shape[-2:]
        boxes = tv_tensors.BoundingBoxes(target["boxes"], format="XYXY", canvas_size=(h, w))
        img, boxes, masks = self.ops(tv_tensors.Image(image), boxes, tv_tensors.Mask(target["masks"]))
        out = dict(target, boxes=boxes.as_subclass(torch.Tensor), masks=masks.as_subclass(torch.Tensor))
        return img.as_subclass(torch.Tensor), out


def build_detection_transforms(train: bool, img_size: int | None = None, hflip: float = 0.5) -> DetectionTransform:
    """The ``"detection"`` view of the data layer (``img_size`` is accepted for the common call shape; unused)."""
    return DetectionTransform(train=train, hflip=hflip)


def detection_collate(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """A list collate: ``{"image": [(3, H_i, W_i)], "target": [dict], "index": (B,) int64}``."""
    return {
        "image": [s["image"] for s in samples],
        "target": [s["target"] for s in samples],
        "index": torch.tensor([int(s["index"]) for s in samples], dtype=torch.int64),
    }


def _ann_mask(seg: Any, h: int, w: int) -> np.ndarray:
    """A COCO ``segmentation`` (polygons, RLE or uncompressed RLE) as an (h, w) uint8 mask."""
    if isinstance(seg, list):
        rles = mask_utils.frPyObjects(seg, h, w)
        rle = mask_utils.merge(rles)
    elif isinstance(seg, dict) and isinstance(seg.get("counts"), list):
        rle = mask_utils.frPyObjects(seg, h, w)
    else:
        rle = seg
    return np.asarray(mask_utils.decode(rle), dtype=np.uint8)


class CocoDetection(Dataset):
    """A COCO instances JSON + image folder as torchvision detection samples (see the module docstring).

    Args:
        ann_file: The instances JSON.
        images: The folder ``file_name`` is relative to.
        transform: Joint transform (default: conversion only).
        skip_empty: Leave out images without usable annotations (training); counted in ``skips``.
        masks: Decode instance masks (needed by Mask R-CNN; False for box-only models).
    """

    def __init__(
        self,
        ann_file: str | Path,
        images: str | Path,
        transform: DetectionTransform | None = None,
        skip_empty: bool = False,
        masks: bool = True,
    ) -> None:
        self.ann_file, self.images = Path(ann_file), Path(images)
        data = read_coco(self.ann_file)
        if not self.images.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.images} (the folder {self.ann_file.name}'s "
                                    f"file_name entries are relative to)")  # fmt: skip
        cats = sorted(data["categories"], key=lambda c: c["id"])
        self.category_ids = [c["id"] for c in cats]
        self.classes = [str(c["name"]) for c in cats]
        self.num_classes = len(self.classes)
        self.label_of = {cid: i + 1 for i, cid in enumerate(self.category_ids)}
        self.transform = transform or DetectionTransform(train=False)
        self.masks = masks
        self.mean, self.std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # the detector's own normalisation
        self.skips = DetectionSkips()
        by_image: dict[Any, list[dict[str, Any]]] = {}
        for a in data["annotations"]:
            by_image.setdefault(a["image_id"], []).append(a)
        self.entries: list[tuple[dict[str, Any], list[dict[str, Any]]]] = []
        missing: list[str] = []
        for im in sorted(data["images"], key=lambda i: i["id"]):
            anns = by_image.get(im["id"], [])
            if not (self.images / im["file_name"]).is_file():
                missing.append(str(im["file_name"]))
                continue
            if skip_empty and not any(self._usable(a, im) for a in anns):
                self.skips.empty_images += 1
                continue
            self.entries.append((im, anns))
        self.skips.missing_images = len(missing)
        if missing and not self.entries:
            raise FileNotFoundError(f"none of the {len(missing)} images listed in {self.ann_file} is in {self.images} "
                                    f"(e.g. {missing[0]})")  # fmt: skip
        if missing:
            logger.warning("%d image(s) listed in %s are missing from %s and were skipped, e.g. %s", len(missing),
                           self.ann_file, self.images, ", ".join(missing[:3]))  # fmt: skip
        if self.skips.empty_images:
            logger.warning("%d image(s) of %s have no usable annotation and were skipped (skip_empty)",
                           self.skips.empty_images, self.ann_file)  # fmt: skip
        if not self.entries:
            raise ValueError(f"{self.ann_file} leaves no image to use ({self.skips.to_dict()})")
        self._count_boxes()

    @staticmethod
    def _usable(ann: dict[str, Any], im: dict[str, Any]) -> bool:
        """Not crowd, and some box area inside the image."""
        x, y, bw, bh = ann["bbox"]
        x0, y0 = max(x, 0.0), max(y, 0.0)
        x1, y1 = min(x + bw, float(im["width"])), min(y + bh, float(im["height"]))
        return not ann.get("iscrowd", 0) and x1 > x0 and y1 > y0

    def _count_boxes(self) -> None:
        for im, anns in self.entries:
            for a in anns:
                if a.get("iscrowd", 0):
                    self.skips.crowd_ignored += 1
                elif not self._usable(a, im):
                    self.skips.boxes_dropped += 1
                else:
                    x, y, bw, bh = a["bbox"]
                    if x < 0 or y < 0 or x + bw > im["width"] or y + bh > im["height"]:
                        self.skips.boxes_clipped += 1
        if self.skips.boxes_clipped or self.skips.boxes_dropped:
            logger.warning("%s: %d box(es) reach outside their image and were clipped to it; %d lie wholly outside "
                           "it and were dropped", self.ann_file, self.skips.boxes_clipped,
                           self.skips.boxes_dropped)  # fmt: skip

    def __len__(self) -> int:
        return len(self.entries)

    def image_path(self, index: int) -> Path:
        """The image file of sample ``index``."""
        return self.images / self.entries[index][0]["file_name"]

    def load(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """Raw ``(3, H, W)`` uint8 image and its target (see the module docstring)."""
        im, anns = self.entries[index]
        path = self.images / im["file_name"]
        try:
            array = load_rgb_array(path)
        except READ_ERRORS as err:
            raise ValueError(f"cannot read image {path}: {err}") from None
        h, w = array.shape[:2]
        if (h, w) != (int(im["height"]), int(im["width"])):
            raise ValueError(f"{path} is {w}x{h} (WxH) but {self.ann_file} says {im['width']}x{im['height']}")
        boxes, labels, masks = [], [], []
        for a in anns:
            if not self._usable(a, im):
                continue
            x, y, bw, bh = a["bbox"]
            boxes.append([max(x, 0.0), max(y, 0.0), min(x + bw, float(w)), min(y + bh, float(h))])
            labels.append(self.label_of[a["category_id"]])
            if self.masks:
                seg = a.get("segmentation")
                if seg is None:
                    raise ValueError(f"{self.ann_file}: annotation {a.get('id', '?')} has no segmentation; use "
                                     f"masks=False for a box-only set")  # fmt: skip
                masks.append(_ann_mask(seg, h, w))
        target = {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "masks": torch.from_numpy(np.stack(masks)) if masks else torch.zeros((0, h, w), dtype=torch.uint8),
            "image_id": int(im["id"]),
        }
        return torch.from_numpy(array).permute(2, 0, 1).contiguous(), target

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, target = self.load(index)
        image, target = self.transform(image, target)
        return {"image": image, "target": target, "index": index}


def build_detection_dataset(
    root: str | Path, split: str, transform: DetectionTransform | None = None, skip_empty: bool = False,
    masks: bool = True,
) -> CocoDetection:  # fmt: skip
    """The ``CocoDetection`` of ``ROOT/annotations/instances_<split>.json`` + ``ROOT/<split>/``."""
    return CocoDetection(annotation_file(root, split), image_dir(root, split), transform, skip_empty, masks)


# ---------------------------------------------------------------------------------------------------------------
# The synthetic detection set


def _render_detection_chunk(
    n: int, gen: torch.Generator, img_size: int, max_objects: int, object_scale: tuple[float, float]
) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """``n`` images with up to ``max_objects`` shapes each.

    Returns:
        uint8 images ``(n, S, S, 3)``, the instance map ``(n, S, S)`` (0 background, j + 1 = slot j visible) and
        the slot labels ``(n, max_objects)`` (-1 = empty slot).
    """
    coords = (torch.arange(img_size, dtype=torch.float32) + 0.5) / img_size * 2 - 1
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    x, y = x[None], y[None]  # (1, H, W)
    light_bg = torch.rand(n, generator=gen) < 0.5
    c1, c2 = _band_colours(light_bg, gen), _band_colours(light_bg, gen)
    kinds = torch.randint(0, len(TEXTURES), (n,), generator=gen)
    image = _lerp_colour(c1, c2, _texture(kinds, x, y, gen))
    count = torch.randint(1, max_objects + 1, (n,), generator=gen)
    # one object per cell of a jittered grid keeps overlaps partial; the cell order is random per image
    side = math.ceil(math.sqrt(max_objects))
    cells = torch.argsort(torch.rand(n, side * side, generator=gen), dim=1)
    labels = torch.full((n, max_objects), -1, dtype=torch.int64)
    instance = torch.zeros(n, img_size, img_size, dtype=torch.int64)
    for j in range(max_objects):
        present = count > j
        lab = torch.randint(0, len(SHAPES), (n,), generator=gen)
        scale = _rand(n, gen, *object_scale)
        cell = cells[:, j]
        ccx = ((cell % side).float() + 0.5) / side * 2 - 1
        ccy = ((cell // side).float() + 0.5) / side * 2 - 1
        cx = ccx + (torch.rand(n, generator=gen) - 0.5) * (2.0 / side)
        cy = ccy + (torch.rand(n, generator=gen) - 0.5) * (2.0 / side)
        angle = _rand(n, gen, 0, 2 * math.pi)
        u, v = _object_frame(x, y, cx, cy, scale, angle)
        inside = _shapes(lab, u, v) & present[:, None, None]
        o1, o2 = _band_colours(~light_bg, gen), _band_colours(~light_bg, gen)
        image = _paint(image, inside, _lerp_colour(o1, o1 + 0.5 * (o2 - o1), _fill(u, v, gen)))
        instance = torch.where(inside, j + 1, instance)
        labels[:, j] = torch.where(present, lab, -1)
    images = (image.clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
    return images, instance, labels


def generate_detection_set(
    out: str | Path,
    seed: int = 0,
    counts: dict[str, int] | None = None,
    img_size: int = 64,
    max_objects: int = 4,
    object_scale: Sequence[float] = (0.22, 0.4),
    min_area: int = 12,
    chunk: int = 64,
) -> dict[str, Any]:
    """Write the synthetic detection set as COCO JSON + PNG images (see the module docstring).

    Args:
        out: Root folder (``annotations/instances_<split>.json`` and ``<split>/<index>.png`` go there).
        seed: The same seed gives the same files.
        counts: Images per split (default ``{"train": 512, "val": 128}``).
        img_size: Image side in pixels.
        max_objects: Up to this many shapes per image (at least one).
        object_scale: Range of the shape radius as a fraction of the half-side.
        min_area: Instances with fewer visible pixels are left out (hidden behind later shapes).
        chunk: Images rendered together.

    Returns:
        ``{split: {"images": n, "instances": m}}``.
    """
    counts = dict(counts or {"train": 512, "val": 128})
    if img_size < 32:
        raise ValueError(f"img_size must be >= 32 (the corruption library's smallest size), got {img_size}")
    if max_objects < 1:
        raise ValueError(f"max_objects must be >= 1, got {max_objects}")
    lo, hi = (float(s) for s in object_scale)
    if not 0 < lo <= hi < 1:
        raise ValueError(f"object_scale must satisfy 0 < low <= high < 1, got {tuple(object_scale)}")
    root = Path(out)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(SHAPES)]
    summary: dict[str, Any] = {}
    for split, total in counts.items():
        folder = root / split
        folder.mkdir(parents=True, exist_ok=True)
        images: list[dict[str, Any]] = []
        anns: list[dict[str, Any]] = []
        for start in range(0, total, chunk):
            n = min(chunk, total - start)
            gen = _generator(FORMAT, seed, split, start // chunk)
            pixels, instance, labels = _render_detection_chunk(n, gen, img_size, max_objects, (lo, hi))
            for b in range(n):
                index = start + b
                name = f"{index:06d}.png"
                Image.fromarray(pixels[b]).save(folder / name, optimize=False, compress_level=1)
                images.append({"id": index + 1, "file_name": name, "width": img_size, "height": img_size})
                for j in range(max_objects):
                    m = (instance[b] == j + 1).numpy()
                    area = int(m.sum())
                    if labels[b, j] < 0 or area < min_area:
                        continue
                    ys, xs = np.nonzero(m)
                    x0, y0 = int(xs.min()), int(ys.min())
                    rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
                    anns.append({
                        "id": len(anns) + 1, "image_id": index + 1, "category_id": int(labels[b, j]) + 1,
                        "bbox": [x0, y0, int(xs.max()) + 1 - x0, int(ys.max()) + 1 - y0], "area": area,
                        "iscrowd": 0, "segmentation": {"size": list(rle["size"]), "counts": rle["counts"].decode()},
                    })  # fmt: skip
        coco = {
            "info": {"description": FORMAT, "seed": seed, "img_size": img_size, "max_objects": max_objects,
                     "object_scale": [lo, hi], "min_area": min_area},
            "images": images, "annotations": anns, "categories": categories,
        }  # fmt: skip
        annotation_file(root, split).write_text(json.dumps(coco))
        summary[split] = {"images": len(images), "instances": len(anns)}
        logger.info("synthetic detection split %s: %d images, %d instances", split, len(images), len(anns))
    return summary
