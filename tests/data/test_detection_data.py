"""COCO-format detection data: the synthetic set, the reader's checks and counted skips, the joint flip."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tokenlab.data.detection import (
    CocoDetection,
    DetectionTransform,
    annotation_file,
    build_detection_dataset,
    detection_collate,
    generate_detection_set,
    read_coco,
)
from tokenlab.data.transforms import build_transforms, collate_for


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("det")
    generate_detection_set(root, seed=3, counts={"train": 6, "val": 3}, img_size=32, max_objects=3, chunk=4)
    return root


def _coco(tmp_path: Path, images: list[dict], anns: list[dict], write: tuple[str, ...] = ("a.png",)) -> Path:
    (tmp_path / "img").mkdir(exist_ok=True)
    for name in write:
        Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "img" / name)
    path = tmp_path / "ann.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": [{"id": 7, "name": "thing"}]}))
    return path


IMG = {"id": 1, "file_name": "a.png", "width": 30, "height": 20}


def _ann(aid: int, bbox: list[float], **kw: object) -> dict:
    return {"id": aid, "image_id": 1, "category_id": 7, "bbox": bbox, "iscrowd": 0, **kw}


def test_synthetic_set_is_deterministic_and_consistent(synth: Path, tmp_path: Path) -> None:
    generate_detection_set(tmp_path, seed=3, counts={"train": 6, "val": 3}, img_size=32, max_objects=3, chunk=4)
    assert annotation_file(tmp_path, "train").read_text() == annotation_file(synth, "train").read_text()
    assert (tmp_path / "train" / "000005.png").read_bytes() == (synth / "train" / "000005.png").read_bytes()
    ds = build_detection_dataset(synth, "train")
    assert ds.classes[0] == "circle" and ds.num_classes == 10
    for i in range(len(ds)):
        t = ds[i]["target"]
        assert t["labels"].min() >= 1 and t["labels"].max() <= 10
        for box, mask in zip(t["boxes"], t["masks"], strict=True):  # the box is the visible mask's extent
            ys, xs = torch.nonzero(mask, as_tuple=True)
            assert box.tolist() == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


def test_flip_moves_boxes_and_masks_together(synth: Path) -> None:
    ds = build_detection_dataset(synth, "val", DetectionTransform(train=True, hflip=1.0))
    plain = build_detection_dataset(synth, "val")
    a, b = ds[0], plain[0]
    assert torch.equal(a["image"], b["image"].flip(-1))
    assert torch.equal(a["target"]["masks"], b["target"]["masks"].flip(-1))
    w = b["image"].shape[-1]
    assert torch.equal(a["target"]["boxes"][:, 0], w - b["target"]["boxes"][:, 2])
    batch = collate_for("detection")([a, b])
    assert batch is not None and len(batch["image"]) == 2 and batch["index"].tolist() == [0, 0]
    assert detection_collate([a])["target"][0]["image_id"] == a["target"]["image_id"]
    assert isinstance(build_transforms("detection", 64, train=False), DetectionTransform)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("{not json", "not valid UTF-8 JSON"),
        ("[]", "JSON list, not a COCO object"),
        ('{"images": [], "annotations": []}', "lacks the COCO list"),
        ('{"images": [{"id": 1}], "annotations": [], "categories": [{"id": 1, "name": "x"}]}', "lacks"),
    ],
)
def test_malformed_json_is_named(tmp_path: Path, content: str, match: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        read_coco(path)


def test_dangling_ids_and_bad_boxes_are_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="category id 9"):
        CocoDetection(_coco(tmp_path, [IMG], [_ann(1, [0, 0, 5, 5], category_id=9)]), tmp_path / "img")
    with pytest.raises(ValueError, match="image id 2"):
        CocoDetection(_coco(tmp_path, [IMG], [_ann(1, [0, 0, 5, 5], image_id=2)]), tmp_path / "img")
    with pytest.raises(ValueError, match="bbox"):
        CocoDetection(_coco(tmp_path, [IMG], [_ann(1, [0, 0, -5, 5])]), tmp_path / "img")
    with pytest.raises(FileNotFoundError, match="not found"):
        read_coco(tmp_path / "nothing.json")


def test_missing_images_are_skipped_and_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    other = {"id": 2, "file_name": "gone.png", "width": 30, "height": 20}
    ds = CocoDetection(_coco(tmp_path, [IMG, other], [_ann(1, [1, 1, 5, 5], segmentation=[[1, 1, 6, 1, 6, 6]])]),
                       tmp_path / "img", masks=False)  # fmt: skip
    assert len(ds) == 1 and ds.skips.missing_images == 1
    assert "gone.png" in caplog.text
    with pytest.raises(FileNotFoundError, match="none of the 1 images"):
        CocoDetection(_coco(tmp_path, [other], []), tmp_path / "img")


def test_empty_images_kept_for_eval_skipped_for_training(tmp_path: Path) -> None:
    second = {"id": 2, "file_name": "b.png", "width": 30, "height": 20}
    ann = _coco(tmp_path, [IMG, second], [_ann(1, [1, 1, 5, 5])], write=("a.png", "b.png"))
    assert len(CocoDetection(ann, tmp_path / "img", masks=False)) == 2
    train = CocoDetection(ann, tmp_path / "img", skip_empty=True, masks=False)
    assert len(train) == 1 and train.skips.empty_images == 1
    empty = CocoDetection(ann, tmp_path / "img", masks=False)[1]["target"]
    assert empty["boxes"].shape == (0, 4) and empty["labels"].numel() == 0


def test_boxes_outside_the_image_are_clipped_or_dropped(tmp_path: Path) -> None:
    anns = [_ann(1, [25, 15, 10, 10]), _ann(2, [40, 30, 5, 5]), _ann(3, [2, 2, 4, 4], iscrowd=1)]
    ds = CocoDetection(_coco(tmp_path, [IMG], anns), tmp_path / "img", masks=False)
    assert ds.skips.boxes_clipped == 1 and ds.skips.boxes_dropped == 1 and ds.skips.crowd_ignored == 1
    assert ds[0]["target"]["boxes"].tolist() == [[25.0, 15.0, 30.0, 20.0]]


def test_size_mismatch_and_missing_segmentation_are_named(tmp_path: Path) -> None:
    small = dict(IMG, width=31)
    with pytest.raises(ValueError, match="31x20"):
        CocoDetection(_coco(tmp_path, [small], [_ann(1, [1, 1, 5, 5])]), tmp_path / "img", masks=False)[0]
    with pytest.raises(ValueError, match="no segmentation"):
        CocoDetection(_coco(tmp_path, [IMG], [_ann(1, [1, 1, 5, 5])]), tmp_path / "img")[0]


def test_polygon_masks_are_decoded(tmp_path: Path) -> None:
    ann = _ann(1, [2, 2, 8, 6], segmentation=[[2, 2, 10, 2, 10, 8, 2, 8]])
    target = CocoDetection(_coco(tmp_path, [IMG], [ann]), tmp_path / "img")[0]["target"]
    assert target["masks"].shape == (1, 20, 30) and 40 <= int(target["masks"].sum()) <= 70
