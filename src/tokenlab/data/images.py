"""Image files, in one place: reading, decoding to 8-bit RGB, scanning class trees, unreadable files.

Which files are images, how any of them becomes 8-bit RGB, how class trees are scanned, and what happens to a
file that cannot be read.

Training data sets, evaluation trees, token analysis, segmentation pairs and the corruption generator all read
images through here, so one file decodes to the same pixels everywhere (a 16-bit PNG is scaled to 8 bits, not
clipped to white; alpha is composited on white) and an unreadable file (corrupt, truncated, or above PIL's
decompression-bomb limit ``Image.MAX_IMAGE_PIXELS``) is treated the same way everywhere: skipped, logged by name,
and counted (``UnreadableImages``) so results can report how many were left out.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

logger = logging.getLogger(__name__)

__all__ = [
    "IMG_EXTENSIONS",
    "READ_ERRORS",
    "ImageTooLarge",
    "UnreadableImages",
    "check_image",
    "denormalize",
    "is_image_file",
    "list_class_dirs",
    "list_images",
    "load_rgb",
    "load_mask",
    "load_rgb_array",
    "scan_class_folders",
    "to_rgb",
]

IMG_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")


class ImageTooLarge(ValueError):
    """An image above PIL's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``): skipped like unreadable ones."""


#: What decoding an unreadable, truncated or oversized file raises (PIL raises SyntaxError / ValueError for some
#: corrupt files, ``DecompressionBombError`` above twice ``Image.MAX_IMAGE_PIXELS``, ``ImageTooLarge`` above it).
READ_ERRORS = (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError)


# ---------------------------------------------------------------------------------------------------------------
# Decoding


def _to_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.floating):
        top = 1.0 if array.max(initial=0.0) <= 1.0 else 255.0
        return (np.clip(array / top, 0, 1) * 255 + 0.5).astype(np.uint8)
    # integer images wider than 8 bits (16-bit PNG/TIFF load as I;16 or I): scale by the type's range
    top = 65535 if array.max(initial=0) > 255 else 255
    return (np.clip(array.astype(np.float64) / top, 0, 1) * 255 + 0.5).astype(np.uint8)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB: alpha composited on white, CMYK/YCbCr/LAB converted, wider than 8 bits scaled.

    PIL's own ``convert("RGB")`` clips 16-bit values (almost every pixel becomes white) and drops alpha onto black,
    which is why every reader goes through here.
    """
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if image.mode.startswith("I") or image.mode == "F":
        return Image.fromarray(_to_uint8(np.asarray(image))).convert("RGB")
    return image.convert("RGB")


def _check_size(image: Image.Image, path: str | Path) -> None:
    """Refuse an image above ``Image.MAX_IMAGE_PIXELS`` (PIL only warns below twice the limit, then decodes it)."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit and image.width * image.height > limit:
        raise ImageTooLarge(
            f"{image.width}x{image.height} = {image.width * image.height} pixels is above PIL's decompression-bomb "
            f"limit of {limit} (PIL.Image.MAX_IMAGE_PIXELS; raise it to read {Path(path).name})"
        )


def load_rgb(path: str | Path) -> Image.Image:
    """Decode an image file to 8-bit RGB.

    Raises:
        OSError: the file is unreadable (incl. ``UnidentifiedImageError``); see ``READ_ERRORS`` for the rest.
        ImageTooLarge / DecompressionBombError: more pixels than ``PIL.Image.MAX_IMAGE_PIXELS`` allows.
    """
    with Image.open(path) as image:
        _check_size(image, path)
        image.load()
        return to_rgb(image)


def load_rgb_array(path: str | Path) -> np.ndarray:
    """``load_rgb`` as an ``(H, W, 3)`` uint8 array."""
    return np.array(load_rgb(path))


def load_mask(path: str | Path) -> np.ndarray:
    """A class-label mask as stored (mode L or P indices; other modes are converted to L).

    The one mask decoder of the classification data sets and the evaluation trees, so a palette mask gives its
    indices everywhere.
    """
    with Image.open(path) as image:
        _check_size(image, path)
        return np.asarray(image.convert("L") if image.mode not in ("L", "P") else image)


def check_image(path: str | Path) -> str | None:
    """An error message when ``path`` is not a readable image, else None (header check; PNG chunk CRCs too)."""
    try:
        with Image.open(path) as image:
            _check_size(image, path)
            image.verify()
    except READ_ERRORS as err:
        return f"{type(err).__name__}: {err}"
    return None


def denormalize(
    image: torch.Tensor, mean: Sequence[float] = IMAGENET_DEFAULT_MEAN, std: Sequence[float] = IMAGENET_DEFAULT_STD
) -> np.ndarray:
    """Normalised ``(3, H, W)`` float image -> ``(H, W, 3)`` uint8, the inverse of the evaluation normalisation.

    The one way pictures (data previews, segmentation overlays, token pictures) get their pixels back.
    """
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    pixels = (image.detach().float().cpu() * s + m).clamp(0, 1) * 255
    return pixels.round().byte().permute(1, 2, 0).numpy()


# ---------------------------------------------------------------------------------------------------------------
# The policy for unreadable files


class UnreadableImages:
    """Unreadable images that were skipped: each one is logged by name, ``count`` goes into results.

    Args:
        where: What is being read (for the messages).
    """

    def __init__(self, where: str = "data set") -> None:
        self.where = where
        self.paths: list[Path] = []

    @property
    def count(self) -> int:
        """How many files were skipped."""
        return len(self.paths)

    def skip(self, path: str | Path, problem: object) -> None:
        """Record and log one skipped file."""
        self.paths.append(Path(path))
        logger.warning("skipping unreadable image %s (%s); %d skipped so far in %s", path, problem, self.count,
                       self.where)  # fmt: skip

    def report(self, total: int) -> None:
        """Log the count once a pass is over (nothing when no file was skipped)."""
        if self.paths:
            logger.warning("skipped %d unreadable of %d files in %s", self.count, total, self.where)

    def filter(self, paths: Sequence[str | Path], strict: bool = False) -> list[int]:
        """Indices of ``paths`` whose header is readable; the others are skipped (or raise with ``strict``).

        Raises:
            OSError: with ``strict=True``, naming the first unreadable file.
        """
        keep = []
        for i, path in enumerate(paths):
            problem = check_image(path)
            if problem is None:
                keep.append(i)
            elif strict:
                raise OSError(f"unreadable image {path}: {problem}")
            else:
                self.skip(path, problem)
        self.report(len(paths))
        return keep


# ---------------------------------------------------------------------------------------------------------------
# Scanning


def is_image_file(path: str | Path) -> bool:
    """True for a file name with one of ``IMG_EXTENSIONS`` (case-insensitive)."""
    return str(path).lower().endswith(IMG_EXTENSIONS)


def _check_dir(root: Path) -> Path:
    if not root.exists():
        raise FileNotFoundError(f"data directory not found: {root}")
    if not root.is_dir():
        raise NotADirectoryError(f"data directory is not a directory: {root}")
    return root


def list_class_dirs(root: str | Path) -> list[str]:
    """Sorted names of the sub-directories of ``root`` (hidden ones ignored).

    Raises:
        FileNotFoundError / NotADirectoryError: ``root`` is missing or not a directory.
    """
    root = _check_dir(Path(root))
    try:
        return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    except PermissionError as err:
        raise PermissionError(f"cannot read data directory {root}: {err.strerror}") from None


def list_images(root: str | Path) -> list[Path]:
    """Every image file under ``root`` (recursively, hidden files and folders skipped), sorted by path."""
    out = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        out += [Path(folder) / f for f in files if not f.startswith(".") and is_image_file(f)]
    return sorted(out)


def scan_class_folders(
    root: str | Path, classes: Sequence[str] | None = None, allow_missing_classes: bool = False
) -> tuple[list[tuple[Path, int]], list[str]]:
    """List the images of a ``root/<class>/<image>`` tree as ``(path, class id)``, in a stable order.

    Images in sub-folders of a class folder count for that class.

    Args:
        root: The tree.
        classes: The class names in id order (default: the sorted folder names).
        allow_missing_classes: Accept classes without images (subsets such as ImageNet-R, corruption cells).

    Raises:
        FileNotFoundError / NotADirectoryError: ``root`` is missing or not a directory.
        ValueError: no class folders, no image at all, a class missing (unless ``allow_missing_classes``), or a
            folder that is not one of ``classes``.
    """
    root = Path(root)
    found = list_class_dirs(root)
    if not found:
        raise ValueError(f"{root} has no class sub-directories (no class folders); expected the layout "
                         f"{root}/<class>/<image files>")  # fmt: skip
    classes = list(classes) if classes is not None else found
    extra = sorted(set(found) - set(classes))
    if extra:
        raise ValueError(f"{root} has folders {extra} that are not classes of this data set; classes: {classes}")
    samples: list[tuple[Path, int]] = []
    missing = []
    for label, name in enumerate(classes):
        files = list_images(root / name) if (root / name).is_dir() else []
        if not files:
            missing.append(name)
        samples.extend((f, label) for f in files)
    if len(missing) == len(classes):
        raise ValueError(f"{root} holds no images (it holds no image files with extensions {list(IMG_EXTENSIONS)} "
                         f"in its {len(classes)} class folders)")  # fmt: skip
    if missing and not allow_missing_classes:
        raise ValueError(f"classes {missing} have no images in {root}; every split must hold every class "
                         f"(pass allow_missing_classes=True for subsets)")  # fmt: skip
    return samples, classes
