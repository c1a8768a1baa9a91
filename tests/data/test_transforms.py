"""Transforms: paired STL views share geometry, masks follow crops, iBOT crops."""

from pathlib import Path

import pytest
import torch
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import tv_tensors

from tokenlab.data.datasets import build_dataset
from tokenlab.data.transforms import (
    RandAugmentSpec,
    ViewTransform,
    build_transforms,
)

MEAN = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)


def _to_uint8_scale(x: torch.Tensor) -> torch.Tensor:
    return (x * STD + MEAN) * 255


def _coordinate_sample(size: int = 64) -> dict:
    # R encodes x, G encodes y (4 levels per pixel); the mask encodes the same coordinates exactly
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    image = torch.stack([xs * 4, ys * 4, torch.full_like(xs, 128)]).to(torch.uint8)
    return {"image": tv_tensors.Image(image), "mask": tv_tensors.Mask(ys * size + xs + 1), "label": 0, "index": 0}


def _strong(teacher: str, colour: bool, seed: int) -> ViewTransform:
    return ViewTransform(
        64,
        scale=(0.3, 1.0),
        rand_augment="rand-m9-n3-mstd0.5-p1.0-inc1",
        re_prob=0.5,
        noise_std=0.1,
        color_jitter=0.4,
        teacher=teacher,
        colour=colour,
        generator=torch.Generator().manual_seed(seed),
    )


@pytest.mark.parametrize("seed", range(6))
def test_colour_off_teacher_and_student_pixel_identical(seed: int) -> None:
    out = _strong("spatial", colour=False, seed=seed)(_coordinate_sample())
    assert torch.equal(out["image"], out["teacher_image"])


@pytest.mark.parametrize("seed", range(6))
def test_colour_on_geometry_still_agrees(seed: int) -> None:
    sample = _coordinate_sample()
    on = _strong("spatial", colour=True, seed=seed)(sample)
    off = _strong("spatial", colour=False, seed=seed)(sample)
    # same draw: the teacher (geometry only) and the mask do not depend on the colour ops
    assert torch.equal(on["teacher_image"], off["teacher_image"]) and torch.equal(on["mask"], off["mask"])
    # the teacher's coordinate colours agree with the mask's exact coordinates (nearest vs bilinear: <= ~1 px)
    mask = on["mask"].as_subclass(torch.Tensor)
    inside = mask > 0
    x_mask, y_mask = (mask - 1) % 64, (mask - 1) // 64
    rgb = _to_uint8_scale(on["teacher_image"])
    x_img, y_img = rgb[0] / 4, rgb[1] / 4
    assert inside.float().mean() > 0.1
    assert (x_img - x_mask).abs()[inside].median() < 1.0 and (y_img - y_mask).abs()[inside].median() < 1.0


def test_masks_follow_the_crop(synth_dir: Path) -> None:
    ds = build_dataset(synth_dir, "train", None, verify="none")
    transform = ViewTransform(
        48, scale=(0.2, 1.0), teacher="spatial", colour=False, generator=torch.Generator().manual_seed(0)
    )
    for index in range(10):
        raw = ds.raw(index)
        raw_image = raw["image"].as_subclass(torch.Tensor).float()
        raw_mask = raw["mask"].as_subclass(torch.Tensor)
        object_colour = raw_image[:, raw_mask > 0].mean(1)
        out = transform(raw)
        view, mask = _to_uint8_scale(out["teacher_image"]), out["mask"]
        assert mask.shape == (48, 48)
        if (mask > 0).sum() < 20:
            continue
        # pixels labelled object in the transformed mask carry the object's colours
        dist_obj = (view[:, mask > 0] - object_colour[:, None]).abs().mean()
        dist_bg = (view[:, mask == 0] - object_colour[:, None]).abs().mean()
        assert dist_obj < dist_bg


def test_teacher_modes() -> None:
    sample = _coordinate_sample()
    full = _strong("full", colour=True, seed=0)(sample)
    assert torch.equal(full["image"], full["teacher_image"])
    none = _strong("none", colour=True, seed=0)(sample)
    centre = build_transforms("eval", 64)(sample)["image"]
    assert torch.equal(none["teacher_image"], centre)
    single = build_transforms("classification", 64)(sample)
    assert "teacher_image" not in single and single["image"].shape == (3, 64, 64)
    with pytest.raises(ValueError, match="unknown teacher mode 'half'"):
        build_transforms("stl_paired", 64, teacher="half")
    with pytest.raises(ValueError, match="unknown transform kind 'weird'.*stl_pair"):
        build_transforms("weird", 64)


def test_rand_augment_strings() -> None:
    spec = RandAugmentSpec.parse("rand-m9-mstd0.5-inc1")
    assert (spec.magnitude, spec.num_ops, spec.magnitude_std, spec.increasing) == (9, 2, 0.5, True)
    assert RandAugmentSpec.parse("rand-n3-m5").num_ops == 3
    with pytest.raises(ValueError, match="unknown RandAugment key"):
        RandAugmentSpec.parse("rand-m9-zz1")
    with pytest.raises(ValueError, match="must start with 'rand'"):
        RandAugmentSpec.parse("augmix-m5")


def test_ibot_multicrop_shapes_and_masks() -> None:
    transform = build_transforms("multicrop", 64, patch_size=8, num_local=3, mask_ratio=(0.2, 0.4))
    out = transform(_coordinate_sample())
    assert [tuple(c.shape) for c in out["crops"]] == [(3, 64, 64)] * 2 + [(3, 24, 24)] * 3
    assert len(out["masks"]) == 2 and all(m.shape == (8, 8) and m.dtype == torch.bool for m in out["masks"])
    assert all(m.float().mean() <= 0.4 for m in out["masks"])
    assert "mask" not in out and out["label"] == 0
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        build_transforms("multicrop", 60, patch_size=8)
