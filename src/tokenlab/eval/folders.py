"""Image-folder trees for evaluation: ``root/<class>/<image>`` read robustly, with the model's eval preprocessing.

Evaluation sets (clean test splits, OOD sets, ImageNet-C style ``corruption/severity/class/img`` trees) are plain
folders. An image that cannot be decoded is never silently dropped: the dataset returns it with ``valid=False``
and the evaluation loop skips it and counts it (and logs its path).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.transforms import v2

logger = logging.getLogger(__name__)

__all__ = ["IMG_EXTENSIONS", "ImageTreeDataset", "eval_transform", "list_class_dirs", "scan_image_tree"]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


def _check_dir(root: str | Path, what: str = "data directory") -> Path:
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"{what} not found: {root}")
    if not root.is_dir():
        raise NotADirectoryError(f"{what} is not a directory: {root}")
    return root


def list_class_dirs(root: str | Path) -> list[str]:
    """Sorted names of the class sub-directories of ``root`` (hidden ones ignored)."""
    root = _check_dir(root)
    try:
        return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except PermissionError as err:
        raise PermissionError(f"cannot read data directory {root}: {err.strerror}") from None


def scan_image_tree(root: str | Path) -> tuple[list[str], list[tuple[Path, str]]]:
    """List ``root/<class>/<image>`` files.

    Returns:
        ``(classes, items)``: sorted class folder names and ``(path, class name)`` for every file with an image
        extension, sorted by path.

    Raises:
        FileNotFoundError / NotADirectoryError: ``root`` is missing or not a directory.
        ValueError: ``root`` has no class folders or no images.
    """
    root = _check_dir(root)
    classes = list_class_dirs(root)
    if not classes:
        raise ValueError(f"{root} has no class sub-directories; expected the layout {root}/<class>/<image>")
    items = []
    for c in classes:
        for p in sorted((root / c).rglob("*")):
            if p.suffix.lower() in IMG_EXTENSIONS and p.is_file():
                items.append((p, c))
    if not items:
        raise ValueError(f"{root} holds no images ({', '.join(IMG_EXTENSIONS)}) under its {len(classes)} class folders")
    return classes, items


def eval_transform(
    img_size: int, mean: Sequence[float], std: Sequence[float], crop_pct: float = 1.0
) -> v2.Compose:
    """Resize the short side to ``img_size / crop_pct``, centre-crop ``img_size``, scale to [0, 1], normalise."""
    resize = int(round(img_size / crop_pct))
    return v2.Compose(
        [
            v2.PILToTensor(),
            v2.Resize(resize, antialias=True),
            v2.CenterCrop(img_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(mean), list(std)),
        ]
    )


class ImageTreeDataset(Dataset):
    """Images of a ``root/<class>/<image>`` tree labelled through ``class_to_idx``.

    Each sample is ``{"image": (3, S, S) float, "label": int, "index": int, "valid": bool}``; an unreadable image
    gives ``valid=False`` and a zero image so a batch still collates; the caller skips and counts it.

    Args:
        root: The tree root.
        class_to_idx: Folder name -> label. Every folder must be named here.
        transform: Maps a PIL RGB image to a tensor.
        image_size: Size of the zero image returned for unreadable files.
    """

    def __init__(
        self, root: str | Path, class_to_idx: Mapping[str, int], transform: Any, image_size: int
    ) -> None:
        self.root = Path(root)
        classes, self.items = scan_image_tree(self.root)
        unknown = [c for c in classes if c not in class_to_idx]
        if unknown:
            raise KeyError(
                f"class folders {unknown[:10]} of {self.root} are not classes of the model; valid classes: "
                f"{sorted(class_to_idx)[:30]}{' ...' if len(class_to_idx) > 30 else ''} (use a mapping file for a "
                "renamed or subset data set)"
            )
        self.classes = classes
        self.class_to_idx = dict(class_to_idx)
        self.transform = transform
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        path, cls = self.items[i]
        label = self.class_to_idx[cls]
        try:
            with Image.open(path) as im:
                img = im.convert("RGB")
            return {"image": self.transform(img), "label": label, "index": i, "valid": True}
        except (OSError, UnidentifiedImageError, ValueError) as err:
            logger.warning("unreadable image skipped: %s (%s)", path, err)
            zero = torch.zeros(3, self.image_size, self.image_size)
            return {"image": zero, "label": label, "index": i, "valid": False}
