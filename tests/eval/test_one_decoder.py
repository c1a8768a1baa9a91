"""One decoder (issue 16, item 5): token analysis and corruption generation see the pixels training sees.

``test_preprocessing`` compares training with the evaluation trees; here the masked trees of ``tokenlab tokens``
and the sources of the corruption generator are compared with training on a 16-bit PNG and an RGBA PNG.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tokenlab.data import build_dataset, eval_transform_from_meta
from tokenlab.data.images import load_rgb_array
from tokenlab.eval import corruptions
from tokenlab.eval.folders import ImageTreeDataset

META = {"img_size": 16, "mean": [0.5] * 3, "std": [0.25] * 3, "crop_pct": 1.0}


def _odd_pair(root: Path) -> Path:
    """``root/val/a/{deep,alpha}.png`` (16-bit grey, RGBA with a transparent half) with masks in ``val_masks``."""
    (root / "val" / "a").mkdir(parents=True)
    (root / "val_masks" / "a").mkdir(parents=True)
    ramp = (np.arange(16 * 16, dtype=np.uint16).reshape(16, 16) * 250).astype(np.uint16)
    Image.fromarray(ramp).save(root / "val" / "a" / "deep.png")
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 1], rgba[:, :8, 3] = 180, 255
    Image.fromarray(rgba).save(root / "val" / "a" / "alpha.png")
    for name in ("deep", "alpha"):
        Image.fromarray(np.ones((16, 16), np.uint8)).save(root / "val_masks" / "a" / f"{name}.png")
    return root


def test_token_analysis_decodes_like_training(tmp_path: Path) -> None:
    root = _odd_pair(tmp_path / "set")
    tf = eval_transform_from_meta(META)
    train = build_dataset(root / "val", split=None, transform=tf)
    tokens = ImageTreeDataset(root / "val", {"a": 0}, tf, mask_root=root / "val_masks")  # as `tokenlab tokens`
    assert [p for p, _ in train.samples] == [p for p, _ in tokens.items]
    for i in range(len(train)):
        assert tokens[i]["valid"] and torch.equal(train[i]["image"], tokens[i]["image"])
    white = (torch.ones(3) - 0.5) / 0.25  # the transparent half is white after normalisation
    alpha = tokens[[p.name for p, _ in tokens.items].index("alpha.png")]["image"]
    assert torch.allclose(alpha[:, :, 12], white[:, None].expand(3, 16))


def test_corruption_sources_are_decoded_like_training(tmp_path: Path, monkeypatch) -> None:
    root = _odd_pair(tmp_path / "set")
    # an identity "corruption": the cached image is then exactly the decoded source
    monkeypatch.setattr(corruptions, "corrupt_image", lambda image, *args, **kwargs: image)
    cache = corruptions.generate_corruptions(root / "val", tmp_path / "cache", ["gaussian_noise"], [1], workers=0,
                                             progress=False)  # fmt: skip
    assert cache.unreadable == []
    for name in ("deep.png", "alpha.png"):
        written = np.asarray(Image.open(cache.root / "gaussian_noise" / "1" / "a" / name).convert("RGB"))
        assert np.array_equal(written, load_rgb_array(root / "val" / "a" / name)), name
    deep = load_rgb_array(root / "val" / "a" / "deep.png")
    assert 0 < deep.mean() < 250  # scaled to 8 bits, not clipped to white
