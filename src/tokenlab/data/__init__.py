"""Data: the built-in synthetic set, real image folders / lists / CIFAR-10, STL paired views, iBOT crops and masks.

``build_dataset(spec, split, transform)`` turns files into sample dicts, ``build_transforms(kind, img_size)`` makes the
transform per data view (``classification``, ``stl_paired``, ``multicrop``, ``segmentation``, ``eval``),
``build_train_loader`` batches them with per-sample seeding (``data.sampler``), and
``mix_batch`` applies Mixup/CutMix to the student image and class target only. See ``docs/design.md``.
"""

from tokenlab.data.datasets import CIFAR10_CLASSES, ImageDataset, build_dataset, ensure_cifar10, load_rgb
from tokenlab.data.sampler import ResumableSampler, SeededDataset, build_train_loader, sample_seed
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
    "EvalTransform",
    "eval_transform_from_meta",
    "ImageDataset",
    "MultiCropTransform",
    "ResumableSampler",
    "SeededDataset",
    "SynthConfig",
    "ViewTransform",
    "build_dataset",
    "build_mixup",
    "build_train_loader",
    "build_transforms",
    "ensure_cifar10",
    "generate",
    "load_rgb",
    "mix_batch",
    "sample_seed",
]
