"""Mask R-CNN on tokenlab backbones: losses and predictions, pyramid levels, weight loading, export round trip."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tokenlab.models import create_model, load_exported, save_exported
from tokenlab.models.detection import TokenlabMaskRCNN, load_backbone_weights

SMALL: dict[str, Any] = {
    "min_size": 32, "max_size": 32, "anchor_sizes": (8, 16, 32, 64, 128), "fpn_dim": 16, "box_head_dim": 32,
    "mask_head_dim": 8, "detector_kwargs": {"rpn_post_nms_top_n_train": 50, "box_batch_size_per_image": 16},
}  # fmt: skip
NANO = {"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}


def _targets(n: int = 2) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    images = [torch.rand(3, 32, 32) for _ in range(n)]
    masks = torch.zeros(1, 32, 32, dtype=torch.uint8)
    masks[:, 4:16, 6:20] = 1
    target = {"boxes": torch.tensor([[6.0, 4.0, 20.0, 16.0]]), "labels": torch.tensor([2]), "masks": masks}
    return images, [dict(target) for _ in range(n)]


@pytest.mark.parametrize(
    ("backbone", "kwargs", "taps"),
    [
        ("fan_nano_6_p16_224", NANO, "simple"),
        ("ibot_vit_tiny_patch4_32", {"depth": 1}, "simple"),
        ("fan_tiny_8_p4_hybrid", {"depth": 1}, "hybrid"),
    ],
)
def test_losses_and_predictions(backbone: str, kwargs: dict[str, Any], taps: str) -> None:
    torch.manual_seed(0)
    model = create_model("mask_rcnn", num_classes=3, backbone=backbone, backbone_kwargs=kwargs, **SMALL)
    assert isinstance(model, TokenlabMaskRCNN) and model.body.taps == taps
    images, targets = _targets()
    model.train()
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    grads = [p.grad for n, p in model.body.backbone.named_parameters() if "blocks.0." in n]
    assert grads and all(g is not None for g in grads)  # the loss reaches the backbone
    feats = model.body(torch.rand(1, 3, 64, 64))
    assert list(feats) == ["0", "1", "2", "3", "pool"]
    assert [f.shape[-1] for f in feats.values()] == [16, 8, 4, 2, 1]  # strides 4, 8, 16, 32, 64
    model.eval()
    with torch.no_grad():
        preds = model(images)
    assert len(preds) == 2 and {"boxes", "labels", "scores", "masks"} <= set(preds[0])


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="hybrid-stem FAN"):
        TokenlabMaskRCNN("fan_nano_6_p16_224", 3, NANO, taps="hybrid")
    with pytest.raises(ValueError, match="unknown detection backbone"):
        TokenlabMaskRCNN("resnet50", 3)
    with pytest.raises(ValueError, match="unknown detector_kwargs"):
        TokenlabMaskRCNN("fan_nano_6_p16_224", 3, NANO, detector_kwargs={"no_such_option": 1})


def test_backbone_from_a_classification_export_and_export_round_trip(tmp_path: Path) -> None:
    classifier = create_model("fan_nano_6_p16_224_token", num_classes=5, **NANO)
    save_exported(classifier, tmp_path / "cls", {"model": "fan_nano_6_p16_224_token", "model_kwargs": NANO,
                                                 "num_classes": 5})  # fmt: skip
    det = create_model("mask_rcnn", num_classes=3, backbone="fan_nano_6_p16_224", backbone_kwargs=NANO, **SMALL)
    meta = load_backbone_weights(det, tmp_path / "cls")
    assert meta is not None and meta["model"] == "fan_nano_6_p16_224_token"
    want = classifier.state_dict()["blocks.1.attn.q.weight"]
    assert torch.equal(det.body.backbone.state_dict()["blocks.1.attn.q.weight"], want)
    other = create_model("mask_rcnn", num_classes=3, backbone="fan_nano_6_p16_224",
                         backbone_kwargs={**NANO, "embed_dim": 48}, **SMALL)  # fmt: skip
    with pytest.raises(ValueError):
        load_backbone_weights(other, tmp_path / "cls")
    kwargs = {"backbone": "fan_nano_6_p16_224", "backbone_kwargs": NANO, **SMALL, "num_classes": 3}
    save_exported(det, tmp_path / "det", {"model": "mask_rcnn", "model_kwargs": kwargs, "num_classes": 3})
    loaded, _ = load_exported(tmp_path / "det")  # built on the meta device: the anchors are regenerated
    det.eval()
    images, _ = _targets(1)
    with torch.no_grad():
        a, b = det(images)[0], loaded(images)[0]
    assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["scores"], b["scores"])


def test_stride_16_vits_get_the_vitdet_simple_pyramid() -> None:
    from tokenlab.models.detection import DetectionBackbone
    from tokenlab.models.segmentation import SimplePyramidNeck

    body = DetectionBackbone("ibot_vit_tiny_patch4_32", {"patch_size": 16, "depth": 1, "img_size": 64}, fpn_dim=8)
    assert isinstance(body.neck, SimplePyramidNeck)
    feats = body(torch.rand(1, 3, 64, 64))
    assert [f.shape[-1] for f in feats.values()] == [16, 8, 4, 2, 1]  # strides 4, 8, 16, 32, 64 from tokens at 16
    assert body(torch.rand(1, 3, 50, 60))["0"].shape[-2:] == (16, 16)  # padded up to the patch multiple (64)
