"""Synthetic data set: determinism, shortcut correlation, masks, speed, parameters."""

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tokenlab.data.synthetic import SHAPES, TEXTURES, SynthConfig, generate, shortcut_correlation


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def test_same_seed_byte_identical_whatever_the_workers(tmp_path: Path) -> None:
    config = SynthConfig(seed=3, counts={"train": 70, "rendition": 40})
    generate(tmp_path / "a", config, workers=1)
    generate(tmp_path / "b", config, workers=2)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    generate(tmp_path / "c", SynthConfig(seed=4, counts={"train": 70, "rendition": 40}))
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_layout_and_metadata(synth_dir: Path) -> None:
    meta = json.loads((synth_dir / "dataset.json").read_text())
    assert meta["classes"] == list(SHAPES) and len(SHAPES) >= 10
    assert meta["seed"] == 7 and meta["params"]["shortcut_p"] == 0.8
    for split, count in (("train", 120), ("val", 40), ("rendition", 30), ("shortcut", 30)):
        files = sorted((synth_dir / split).rglob("*.png"))
        masks = sorted((synth_dir / f"{split}_masks").rglob("*.png"))
        assert len(files) == len(masks) == count == meta["splits"][split]["count"]
    assert len(meta["splits"]["rendition"]["styles"]) == 30
    # labels are balanced
    assert np.bincount(meta["splits"]["train"]["labels"]).tolist() == [12] * 10


def test_masks_mark_the_object_with_class_plus_one(synth_dir: Path) -> None:
    meta = json.loads((synth_dir / "dataset.json").read_text())
    for split in ("train", "rendition"):
        for index, label in list(enumerate(meta["splits"][split]["labels"]))[:20]:
            name = f"{SHAPES[label]}/{index:06d}.png"
            image = np.asarray(Image.open(synth_dir / split / name))
            mask = np.asarray(Image.open(synth_dir / f"{split}_masks" / name))
            assert image.shape == (64, 64, 3) and mask.shape == (64, 64)
            assert set(np.unique(mask).tolist()) == {0, label + 1}
            assert 0.03 < (mask > 0).mean() < 0.7


def test_shortcut_correlation_is_p_in_train_and_chance_in_val(tmp_path: Path) -> None:
    # labels/textures are assigned before rendering, so count-only checks are cheap; render a few to be honest
    config = SynthConfig(seed=11, counts={"train": 2000, "val": 2000, "shortcut": 500}, shortcut_p=0.7)
    from tokenlab.data.synthetic import assign_split

    meta = {"splits": {}}
    for split in config.counts:
        labels, textures = assign_split(config, split)
        meta["splits"][split] = {"labels": labels.tolist(), "textures": textures.tolist()}
    assert abs(shortcut_correlation(meta, "train") - 0.7) <= 0.02
    assert abs(shortcut_correlation(meta, "val") - 1 / len(TEXTURES)) <= 0.02
    assert shortcut_correlation(meta, "shortcut") == 0.0
    written = generate(tmp_path, SynthConfig(seed=11, counts={"train": 200}, shortcut_p=0.7))
    assert abs(shortcut_correlation(written, "train") - 0.7) <= 0.02


def test_val_tied_shares_the_train_correlation_and_the_shortcut_split_breaks_it() -> None:
    from tokenlab.data.synthetic import assign_split

    config = SynthConfig(seed=11, counts={"train": 2000, "val": 2000, "shortcut": 500}, shortcut_p=0.7, val_tied=True)
    meta = {"splits": {}}
    for split in config.counts:
        labels, textures = assign_split(config, split)
        meta["splits"][split] = {"labels": labels.tolist(), "textures": textures.tolist()}
    assert shortcut_correlation(meta, "train") == pytest.approx(0.7, abs=1e-3)
    assert shortcut_correlation(meta, "val") == pytest.approx(0.7, abs=1e-3)
    assert shortcut_correlation(meta, "shortcut") == 0.0
    # the train split (and every other split) does not depend on how val is drawn
    untied = replace(config, val_tied=False)
    for split in ("train", "shortcut"):
        pairs = zip(assign_split(config, split), assign_split(untied, split), strict=True)
        assert all(torch.equal(a, b) for a, b in pairs)


def test_colour_cue_ties_the_object_hue_and_unties_the_background(tmp_path: Path) -> None:
    from tokenlab.data.synthetic import HUES

    config = SynthConfig(seed=2, img_size=32, counts={"train": 300, "shortcut": 100}, shortcut_p=0.8,
                         shortcut_cue="colour", object_scale=(0.7, 1.0), max_fragments=0)  # fmt: skip
    meta = generate(tmp_path, config, workers=1)
    assert shortcut_correlation(meta, "train") == pytest.approx(0.8, abs=1e-3)
    assert shortcut_correlation(meta, "shortcut") == 0.0
    train = meta["splits"]["train"]
    # backgrounds carry no class evidence: texture = class at chance
    assert abs(np.mean(np.array(train["textures"]) == np.array(train["labels"])) - 0.1) < 0.06
    # the object's mean colour, as a direction in colour space, is nearest to its cue's hue
    hues = HUES.numpy() - HUES.numpy().mean(1, keepdims=True)
    hits = 0
    for index, (label, cue) in enumerate(zip(train["labels"], train["colours"], strict=True)):
        name = f"{SHAPES[label]}/{index:06d}.png"
        image = np.asarray(Image.open(tmp_path / "train" / name)).astype(float) / 255
        mask = np.asarray(Image.open(tmp_path / "train_masks" / name)) > 0
        colour = image[mask].mean(0)
        hits += int(np.argmax(hues @ (colour - colour.mean())) == cue)
    assert hits / len(train["labels"]) > 0.9


def test_colour_cue_changes_only_the_object_pixels() -> None:
    from tokenlab.data.synthetic import render_chunk

    labels = torch.arange(20) % len(SHAPES)
    plain = render_chunk(labels, labels, torch.Generator().manual_seed(5), 32)
    tied = render_chunk(labels, labels, torch.Generator().manual_seed(5), 32, colours=(labels + 3) % len(SHAPES))
    assert np.array_equal(plain[1], tied[1])
    changed = (plain[0] != tied[0]).any(-1)
    assert changed[tied[1] > 0].mean() > 0.9 and not changed[tied[1] == 0].any()


def test_colour_cue_set_is_byte_identical_for_a_seed(tmp_path: Path) -> None:
    config = SynthConfig(seed=3, img_size=32, counts={"train": 40, "val": 20}, shortcut_cue="colour", val_tied=True)
    generate(tmp_path / "a", config, workers=1)
    generate(tmp_path / "b", config, workers=2)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")


def test_small_set_writes_every_image_and_mask(tmp_path: Path) -> None:
    # generation speed is measured in benchmarks/data.py, not asserted here
    generate(tmp_path, SynthConfig(counts={"train": 200}))
    assert len(list((tmp_path / "train").rglob("*.png"))) == 200
    assert len(list((tmp_path / "train_masks").rglob("*.png"))) == 200


def test_other_image_size(tmp_path: Path) -> None:
    generate(tmp_path, SynthConfig(img_size=32, counts={"val": 10}))
    image = Image.open(next((tmp_path / "val").rglob("*.png")))
    assert image.size == (32, 32)


def test_distractor_shapes_change_only_the_background() -> None:
    # the distractors are drawn under the object: the mask and the object pixels stay, some background changes
    import torch

    from tokenlab.data.synthetic import render_chunk

    labels = torch.arange(20) % len(SHAPES)
    plain = render_chunk(labels, labels, torch.Generator().manual_seed(5), 32, distractor_shapes=0)
    busy = render_chunk(labels, labels, torch.Generator().manual_seed(5), 32, distractor_shapes=2)
    assert np.array_equal(plain[1], busy[1])
    changed = (plain[0] != busy[0]).any(-1)
    assert changed.any() and not changed[busy[1] > 0].any()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"counts": {"test": 3}}, "unknown split"),
        ({"counts": {"train": -1}}, "counts"),
        ({"shortcut_p": 1.2}, "shortcut_p"),
        ({"img_size": 4}, "img_size"),
        ({"distractor_shapes": -1}, "distractor_shapes"),
        ({"distractor_scale": (0.5, 0.2)}, "distractor_scale"),
        ({"shortcut_cue": "shape"}, "shortcut_cue"),
    ],
)
def test_bad_config(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        generate(tmp_path, SynthConfig(**kwargs))


def test_correlation_of_missing_split() -> None:
    with pytest.raises(KeyError, match="not in the data set"):
        shortcut_correlation({"splits": {}}, "train")
