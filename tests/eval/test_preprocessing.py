"""One decoder and one eval preprocessing: training and evaluation see the same pixels and skip the same files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tokenlab.data import build_dataset, eval_transform_from_meta
from tokenlab.data.images import load_rgb
from tokenlab.eval.classify import predict
from tokenlab.eval.folders import ImageTreeDataset, eval_loader

META = {"img_size": 16, "mean": [0.5] * 3, "std": [0.25] * 3, "crop_pct": 0.875}


def _odd_tree(root: Path) -> Path:
    """Class ``a``: a 16-bit grey PNG and an RGBA PNG with a transparent half; class ``b``: a plain RGB PNG."""
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir(parents=True)
    ramp = (np.arange(20 * 24, dtype=np.uint16).reshape(20, 24) * 130).astype(np.uint16)  # values up to ~62k
    Image.fromarray(ramp).save(root / "a" / "deep.png")  # uint16 -> mode I;16, a 16-bit PNG
    rgba = np.zeros((20, 24, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 255
    rgba[:, 12:, 3] = 0  # transparent right half
    Image.fromarray(rgba).save(root / "a" / "alpha.png")
    Image.fromarray(np.full((20, 24, 3), 90, np.uint8)).save(root / "b" / "plain.png")
    return root


def test_sixteen_bit_and_rgba_decode_to_the_same_rgb_in_training_and_evaluation(tmp_path: Path) -> None:
    root = _odd_tree(tmp_path / "tree")
    deep = np.asarray(load_rgb(root / "a" / "deep.png"))
    assert 0 < deep.mean() < 250, "16-bit values are scaled to 8 bits, not clipped to white"
    alpha = np.asarray(load_rgb(root / "a" / "alpha.png"))
    assert (alpha[:, 12:] == 255).all() and (alpha[:, :12] == (200, 0, 0)).all()  # composited on white

    tf = eval_transform_from_meta(META)
    train = build_dataset(root, split=None, transform=tf)
    evaluation = ImageTreeDataset(root, {"a": 0, "b": 1}, tf)
    assert [p for p, _ in train.samples] == [p for p, _ in evaluation.items]
    for i in range(len(train)):
        a, b = train[i], evaluation[i]
        assert b["valid"] and a["label"] == b["label"]
        assert a["image"].shape == (3, 16, 16) and torch.equal(a["image"], b["image"])


def test_unreadable_image_is_skipped_and_counted_in_training_and_evaluation(tmp_path: Path) -> None:
    root = _odd_tree(tmp_path / "tree")
    (root / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    train = build_dataset(root, split=None, transform=eval_transform_from_meta(META))
    assert len(train) == 3 and [p.name for p in train.skipped] == ["broken.png"]

    loader = eval_loader(root, {"a": 0, "b": 1}, META, batch_size=2, workers=0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 2))
    pred = predict(model, loader)
    assert pred.skipped == 1 and len(pred.targets) == 3
    assert [p.name for p in loader.dataset.unreadable.paths] == ["broken.png"]


def test_eval_resize_follows_the_exported_crop_pct(tmp_path: Path) -> None:
    root = _odd_tree(tmp_path / "tree")
    sample = {"image": torch.from_numpy(np.asarray(load_rgb(root / "b" / "plain.png")).copy()).permute(2, 0, 1)}
    tf = eval_transform_from_meta(META)
    assert tf.crop_pct == 0.875 and tf.pipeline.transforms[0].size == [18]  # floor(16 / 0.875) = 18
    assert tf(sample)["image"].shape == (3, 16, 16)
