"""From-scratch initialisation of FAN, pinned to the published NVlabs/FAN code.

The published model initialises its hybrid ConvNeXt stem (``convnext_utils._init_weights``, ``ls_init_value``) and
the depthwise convolutions of its channel-processing MLP (``fan.Mlp._init_weights``) differently from PyTorch's
defaults; these tests fail if a from-scratch model drifts back to the defaults.
"""

import json
import math
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file
from torch import nn

import tokenlab  # noqa: F401
from tokenlab.models.layers import ChannelProcessing, DWConv


@pytest.fixture(scope="module")
def tiny_hybrid() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("fan_tiny_8_p4_hybrid", num_classes=1000)


def test_convnext_stem_layer_scale_starts_at_1e_6(tiny_hybrid: nn.Module) -> None:
    gammas = [p for n, p in tiny_hybrid.patch_embed.backbone.named_parameters() if n.endswith("gamma")]
    assert len(gammas) == 6  # depths (3, 3)
    for g in gammas:
        assert torch.equal(g, torch.full_like(g, 1e-6))


def test_convnext_stem_convs_are_trunc_normal_002_with_zero_bias(tiny_hybrid: nn.Module) -> None:
    convs = [m for m in tiny_hybrid.patch_embed.backbone.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 + 1 + 6 * 3  # stem, stage-2 downsample, (dw, fc1, fc2) per block
    weights = torch.cat([c.weight.flatten() for c in convs])
    assert weights.std().item() == pytest.approx(0.02, rel=0.02)
    # Normal-shaped (68.3 % within one std); timm truncates at +-2 absolute, i.e. at 100 std, so not visibly.
    assert (weights.abs() < 0.02).float().mean().item() == pytest.approx(0.683, abs=0.01)
    for c in convs:
        assert c.weight.std().item() == pytest.approx(0.02, rel=0.25)  # per tensor: the smallest has 2k entries
        assert c.bias is not None and not c.bias.any()


def test_hybrid_projection_keeps_pytorch_default(tiny_hybrid: nn.Module) -> None:
    # Outside the published ConvNeXt backbone, and the published FAN._init_weights skips convolutions.
    proj = tiny_hybrid.patch_embed.proj
    bound = 1 / math.sqrt(proj.in_channels * 4)
    assert proj.weight.abs().max().item() <= bound and proj.bias.abs().max().item() > 0


def test_channel_mlp_dwconvs_are_fan_out_normal_with_zero_bias(tiny_hybrid: nn.Module) -> None:
    dwconvs = [m for m in tiny_hybrid.modules() if isinstance(m, DWConv)]
    assert len(dwconvs) == 8
    for dw in dwconvs:
        for conv in (dw.conv1, dw.conv2):
            fan_out = conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels // conv.groups
            assert fan_out == 9
            # 768 channels x 9 taps = 6912 samples: the sample std is within ~3% at 3.5 sigma
            assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.03)
            assert abs(conv.weight.mean().item()) < 0.02
            assert conv.bias is not None and not conv.bias.any()


def test_norm_v_uses_pytorch_layer_norm_eps(tiny_hybrid: nn.Module) -> None:
    blocks = [m for m in tiny_hybrid.modules() if isinstance(m, ChannelProcessing)]
    assert len(blocks) == 8
    for cp in blocks:
        assert isinstance(cp.norm_v, nn.LayerNorm) and cp.norm_v.eps == 1e-5
    assert tiny_hybrid.blocks[0].norm1.eps == 1e-6  # the block norms keep FAN's 1e-6


def test_head_init_scale_only_on_the_large_hybrid_baseline() -> None:
    torch.manual_seed(0)
    large = timm.create_model("fan_large_16_p4_hybrid", num_classes=10)
    assert large.head.weight.std().item() == pytest.approx(0.02e-3, rel=0.1)
    large_token = timm.create_model("fan_large_16_p4_hybrid_token", num_classes=10)
    assert large_token.head.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert large_token.aux_head.weight.std().item() == pytest.approx(0.02, rel=0.1)
    tiny = timm.create_model("fan_tiny_8_p4_hybrid", num_classes=10)
    assert tiny.head.weight.std().item() == pytest.approx(0.02, rel=0.1)


# --- at the published initialisation, against the published implementation (reference/README.md) ---------------
_PUB = Path(__file__).parent / "reference" / "fan_published_init"
_PUB_KW = {"img_size": 64, "embed_dim": 48, "depth": 2, "num_heads": 4, "num_classes": 10}


def _published_init_run(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model.eval().forward_tokens(x)
    ref = json.loads(_PUB.with_suffix(".json").read_text())
    return (out.cls_logits - torch.tensor(ref["cls_logits"])).abs().max(), (
        out.token_logits - torch.tensor(ref["token_logits"])
    ).abs().max()


def test_logits_equal_the_published_implementation_at_its_initialisation() -> None:
    model = timm.create_model("fan_tiny_12_p16_224_token", **_PUB_KW)
    model.load_state_dict(load_file(_PUB.with_suffix(".safetensors")), strict=True)
    cls_err, tok_err = _published_init_run(model)
    assert cls_err < 1e-5 and tok_err < 1e-5  # measured ~5e-8 / 1e-7
    for m in model.modules():  # the bar is sharp enough to see the old norm_v eps (1e-6): ~2e-4 off
        if isinstance(m, ChannelProcessing):
            m.norm_v.eps = 1e-6
    assert max(_published_init_run(model)) > 1e-5


def test_our_from_scratch_init_matches_the_published_init_per_tensor() -> None:
    """Same distribution per tensor: constants equal, random tensors' mean and std within sampling error."""
    published = load_file(_PUB.with_suffix(".safetensors"))
    torch.manual_seed(0)
    ours = timm.create_model("fan_tiny_12_p16_224_token", **_PUB_KW).state_dict()
    assert set(ours) == set(published)
    for key, p in published.items():
        o = ours[key]
        assert o.shape == p.shape, key
        if not p.is_floating_point() or p.numel() < 64 or p.std() == 0:
            if p.numel() > 1 and p.is_floating_point() and p.std() > 0:
                continue  # a handful of random values: too few to compare statistics
            assert torch.equal(o, p) or (p.std() == 0 and torch.allclose(o, p)), key
            continue
        sd = float(p.std())
        assert abs(float(o.std()) / sd - 1) < 0.25, (key, float(o.std()), sd)
        assert abs(float(o.mean()) - float(p.mean())) < 4 * sd / math.sqrt(p.numel()) + 1e-8, key
