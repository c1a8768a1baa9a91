"""Data: the built-in synthetic set, real image folders / lists / CIFAR-10, STL paired views, iBOT crops and masks.

``parse_data_spec(spec, split)`` reads a data-spec string, ``build_dataset(spec, split, transform)`` turns its
files into sample dicts (decoded by ``data.images``), ``build_transforms(kind, img_size)`` makes the transform per
data view (``classification``, ``stl_paired``, ``multicrop``, ``segmentation``, ``eval``; evaluation everywhere
through ``eval_transform_from_meta``) and ``build_train_loader`` (``data.sampler``) batches them with per-sample
seeding. See ``docs/design.md``.
"""

from tokenlab.data.datasets import ImageDataset, build_dataset
from tokenlab.data.images import (
    IMG_EXTENSIONS,
    UnreadableImages,
    denormalize,
    load_rgb,
    scan_class_folders,
    to_rgb,
)
from tokenlab.data.masking import BlockMaskGenerator
from tokenlab.data.sampler import ResumableSampler, SeededDataset, build_train_loader, sample_seed
from tokenlab.data.specs import CIFAR10_CLASSES, DataSpec, ensure_cifar10, parse_data_spec
from tokenlab.data.synthetic import SHAPES, TEXTURES, SynthConfig, generate
from tokenlab.data.transforms import (
    TEACHER_MODES,
    EvalTransform,
    MultiCropTransform,
    ViewTransform,
    build_transforms,
    eval_transform_from_meta,
)

__all__ = [
    "CIFAR10_CLASSES",
    "IMG_EXTENSIONS",
    "SHAPES",
    "TEACHER_MODES",
    "TEXTURES",
    "BlockMaskGenerator",
    "DataSpec",
    "EvalTransform",
    "ImageDataset",
    "MultiCropTransform",
    "ResumableSampler",
    "SeededDataset",
    "SynthConfig",
    "UnreadableImages",
    "ViewTransform",
    "build_dataset",
    "build_train_loader",
    "build_transforms",
    "denormalize",
    "ensure_cifar10",
    "eval_transform_from_meta",
    "generate",
    "load_rgb",
    "parse_data_spec",
    "sample_seed",
    "scan_class_folders",
    "to_rgb",
]
