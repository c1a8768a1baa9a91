"""Sample-dict transforms: evaluation, single-view training, paired STL teacher/student views, iBOT multi-crop.

All transforms take and return the sample dict of ``docs/design.md`` (``image`` as a uint8 ``tv_tensors.Image``, an
optional ``mask`` as ``tv_tensors.Mask``) and are built on ``torchvision.transforms.v2``, whose kernels dispatch on
the tensor type, so a mask always follows the spatial ops with nearest-neighbour sampling.

**Paired STL views** (``ViewTransform(teacher=...)``), after STL [0]: ``make_params`` draws *once* the
random-resized-crop box, the flip, the RandAugment [1] ops with their magnitudes and the erasing box; ``transform``
applies the geometric part (crop, flip, rotate, shear, translate) to each input: image and mask alike. The teacher
view is that shared geometric result; the student view continues with the colour ops of the same RandAugment draw,
normalisation, random erasing (timm's per-pixel N(0, 1) fill) and optional Gaussian noise at normalisation level.
Geometric ops run before colour ops, so the shared part is computed once; for the pointwise colour ops this is the
same image as interleaving, for the histogram ops (autocontrast, equalize) the geometric fill counts slightly
differently. Teacher modes (the paper's ablation): ``none`` = the centre (evaluation) view of the original image,
``spatial`` (default) = shared geometry only, ``full`` = exactly the student's view; ``geometry`` = no teacher image
but the student view's geometry as ``view_theta`` (``view_affine``: the 2x3 affine that maps the view's normalised
coordinates onto the source image's), for labels cached per source image (``tokenlab.data.label_store``).
Mixup/CutMix work on batches
and live in the supervised method (``tokenlab.methods.supervised``): student image and class target only.

**iBOT multi-crop** [2] (``MultiCropTransform``): 2 global crops (scale 0.25-1; blur p 1.0 / 0.1, solarize 0.2 on the
second) and N local crops (scale 0.05-0.25, blur 0.5), colour jitter 0.8, grayscale 0.2; a ``BlockMaskGenerator`` mask
per global crop.

RandAugment ops and magnitudes follow the ``rand-m9-mstd0.5-inc1`` recipe string convention of timm: ``n`` ops
drawn with replacement from 15, each applied with probability ``p`` (0.5) at magnitude ``m ~ N(m, mstd)`` clipped
to ``[0, mmax]`` (10); ``inc1`` selects the variants whose strength increases with ``m``.

- [0]: Self-emerging Token Labeling (STL), 2024, https://arxiv.org/abs/2401.03844
- [1]: RandAugment, 2019, https://arxiv.org/abs/1909.13719
- [2]: iBOT, 2021, https://arxiv.org/abs/2111.07832
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import default_collate
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from tokenlab.data.masking import BlockMaskGenerator, build_mask_generator

logger = logging.getLogger(__name__)

TEACHER_MODES = ("none", "spatial", "full", "geometry")
# The data views: what a method asks for (``Method.data_view``) is what ``build_transforms`` builds.
TRANSFORM_KINDS = ("classification", "stl_paired", "multicrop", "segmentation", "detection", "eval")
GEOMETRIC_OPS = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
COLOUR_OPS = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Posterize",
    "Solarize",
    "SolarizeAdd",
    "Color",
    "Contrast",
    "Brightness",
    "Sharpness",
)
RAND_AUGMENT_OPS = COLOUR_OPS[:3] + ("Rotate",) + COLOUR_OPS[3:] + GEOMETRIC_OPS[1:]
_FILL = [124, 116, 104]  # ImageNet mean pixel, the usual RandAugment border fill
_LEVEL_DENOM = 10.0


def _rand(generator: torch.Generator | None) -> float:
    return float(torch.rand((), generator=generator))


def _sign(generator: torch.Generator | None) -> float:
    return 1.0 if _rand(generator) < 0.5 else -1.0


# ---------------------------------------------------------------------------------------------------------------
# RandAugment, split into a geometric and a colour part


@dataclass(frozen=True)
class RandAugmentSpec:
    """``rand-m9-n2-mstd0.5-mmax10-p0.5-inc1``: ``num_ops`` ops per image at ``magnitude`` (0-``max_magnitude``).

    Keys left out of a string take timm's defaults: ``m10 n2 mstd0 mmax10 p0.5 inc0``.
    """

    magnitude: float = 10.0
    num_ops: int = 2
    magnitude_std: float = 0.0
    max_magnitude: float = 10.0
    prob: float = 0.5
    increasing: bool = False

    @classmethod
    def parse(cls, text: str) -> RandAugmentSpec:
        """Parse a timm-style RandAugment string, e.g. ``rand-m9-mstd0.5-inc1``.

        Raises:
            ValueError: when the string does not start with ``rand`` or holds an unknown key.
        """
        parts = text.split("-")
        if parts[0] != "rand":
            raise ValueError(f"RandAugment string must start with 'rand', got {text!r}")
        keys = {
            "m": "magnitude",
            "n": "num_ops",
            "mstd": "magnitude_std",
            "mmax": "max_magnitude",
            "p": "prob",
            "inc": "increasing",
        }
        values: dict[str, Any] = {}
        for part in parts[1:]:
            key = next((k for k in sorted(keys, key=len, reverse=True) if part.startswith(k)), None)
            if key is None:
                raise ValueError(f"unknown RandAugment key in {part!r} of {text!r}; valid keys: {sorted(keys)}")
            raw = part[len(key) :]
            if key == "n":
                values[keys[key]] = int(raw)
            elif key == "inc":
                values[keys[key]] = bool(int(raw))
            else:
                values[keys[key]] = float(raw)
        return cls(**values)


@dataclass(frozen=True)
class Op:
    """One augmentation op of a policy: its name and its op-specific strength."""

    name: str
    level: float  # op-specific argument: degrees, pixels, factor, bits, threshold or offset


def _op_level(
    name: str, magnitude: float, spec: RandAugmentSpec, size: tuple[int, int], gen: torch.Generator | None
) -> float:
    frac = magnitude / _LEVEL_DENOM  # timm's convention: levels scale by 10; mmax only clips the magnitude
    if name == "Rotate":
        return _sign(gen) * 30.0 * frac
    if name in ("ShearX", "ShearY"):
        return math.degrees(math.atan(_sign(gen) * 0.3 * frac))  # PIL shear factor s == torchvision angle atan(s)
    if name == "TranslateXRel":
        return _sign(gen) * 0.45 * frac * size[1]
    if name == "TranslateYRel":
        return _sign(gen) * 0.45 * frac * size[0]
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        return 1.0 + _sign(gen) * 0.9 * frac if spec.increasing else 0.1 + 1.8 * frac
    if name == "Posterize":
        return 4 - int(4 * frac) if spec.increasing else int(4 * frac)
    if name == "Solarize":
        return 256 - int(256 * frac) if spec.increasing else int(256 * frac)
    if name == "SolarizeAdd":
        return int(110 * frac)
    if name in ("AutoContrast", "Equalize", "Invert"):
        return 0.0
    raise KeyError(f"unknown RandAugment op {name!r}; valid: {list(RAND_AUGMENT_OPS)}")


def sample_rand_augment(spec: RandAugmentSpec, size: tuple[int, int], gen: torch.Generator | None) -> list[Op]:
    """Draw the ops one image gets: ``num_ops`` picks with replacement, each kept with probability ``prob``."""
    ops = []
    for _ in range(spec.num_ops):
        name = RAND_AUGMENT_OPS[int(torch.randint(0, len(RAND_AUGMENT_OPS), (), generator=gen))]
        magnitude = spec.magnitude
        if spec.magnitude_std > 0:
            magnitude += spec.magnitude_std * float(torch.randn((), generator=gen))
        magnitude = min(max(magnitude, 0.0), spec.max_magnitude)
        level = _op_level(name, magnitude, spec, size, gen)
        if _rand(gen) < spec.prob:
            ops.append(Op(name, level))
    return ops


def apply_geometric_op(inpt: torch.Tensor, op: Op) -> torch.Tensor:
    """Rotate / shear / translate an Image or Mask (masks are sampled nearest and filled with background 0)."""
    fill = 0 if isinstance(inpt, tv_tensors.Mask) else _FILL
    if op.name == "Rotate":
        return F.rotate(inpt, op.level, fill=fill)
    if op.name not in GEOMETRIC_OPS:
        raise KeyError(f"{op.name!r} is not a geometric op; valid: {list(GEOMETRIC_OPS)}")
    shear, translate = [0.0, 0.0], [0.0, 0.0]
    axis = 0 if op.name.endswith("X") or op.name == "TranslateXRel" else 1
    (shear if op.name.startswith("Shear") else translate)[axis] = op.level
    return F.affine(inpt, angle=0.0, translate=translate, scale=1.0, shear=shear, fill=fill)


def apply_colour_op(image: torch.Tensor, op: Op) -> torch.Tensor:
    """Apply one colour op to a uint8 image."""
    name, level = op.name, op.level
    if name == "AutoContrast":
        return F.autocontrast(image)
    if name == "Equalize":
        return F.equalize(image)
    if name == "Invert":
        return F.invert(image)
    if name == "Posterize":
        return F.posterize(image, int(level)) if level < 8 else image
    if name == "Solarize":
        return F.solarize(image, float(level)) if level < 256 else image
    if name == "SolarizeAdd":
        plain = image.as_subclass(torch.Tensor)
        raised = (plain.to(torch.int16) + int(level)).clamp(0, 255).to(torch.uint8)
        return tv_tensors.Image(torch.where(plain < 128, raised, plain))
    if name == "Color":
        return F.adjust_saturation(image, level)
    if name == "Contrast":
        return F.adjust_contrast(image, level)
    if name == "Brightness":
        return F.adjust_brightness(image, level)
    if name == "Sharpness":
        return F.adjust_sharpness(image, level)
    raise KeyError(f"unknown colour op {name!r}; valid: {list(COLOUR_OPS)}")


# ---------------------------------------------------------------------------------------------------------------
# Crop box and erasing, drawn from a generator


def sample_crop_box(
    size: tuple[int, int],
    scale: tuple[float, float],
    ratio: tuple[float, float],
    gen: torch.Generator | None,
) -> tuple[int, int, int, int]:
    """A RandomResizedCrop box ``(top, left, height, width)``.

    Area fraction in ``scale``, log-uniform aspect in ``ratio``; after 10 misses, the largest centred box with an
    aspect inside ``ratio``.
    """
    height, width = size
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * (scale[0] + (scale[1] - scale[0]) * _rand(gen))
        aspect = math.exp(log_lo + (log_hi - log_lo) * _rand(gen))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (), generator=gen))
            left = int(torch.randint(0, width - w + 1, (), generator=gen))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def sample_erase_box(
    size: tuple[int, int],
    prob: float,
    area: tuple[float, float],
    log_aspect: tuple[float, float],
    gen: torch.Generator | None,
) -> tuple[int, int, int, int] | None:
    """A random-erasing box ``(top, left, h, w)`` with probability ``prob`` (10 tries), else None."""
    if prob <= 0 or _rand(gen) >= prob:
        return None
    height, width = size
    for _ in range(10):
        target = height * width * (area[0] + (area[1] - area[0]) * _rand(gen))
        aspect = math.exp(log_aspect[0] + (log_aspect[1] - log_aspect[0]) * _rand(gen))
        h, w = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < h < height and 0 < w < width:
            top = int(torch.randint(0, height - h + 1, (), generator=gen))
            left = int(torch.randint(0, width - w + 1, (), generator=gen))
            return top, left, h, w
    return None


def view_affine(params: Mapping[str, Any], src_size: tuple[int, int], img_size: int) -> torch.Tensor:
    """The (2, 3) affine ``theta`` of a view's geometry, in ``torch.nn.functional.affine_grid`` convention.

    ``theta`` maps a point of the ``img_size`` view in normalised coordinates (``[-1, 1]``, ``align_corners=False``)
    to the point of the ``src_size`` source image it was sampled from, in the same convention, so
    ``grid_sample(source_map, affine_grid(theta, (1, C, h, w)))`` cuts any map laid over the source image (e.g. a
    token-label map) as ``ViewTransform.transform`` cut the image: crop box, flip and the geometric RandAugment
    ops, composed in pixel coordinates centred on the view, exactly as torchvision's ``affine`` / ``rotate`` invert
    them.

    Args:
        params: ``ViewTransform.make_params`` output (``box``, ``flip``, ``geometric``).
        src_size: ``(height, width)`` of the source image.
        img_size: side of the view.
    """
    from torchvision.transforms.functional import _get_inverse_affine_matrix

    top, left, height, width = params["box"]
    src_h, src_w = src_size
    half = img_size / 2
    # view-normalised -> view pixels centred on the view centre
    m = torch.tensor([[half, 0.0, 0.0], [0.0, half, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    for op in reversed(list(params.get("geometric", ()))):
        if op.name == "Rotate":
            inv = _get_inverse_affine_matrix([0.0, 0.0], -op.level, [0.0, 0.0], 1.0, [0.0, 0.0])
        else:
            shear, translate = [0.0, 0.0], [0.0, 0.0]
            axis = 0 if op.name.endswith("X") or op.name == "TranslateXRel" else 1
            (shear if op.name.startswith("Shear") else translate)[axis] = op.level
            inv = _get_inverse_affine_matrix([0.0, 0.0], 0.0, translate, 1.0, shear)
        step = torch.tensor([inv[:3], inv[3:], [0.0, 0.0, 1.0]], dtype=torch.float64)
        m = step @ m  # output of op -> input of op, both centred on the view
    if params.get("flip"):
        m = torch.diag(torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64)) @ m
    # centred view pixels -> source pixels -> source-normalised
    crop = torch.tensor(
        [[width / img_size, 0.0, left + width / 2], [0.0, height / img_size, top + height / 2], [0.0, 0.0, 1.0]],
        dtype=torch.float64,
    )
    norm = torch.tensor([[2 / src_w, 0.0, -1.0], [0.0, 2 / src_h, -1.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    return (norm @ crop @ m)[:2].float()


# ---------------------------------------------------------------------------------------------------------------
# Transforms


def _as_sample(inpt: Any) -> dict[str, Any]:
    if isinstance(inpt, dict):
        return dict(inpt)
    if isinstance(inpt, torch.Tensor) and not isinstance(inpt, tv_tensors.Image):
        return {"image": tv_tensors.Image(inpt)}
    if isinstance(inpt, torch.Tensor):
        return {"image": inpt}
    return {"image": F.to_image(inpt)}


def _image_size(image: torch.Tensor) -> tuple[int, int]:
    height, width = F.get_size(image)
    return int(height), int(width)


INTERPOLATIONS = {
    "bilinear": v2.InterpolationMode.BILINEAR,
    "bicubic": v2.InterpolationMode.BICUBIC,
    "nearest": v2.InterpolationMode.NEAREST,
}
#: Evaluation preprocessing keys stored in every exported ``model.json`` (``eval_transform_from_meta`` reads them).
EVAL_META_KEYS = ("img_size", "mean", "std", "crop_pct", "interpolation")
#: Published FAN / STL evaluation (NVlabs/FAN and NVlabs/STL ``_cfg``, timm ``resolve_data_config``): resize the short
#: side to ``floor(224 / 1.0) = 224`` bicubic, centre-crop 224. Used when neither the export nor the model cfg says.
DEFAULT_CROP_PCT = 1.0
DEFAULT_INTERPOLATION = "bicubic"


class EvalTransform(v2.Transform):
    """Resize the short side to ``floor(img_size / crop_pct)``, centre-crop ``img_size``, scale to [0, 1], normalise.

    The one evaluation preprocessing of tokenlab: training validation, ``eval``, ``tokens``, ``eval-ssl`` and
    segmentation all build it, from the exported model's metadata through ``eval_transform_from_meta``.

    Args:
        img_size: Output side.
        crop_pct: Centre-crop fraction; None: the model's default cfg (``model``), else ``DEFAULT_CROP_PCT``.
        mean, std: Normalisation; None: the model's default cfg, else the ImageNet values.
        interpolation: ``bilinear | bicubic | nearest``; None: the model's default cfg, else
            ``DEFAULT_INTERPOLATION``.
        model: timm name whose default cfg (``timm.models.get_pretrained_cfg``) fills the values left None, as
            timm's ``resolve_data_config`` does (every tokenlab FAN: bicubic, crop_pct 1.0, the published values).
    """

    def __init__(
        self,
        img_size: int,
        crop_pct: float | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        interpolation: str | None = None,
        model: str | None = None,
    ) -> None:
        super().__init__()
        cfg = model_eval_defaults(model)
        crop_pct = float(crop_pct if crop_pct is not None else cfg.get("crop_pct", DEFAULT_CROP_PCT))
        interpolation = interpolation if interpolation is not None else cfg.get("interpolation", DEFAULT_INTERPOLATION)
        mean = mean if mean is not None else cfg.get("mean", IMAGENET_DEFAULT_MEAN)
        std = std if std is not None else cfg.get("std", IMAGENET_DEFAULT_STD)
        if not 0 < crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"unknown interpolation {interpolation!r}; valid: {', '.join(INTERPOLATIONS)}")
        self.img_size, self.crop_pct, self.interpolation = img_size, crop_pct, str(interpolation)
        self.mean, self.std = [float(v) for v in mean], [float(v) for v in std]
        self.pipeline = v2.Compose(
            [
                v2.Resize(math.floor(img_size / crop_pct), interpolation=INTERPOLATIONS[interpolation], antialias=True),
                v2.CenterCrop(img_size),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(self.mean, self.std),
            ]
        )

    def forward(self, inpt: Any) -> dict[str, Any]:
        """Preprocess one sample (an image or a sample dict) into a sample dict."""
        return self.pipeline(_as_sample(inpt))

    def meta(self) -> dict[str, Any]:
        """The ``EVAL_META_KEYS`` that rebuild this transform (written into an exported ``model.json``)."""
        return {
            "img_size": self.img_size,
            "mean": self.mean,
            "std": self.std,
            "crop_pct": self.crop_pct,
            "interpolation": self.interpolation,
        }


def model_eval_defaults(model: str | None) -> dict[str, Any]:
    """``crop_pct``, ``interpolation``, ``mean``, ``std`` of a registered model's default cfg (empty if unknown)."""
    if not model:
        return {}
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(str(model))
    if cfg is None:
        return {}
    return {k: getattr(cfg, k) for k in ("crop_pct", "interpolation", "mean", "std") if getattr(cfg, k, None)}


def eval_transform_from_meta(meta: Mapping[str, Any], img_size: int | None = None) -> EvalTransform:
    """The evaluation transform an exported model was trained for (``EVAL_META_KEYS`` of its ``model.json``).

    Keys missing from ``meta`` (older exports stored only size, mean and std; converted published checkpoints hold
    their model's cfg values) fall back to the default cfg of ``meta["model"]`` and then to the published FAN
    values (``DEFAULT_CROP_PCT``, ``DEFAULT_INTERPOLATION``), so the model cfg and evaluation agree.

    Args:
        meta: An exported model's metadata.
        img_size: Override of the stored input size (e.g. to evaluate at another resolution).

    Raises:
        ValueError: no input size in ``meta`` and none given.
    """
    size = img_size if img_size is not None else meta.get("img_size")
    if size is None:
        raise ValueError("the exported model's metadata has no img_size; pass one")
    kwargs = {k: meta.get(k) for k in ("mean", "std", "crop_pct", "interpolation")}
    return EvalTransform(int(size), model=meta.get("model"), **kwargs)


class ViewTransform(v2.Transform):
    """Single-view training augmentation, or paired STL teacher/student views when ``teacher`` is set.

    ``make_params`` draws every random choice once; ``transform(inpt, params)`` applies the shared geometry (crop,
    flip, geometric RandAugment ops) to an Image or Mask. ``forward`` builds the outputs: ``image`` (student),
    ``teacher_image`` (when ``teacher`` is set) and ``mask`` following the student's geometry.

    Args:
        img_size: output side.
        scale: random-resized-crop area range.
        ratio: random-resized-crop aspect range.
        hflip: horizontal flip probability.
        rand_augment: timm-style RandAugment string (``rand-m9-mstd0.5-inc1``) or None.
        color_jitter: ColorJitter strength for brightness/contrast/saturation on the student (None: off).
        re_prob: random-erasing probability on the student (timm's per-pixel N(0, 1) fill).
        noise_std: std of Gaussian noise added to the normalised student image.
        teacher: None (single view), ``"none"``, ``"spatial"``, ``"full"`` or ``"geometry"`` (``view_theta``, no
            teacher image: see ``view_affine``).
        crop_pct: centre-crop fraction of the ``teacher="none"`` view.
        mean: normalisation mean.
        std: normalisation std.
        colour: False turns every student-only op (colour ops, jitter, erasing, noise) off.
        generator: randomness source; None uses torch's default generator (seeded per sample by the loader).
        crops: given crops instead of random ones: ``crops(sample["index"], (H, W))`` lists ``(box, flip)`` pairs and
            each call takes one at random, returned as ``given_crop`` (its position in the list; ``scale``, ``ratio``
            and ``hflip`` are then unused); a label store's random-crop views
            (``tokenlab.data.label_store.StoredCrops``) train a student on the labeler's crops.

    Raises:
        ValueError: on an unknown teacher mode, bad ranges or probabilities.
    """

    def __init__(
        self,
        img_size: int,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        rand_augment: str | None = "rand-m9-mstd0.5-inc1",
        color_jitter: float | None = None,
        re_prob: float = 0.25,
        noise_std: float = 0.0,
        teacher: str | None = None,
        crop_pct: float = 1.0,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
        colour: bool = True,
        generator: torch.Generator | None = None,
        crops: Callable[[int, tuple[int, int]], Sequence[tuple[tuple[int, int, int, int], bool]]] | None = None,
    ) -> None:
        super().__init__()
        if teacher is not None and teacher not in TEACHER_MODES:
            raise ValueError(f"unknown teacher mode {teacher!r}; valid: {list(TEACHER_MODES)} or None")
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < lo <= hi <= 1, got {scale}")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < lo <= hi, got {ratio}")
        for name, prob in (("hflip", hflip), ("re_prob", re_prob)):
            if not 0 <= prob <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {prob}")
        self.img_size = img_size
        self.scale, self.ratio, self.hflip = scale, ratio, hflip
        self.rand_augment = RandAugmentSpec.parse(rand_augment) if rand_augment else None
        self.color_jitter = color_jitter
        self.re_prob, self.noise_std = re_prob, noise_std
        self.teacher = teacher
        self.mean = torch.tensor(list(mean)).view(3, 1, 1)
        self.std = torch.tensor(list(std)).view(3, 1, 1)
        self.colour = colour
        self.generator = generator
        self.crops = crops
        self.centre = EvalTransform(img_size, crop_pct, mean, std) if teacher == "none" else None

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        """Draw this call's random parameters (the torchvision v2 hook)."""
        gen = self.generator
        image = next(x for x in flat_inputs if isinstance(x, tv_tensors.Image))
        box = sample_crop_box(_image_size(image), self.scale, self.ratio, gen)
        flip = _rand(gen) < self.hflip
        size = (self.img_size, self.img_size)
        ops = sample_rand_augment(self.rand_augment, size, gen) if self.rand_augment else []
        jitter = None
        if self.color_jitter:
            jitter = [1 + self.color_jitter * (2 * _rand(gen) - 1) for _ in range(3)]
        erase = sample_erase_box(size, self.re_prob, (0.02, 1 / 3), (math.log(0.3), math.log(1 / 0.3)), gen)
        seed = int(torch.randint(0, 2**62, (), generator=gen))  # erasing fill and noise
        return {
            "box": box,
            "flip": flip,
            "geometric": [op for op in ops if op.name in GEOMETRIC_OPS],
            "colour": [op for op in ops if op.name not in GEOMETRIC_OPS],
            "jitter": jitter,
            "erase": erase,
            "seed": seed,
        }

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        """The shared geometry: crop box, flip, geometric RandAugment ops; any other input passes through."""
        if not isinstance(inpt, (tv_tensors.Image, tv_tensors.Mask)):
            return inpt
        top, left, height, width = params["box"]
        out = F.resized_crop(inpt, top, left, height, width, [self.img_size, self.img_size], antialias=True)
        if params["flip"]:
            out = F.horizontal_flip(out)
        for op in params["geometric"]:
            out = apply_geometric_op(out, op)
        return out

    def _normalise(self, image: torch.Tensor) -> torch.Tensor:
        return (image.as_subclass(torch.Tensor).float() / 255 - self.mean) / self.std

    def _student(self, image: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
        if self.colour:
            for op in params["colour"]:
                image = apply_colour_op(image, op)
            if params["jitter"] is not None:
                brightness, contrast, saturation = params["jitter"]
                image = F.adjust_saturation(
                    F.adjust_contrast(F.adjust_brightness(image, brightness), contrast), saturation
                )
        out = self._normalise(image)
        if self.colour and (params["erase"] is not None or self.noise_std > 0):
            noise_gen = torch.Generator().manual_seed(params["seed"])
            if params["erase"] is not None:
                top, left, h, w = params["erase"]
                out[:, top : top + h, left : left + w] = torch.randn(3, h, w, generator=noise_gen)
            if self.noise_std > 0:
                out = out + self.noise_std * torch.randn(out.shape, generator=noise_gen)
        return out

    def forward(self, inpt: Any) -> dict[str, Any]:
        """The sample with this view applied (one random crop box shared by image and mask)."""
        sample = _as_sample(inpt)
        flat = [sample["image"]] + ([sample["mask"]] if "mask" in sample else [])
        params = self.make_params(flat)
        if self.crops is not None:
            if "index" not in sample:
                raise KeyError(f"ViewTransform(crops=...) needs sample['index']; the sample has {sorted(sample)}")
            given = self.crops(int(sample["index"]), _image_size(sample["image"]))
            chosen = min(int(_rand(self.generator) * len(given)), len(given) - 1)
            params["box"], params["flip"] = given[chosen]
        geometric = self.transform(sample["image"], params)
        out = dict(sample)
        if self.crops is not None:
            out["given_crop"] = chosen
        if "mask" in sample:
            out["mask"] = self.transform(sample["mask"], params)
        out["image"] = self._student(geometric, params)
        if self.teacher == "spatial":
            out["teacher_image"] = self._normalise(geometric)
        elif self.teacher == "full":
            out["teacher_image"] = out["image"].clone()
        elif self.teacher == "geometry":
            out["view_theta"] = view_affine(params, _image_size(sample["image"]), self.img_size)
        elif self.teacher == "none":
            assert self.centre is not None
            out["teacher_image"] = self.centre({"image": sample["image"]})["image"]
        return out


class MultiCropTransform(v2.Transform):
    """iBOT multi-crop: 2 global + ``num_local`` local crops, and a block mask per global crop.

    Each view is its own v2 pipeline (a list of per-view transforms): random-resized crop, flip, colour jitter
    (p ``jitter_prob``; brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1), grayscale (p ``gray_prob``), Gaussian
    blur (global 1: ``blur_probs[0]``, global 2: ``blur_probs[1]``, locals: ``blur_probs[2]``), solarize on global 2.

    Args:
        global_size: side of the global crops.
        local_size: side of the local crops.
        num_local: local crops per image (0 allowed).
        global_scale: area range of global crops.
        local_scale: area range of local crops.
        blur_probs: blur probability for global 1, global 2 and the locals.
        solarize_prob: solarize probability on global 2.
        jitter_prob: colour-jitter probability.
        gray_prob: grayscale probability.
        blur_sigma: blur sigma range; None scales iBOT's (0.1, 2.0) at 224 px to ``global_size``.
        mask_generator: block mask generator for the global crops' token grid, or None for no masks.
        mean: normalisation mean.
        std: normalisation std.
    """

    def __init__(
        self,
        global_size: int = 224,
        local_size: int = 96,
        num_local: int = 10,
        global_scale: tuple[float, float] = (0.25, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.25),
        blur_probs: tuple[float, float, float] = (1.0, 0.1, 0.5),
        solarize_prob: float = 0.2,
        jitter_prob: float = 0.8,
        gray_prob: float = 0.2,
        blur_sigma: tuple[float, float] | None = None,
        mask_generator: BlockMaskGenerator | None = None,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
    ) -> None:
        super().__init__()
        if num_local < 0:
            raise ValueError(f"num_local must be >= 0, got {num_local}")
        sigma = blur_sigma or (0.1, max(0.1, 2.0 * global_size / 224))
        self.global_views = [
            self._view(global_size, global_scale, blur_probs[0], 0.0, jitter_prob, gray_prob, sigma, mean, std),
            self._view(
                global_size, global_scale, blur_probs[1], solarize_prob, jitter_prob, gray_prob, sigma, mean, std
            ),
        ]
        self.local_view = self._view(
            local_size, local_scale, blur_probs[2], 0.0, jitter_prob, gray_prob, sigma, mean, std
        )
        self.num_local = num_local
        self.mask_generator = mask_generator

    @staticmethod
    def _view(
        size: int,
        scale: tuple[float, float],
        blur: float,
        solarize: float,
        jitter: float,
        gray: float,
        sigma: tuple[float, float],
        mean: Sequence[float],
        std: Sequence[float],
    ) -> v2.Compose:
        kernel = 2 * max(1, round(3 * sigma[1])) + 1
        ops: list[Any] = [
            v2.RandomResizedCrop(size, scale=scale, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=jitter),
            v2.RandomGrayscale(gray),
        ]
        if blur > 0:
            ops.append(v2.RandomApply([v2.GaussianBlur(kernel, sigma=sigma)], p=blur))
        if solarize > 0:
            ops.append(v2.RandomSolarize(128, p=solarize))
        ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
        return v2.Compose(ops)

    def forward(self, inpt: Any) -> dict[str, Any]:
        """The sample with its global and local crops."""
        sample = _as_sample(inpt)
        image = sample["image"]
        crops = [view(image) for view in self.global_views] + [self.local_view(image) for _ in range(self.num_local)]
        out = {key: value for key, value in sample.items() if key not in ("image", "mask")}
        out["crops"] = crops
        if self.mask_generator is not None:
            out["masks"] = [self.mask_generator() for _ in self.global_views]
        return out


def _round_to(value: float, multiple: int) -> int:
    return max(multiple, int(round(value / multiple)) * multiple)


def collate_for(kind: str) -> Callable[[Any], Any]:
    """The batch collate of a data view: a list collate for ``detection`` (targets differ in size), else torch's."""
    if kind == "detection":
        from tokenlab.data.detection import detection_collate

        return detection_collate
    return default_collate


def build_transforms(kind: str, img_size: int, **kwargs: Any) -> Any:
    """Build a sample transform for a data view (the vocabulary of ``Method.data_view``).

    Args:
        kind: ``eval``, ``classification`` (single view), ``stl_paired`` (teacher/student; ``teacher=``
            none/spatial/full/geometry, default spatial; ``crops_from=`` a label store whose random-crop views are
            the student's crops, see ``label_store.StoredCrops``), ``multicrop`` (iBOT; ``patch_size=`` sets the
            mask grid, ``mask_ratio=(a, b)``, ``mask_prob``, ``min_block``; ``local_size`` defaults to ``96/224`` of
            ``img_size`` rounded to the patch) or ``segmentation`` (joint image + mask; ``train=`` True/False, see
            ``data.segmentation.build_segmentation_transforms``) or ``detection`` (image + boxes + masks, ``train=``,
            ``hflip=``; ``data.detection.build_detection_transforms``). The old names ``train``, ``stl_pair`` and
            ``ibot`` are accepted for ``classification``, ``stl_paired`` and ``multicrop``.
        img_size: output side (global crop side for ``multicrop``, training crop for ``segmentation``).
        **kwargs: passed to ``EvalTransform``, ``ViewTransform``, ``MultiCropTransform`` or the segmentation
            transform.

    Raises:
        ValueError: on an unknown kind (naming the valid ones) or bad arguments.
    """
    if kind == "eval":
        return EvalTransform(img_size, **kwargs)
    if kind == "classification":
        if kwargs.get("teacher") is not None:
            raise ValueError("view 'classification' is single-view; use view 'stl_paired' for teacher views")
        return ViewTransform(img_size, **kwargs)
    if kind == "stl_paired":
        kwargs.setdefault("teacher", "spatial")
        if kwargs["teacher"] is None:
            raise ValueError(f"view 'stl_paired' needs a teacher mode in {list(TEACHER_MODES)}")
        crops_from = kwargs.pop("crops_from", None)
        if crops_from is not None:
            from tokenlab.data.label_store import StoredCrops

            kwargs["crops"] = StoredCrops(crops_from)
            logger.info("student crops: the %d random-crop views of label store %s per image (area %s, flip p 0.5); "
                        "the data.transform scale/ratio/hflip are not used", kwargs["crops"].count, crops_from,
                        kwargs["crops"].scale)  # fmt: skip
        return ViewTransform(img_size, **kwargs)
    if kind == "multicrop":
        patch_size = kwargs.pop("patch_size", 16)
        ratio = kwargs.pop("mask_ratio", (0.1, 0.5))
        mask_prob = kwargs.pop("mask_prob", 1.0)
        min_block = kwargs.pop("min_block", None)
        shape = kwargs.pop("mask_shape", "block")  # block | rand (data.masking.MASK_SHAPES)
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        kwargs.setdefault("local_size", _round_to(img_size * 96 / 224, patch_size))
        grid = img_size // patch_size
        kwargs.setdefault("mask_generator", build_mask_generator(shape, grid, ratio, mask_prob, min_block))
        return MultiCropTransform(global_size=img_size, **kwargs)
    if kind == "segmentation":
        from tokenlab.data.segmentation import build_segmentation_transforms

        return build_segmentation_transforms(kwargs.pop("train", True), img_size, **kwargs)
    if kind == "detection":
        from tokenlab.data.detection import build_detection_transforms

        return build_detection_transforms(kwargs.pop("train", True), img_size, **kwargs)
    raise ValueError(f"unknown transform kind {kind!r}; valid: {list(TRANSFORM_KINDS)}")
