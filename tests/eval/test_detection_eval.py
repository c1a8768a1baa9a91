"""COCO AP on hand-made cases with known answers, mPC / rPC arithmetic, and AP through corrupted cells."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from tokenlab.data.detection import build_detection_dataset, generate_detection_set
from tokenlab.eval.detection import (
    DetMetrics,
    coco_gt,
    coco_metrics,
    evaluate_detection,
    evaluate_detection_corruptions,
    robustness_summary,
)


def _rle(box: list[int], h: int = 40, w: int = 40) -> dict[str, Any]:
    m = np.zeros((h, w), np.uint8)
    x, y, bw, bh = box
    m[y : y + bh, x : x + bw] = 1
    rle = mask_utils.encode(np.asfortranarray(m))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode()}


GT_BOXES = {1: [[2, 2, 10, 10], [20, 20, 12, 8]], 2: [[5, 15, 20, 20]]}


@pytest.fixture
def gt_file(tmp_path: Path) -> Path:
    images = [{"id": i, "file_name": f"{i}.png", "width": 40, "height": 40} for i in GT_BOXES]
    anns = [{"id": 10 * i + k, "image_id": i, "category_id": 1, "bbox": b, "area": b[2] * b[3], "iscrowd": 0,
             "segmentation": _rle(b)} for i, boxes in GT_BOXES.items() for k, b in enumerate(boxes)]  # fmt: skip
    path = tmp_path / "gt.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "a"}]}))
    return path


def _det(image_id: int, box: list[int], score: float) -> dict[str, Any]:
    return {"image_id": image_id, "category_id": 1, "bbox": box, "score": score, "segmentation": _rle(box)}


def test_perfect_predictions_give_ap_one(gt_file: Path) -> None:
    gt = coco_gt(gt_file)
    results = [_det(i, b, 0.9) for i, boxes in GT_BOXES.items() for b in boxes]
    for iou_type in ("bbox", "segm"):
        m = coco_metrics(gt, results, iou_type, list(GT_BOXES))
        assert m["AP"] == pytest.approx(1.0) and m["AP50"] == pytest.approx(1.0) and m["AP75"] == pytest.approx(1.0)
        # every area (100, 96, 400) is under 32^2: small objects only, no medium or large AP
        assert m["APs"] == pytest.approx(1.0) and math.isnan(m["APm"]) and math.isnan(m["APl"])


def test_half_recall_gives_the_interpolated_51_of_101(gt_file: Path) -> None:
    # image 1 holds two objects and one is found: recall 1/2 at precision 1
    gt = coco_gt(gt_file)
    m = coco_metrics(gt, [_det(1, GT_BOXES[1][0], 0.9)], "bbox", [1])
    # 101-point interpolation: precision 1 at recall thresholds 0.00..0.50 (51 of them), 0 beyond
    assert m["AP"] == pytest.approx(51 / 101)


def test_a_higher_scored_false_positive_halves_ap(gt_file: Path) -> None:
    gt = coco_gt(gt_file)
    results = [_det(2, [30, 0, 8, 8], 0.95), _det(2, GT_BOXES[2][0], 0.8)]
    m = coco_metrics(gt, results, "bbox", [2])
    assert m["AP"] == pytest.approx(0.5)  # the only recall level (1.0) is reached at precision 1/2


def test_no_detections_is_zero_not_an_error(gt_file: Path) -> None:
    m = coco_metrics(coco_gt(gt_file), [], "segm", list(GT_BOXES))
    assert m["AP"] == 0.0 and math.isnan(m["APl"])
    with pytest.raises(ValueError, match="unknown iou_type"):
        coco_metrics(coco_gt(gt_file), [], "keypoints", [1])


def test_mpc_and_rpc() -> None:
    clean = DetMetrics({"AP": 0.5}, {"AP": 0.4}, 10)
    table = {"fog": {1: {"box": 0.4, "mask": 0.2}, 3: {"box": 0.2, "mask": 0.2}}, "snow": {1: {"box": 0.3,
             "mask": float("nan")}}}  # fmt: skip
    r = robustness_summary(clean, table)
    assert r.mpc["box"] == pytest.approx(0.3) and r.rpc["box"] == pytest.approx(0.6)
    assert r.mpc["mask"] == pytest.approx(0.4 / 3) and r.rpc["mask"] == pytest.approx(0.4 / 3 / 0.4)
    assert r.severities == [1, 3] and r.corruptions == ["fog", "snow"]
    assert r.to_dict()["per_cell"]["snow"]["1"]["mask"] is None


class _Oracle(torch.nn.Module):
    """Returns a data set's ground truth as predictions, whatever the pixels (looked up by image position)."""

    def __init__(self, targets: list[dict[str, Any]]) -> None:
        super().__init__()
        self.targets, self.calls = targets, 0

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        out = []
        for _ in images:
            t = self.targets[self.calls % len(self.targets)]
            self.calls += 1
            n = t["labels"].numel()
            out.append({"boxes": t["boxes"], "labels": t["labels"], "scores": torch.ones(n),
                        "masks": t["masks"][:, None].float()})  # fmt: skip
        return out


def test_corrupted_cells_are_scored_with_the_clean_annotations(tmp_path: Path) -> None:
    generate_detection_set(tmp_path / "d", seed=1, counts={"val": 3}, img_size=32, max_objects=2)
    ds = build_detection_dataset(tmp_path / "d", "val")
    model = _Oracle([ds[i]["target"] for i in range(len(ds))])
    clean = evaluate_detection(model, ds, batch_size=3)
    assert clean.box["AP"] == pytest.approx(1.0) and clean.mask is not None and clean.mask["AP"] == pytest.approx(1.0)
    r = evaluate_detection_corruptions(model, ds, tmp_path / "cache", "gaussian_noise,fog", [1, 5], batch_size=3,
                                       workers=0)  # fmt: skip
    assert r.corruptions == ["gaussian_noise", "fog"] and r.severities == [1, 5]
    assert r.mpc["box"] == pytest.approx(1.0) and r.rpc["mask"] == pytest.approx(1.0)  # the oracle ignores pixels
    cells = list((tmp_path / "cache").glob("val-source-*/fog/5/val/*.png"))
    assert len(cells) == 3  # every val image corrupted, under the split's own group
