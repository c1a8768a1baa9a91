"""Cityscapes-C: the corrupted val split is written by the one corruption implementation and scored against the
clean masks (a tiny generated tree in the Cityscapes layout stands in for the real data set)."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tokenlab.cli import main
from tokenlab.data.segmentation import build_segmentation_dataset, cityscapes_pairs
from tokenlab.eval.segmentation import evaluate_corruptions, generate_corrupted_split
from tokenlab.models.segmentation import FANSegFormer


def _tiny_cityscapes(root: Path, split: str = "val") -> Path:
    """Two cities, three 64x128 frames with ``labelIds`` ground truth (mapped to train ids by the reader)."""
    rng = np.random.default_rng(0)
    for city, frames in (("frankfurt", 2), ("lindau", 1)):
        for f in range(frames):
            stem = f"{city}_000000_{f:06d}"
            img = root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png"
            gt = root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png"
            img.parent.mkdir(parents=True, exist_ok=True)
            gt.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (64, 128, 3), dtype=np.uint8)).save(img)
            ids = np.full((64, 128), 7, np.uint8)  # road
            ids[:32] = 23  # sky
            ids[:, :8] = 0  # unlabeled -> ignore
            Image.fromarray(ids).save(gt)
    return root


def test_cli_writes_cityscapes_c_from_the_val_split(tmp_path, capsys) -> None:
    root = _tiny_cityscapes(tmp_path / "cityscapes")
    cache = tmp_path / "cache"
    rc = main(["segment", "corrupt", "--root", str(root), "--cache-dir", str(cache), "--corruptions",
               "brightness,gaussian_noise", "--severities", "1-2", "--workers", "0"])  # fmt: skip
    assert rc == 0
    assert "2 corruptions x severities [1, 2] of 3 images (4 cells generated now)" in capsys.readouterr().out
    (tree,) = cache.iterdir()
    assert tree.name.startswith("val-")
    clean = root / "leftImg8bit" / "val" / "lindau" / "lindau_000000_000000_leftImg8bit.png"
    for corruption in ("brightness", "gaussian_noise"):
        for severity in (1, 2):
            out = tree / corruption / str(severity) / "lindau" / "lindau_000000_000000_leftImg8bit.png"
            with Image.open(out) as a, Image.open(clean) as b:
                assert a.size == b.size == (128, 64)  # native size, no resize
                assert not np.array_equal(np.asarray(a), np.asarray(b))
    # the same request again is served from the cache (what `segment eval --corruptions` relies on)
    again = generate_corrupted_split("cityscapes", root, "val", cache, "brightness,gaussian_noise", "1-2",
                                     workers=0, progress=False)  # fmt: skip
    assert again.root == tree and again.generated_cells == []


def test_corrupted_cityscapes_images_are_paired_with_clean_masks(tmp_path) -> None:
    root = _tiny_cityscapes(tmp_path / "cityscapes")
    ds = build_segmentation_dataset("cityscapes", root, "val")
    image_root = cityscapes_pairs(root, "val").image_root
    torch.manual_seed(0)
    model = FANSegFormer("fan_nano_6_p16_224", num_classes=19, neck="none", decoder_dim=16,
                         backbone_kwargs={"patch_size": 8})  # fmt: skip
    res = evaluate_corruptions(model.eval(), ds, image_root, tmp_path / "cache", "brightness", "1", batch_size=2,
                               workers=0)  # fmt: skip
    assert set(res.per_corruption) == {"brightness"}
    assert 0.0 <= res.clean.miou <= 1.0 and 0.0 <= res.robust_miou <= 1.0
    with pytest.raises(ValueError, match="unknown corruption 'brightnes'"):
        generate_corrupted_split("cityscapes", root, "val", tmp_path / "cache", "brightnes", workers=0)
