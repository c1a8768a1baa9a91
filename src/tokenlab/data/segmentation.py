"""Semantic-segmentation data: (image, mask) pairs from three layouts, with joint spatial augmentation.

Layouts (``build_segmentation_dataset(kind, root, split)``):

- ``synthetic``: the built-in synthetic set (``tokenlab.data.synthetic``): ``root/<split>/<class>/<i>.png`` with
  ``root/<split>_masks/<class>/<i>.png`` (0 = background, class id + 1 = object), so K = 1 + number of shapes and
  class 0 is ``background``. Splits ``train``, ``val``, ``rendition`` (and ``shortcut``).
- ``cityscapes``: ``root/leftImg8bit/<split>/<city>/<name>_leftImg8bit.png`` with
  ``root/gtFine/<split>/<city>/<name>_gtFine_labelTrainIds.png`` when present, else ``..._labelIds.png`` mapped to
  the 19 training classes (every other id becomes the ignore index).
- ``folder``: ``root/images/[<split>/]**/<name>.<ext>`` with ``root/masks/[<split>/]**/<name>.png`` (same relative
  path, any image extension); class names from ``root/classes.txt`` (one per line) or the ``num_classes`` argument.

``SegmentationDataset(pairs, ...)`` also takes explicit pairs, e.g. a corrupted copy of a split (the evaluation
issue's corruption cache keeps the ``<class>/<name>`` layout) paired with the clean masks.

Every sample is checked: a mask whose size differs from its image, a mask with several channels, or label values
outside ``[0, K)`` other than the ignore index raise a ``ValueError`` naming the file.

Joint augmentation uses ``torchvision.transforms.v2`` with ``tv_tensors.Image`` and ``tv_tensors.Mask``: one draw
of the random parameters is applied to both, masks are resampled with nearest-neighbour interpolation and padded
with the ignore index, and photometric ops touch only the image. ``SegmentationDataset`` draws its augmentation
from torch's default generator, which the training loader (``data.sampler.SeededDataset``) seeds per
(seed, epoch, index) like every other training data set.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from tokenlab.data.images import READ_ERRORS, UnreadableImages, list_images, load_rgb_array

logger = logging.getLogger(__name__)

__all__ = [
    "CITYSCAPES_CLASSES",
    "KINDS",
    "SegmentationDataset",
    "SegmentationTransform",
    "build_segmentation_dataset",
    "build_segmentation_transforms",
    "cityscapes_pairs",
    "folder_pairs",
    "pair_set",
    "synthetic_pairs",
]

KINDS = ("synthetic", "cityscapes", "folder")
CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)  # fmt: skip
# Cityscapes label ids of the 19 training classes, in train-id order (cityscapesScripts' labels.py table).
_CITYSCAPES_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)


@dataclass
class PairSet:
    """Image/mask file pairs of one split and what their labels mean.

    Attributes:
        pairs: ``(image path, mask path)`` in a stable order.
        class_names: The K class names.
        label_map: Optional 256-entry lookup applied to raw mask values (e.g. Cityscapes label id -> train id).
        skipped: Unreadable images left out (``tokenlab.data.images``' policy: skipped, logged, counted).
        image_root: The tree the images live in (what the corruption cache is generated from).
    """

    pairs: list[tuple[Path, Path]]
    class_names: list[str]
    label_map: np.ndarray | None = None
    skipped: list[Path] = field(default_factory=list)
    image_root: Path | None = None


class SegmentationTransform:
    """Joint image + mask transform built from ``torchvision.transforms.v2``.

    ``train=True``: scale jitter (the image is resized so it fits ``base_size`` times a factor drawn from
    ``scale_range``; mmsegmentation's ``Resize(img_scale=base_size, ratio_range=scale_range)``), optional random
    rotation, random crop of ``crop_size`` (padded with 0 / the ignore index when the image is smaller; with
    ``cat_max_ratio`` < 1 redrawn up to 10 times while one class covers that share of the labelled pixels),
    horizontal flip, colour jitter (image only). ``train=False``: optional resize to ``resize`` (shorter side), no
    randomness. Both end with conversion to float and normalisation.

    Args:
        crop_size: Training crop (int or (H, W)).
        train: Augment (True) or only convert (False).
        scale_range: Range of the scale-jitter factor.
        base_size: The (H, W) box the scale-jitter factor multiplies (default ``crop_size``). The published
            Cityscapes recipe uses (1024, 2048), the native size, so the factor is relative to the full image.
        cat_max_ratio: Largest share one class may take of a training crop's labelled pixels (mmsegmentation's
            ``RandomCrop(cat_max_ratio=...)``, 0.75 in the published Cityscapes recipe); 1 disables the check.
        image_fill: 8-bit value (one or per channel) of image pixels added by padding or rotation. mmsegmentation
            pads after normalising with 0, i.e. with the mean colour: ``[124, 116, 104]`` (the ImageNet mean).
        hflip: Probability of a horizontal flip.
        rotate_degrees: Maximum absolute rotation; 0 disables rotation.
        color_jitter: Strength of brightness/contrast/saturation jitter; 0 disables it.
        resize: Evaluation resize of the shorter side; None keeps the native size.
        ignore_index: Fill value of the mask outside the image.
        mean / std: Normalisation.
    """

    def __init__(
        self,
        crop_size: int | Sequence[int] = 512,
        train: bool = True,
        scale_range: Sequence[float] = (0.5, 2.0),
        hflip: float = 0.5,
        rotate_degrees: float = 0.0,
        color_jitter: float = 0.4,
        resize: int | None = None,
        ignore_index: int = 255,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
        base_size: int | Sequence[int] | None = None,
        cat_max_ratio: float = 1.0,
        image_fill: int | Sequence[int] = 0,
    ) -> None:
        crop = _size_pair(crop_size, "crop_size")
        base = crop if base_size is None else _size_pair(base_size, "base_size")
        lo, hi = (float(s) for s in scale_range)
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range must satisfy 0 < low <= high, got {tuple(scale_range)}")
        if not 0.0 <= hflip <= 1.0:
            raise ValueError(f"hflip must be a probability in [0, 1], got {hflip}")
        if not 0.0 < cat_max_ratio <= 1.0:
            raise ValueError(f"cat_max_ratio must be in (0, 1], got {cat_max_ratio}")
        self.crop_size = crop
        self.train = train
        self.mean, self.std = tuple(mean), tuple(std)
        img_fill = [int(v) for v in image_fill] if isinstance(image_fill, Sequence) else int(image_fill)
        if isinstance(img_fill, list) and len(img_fill) not in (1, 3):
            raise ValueError(f"image_fill must be one value or one per channel (3), got {image_fill!r}")
        fill = {tv_tensors.Image: img_fill, tv_tensors.Mask: ignore_index}
        ops: list[Any] = []
        if train:
            ops.append(v2.ScaleJitter(base, scale_range=(lo, hi), antialias=True))
            if rotate_degrees > 0:
                ops.append(v2.RandomRotation(rotate_degrees, interpolation=v2.InterpolationMode.BILINEAR, fill=fill))
            ops += [_CatMaxRandomCrop(crop, cat_max_ratio, ignore_index, pad_if_needed=True, fill=fill),
                    v2.RandomHorizontalFlip(hflip)]  # fmt: skip
            if color_jitter > 0:
                ops.append(v2.ColorJitter(color_jitter, color_jitter, color_jitter))
        elif resize is not None:
            ops.append(v2.Resize(resize, antialias=True))
        ops += [
            v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64, "others": None}, scale=True),
            v2.Normalize(self.mean, self.std),
        ]
        self.ops = v2.Compose(ops)

    def __call__(
        self, image: torch.Tensor, mask: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``image`` (3, H, W) uint8 and ``mask`` (H, W) -> normalised float image and int64 mask.

        v2 transforms draw from torch's global generator; when ``generator`` is given, the draws happen inside
        ``fork_rng`` seeded from it, so they are reproducible and leave the caller's global state untouched.
        """
        img, msk = tv_tensors.Image(image), tv_tensors.Mask(mask)
        if generator is None or not self.train:
            out_img, out_msk = self.ops(img, msk)
        else:
            seed = int(torch.randint(0, 2**62, (1,), generator=generator))
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                out_img, out_msk = self.ops(img, msk)
        return out_img.as_subclass(torch.Tensor), out_msk.as_subclass(torch.Tensor)


class _CatMaxRandomCrop(v2.RandomCrop):
    """``v2.RandomCrop`` that redraws while one class dominates the crop (mmsegmentation's ``cat_max_ratio``).

    A crop is kept when its labelled pixels hold more than one class and the largest takes less than
    ``cat_max_ratio`` of them; after 10 rejected draws the next draw is kept unchecked (as mmsegmentation does).
    """

    def __init__(self, size: tuple[int, int], cat_max_ratio: float, ignore_index: int, **kwargs: Any) -> None:
        super().__init__(size, **kwargs)
        self.cat_max_ratio = cat_max_ratio
        self.ignore_index = ignore_index

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        """Crop parameters, redrawn while one class dominates the crop's part of the mask."""
        params = super().make_params(flat_inputs)
        mask = next((x for x in flat_inputs if isinstance(x, tv_tensors.Mask)), None)
        if self.cat_max_ratio >= 1.0 or mask is None:
            return params
        for _ in range(10):
            if self._balanced(mask, params):
                break
            params = super().make_params(flat_inputs)
        return params

    def _balanced(self, mask: torch.Tensor, params: dict[str, Any]) -> bool:
        pad_left, pad_top = params["padding"][0], params["padding"][1]  # crop offsets are in the padded frame
        top, left = max(params["top"] - pad_top, 0), max(params["left"] - pad_left, 0)
        bottom, right = params["top"] - pad_top + params["height"], params["left"] - pad_left + params["width"]
        labels, counts = mask[..., top : max(bottom, 0), left : max(right, 0)].unique(return_counts=True)
        counts = counts[labels != self.ignore_index]
        return counts.numel() > 1 and float(counts.max()) / float(counts.sum()) < self.cat_max_ratio


class SegmentationDataset(Dataset):
    """Reads, checks and transforms (image, mask) pairs.

    Samples are ``{"image": float (3, H, W), "mask": int64 (H, W), "index": int}``.

    Args:
        pairs: ``(image path, mask path)`` list.
        class_names: The K class names (labels must lie in ``[0, K)`` or equal ``ignore_index``).
        transform: Joint transform; default: evaluation conversion at native size.
        ignore_index: Label value that is not a class.
        label_map: Optional 256-entry lookup applied to raw mask values before checking.
    """

    def __init__(
        self,
        pairs: Sequence[tuple[str | Path, str | Path]],
        class_names: Sequence[str],
        transform: SegmentationTransform | None = None,
        ignore_index: int = 255,
        label_map: np.ndarray | None = None,
    ) -> None:
        if not pairs:
            raise ValueError("no (image, mask) pairs given")
        if not class_names:
            raise ValueError("class_names is empty")
        if 0 <= ignore_index < len(class_names):
            raise ValueError(f"ignore_index {ignore_index} is a valid class id for {len(class_names)} classes")
        self.pairs = [(Path(a), Path(b)) for a, b in pairs]
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        self.ignore_index = ignore_index
        self.label_map = label_map
        self.transform = transform or SegmentationTransform(train=False, ignore_index=ignore_index)
        self.classes = self.class_names  # the engine stores ``classes``/``mean``/``std`` with the exported model
        self.mean, self.std = list(self.transform.mean), list(self.transform.std)

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw ``(3, H, W)`` uint8 image and checked ``(H, W)`` int64 mask of pair ``index``."""
        img_path, mask_path = self.pairs[index]
        image = _read_image(img_path, "RGB")
        raw = _read_image(mask_path, None)
        if raw.ndim != 2:
            raise ValueError(
                f"mask {mask_path} has {raw.shape[2]} channels; expected a single-channel label image (mode L or P)"
            )
        if raw.shape != image.shape[:2]:
            raise ValueError(
                f"mask {mask_path} is {raw.shape[1]}x{raw.shape[0]} (WxH) but its image {img_path} is "
                f"{image.shape[1]}x{image.shape[0]}"
            )
        if self.label_map is not None:
            if raw.max() >= len(self.label_map):
                raise ValueError(f"mask {mask_path} has raw value {int(raw.max())} beyond the label map (0..255)")
            labels = self.label_map[raw]
        else:
            labels = raw.astype(np.int64)
        bad = np.unique(labels[(labels != self.ignore_index) & ((labels < 0) | (labels >= self.num_classes))])
        if bad.size:
            raise ValueError(
                f"mask {mask_path} has label values {bad[:10].tolist()} outside the class range "
                f"[0, {self.num_classes}) (ignore index {self.ignore_index})"
            )
        return torch.from_numpy(image).permute(2, 0, 1).contiguous(), torch.from_numpy(labels.astype(np.int64))

    def check(self) -> int:
        """Load every pair once (raises on the first bad file); returns the number of pairs checked."""
        for i in range(len(self)):
            self.load(i)
        return len(self)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, mask = self.load(index)
        # The augmentation draws from the default generator: under the training loader it is seeded per
        # (seed, epoch, index) by ``SeededDataset``, so the draws change every epoch and survive a resume.
        image, mask = self.transform(image, mask)
        return {"image": image, "mask": mask, "index": index}


def _size_pair(size: int | Sequence[int], name: str) -> tuple[int, int]:
    """``size`` as a positive ``(H, W)``; an int is square."""
    pair = (size, size) if isinstance(size, int) else tuple(int(c) for c in size)
    if len(pair) != 2 or min(pair) < 1:
        raise ValueError(f"{name} must be a positive int or (H, W), got {size!r}")
    return pair[0], pair[1]


def _read_image(path: Path, mode: str | None) -> np.ndarray:
    """An image as 8-bit RGB (``mode="RGB"``, the one decoder of ``tokenlab.data.images``) or a mask as stored.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file cannot be decoded (naming it).
    """
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    try:
        if mode == "RGB":
            return load_rgb_array(path)
        with Image.open(path) as im:
            # A mask is read as stored: mode P gives palette indices, a multi-channel mask is reported by the caller.
            return np.array(im.convert(mode) if mode is not None else im)
    except READ_ERRORS as err:
        raise ValueError(f"cannot read image {path}: {err}") from None


def _readable(pairs: list[tuple[Path, Path]], class_names: list[str], image_root: Path,
              label_map: np.ndarray | None = None) -> PairSet:  # fmt: skip
    """The pairs whose image is readable; the others are skipped, logged and counted (``PairSet.skipped``)."""
    unreadable = UnreadableImages(str(image_root))
    keep = unreadable.filter([img for img, _ in pairs])
    if not keep:
        raise ValueError(f"no readable image in {image_root} ({len(pairs)} unreadable)")
    return PairSet([pairs[i] for i in keep], class_names, label_map, unreadable.paths, image_root)


def synthetic_pairs(root: str | Path, split: str) -> PairSet:
    """Pairs of the synthetic set's ``split`` (see the module docstring); classes ``background`` + shapes."""
    root = Path(root)
    meta_file = root / "dataset.json"
    if not meta_file.is_file():
        raise FileNotFoundError(
            f"{root} is not a synthetic data set (no dataset.json); create one with `tokenlab data synth --out DIR`"
        )
    meta = json.loads(meta_file.read_text())
    if split not in meta.get("splits", {}):
        raise KeyError(f"split {split!r} not in {root}; present: {', '.join(sorted(meta.get('splits', {})))}")
    classes = list(meta["classes"])
    labels = meta["splits"][split]["labels"]
    pairs = []
    for index, label in enumerate(labels):
        name = f"{classes[label]}/{index:06d}.png"
        pairs.append((root / split / name, root / f"{split}_masks" / name))
    return _readable(pairs, ["background", *classes], root / split)


def cityscapes_pairs(root: str | Path, split: str) -> PairSet:
    """Pairs of a Cityscapes-layout tree (``leftImg8bit`` + ``gtFine``), 19 training classes."""
    root = Path(root)
    img_root, gt_root = root / "leftImg8bit" / split, root / "gtFine" / split
    if not img_root.is_dir():
        raise FileNotFoundError(f"no Cityscapes images at {img_root} (expected leftImg8bit/<split>/<city>/*.png)")
    images = sorted(img_root.rglob("*_leftImg8bit.png"))
    if not images:
        raise ValueError(f"no *_leftImg8bit.png files under {img_root}")
    stem = images[0].name[: -len("_leftImg8bit.png")]
    train_ids = (gt_root / images[0].parent.name / f"{stem}_gtFine_labelTrainIds.png").is_file()
    suffix = "_gtFine_labelTrainIds.png" if train_ids else "_gtFine_labelIds.png"
    pairs = []
    for img in images:
        mask = gt_root / img.parent.name / (img.name[: -len("_leftImg8bit.png")] + suffix)
        if not mask.is_file():
            raise FileNotFoundError(f"no ground truth for {img}: expected {mask}")
        pairs.append((img, mask))
    label_map = None
    if not train_ids:
        label_map = np.full(256, 255, dtype=np.int64)
        label_map[list(_CITYSCAPES_IDS)] = np.arange(len(_CITYSCAPES_IDS))
    return _readable(pairs, list(CITYSCAPES_CLASSES), img_root, label_map)


def folder_pairs(
    root: str | Path, split: str | None = None, num_classes: int | None = None, masks_root: str | Path | None = None
) -> PairSet:
    """Pairs of ``images/[split/]`` + ``masks/[split/]`` trees matched by relative path without extension.

    ``root`` may also be an image tree itself when ``masks_root`` is given (e.g. a corrupted copy of a split
    paired with its clean masks).
    """
    root = Path(root)
    if masks_root is None:
        img_root, mask_root = root / "images", root / "masks"
        if split is not None and (img_root / split).is_dir():
            img_root, mask_root = img_root / split, mask_root / split
    else:
        img_root, mask_root = root, Path(masks_root)
    for what, d in (("image", img_root), ("mask", mask_root)):
        if not d.is_dir():
            raise FileNotFoundError(f"{what} folder not found: {d} (expected {root}/images and {root}/masks)")
    masks = {p.relative_to(mask_root).with_suffix(""): p for p in mask_root.rglob("*") if p.suffix.lower() == ".png"}
    pairs, missing = [], []
    for img in list_images(img_root):
        mask = masks.get(img.relative_to(img_root).with_suffix(""))
        if mask is None:
            missing.append(str(img))
        else:
            pairs.append((img, mask))
    if missing:
        raise FileNotFoundError(f"{len(missing)} image(s) have no mask under {mask_root}, e.g. {missing[0]}")
    if not pairs:
        raise ValueError(f"no images under {img_root}")
    names_file = root / "classes.txt"
    if names_file.is_file():
        names = [ln.strip() for ln in names_file.read_text().splitlines() if ln.strip()]
    elif num_classes is not None:
        names = [str(i) for i in range(num_classes)]
    else:
        raise ValueError(f"{root} has no classes.txt; pass num_classes")
    return _readable(pairs, names, img_root)


def pair_set(kind: str, root: str | Path, split: str, num_classes: int | None = None) -> PairSet:
    """The (image, mask) pairs of one of ``KINDS`` (see the module docstring).

    Raises:
        ValueError: an unknown kind, or ``num_classes`` that differs from the layout's classes.
    """
    if kind == "synthetic":
        ps = synthetic_pairs(root, split)
    elif kind == "cityscapes":
        ps = cityscapes_pairs(root, split)
    elif kind == "folder":
        ps = folder_pairs(root, split, num_classes)
    else:
        raise ValueError(f"unknown segmentation data kind {kind!r}; valid: {', '.join(KINDS)}")
    if num_classes is not None and num_classes != len(ps.class_names):
        raise ValueError(f"num_classes={num_classes} but {root} ({kind}) has {len(ps.class_names)} classes")
    return ps


def build_segmentation_dataset(
    kind: str,
    root: str | Path,
    split: str,
    transform: SegmentationTransform | None = None,
    ignore_index: int = 255,
    num_classes: int | None = None,
) -> SegmentationDataset:
    """A ``SegmentationDataset`` for one of ``KINDS`` (see the module docstring)."""
    ps = pair_set(kind, root, split, num_classes)
    return SegmentationDataset(ps.pairs, ps.class_names, transform, ignore_index, ps.label_map)


def build_segmentation_transforms(
    train: bool,
    img_size: int | Sequence[int],
    scale_range: Sequence[float] = (0.5, 2.0),
    hflip: float = 0.5,
    rotate_degrees: float = 0.0,
    color_jitter: float = 0.4,
    eval_resize: int | None = None,
    ignore_index: int = 255,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
    base_size: int | Sequence[int] | None = None,
    cat_max_ratio: float = 1.0,
    image_fill: int | Sequence[int] = 0,
) -> SegmentationTransform:
    """The ``"segmentation"`` view of the data layer: training crop ``img_size`` or evaluation at native size.

    Same call shape as the data layer's ``build_transforms(view, train=..., img_size=..., **data.transform)``.
    """
    return SegmentationTransform(
        crop_size=img_size, train=train, scale_range=scale_range, hflip=hflip, rotate_degrees=rotate_degrees,
        color_jitter=color_jitter, resize=eval_resize, ignore_index=ignore_index, mean=mean, std=std,
        base_size=base_size, cat_max_ratio=cat_max_ratio, image_fill=image_fill,
    )  # fmt: skip
