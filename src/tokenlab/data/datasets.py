"""Data sets that turn files into sample dicts: image folders, CSV/TSV lists, CIFAR-10 and the synthetic set.

Every data set returns the sample dict of ``docs/design.md`` ("Samples and batches"): the transform receives
``{"image": tv_tensors.Image uint8 (3, H, W), "label": int, "index": int}`` plus ``"mask"`` (``tv_tensors.Mask``,
0 = background, class id + 1 = object) when the data set has masks, and returns the dict the model sees. Without a
transform the image is returned as float in [0, 1].

``build_dataset(spec, split)`` reads every spec of ``tokenlab.data.specs.parse_data_spec`` (the one parser):

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
next readable sample with a warning; ``ImageDataset.skipped`` holds them all. Decoding and the skip policy are
``tokenlab.data.images``'s: grayscale, palette, CMYK, RGBA (composited on white) and 16-bit images become 8-bit RGB.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision import tv_tensors

from tokenlab.data.images import READ_ERRORS, UnreadableImages, list_class_dirs, load_mask, load_rgb, scan_class_folders
from tokenlab.data.specs import CIFAR10_CLASSES, DataSpec, ensure_cifar10, parse_data_spec

logger = logging.getLogger(__name__)

__all__ = [
    "CIFAR10_CLASSES",
    "VERIFY_MODES",
    "ImageDataset",
    "build_dataset",
    "ensure_cifar10",
    "read_list",
]

VERIFY_MODES = ("header", "none")
Transform = Callable[[dict[str, Any]], dict[str, Any]]


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
        self.unreadable = UnreadableImages(self.name)
        if verify == "header":
            keep = self.unreadable.filter([path for path, _ in samples], strict)
            samples = [samples[i] for i in keep]
            mask_paths = None if mask_paths is None else [mask_paths[i] for i in keep]
        if not samples:
            raise ValueError(f"no readable images in {self.name}")
        self.samples = samples
        self.mask_paths = mask_paths

    @property
    def targets(self) -> list[int]:
        """The class index of every sample, in sample order."""
        return [label for _, label in self.samples]

    @property
    def skipped(self) -> list[Path]:
        """The unreadable files skipped so far (at build time and while loading)."""
        return self.unreadable.paths

    @property
    def has_masks(self) -> bool:
        """Whether every image has an object mask (``mask_root`` was given)."""
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
                raise ValueError(
                    f"mask {self.mask_paths[index]} is {tuple(mask.shape)}, image {path} is "
                    f"{tuple(sample['image'].shape[-2:])}"
                )
            sample["mask"] = tv_tensors.Mask(mask)
        return sample

    def __getitem__(self, index: int) -> dict[str, Any]:
        for attempt in range(len(self.samples)):
            current = (index + attempt) % len(self.samples)
            try:
                sample = self.raw(current)
            except READ_ERRORS as err:
                path = self.samples[current][0]
                if self.strict:
                    raise OSError(f"unreadable image {path}: {err}") from err
                self.unreadable.skip(path, err)
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
# Lists


def read_list(path: Path, classes: list[str] | None = None) -> tuple[list[tuple[Path, int]], list[str]]:
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
    for row, label in zip(rows, labels, strict=True):
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
# The builder


def build_dataset(
    spec: str | Path | DataSpec,
    split: str | None = "train",
    transform: Transform | None = None,
    *,
    strict: bool = False,
    verify: str = "header",
    classes: list[str] | None = None,
    allow_missing_classes: bool = False,
    load_masks: bool = True,
) -> ImageDataset:
    """Build the data set named by ``spec`` (``tokenlab.data.specs.parse_data_spec``) for ``split``.

    Args:
        spec: a synthetic set dir, an image-folder root, a CSV/TSV list (or a dir of ``<split>.csv``), or ``cifar10``.
        split: split folder / list name; None uses ``spec`` itself as the class-folder tree (``train`` for sets
            of splits and CIFAR-10).
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
    data = parse_data_spec(spec, split).resolve(("train",))
    options: dict[str, Any] = {"strict": strict, "verify": verify}
    list_file = data.list_file()
    if list_file is not None:
        samples, classes = read_list(list_file, classes)
        name = str(list_file) if data.kind == "list" else f"{data.path}/{data.split}"
        return ImageDataset(samples, classes, transform, name=name, **options)
    if classes is None:
        classes = data.classes
    if (
        classes is None
        and data.kind == "folder"
        and data.split not in (None, "train")
        and (data.path / "train").is_dir()
    ):
        classes = list_class_dirs(data.path / "train")  # every split shares the training split's class list
    folder = data.root
    samples, classes = scan_class_folders(folder, classes, allow_missing_classes)
    masks = None
    if load_masks and data.kind == "splits" and data.masks is not None:
        masks = [data.masks / p.relative_to(folder) for p, _ in samples]
    name = (
        f"cifar10/{data.split}"
        if data.kind == "cifar10"
        else (f"{data.path}/{data.split}" if data.split else str(folder))
    )
    return ImageDataset(samples, classes, transform, mask_paths=masks, name=name, **options)
