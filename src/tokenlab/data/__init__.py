"""Data: the built-in synthetic set, real image folders / lists / CIFAR-10, STL paired views, iBOT crops and masks.

``build_dataset(spec, split, transform)`` turns files into sample dicts, ``build_transforms(kind, img_size)`` makes the
transform (``eval``, ``train``, ``stl_pair``, ``ibot``), ``build_loader`` batches them with per-sample seeding, and
``mix_batch`` applies Mixup/CutMix to the student image and class target only. See ``docs/design.md``.
"""

from tokenlab.data.datasets import CIFAR10_CLASSES, ImageDataset, build_dataset, ensure_cifar10, load_rgb
from tokenlab.data.loader import EpochSampler, SeededDataset, build_loader, set_epoch
from tokenlab.data.masking import BlockMaskGenerator
from tokenlab.data.synthetic import SHAPES, TEXTURES, SynthConfig, generate
from tokenlab.data.transforms import (
    TEACHER_MODES,
    EvalTransform,
    eval_transform_from_meta,
    MultiCropTransform,
    ViewTransform,
    build_mixup,
    build_transforms,
    mix_batch,
)

__all__ = [
    "CIFAR10_CLASSES",
    "SHAPES",
    "TEACHER_MODES",
    "TEXTURES",
    "BlockMaskGenerator",
    "EpochSampler",
    "EvalTransform",
    "eval_transform_from_meta",
    "ImageDataset",
    "MultiCropTransform",
    "SeededDataset",
    "SynthConfig",
    "ViewTransform",
    "build_dataset",
    "build_loader",
    "build_mixup",
    "build_transforms",
    "ensure_cifar10",
    "generate",
    "load_rgb",
    "mix_batch",
    "set_epoch",
]
