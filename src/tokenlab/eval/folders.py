"""Evaluation image trees: ``root/<class>/<image>`` (optionally with masks) read through the data layer.

Clean test splits, OOD sets, ImageNet-C style ``corruption/severity/class/img`` cells and the masked sets of the
token analysis are plain folders. Files are listed by ``tokenlab.data.images.scan_class_folders``, decoded by its
``load_rgb`` (so 16-bit and RGBA images give the same pixels as in training) and preprocessed by the exported
model's ``EvalTransform`` (``eval_transform_from_meta``). An image that cannot be decoded follows the data layer's
policy: it is skipped, logged by name and counted. The data set returns it with ``valid=False`` (and a zero image so
the batch still collates), and the evaluation loop leaves it out and reports the count.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as TF

from tokenlab.data.images import (
    READ_ERRORS,
    UnreadableImages,
    list_class_dirs,
    load_mask,
    load_rgb,
    scan_class_folders,
)
from tokenlab.data.transforms import EvalTransform, eval_transform_from_meta

logger = logging.getLogger(__name__)

__all__ = ["ImageTreeDataset", "eval_loader"]


class ImageTreeDataset(Dataset):
    """Images of a ``root/<class>/<image>`` tree labelled through ``class_to_idx``, in evaluation form.

    Each sample is ``{"image": (3, S, S) float, "label": int, "index": int, "valid": bool}`` (plus ``"mask"``:
    ``(S, S)`` int64 with ``mask_root``); an unreadable image gives ``valid=False`` and zeros.

    Args:
        root: The tree root.
        class_to_idx: Folder name -> label. Every folder must be named here.
        transform: The evaluation transform (``eval_transform_from_meta(meta)``); a mask follows its geometry.
        mask_root: Optional tree of label masks with the same relative paths as the images.

    Raises:
        KeyError: a class folder that ``class_to_idx`` does not name.
        FileNotFoundError: ``mask_root`` missing, or an image without its mask.
    """

    def __init__(
        self,
        root: str | Path,
        class_to_idx: Mapping[str, int],
        transform: EvalTransform,
        mask_root: str | Path | None = None,
    ) -> None:
        self.root = Path(root)
        classes = list_class_dirs(self.root)
        unknown = [c for c in classes if c not in class_to_idx]
        if unknown:
            raise KeyError(
                f"class folders {unknown[:10]} of {self.root} are not classes of the model; valid classes: "
                f"{sorted(class_to_idx)[:30]}{' ...' if len(class_to_idx) > 30 else ''} (use a mapping file for a "
                "renamed or subset data set)"
            )
        samples, _ = scan_class_folders(self.root, classes, allow_missing_classes=True)
        self.items = [(path, classes[k]) for path, k in samples]
        self.classes = classes
        self.class_to_idx = dict(class_to_idx)
        self.transform = transform
        self.mask_root = Path(mask_root) if mask_root is not None else None
        if self.mask_root is not None:
            if not self.mask_root.is_dir():
                raise FileNotFoundError(f"mask directory not found: {self.mask_root}")
            missing = [p for p, _ in self.items[:50] if not self._mask_path(p).is_file()]
            if missing:
                raise FileNotFoundError(f"no mask for {missing[0]} (expected {self._mask_path(missing[0])})")
        self.unreadable = UnreadableImages(str(self.root))

    def _mask_path(self, path: Path) -> Path:
        assert self.mask_root is not None
        return self.mask_root / path.relative_to(self.root)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        path, cls = self.items[i]
        label = self.class_to_idx[cls]
        try:
            sample: dict[str, Any] = {"image": TF.pil_to_tensor(load_rgb(path))}
            if self.mask_root is not None:
                mask = torch.from_numpy(load_mask(self._mask_path(path)).astype("int64"))
                sample["mask"] = tv_tensors.Mask(mask)
            sample["image"] = tv_tensors.Image(sample["image"])
        except READ_ERRORS as err:
            self.unreadable.skip(path, err)
            size = self.transform.img_size
            out = {"image": torch.zeros(3, size, size), "label": label, "index": i, "valid": False}
            if self.mask_root is not None:
                out["mask"] = torch.zeros(size, size, dtype=torch.long)
            return out
        out = self.transform(sample)
        result = {"image": out["image"].as_subclass(torch.Tensor), "label": label, "index": i, "valid": True}
        if "mask" in out:
            result["mask"] = out["mask"].as_subclass(torch.Tensor)
        return result


def eval_loader(
    root: str | Path,
    class_to_idx: Mapping[str, int],
    meta: Mapping[str, Any],
    batch_size: int = 128,
    workers: int | None = None,
) -> DataLoader:
    """A loader over the tree ``root/<class>/<image>`` with the exported model's preprocessing (``meta``)."""
    ds = ImageTreeDataset(root, class_to_idx, eval_transform_from_meta(meta))
    workers = min(4, os.cpu_count() or 1) if workers is None else workers
    return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers,
                      persistent_workers=False, pin_memory=torch.cuda.is_available())  # fmt: skip
