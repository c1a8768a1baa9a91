"""Segmentation data: joint transforms keep image and mask aligned, layouts, and bad-input errors."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from tokenlab.data.images import denormalize
from tokenlab.data.segmentation import (
    SegmentationDataset,
    SegmentationTransform,
    build_segmentation_dataset,
    cityscapes_pairs,
    folder_pairs,
)

IGNORE = 255
S = 64
BLOCK = 16


def _coordinate_pair() -> tuple[torch.Tensor, torch.Tensor]:
    """Image whose R/G channels encode the pixel's x/y (4 * c + 2, never 0) and a mask of 16 x 16 blocks."""
    y, x = torch.meshgrid(torch.arange(S), torch.arange(S), indexing="ij")
    image = torch.stack([4 * x + 2, 4 * y + 2, torch.full_like(x, 128)]).to(torch.uint8)
    mask = (x // BLOCK + (S // BLOCK) * (y // BLOCK)).to(torch.uint8)
    return image, mask


def _agreement(image: torch.Tensor, mask: torch.Tensor, tf: SegmentationTransform) -> tuple[float, float]:
    """Fraction of labelled pixels whose decoded source coordinate falls in the block their label names,
    and the fraction of padded image pixels (decoded value ~0) that carry the ignore label."""
    raw = torch.from_numpy(denormalize(image, tf.mean, tf.std)).long()  # (H, W, 3)
    # The B channel is 128 inside the source image and 0 in padding; pixels in between straddle the border.
    pad, inside = raw[..., 2] < 8, raw[..., 2] > 120
    sx = ((raw[..., 0] - 2).float() / 4).round().clamp(0, S - 1).long()
    sy = ((raw[..., 1] - 2).float() / 4).round().clamp(0, S - 1).long()
    expected = sx // BLOCK + (S // BLOCK) * (sy // BLOCK)
    labelled = (mask != IGNORE) & inside
    agree = (expected[labelled] == mask[labelled]).float().mean().item()
    pad_ignored = (mask[pad] == IGNORE).float().mean().item() if pad.any() else 1.0
    return agree, pad_ignored


AUGMENTATIONS = {
    "scale_jitter": dict(scale_range=(0.5, 2.0), hflip=0.0),
    "crop_with_padding": dict(crop_size=96, scale_range=(1.0, 1.0), hflip=0.0),
    "hflip": dict(scale_range=(1.0, 1.0), hflip=1.0),
    "rotation": dict(scale_range=(1.0, 1.0), hflip=0.0, rotate_degrees=40.0),
    "everything": dict(crop_size=48, scale_range=(0.6, 1.8), hflip=0.5, rotate_degrees=30.0),
}


@pytest.mark.parametrize("name", list(AUGMENTATIONS))
def test_image_and_mask_stay_aligned(name: str) -> None:
    image, mask = _coordinate_pair()
    kwargs = dict(crop_size=S, color_jitter=0.0, ignore_index=IGNORE) | AUGMENTATIONS[name]
    tf = SegmentationTransform(train=True, **kwargs)
    for seed in range(4):
        out_img, out_mask = tf(image, mask, torch.Generator().manual_seed(seed))
        assert out_img.dtype == torch.float32 and out_mask.dtype == torch.int64
        assert out_img.shape[-2:] == out_mask.shape == tf.crop_size
        agree, pad_ignored = _agreement(out_img, out_mask, tf)
        # Only pixels on block borders may disagree (bilinear image vs nearest mask resampling).
        assert agree > 0.9, (name, seed, agree)
        assert pad_ignored > 0.95, (name, seed, pad_ignored)
        # The check is meaningful: the same mask mirrored no longer matches the image.
        if (out_mask != IGNORE).float().mean() > 0.5:
            assert _agreement(out_img, out_mask.flip(-1), tf)[0] < 0.6


def test_colour_jitter_touches_only_the_image_and_draws_are_reproducible() -> None:
    image, mask = _coordinate_pair()
    plain = SegmentationTransform(S, color_jitter=0.0, rotate_degrees=20.0)
    jitter = SegmentationTransform(S, color_jitter=0.8, rotate_degrees=20.0)
    a_img, a_mask = plain(image, mask, torch.Generator().manual_seed(3))
    b_img, b_mask = jitter(image, mask, torch.Generator().manual_seed(3))
    torch.testing.assert_close(a_mask, b_mask)  # same spatial draw, mask untouched by colour ops
    assert not torch.allclose(a_img, b_img)
    c_img, c_mask = jitter(image, mask, torch.Generator().manual_seed(3))
    torch.testing.assert_close(b_img, c_img)
    torch.testing.assert_close(b_mask, c_mask)
    state = torch.random.get_rng_state()
    jitter(image, mask, torch.Generator().manual_seed(4))
    assert torch.equal(state, torch.random.get_rng_state())  # the caller's global RNG is not consumed


def test_eval_transform_is_identity_on_geometry() -> None:
    image, mask = _coordinate_pair()
    tf = SegmentationTransform(train=False)
    out_img, out_mask = tf(image, mask)
    torch.testing.assert_close(out_mask, mask.long())
    assert np.array_equal(denormalize(out_img, tf.mean, tf.std), image.permute(1, 2, 0).numpy())


def test_scale_jitter_is_relative_to_the_base_size() -> None:
    # mmsegmentation's Resize(img_scale=(2048, 1024), ratio_range=(0.5, 2.0)) scales a Cityscapes image by the drawn
    # ratio itself; with the crop as the base, the same ratio would shrink it to fit one crop first.
    image, mask = _coordinate_pair()
    native = SegmentationTransform(crop_size=32, scale_range=(1.0, 1.0), hflip=0.0, color_jitter=0.0, base_size=S)
    fitted = SegmentationTransform(crop_size=32, scale_range=(1.0, 1.0), hflip=0.0, color_jitter=0.0)
    for tf, step in ((native, 1.0), (fitted, 2.0)):
        out, _ = tf(image, mask, generator=torch.Generator().manual_seed(0))
        x = (torch.from_numpy(denormalize(out, tf.mean, tf.std)).float()[..., 0] - 2) / 4  # source column
        assert abs(float(x[:, 1:].sub(x[:, :-1]).mean()) - step) < 0.1
    with pytest.raises(ValueError, match="base_size must be a positive int"):
        SegmentationTransform(base_size=(1024, 0))


def test_cat_max_ratio_redraws_crops_one_class_dominates() -> None:
    # Left half class 0, right half class 1; a 32-wide crop of the 64-wide image is balanced (largest class < 75 %)
    # only when its left edge lies in 9..23 (15 of 33 offsets): mmsegmentation's cat_max_ratio=0.75 redraws up to 10x.
    image = torch.zeros(3, S, S, dtype=torch.uint8)
    mask = torch.zeros(S, S, dtype=torch.uint8)
    mask[:, S // 2 :] = 1
    mask[:4] = IGNORE  # ignored pixels do not count

    def balanced_share(ratio: float) -> float:
        tf = SegmentationTransform(crop_size=32, scale_range=(1.0, 1.0), hflip=0.0, color_jitter=0.0, base_size=S,
                                   cat_max_ratio=ratio)  # fmt: skip
        ok = 0
        for seed in range(60):
            _, out = tf(image, mask, generator=torch.Generator().manual_seed(seed))
            counts = torch.bincount(out[out != IGNORE].flatten(), minlength=2)
            ok += int(counts.max() / counts.sum() < 0.75)
        return ok / 60

    assert balanced_share(1.0) < 0.7 and balanced_share(0.75) > 0.95
    with pytest.raises(ValueError, match="cat_max_ratio must be in"):
        SegmentationTransform(cat_max_ratio=0.0)


def test_padding_with_the_mean_colour_normalises_to_zero() -> None:
    image, mask = _coordinate_pair()
    tf = SegmentationTransform(crop_size=96, scale_range=(1.0, 1.0), hflip=0.0, color_jitter=0.0, base_size=S,
                               image_fill=[124, 116, 104])  # fmt: skip
    out, out_mask = tf(image, mask, generator=torch.Generator().manual_seed(0))
    padded = out_mask == IGNORE
    assert padded.float().mean() > 0.5  # 64 px image in a 96 px crop
    assert out[:, padded].abs().max() < 0.01  # the mean colour: ~0 after normalisation, as mmseg's Pad after Normalize
    with pytest.raises(ValueError, match="image_fill must be one value or one per channel"):
        SegmentationTransform(image_fill=[1, 2])


def test_bad_transform_arguments() -> None:
    with pytest.raises(ValueError, match="scale_range must satisfy"):
        SegmentationTransform(scale_range=(2.0, 1.0))
    with pytest.raises(ValueError, match="crop_size must be a positive int"):
        SegmentationTransform(crop_size=0)


def _write(path, array) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_folder_layout_and_bad_files(tmp_path) -> None:
    img = np.zeros((8, 12, 3), np.uint8)
    _write(tmp_path / "images" / "train" / "a.jpg", img)
    _write(tmp_path / "masks" / "train" / "a.png", np.full((8, 12), 2, np.uint8))
    _write(tmp_path / "images" / "train" / "sub" / "b.png", img)
    mask_b = np.zeros((8, 12), np.uint8)
    mask_b[0, 0] = IGNORE
    _write(tmp_path / "masks" / "train" / "sub" / "b.png", mask_b)
    (tmp_path / "classes.txt").write_text("bg\nroad\ncar\n")
    ds = build_segmentation_dataset("folder", tmp_path, "train")
    assert ds.class_names == ["bg", "road", "car"] and len(ds) == 2
    assert ds.check() == 2
    sample = ds[1]
    assert sample["image"].shape == (3, 8, 12) and sample["mask"][0, 0] == IGNORE

    _write(tmp_path / "masks" / "train" / "a.png", np.full((8, 10), 1, np.uint8))
    with pytest.raises(ValueError, match=r"mask .*a\.png is 10x8 \(WxH\) but its image .*a\.jpg is 12x8"):
        ds[0]
    _write(tmp_path / "masks" / "train" / "a.png", np.full((8, 12), 7, np.uint8))
    with pytest.raises(ValueError, match=r"mask .*a\.png has label values \[7\] outside the class range \[0, 3\)"):
        ds.check()
    _write(tmp_path / "masks" / "train" / "a.png", np.zeros((8, 12, 3), np.uint8))
    with pytest.raises(ValueError, match=r"mask .*a\.png has 3 channels"):
        ds[0]
    (tmp_path / "images" / "train" / "c.png").write_bytes(b"not an image")
    with pytest.raises(FileNotFoundError, match=r"1 image\(s\) have no mask"):
        folder_pairs(tmp_path, "train")
    with pytest.raises(ValueError, match="unknown segmentation data kind 'coco'; valid: synthetic, cityscapes, folder"):
        build_segmentation_dataset("coco", tmp_path, "train")
    with pytest.raises(ValueError, match="ignore_index 1 is a valid class id"):
        SegmentationDataset(ds.pairs, ds.class_names, ignore_index=1)


def test_cityscapes_label_ids_are_mapped_to_train_ids(tmp_path) -> None:
    image = tmp_path / "leftImg8bit" / "val" / "ulm" / "ulm_000000_000019_leftImg8bit.png"
    _write(image, np.zeros((4, 4, 3), np.uint8))
    ids = np.array([[7, 8, 26, 0], [33, 1, 255, 24], [7, 7, 7, 7], [7, 7, 7, 7]], np.uint8)
    _write(tmp_path / "gtFine" / "val" / "ulm" / "ulm_000000_000019_gtFine_labelIds.png", ids)
    ps = cityscapes_pairs(tmp_path, "val")
    ds = SegmentationDataset(ps.pairs, ps.class_names, label_map=ps.label_map)
    mask = ds[0]["mask"]
    assert mask[0].tolist() == [0, 1, 13, IGNORE]  # road, sidewalk, car, unlabeled
    assert mask[1].tolist() == [18, IGNORE, IGNORE, 11]  # bicycle, ego vehicle, 255, person
    assert len(ds.class_names) == 19


def test_cityscapes_tree_with_train_ids_and_several_cities(tmp_path) -> None:
    # A tiny tree in the Cityscapes layout: leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png with
    # gtFine/<split>/<city>/..._gtFine_labelTrainIds.png (cityscapesScripts' createTrainIdLabelImgs output).
    rng = np.random.default_rng(0)
    for city, frames in (("aachen", 2), ("bremen", 1)):
        for f in range(frames):
            stem = f"{city}_000000_{f:06d}"
            _write(tmp_path / "leftImg8bit" / "train" / city / f"{stem}_leftImg8bit.png",
                   rng.integers(0, 255, (8, 16, 3), dtype=np.uint8))  # fmt: skip
            train_ids = rng.integers(0, 19, (8, 16)).astype(np.uint8)
            train_ids[0, :4] = IGNORE
            _write(tmp_path / "gtFine" / "train" / city / f"{stem}_gtFine_labelTrainIds.png", train_ids)
            _write(tmp_path / "gtFine" / "train" / city / f"{stem}_gtFine_labelIds.png", np.zeros((8, 16), np.uint8))
    ps = cityscapes_pairs(tmp_path, "train")
    assert ps.label_map is None and ps.image_root == tmp_path / "leftImg8bit" / "train"
    assert [p[0].name for p in ps.pairs] == ["aachen_000000_000000_leftImg8bit.png",
                                             "aachen_000000_000001_leftImg8bit.png",
                                             "bremen_000000_000000_leftImg8bit.png"]  # fmt: skip
    assert all(m.name.endswith("_gtFine_labelTrainIds.png") for _, m in ps.pairs)
    ds = build_segmentation_dataset("cityscapes", tmp_path, "train")
    mask = ds[2]["mask"]
    assert mask.shape == (8, 16) and (mask[0, :4] == IGNORE).all() and int(mask[1:].max()) < 19
    assert ds.check() == 3
    (tmp_path / "gtFine" / "train" / "bremen" / "bremen_000000_000000_gtFine_labelTrainIds.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"no ground truth for .*bremen_000000_000000_leftImg8bit\.png"):
        cityscapes_pairs(tmp_path, "train")
    with pytest.raises(FileNotFoundError, match=r"no Cityscapes images at .*leftImg8bit/val"):
        cityscapes_pairs(tmp_path, "val")


def test_synthetic_split(synthetic_root) -> None:
    ds = build_segmentation_dataset("synthetic", synthetic_root, "val")
    meta = json.loads((synthetic_root / "dataset.json").read_text())
    assert ds.class_names == ["background", *meta["classes"]]
    sample = ds[0]
    label = meta["splits"]["val"]["labels"][0]
    assert set(sample["mask"].unique().tolist()) <= {0, label + 1}
    assert (sample["mask"] == label + 1).any()
    with pytest.raises(KeyError, match="split 'test' not in"):
        build_segmentation_dataset("synthetic", synthetic_root, "test")
