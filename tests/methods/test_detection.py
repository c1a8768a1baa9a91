"""The detection method: torchvision's loss dict + their sum, and the validation recall count."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from tokenlab.methods import StepContext, TrainPlan, build_method


class _Fake(nn.Module):
    """Loss dict in training; fixed predictions in eval."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, images: list[torch.Tensor], targets: list[dict[str, Any]] | None = None) -> Any:
        if self.training:
            return {"loss_a": self.w * 2.0, "loss_b": self.w * 0.5}
        pred = {"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]]),
                "labels": torch.tensor([1, 2]), "scores": torch.tensor([0.9, 0.3])}  # fmt: skip
        return [pred for _ in images]


def test_training_step_sums_torchvision_losses() -> None:
    method = build_method("detection", model=_Fake())
    assert method.data_view == "detection"
    method.train()
    ctx = StepContext(0, 0, TrainPlan(1, 1, 1), torch.device("cpu"))
    out = method.training_step({"image": [torch.zeros(3, 8, 8)], "target": [{}]}, ctx)
    assert out["loss"].item() == pytest.approx(2.5) and out["loss_a"].item() == pytest.approx(2.0)
    out["loss"].backward()
    assert method.model.w.grad is not None


def test_validation_counts_found_boxes() -> None:
    method = build_method("detection", model=_Fake())
    model = method.model.eval()
    target = {"boxes": torch.tensor([[1.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0], [0, 0, 5, 5]]),
              "labels": torch.tensor([1, 2, 1])}  # fmt: skip
    out = method.validation_step(model, {"image": [torch.zeros(3, 8, 8)], "target": [target]})
    # box 1 found (IoU 0.9, right label); box 2's match scores 0.3 < 0.5; box 3 overlaps box 1 by IoU 0.25
    assert out["correct"].item() == 1 and out["count"].item() == 3


def test_init_from_needs_a_detection_model(tmp_path: Any) -> None:
    with pytest.raises(ValueError, match="tokenlab detection model"):
        build_method("detection", model=_Fake(), init_from=str(tmp_path))
