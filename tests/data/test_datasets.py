"""Datasets: image folders, lists, CIFAR-10 extraction, odd and broken files, clear errors."""

import io
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tokenlab.data.datasets import build_dataset
from tokenlab.data.images import load_rgb
from tokenlab.data.transforms import build_transforms


def _png(path: Path, colour: tuple[int, int, int] = (200, 30, 30), size: int = 12) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path)
    return path


def _folder(root: Path, classes: tuple[str, ...] = ("cat", "dog"), per_class: int = 3) -> Path:
    for split in ("train", "val"):
        for c in classes:
            for i in range(per_class):
                _png(root / split / c / f"{i}.png")
    return root


def test_image_folder_samples(tmp_path: Path) -> None:
    root = _folder(tmp_path)
    ds = build_dataset(root, "train")
    assert ds.classes == ["cat", "dog"] and len(ds) == 6 and not ds.has_masks
    sample = ds[4]
    assert sample["image"].shape == (3, 12, 12) and sample["image"].dtype == torch.float32
    assert sample["label"] == 1 and sample["index"] == 4
    assert build_dataset(root / "train", None).classes == ["cat", "dog"]


def test_synthetic_set_has_masks_that_follow_the_transform(synth_dir: Path) -> None:
    ds = build_dataset(synth_dir, "val", build_transforms("eval", 32))
    sample = ds[0]
    assert ds.has_masks and sample["mask"].shape == (32, 32) and sample["mask"].dtype == torch.int64
    assert set(sample["mask"].unique().tolist()) <= {0, sample["label"] + 1}
    with pytest.raises(ValueError, match="split 'test' not in synthetic set"):
        build_dataset(synth_dir, "test")


def test_csv_and_tsv_lists(tmp_path: Path) -> None:
    _png(tmp_path / "img" / "a.png")
    _png(tmp_path / "img" / "b.png")
    (tmp_path / "train.csv").write_text("path,label\nimg/a.png,zebra\nimg/b.png,ant\n")
    ds = build_dataset(tmp_path / "train.csv")
    assert ds.classes == ["ant", "zebra"] and ds.targets == [1, 0]
    (tmp_path / "list.tsv").write_text("img/a.png\t2\nimg/b.png\t0\n")
    ds = build_dataset(tmp_path / "list.tsv")
    assert ds.classes == ["0", "1", "2"] and ds.targets == [2, 0]
    assert len(build_dataset(tmp_path, "train")) == 2  # <split>.csv inside a directory
    (tmp_path / "bad.csv").write_text("img/a.png,ghost\n")
    with pytest.raises(ValueError, match="unknown class 'ghost'"):
        build_dataset(tmp_path / "bad.csv", classes=["ant", "zebra"])


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "RGBA", "LA", "I;16", "1"])
def test_odd_modes_become_rgb(tmp_path: Path, mode: str) -> None:
    path = tmp_path / f"odd.{'tiff' if mode == 'CMYK' else 'png'}"
    if mode == "I;16":
        Image.fromarray(np.full((5, 5), 65535, dtype=np.uint16)).save(path)
    elif mode == "RGBA":
        Image.new("RGBA", (5, 5), (10, 20, 30, 0)).save(path)  # fully transparent -> white
    else:
        Image.new("RGB", (5, 5), (90, 160, 220)).convert(mode).save(path)
    image = load_rgb(path)
    assert image.mode == "RGB" and image.size == (5, 5)
    if mode in ("I;16", "RGBA"):
        assert np.asarray(image).min() == 255


def test_corrupt_and_truncated_files_are_skipped_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = _folder(tmp_path)
    (root / "train" / "cat" / "junk.png").write_bytes(b"not an image")
    good = root / "train" / "dog" / "0.png"
    (root / "train" / "dog" / "cut.png").write_bytes(good.read_bytes()[:60])
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    (root / "train" / "dog" / "cut.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with caplog.at_level(logging.WARNING):
        ds = build_dataset(root, "train")
    assert "junk.png" in caplog.text and "cut.png" in caplog.text and "skipped 2 unreadable of 9" in caplog.text
    assert len(ds) == 7
    # the truncated JPEG passes the header check and fails at decode: replaced by the next sample, with a warning
    jpeg_index = [i for i, (p, _) in enumerate(ds.samples) if p.name == "cut.jpg"][0]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        sample = ds[jpeg_index]
    assert "cut.jpg" in caplog.text and sample["index"] == jpeg_index
    with pytest.raises(OSError, match="junk.png"):
        build_dataset(root, "train", strict=True)
    lazy = build_dataset(root, "train", strict=True, verify="none")
    with pytest.raises(OSError, match="junk.png|cut"):
        [lazy[i] for i in range(len(lazy))]


def test_clear_errors_before_training(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found.*cifar10"):
        build_dataset(tmp_path / "missing", "train")
    (tmp_path / "empty" / "train" / "cat").mkdir(parents=True)
    with pytest.raises(ValueError, match="holds no image files"):
        build_dataset(tmp_path / "empty", "train")
    (tmp_path / "flat").mkdir()
    with pytest.raises(ValueError, match="no class folders"):
        build_dataset(tmp_path / "flat", None)
    root = _folder(tmp_path / "ds", classes=("cat", "dog", "eel"))
    for f in (root / "val" / "eel").iterdir():
        f.unlink()
    with pytest.raises(ValueError, match=r"classes \['eel'\] have no images"):
        build_dataset(root, "val")
    assert len(build_dataset(root, "val", allow_missing_classes=True).classes) == 3
    with pytest.raises(ValueError, match="split 'test' not found.*available"):
        build_dataset(root, "test")
    _png(root / "val" / "fox" / "0.png")
    with pytest.raises(ValueError, match=r"folders \['fox'\] that are not classes"):
        build_dataset(root, "val")


def test_cifar10_archive_is_extracted_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src" / "cifar10"
    for split in ("train", "test"):
        for c in ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"):
            _png(src / split / c / "0000.png", size=8)
    archive = tmp_path / "cifar10.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src, arcname="cifar10")
    monkeypatch.setenv("TOKENLAB_CIFAR10", str(archive))
    monkeypatch.setenv("TOKENLAB_CACHE", str(tmp_path / "cache"))
    train = build_dataset("cifar10", "train")
    val = build_dataset("cifar10", "val")  # CIFAR's test split
    assert len(train) == len(val) == 10 and train.classes[0] == "airplane"
    assert (tmp_path / "cache" / "cifar10" / ".complete").exists()
    archive.unlink()  # a second build reads the cache only
    assert len(build_dataset("cifar10", "train")) == 10
