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


def test_published_hybrid_taps_feed_stem_stages_block_and_class_tokens() -> None:
    from tokenlab.models.segmentation import PUBLISHED_HYBRID_BLOCK

    # NVlabs/FAN segmentation configs: in_channels [128, 256, C, C] with out_idx 7 / 9 / 15 / 18 (tiny..large)
    assert PUBLISHED_HYBRID_BLOCK == {"fan_tiny_8_p4_hybrid": 7, "fan_small_12_p4_hybrid": 9,
                                      "fan_base_16_p4_hybrid": 15, "fan_large_16_p4_hybrid": 18}  # fmt: skip
    seg = FANSegFormer("fan_tiny_8_p4_hybrid_token", num_classes=3, neck="none", taps="hybrid", decoder_dim=16).eval()
    assert seg.indices == [7]
    assert [p.in_channels for p in seg.decode_head.proj] == [128, 256, 192, 192]
    assert hasattr(seg.backbone, "cls_attn_blocks") and not hasattr(seg.backbone, "norm")
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        feats = seg.forward_features(x)
        assert [tuple(f.shape) for f in feats] == [(1, 128, 16, 24), (1, 256, 8, 12), (1, 192, 4, 6), (1, 192, 4, 6)]
        # the same weights as a classification FAN whose final norm is removed: its patch tokens are the 4th level,
        # its ConvNeXt trunk output is the 2nd
        cls = timm.create_model("fan_tiny_8_p4_hybrid_token", num_classes=0).eval()
        cls.load_state_dict(seg.backbone.state_dict(), strict=False)
        cls.norm = torch.nn.Identity()
        patches = cls.forward_features(x)[1]
        torch.testing.assert_close(feats[3], patches.transpose(1, 2).reshape(1, 192, 4, 6))
        torch.testing.assert_close(feats[1], cls.patch_embed.backbone(x))
        torch.testing.assert_close(feats[2], cls.forward_intermediates(x, [7])[0])
        assert seg(x).shape == (1, 3, 64, 96)
    # Only the patch-token path of the class-attention blocks reaches the taps: the class token's own parameters get
    # zero gradients (not None, so DDP needs no find_unused_parameters), as in the published model
    seg.train()
    seg(x).square().mean().backward()
    zero = {n for n, p in seg.named_parameters() if not p.grad.abs().any()}
    assert "backbone.cls_token" in zero and "backbone.cls_attn_blocks.1.mlp.fc1.weight" in zero
    assert all(n.startswith("backbone.cls_") for n in zero)
    assert not {f"backbone.cls_attn_blocks.{i}.{k}" for i in (0, 1) for k in ("norm1.weight", "gamma1")} & zero
    xl = FANSegFormer("fan_small_12_p4_hybrid", num_classes=2, neck="none", taps="hybrid", indices=[4], decoder_dim=8)
    assert xl.indices == [4] and [p.in_channels for p in xl.decode_head.proj] == [128, 256, 384, 384]


def test_hybrid_taps_errors_and_backbone_weights_keep_class_attention(tmp_path) -> None:
    with pytest.raises(ValueError, match="neck='none'"):
        FANSegFormer("fan_tiny_8_p4_hybrid", taps="hybrid")
    with pytest.raises(ValueError, match="hybrid-stem FAN"):
        FANSegFormer(num_classes=2, neck="none", taps="hybrid", **TINY)
    with pytest.raises(ValueError, match="exactly one block index"):
        FANSegFormer("fan_tiny_8_p4_hybrid", neck="none", taps="hybrid", indices=[3, 7])
    with pytest.raises(ValueError, match="unknown taps 'stem'"):
        FANSegFormer(taps="stem", **TINY)
    cls = timm.create_model("fan_tiny_8_p4_hybrid", num_classes=10)
    save_exported(cls, tmp_path / "model", {"model": "fan_tiny_8_p4_hybrid", "model_kwargs": {"num_classes": 10}})
    seg = FANSegFormer("fan_tiny_8_p4_hybrid", num_classes=4, neck="none", taps="hybrid", decoder_dim=16)
    load_backbone_weights(seg, tmp_path / "model")
    torch.testing.assert_close(seg.backbone.cls_attn_blocks[1].attn.q.weight, cls.cls_attn_blocks[1].attn.q.weight)
    torch.testing.assert_close(seg.backbone.cls_token, cls.cls_token)


def test_decoder_lr_multiplier_reaches_the_optimizer_groups() -> None:
    from tokenlab.engine.builders import param_groups

    seg = FANSegFormer(num_classes=3, head_lr_mult=10.0, **TINY)
    assert seg.lr_scales() == {"decode_head": 10.0, "neck": 10.0}
    groups = param_groups(seg, 0.01, None)
    head = {id(p) for n, p in seg.named_parameters() if n.startswith(("decode_head.", "neck."))}
    for g in groups:
        ids = {id(p) for p in g["params"]}
        assert g["lr_scale"] == (10.0 if ids <= head else 1.0) and (ids <= head or not ids & head)
    assert sum(len(g["params"]) for g in groups) == len(list(seg.parameters()))
    assert {(g["lr_scale"], g["weight_decay"]) for g in groups} == {(1.0, 0.0), (1.0, 0.01), (10.0, 0.0), (10.0, 0.01)}
    assert FANSegFormer(num_classes=3, **TINY).lr_scales() == {}
    with pytest.raises(ValueError, match="head_lr_mult"):
        FANSegFormer(num_classes=3, head_lr_mult=0.0, **TINY)


def test_fuse_conv_starts_as_the_released_head() -> None:
    head = SegFormerHead([64, 64, 64, 64], 19, embed_dim=256)
    w = head.fuse[0].weight  # Kaiming normal, fan-out (256 outputs of a 1x1 conv), ReLU gain
    assert abs(float(w.detach().std()) - (2 / 256) ** 0.5) < 3e-3
