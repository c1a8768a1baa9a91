"""The FAN + SegFormer segmentation model: output size, gradients, registry, backbone initialisation."""

import json

import pytest
import timm
import torch

import tokenlab  # noqa: F401
from tokenlab.models import save_exported
from tokenlab.models.segmentation import FANSegFormer, SegFormerHead, default_indices, load_backbone_weights

TINY = dict(backbone="fan_nano_6_p16_224", backbone_kwargs=dict(patch_size=4), decoder_dim=32)


@pytest.mark.parametrize("neck", ["pyramid", "none"])
@pytest.mark.parametrize("size", [(32, 32), (32, 48)])
def test_output_has_input_spatial_size(neck: str, size: tuple[int, int]) -> None:
    model = timm.create_model("segformer_fan", num_classes=5, neck=neck, **TINY)
    x = torch.randn(2, 3, *size)
    out = model(x)
    assert out.shape == (2, 5, *size)
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_hybrid_stem_and_head_shapes() -> None:
    model = FANSegFormer("fan_tiny_8_p4_hybrid_token", num_classes=3, neck="none", indices=[3, 7], decoder_dim=16)
    assert model(torch.randn(1, 3, 64, 32)).shape == (1, 3, 64, 32)
    head = SegFormerHead([8, 8], 4, embed_dim=16)
    out = head([torch.randn(1, 8, 8, 8), torch.randn(1, 8, 4, 4)])
    assert out.shape == (1, 4, 8, 8)  # fused at the finest level


def test_default_indices() -> None:
    assert default_indices(12) == [2, 5, 8, 11]
    assert default_indices(6) == [1, 2, 3, 5]
    with pytest.raises(ValueError, match="cannot take 4 feature levels from a backbone of depth 2"):
        default_indices(2)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown FAN backbone 'fan_huge'"):
        FANSegFormer("fan_huge")
    with pytest.raises(ValueError, match="unknown neck 'fpn'; valid: pyramid, none"):
        FANSegFormer(num_classes=2, neck="fpn", **TINY)
    with pytest.raises(ValueError, match="out of range"):
        FANSegFormer(num_classes=2, indices=[0, 1, 2, 9], **TINY)


def test_backbone_initialised_from_exported_classifier(tmp_path) -> None:
    cls = timm.create_model("fan_nano_6_p16_224_token", num_classes=10, patch_size=4, img_size=32)
    meta = {"model": "fan_nano_6_p16_224_token", "model_kwargs": {"num_classes": 10, "patch_size": 4}}
    save_exported(cls, tmp_path / "run" / "model", meta)
    seg = FANSegFormer("fan_nano_6_p16_224_token", num_classes=4, backbone_kwargs={"patch_size": 4}, decoder_dim=16)
    got = load_backbone_weights(seg, tmp_path / "run")
    assert got["model"] == "fan_nano_6_p16_224_token"
    torch.testing.assert_close(seg.backbone.blocks[2].attn.q.weight, cls.blocks[2].attn.q.weight)
    assert not hasattr(seg.backbone, "cls_attn_blocks")

    wrong_patch = FANSegFormer("fan_nano_6_p16_224_token", num_classes=4, backbone_kwargs={"patch_size": 8})
    with pytest.raises(ValueError, match="shape mismatches"):
        load_backbone_weights(wrong_patch, tmp_path / "run")
    other = FANSegFormer(num_classes=4, **TINY)  # the plain FAN of the same size: only aux_head differs, dropped
    load_backbone_weights(other, tmp_path / "run" / "model")
    torch.testing.assert_close(other.backbone.blocks[2].attn.q.weight, cls.blocks[2].attn.q.weight)
    hybrid = FANSegFormer("fan_tiny_8_p4_hybrid", num_classes=4, decoder_dim=16)
    with pytest.raises(ValueError, match="set backbone='fan_nano_6_p16_224_token'"):
        load_backbone_weights(hybrid, tmp_path / "run" / "model")
    with pytest.raises(FileNotFoundError, match="no classification model"):
        load_backbone_weights(other, tmp_path / "missing")
    assert json.loads((tmp_path / "run" / "model.json").read_text())["model"] == "fan_nano_6_p16_224_token"
