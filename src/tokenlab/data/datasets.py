"""Data sets that turn files into sample dicts: image folders, CSV/TSV lists, CIFAR-10 and the synthetic set.

Every data set returns the sample dict of ``docs/design.md`` ("Samples and batches"): the transform receives
``{"image": tv_tensors.Image uint8 (3, H, W), "label": int, "index": int}`` plus ``"mask"`` (``tv_tensors.Mask``,
0 = background, class id + 1 = object) when the data set has masks, and returns the dict the model sees. Without a
transform the image is returned as float in [0, 1].

``build_dataset(spec, split)`` understands:

- a synthetic data set directory (``dataset.json`` with ``format: tokenlab-synthetic``): ``DIR/<split>`` with masks
  from ``DIR/<split>_masks``, classes from ``dataset.json``;
- an image-folder root with one folder per split (``ROOT/<split>/<class>/*.jpg``), or, with ``split=None``, a
  class-folder tree itself; classes come from ``ROOT/train`` when it exists so every split shares one class list;
- a CSV/TSV list (``path,label`` rows, optional header, paths relative to the list) or a directory holding
  ``<split>.csv`` / ``<split>.tsv``;
- the literal ``cifar10``: the archive ``../shared/data/cifar10.tar.gz`` (or ``$TOKENLAB_CIFAR10``), extracted once
  to ``~/.cache/tokenlab`` (or ``$TOKENLAB_CACHE``); split ``val`` reads CIFAR's ``test``.

Unreadable files are skipped with a warning that names each file and a final count (``strict=True`` raises instead):
at build time every file's header is checked (``verify="header"``, which for PNG also checks the chunk CRCs, so
truncated PNGs are caught); a file that still fails to decode at load time (e.g. a truncated JPEG) is replaced by the
next readable sample with a warning. Grayscale, palette, CMYK, RGBA (composited on white) and 16-bit images become
8-bit RGB.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import tarfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision import tv_tensors

from tokenlab.data.synthetic import FORMAT as SYNTHETIC_FORMAT

logger = logging.getLogger(__name__)

IMG_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")
LIST_SUFFIXES = (".csv", ".tsv", ".txt")
VERIFY_MODES = ("header", "none")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
Transform = Callable[[dict[str, Any]], dict[str, Any]]


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
    """Convert any PIL mode to 8-bit RGB: alpha is composited on white, CMYK/YCbCr/LAB converted, >8 bit scaled."""
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


def load_rgb(path: str | Path) -> Image.Image:
    """Decode an image file to 8-bit RGB. Raises ``OSError`` (incl. ``UnidentifiedImageError``) when unreadable."""
    with Image.open(path) as image:
        image.load()
        return to_rgb(image)


def load_mask(path: str | Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("L") if image.mode not in ("L", "P") else image)


def _check_header(path: Path) -> str | None:
    """Return an error message when ``path`` is not a readable image, else None (header + PNG CRC check)."""
    try:
        with Image.open(path) as image:
            image.verify()
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as err:
        return f"{type(err).__name__}: {err}"
    return None


# ---------------------------------------------------------------------------------------------------------------
# The data set


class ImageDataset(torch.utils.data.Dataset):
    """A list of ``(path, label)`` samples (plus optional mask paths) returning sample dicts.

    Args:
        samples: ``(image path, class id)`` pairs.
        classes: class names; ``classes[k]`` is the name of class id ``k``.
        transform: callable on the sample dict (see the module docstring); None returns float images in [0, 1].
        mask_paths: per-sample mask files, or None.
        strict: raise on an unreadable file instead of skipping it.
        verify: ``"header"`` checks every file when the data set is built; ``"none"`` skips the check.
        name: a short description for messages.

    Raises:
        ValueError: when no readable image is left, or on an unknown ``verify`` mode.
        OSError: with ``strict=True``, naming the first unreadable file.
    """

    def __init__(
        self,
        samples: list[tuple[Path, int]],
        classes: list[str],
        transform: Transform | None = None,
        mask_paths: list[Path] | None = None,
        strict: bool = False,
        verify: str = "header",
        name: str = "",
    ) -> None:
        if verify not in VERIFY_MODES:
            raise ValueError(f"unknown verify mode {verify!r}; valid: {list(VERIFY_MODES)}")
        if mask_paths is not None and len(mask_paths) != len(samples):
            raise ValueError(f"{len(mask_paths)} mask paths for {len(samples)} samples in {name}")
        self.name = name or "data set"
        self.classes = list(classes)
        self.transform = transform
        self.strict = strict
        self.skipped: list[Path] = []
        if verify == "header":
            keep = []
            for i, (path, _) in enumerate(samples):
                problem = _check_header(path)
                if problem is None:
                    keep.append(i)
                elif strict:
                    raise OSError(f"unreadable image {path}: {problem}")
                else:
                    logger.warning("skipping unreadable image %s (%s)", path, problem)
                    self.skipped.append(path)
            if self.skipped:
                logger.warning("skipped %d unreadable of %d files in %s", len(self.skipped), len(samples), self.name)
            samples = [samples[i] for i in keep]
            mask_paths = None if mask_paths is None else [mask_paths[i] for i in keep]
        if not samples:
            raise ValueError(f"no readable images in {self.name}")
        self.samples = samples
        self.mask_paths = mask_paths

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]

    @property
    def has_masks(self) -> bool:
        return self.mask_paths is not None

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {len(self)} images, {len(self.classes)} classes)"

    def raw(self, index: int) -> dict[str, Any]:
        """The untransformed sample: uint8 ``tv_tensors.Image`` (and ``Mask``), label, index."""
        path, label = self.samples[index]
        image = load_rgb(path)
        sample: dict[str, Any] = {
            "image": tv_tensors.Image(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)),
            "label": label,
            "index": index,
        }
        if self.mask_paths is not None:
            mask = torch.from_numpy(load_mask(self.mask_paths[index]).copy())
            if tuple(mask.shape) != tuple(sample["image"].shape[-2:]):
                raise ValueError(f"mask {self.mask_paths[index]} is {tuple(mask.shape)}, image {path} is "
                                 f"{tuple(sample['image'].shape[-2:])}")
            sample["mask"] = tv_tensors.Mask(mask)
        return sample

    def __getitem__(self, index: int) -> dict[str, Any]:
        for attempt in range(len(self.samples)):
            current = (index + attempt) % len(self.samples)
            try:
                sample = self.raw(current)
            except OSError as err:
                path = self.samples[current][0]
                if self.strict:
                    raise OSError(f"unreadable image {path}: {err}") from err
                self.skipped.append(path)
                logger.warning("skipping unreadable image %s (%s); %d skipped so far", path, err, len(self.skipped))
                continue
            sample["index"] = index
            return _finish(self.transform(sample) if self.transform is not None else _default_view(sample))
        raise OSError(f"no readable image left in {self.name}")


def _default_view(sample: dict[str, Any]) -> dict[str, Any]:
    sample["image"] = sample["image"].float() / 255
    return sample


def _plain(value: Any) -> Any:
    if isinstance(value, tv_tensors.Mask):
        return value.as_subclass(torch.Tensor).long()
    if isinstance(value, torch.Tensor):
        return value.as_subclass(torch.Tensor)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _finish(sample: dict[str, Any]) -> dict[str, Any]:
    """Strip tv_tensor subclasses so ``default_collate`` produces plain tensors; masks become long."""
    return {key: _plain(value) for key, value in sample.items()}


# ---------------------------------------------------------------------------------------------------------------
# Scanning


def _is_image(entry: os.DirEntry) -> bool:
    return entry.is_file() and entry.name.lower().endswith(IMG_EXTENSIONS)


def _class_dirs(root: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


def scan_image_folder(
    root: Path, classes: list[str] | None = None, allow_missing_classes: bool = False
) -> tuple[list[tuple[Path, int]], list[str]]:
    """List ``root/<class>/*`` images as ``(path, class id)`` in a stable order.

    Raises:
        FileNotFoundError: when ``root`` does not exist.
        ValueError: no class folders, a class of ``classes`` missing or empty (unless ``allow_missing_classes``), or
            a folder that is not one of ``classes``.
    """
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    found = _class_dirs(root)
    if not found:
        raise ValueError(f"{root} holds no class folders; expected {root}/<class>/<image files>")
    classes = list(classes) if classes is not None else found
    extra = sorted(set(found) - set(classes))
    if extra:
        raise ValueError(f"{root} has folders {extra} that are not classes of this data set; classes: {classes}")
    samples: list[tuple[Path, int]] = []
    missing = []
    for label, name in enumerate(classes):
        folder = root / name
        files = sorted(e.name for e in os.scandir(folder) if _is_image(e)) if folder.is_dir() else []
        if not files:
            missing.append(name)
        samples.extend((folder / f, label) for f in files)
    if len(missing) == len(classes):
        raise ValueError(f"{root} holds no image files (extensions {list(IMG_EXTENSIONS)})")
    if missing and not allow_missing_classes:
        raise ValueError(f"classes {missing} have no images in {root}; every split must hold every class "
                         f"(pass allow_missing_classes=True for subsets)")
    return samples, classes


def read_list(
    path: Path, classes: list[str] | None = None
) -> tuple[list[tuple[Path, int]], list[str]]:
    """Read a ``path,label`` CSV/TSV list; labels are class names or integer ids; paths are relative to the list.

    Raises:
        FileNotFoundError: missing list.
        ValueError: malformed rows or labels outside ``classes``.
    """
    if not path.is_file():
        raise FileNotFoundError(f"list file {path} does not exist")
    text = path.read_text()
    delimiter = "\t" if path.suffix == ".tsv" or ("\t" in text.splitlines()[0] if text else False) else ","
    rows = [r for r in csv.reader(text.splitlines(), delimiter=delimiter) if r and not r[0].startswith("#")]
    if rows and rows[0][0].strip().lower() in ("path", "file", "filename", "image", "image_path"):
        rows = rows[1:]
    if not rows:
        raise ValueError(f"list file {path} holds no rows; expected 'path{delimiter}label' lines")
    bad = [i for i, r in enumerate(rows) if len(r) < 2]
    if bad:
        raise ValueError(f"list file {path}: rows {bad[:5]} do not have 'path{delimiter}label'")
    labels = [r[1].strip() for r in rows]
    numeric = all(lbl.lstrip("-").isdigit() for lbl in labels)
    if classes is None:
        classes = [str(i) for i in range(max(int(x) for x in labels) + 1)] if numeric else sorted(set(labels))
    index = {name: i for i, name in enumerate(classes)}
    samples = []
    for row, label in zip(rows, labels):
        if numeric and label not in index:
            label_id = int(label)
            if not 0 <= label_id < len(classes):
                raise ValueError(f"list file {path}: label {label_id} outside [0, {len(classes)})")
        elif label in index:
            label_id = index[label]
        else:
            raise ValueError(f"list file {path}: unknown class {label!r}; classes: {classes}")
        file = Path(row[0].strip())
        samples.append((file if file.is_absolute() else path.parent / file, label_id))
    return samples, list(classes)


# ---------------------------------------------------------------------------------------------------------------
# CIFAR-10


def cache_dir() -> Path:
    return Path(os.environ.get("TOKENLAB_CACHE", Path.home() / ".cache" / "tokenlab"))


def cifar10_archive() -> Path:
    """Locate ``cifar10.tar.gz``: ``$TOKENLAB_CIFAR10``, else ``../shared/data`` from the cwd or the project root."""
    env = os.environ.get("TOKENLAB_CIFAR10")
    if env:
        if not Path(env).is_file():
            raise FileNotFoundError(f"TOKENLAB_CIFAR10={env} is not a file")
        return Path(env)
    project = Path(__file__).resolve().parents[3]
    candidates = [Path.cwd() / "../shared/data/cifar10.tar.gz", project / "../shared/data/cifar10.tar.gz"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise FileNotFoundError(
        f"cifar10.tar.gz not found in {[str(c) for c in candidates]}; set TOKENLAB_CIFAR10 to the archive"
    )


def ensure_cifar10(cache: Path | None = None) -> Path:
    """Extract the CIFAR-10 archive once to ``<cache>/cifar10`` and return that directory."""
    cache = Path(cache) if cache is not None else cache_dir()
    target = cache / "cifar10"
    if (target / ".complete").exists():
        return target
    archive = cifar10_archive()
    cache.mkdir(parents=True, exist_ok=True)
    staging = cache / f".cifar10-extract-{os.getpid()}"
    logger.info("extracting %s to %s (once)", archive, target)
    with tarfile.open(archive) as tar:
        tar.extractall(staging, filter="data")
    # the archive holds one top folder (cifar10/) with train/ and test/
    roots = [p for p in staging.iterdir() if p.is_dir()]
    source = roots[0] if len(roots) == 1 and (roots[0] / "train").is_dir() else staging
    (source / ".complete").write_text(str(archive))
    try:
        source.rename(target)
    except OSError:
        if not (target / ".complete").exists():
            raise
        logger.info("another process extracted %s first", target)
    if staging.exists():
        shutil.rmtree(staging, ignore_errors=True)
    return target


# ---------------------------------------------------------------------------------------------------------------
# The builder


def read_synthetic_meta(root: Path) -> dict | None:
    meta_path = root / "dataset.json"
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    return meta if meta.get("format") == SYNTHETIC_FORMAT else None


def _split_dir(root: Path, split: str) -> Path:
    folder = root / split
    if folder.is_dir():
        return folder
    if split == "val" and (root / "test").is_dir():
        logger.info("no split 'val' in %s; using 'test'", root)
        return root / "test"
    splits = [d for d in _class_dirs(root) if not d.endswith("_masks")]
    raise ValueError(f"split {split!r} not found in {root}; available: {splits} (split=None reads {root} itself)")


def build_dataset(
    spec: str | Path,
    split: str | None = "train",
    transform: Transform | None = None,
    *,
    strict: bool = False,
    verify: str = "header",
    classes: list[str] | None = None,
    allow_missing_classes: bool = False,
    load_masks: bool = True,
) -> ImageDataset:
    """Build the data set named by ``spec`` (see the module docstring) for ``split``.

    Args:
        spec: a synthetic set dir, an image-folder root, a CSV/TSV list (or a dir of ``<split>.csv``), or ``cifar10``.
        split: split folder / list name; None uses ``spec`` itself as the class-folder tree.
        transform: sample-dict transform (``tokenlab.data.build_transforms``).
        strict: unreadable files raise instead of being skipped.
        verify: ``"header"`` or ``"none"`` (see ``ImageDataset``).
        classes: fix the class list (and order); default: from the data set.
        allow_missing_classes: accept splits that lack some classes (e.g. subsets like ImageNet-R).
        load_masks: read the synthetic set's masks (False saves one PNG decode per sample).

    Raises:
        FileNotFoundError: ``spec`` does not exist.
        ValueError: empty folders, unknown splits, missing classes, malformed lists.
    """
    if str(spec) == "cifar10":
        root = ensure_cifar10()
        samples, classes = scan_image_folder(
            _split_dir(root, split or "train"), classes or list(CIFAR10_CLASSES), allow_missing_classes
        )
        return ImageDataset(samples, classes, transform, strict=strict, verify=verify, name=f"cifar10/{split}")
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"data set {str(spec)!r} not found; give a synthetic set or image-folder directory, a .csv/.tsv list, "
            f"or 'cifar10'"
        )
    if path.is_file():
        if path.suffix.lower() not in LIST_SUFFIXES:
            raise ValueError(f"{path} is not a list file; expected one of {list(LIST_SUFFIXES)}")
        samples, classes = read_list(path, classes)
        return ImageDataset(samples, classes, transform, strict=strict, verify=verify, name=str(path))
    meta = read_synthetic_meta(path)
    if meta is not None:
        split = split or "train"
        if split not in meta["splits"]:
            raise ValueError(f"split {split!r} not in synthetic set {path}; available: {sorted(meta['splits'])}")
        folder = path / split
        samples, classes = scan_image_folder(folder, classes or meta["classes"], allow_missing_classes)
        masks = [path / f"{split}_masks" / p.relative_to(folder) for p, _ in samples] if load_masks else None
        return ImageDataset(
            samples, classes, transform, mask_paths=masks, strict=strict, verify=verify, name=f"{path}/{split}"
        )
    if split is not None:
        for suffix in (".csv", ".tsv"):
            if (path / f"{split}{suffix}").is_file():
                samples, classes = read_list(path / f"{split}{suffix}", classes)
                return ImageDataset(samples, classes, transform, strict=strict, verify=verify, name=f"{path}/{split}")
    folder = path if split is None else _split_dir(path, split)
    if classes is None and split is not None and split != "train" and (path / "train").is_dir():
        classes = _class_dirs(path / "train")
    samples, classes = scan_image_folder(folder, classes, allow_missing_classes)
    return ImageDataset(samples, classes, transform, strict=strict, verify=verify, name=str(folder))
