"""mIoU / per-class IoU / pixel accuracy on hand-made predictions, sliding-window inference and overlays."""

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from tokenlab.eval.seg_metrics import ConfusionMeter, confusion_matrix, metrics_from_confusion, robustness_summary
from tokenlab.eval.seg_overlays import save_overlays
from tokenlab.eval.segmentation import predict_logits

IGNORE = 255


def test_hand_made_miou_with_ignore_and_absent_class() -> None:
    # 4 classes; class 3 never appears in the labels and is predicted only on ignored pixels.
    target = torch.tensor([[0, 0, 1, IGNORE], [1, 2, 2, IGNORE]])
    pred = torch.tensor([[0, 1, 1, 3], [1, 2, 0, 0]])
    m = metrics_from_confusion(confusion_matrix(pred, target, 4, IGNORE))
    # Scored pixels (true, pred): (0,0) (0,1) (1,1) (1,1) (2,2) (2,0).
    # class 0: TP 1, FN 1, FP 1 -> 1/3; class 1: TP 2, FP 1 -> 2/3; class 2: TP 1, FN 1 -> 1/2; class 3: no union.
    assert m.iou[:3] == pytest.approx([1 / 3, 2 / 3, 1 / 2])
    assert math.isnan(m.iou[3])
    assert m.miou == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert m.pixel_accuracy == pytest.approx(4 / 6)
    assert m.pixels == 6
    assert m.mean_accuracy == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)


def test_class_predicted_but_absent_counts_as_zero() -> None:
    target = torch.tensor([0, 0, 1, 1])
    pred = torch.tensor([0, 2, 1, 1])  # class 2 is absent from the labels but predicted once -> IoU 0
    m = metrics_from_confusion(confusion_matrix(pred, target, 3))
    assert m.iou == pytest.approx([1 / 2, 1.0, 0.0])
    assert m.miou == pytest.approx(0.5)


def test_matches_bruteforce_formula() -> None:
    g = torch.Generator().manual_seed(1)
    K = 5
    target = torch.randint(0, K, (3, 17, 13), generator=g)
    target[torch.rand(target.shape, generator=g) < 0.2] = IGNORE
    pred = torch.randint(0, K, target.shape, generator=g)
    meter = ConfusionMeter(K, IGNORE)
    meter.update(pred[:2], target[:2])
    meter.update(pred[2:], target[2:])
    m = meter.compute()
    t, p = target.numpy(), pred.numpy()
    valid = t != IGNORE
    ious = []
    for k in range(K):
        inter = np.sum((t == k) & (p == k) & valid)
        union = np.sum(((t == k) | (p == k)) & valid)
        ious.append(inter / union)
    assert m.iou == pytest.approx(ious)
    assert m.miou == pytest.approx(np.mean(ious))
    assert m.pixel_accuracy == pytest.approx(np.sum((t == p) & valid) / valid.sum())


def test_logits_are_argmaxed_and_bad_labels_raise() -> None:
    logits = torch.zeros(1, 3, 2, 2)
    logits[:, 2] = 1.0
    meter = ConfusionMeter(3)
    meter.update(logits, torch.full((1, 2, 2), 2))
    assert meter.compute().miou == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"label values \[7\] outside \[0, 3\)"):
        confusion_matrix(torch.zeros(4, dtype=torch.long), torch.tensor([0, 1, 7, IGNORE]), 3, IGNORE)
    with pytest.raises(ValueError, match="differs from target shape"):
        confusion_matrix(torch.zeros(4), torch.zeros(5), 3)


class _PixelModel(nn.Module):
    """Per-pixel linear model: logits depend only on each pixel, so windowed and whole inference must agree."""

    patch_size = 4

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


@pytest.mark.parametrize("size", [(24, 40), (9, 13)])
def test_sliding_window_equals_whole_for_pixelwise_model(size: tuple[int, int]) -> None:
    model = _PixelModel().eval()
    x = torch.randn(2, 3, *size)
    whole = predict_logits(model, x, 4, mode="whole")
    slide = predict_logits(model, x, 4, mode="slide", crop_size=16, stride=12)
    assert whole.shape == slide.shape == (2, 4, *size)
    torch.testing.assert_close(slide, whole, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="unknown inference mode 'tiles'"):
        predict_logits(model, x, 4, mode="tiles")


def test_robustness_summary_and_overlay_png(tmp_path) -> None:
    clean = metrics_from_confusion(torch.eye(2, dtype=torch.long) * 10)
    rob = robustness_summary(clean, {"fog": {1: 0.8, 2: 0.6}, "snow": {1: 0.5, 2: 0.3}})
    assert rob.robust_miou == pytest.approx(0.55)
    assert rob.per_corruption == pytest.approx({"fog": 0.7, "snow": 0.4})
    assert rob.retention == pytest.approx(0.55)
    img = np.full((8, 8, 3), 100, np.uint8)
    mask = np.zeros((8, 8), np.int64)
    mask[2:5, 2:5] = 1
    mask[0, 0] = IGNORE
    out = save_overlays([img, img], [mask, mask], [mask, np.zeros_like(mask)], tmp_path / "o.png", 2, scale=2)
    arr = np.asarray(Image.open(out))
    assert arr.shape == (2 * 8 * 2, 3 * 8 * 2, 3)
