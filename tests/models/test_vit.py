"""MaskedViT: the published iBOT position-embedding interpolation for other input sizes (local crops)."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed

import tokenlab.models  # noqa: F401  (registers the models)
from tokenlab.models.vit import interpolate_pos_embed_ibot

KW = dict(img_size=32, patch_size=4, embed_dim=16, depth=1, num_heads=2)


def _published(pos_embed: torch.Tensor, h: int, w: int, patch: int) -> torch.Tensor:
    """iBOT's VisionTransformer.interpolate_pos_encoding, as its source reads (square source grid)."""
    n = pos_embed.shape[1] - 1
    side = int(math.sqrt(n))
    grid = pos_embed[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    h0, w0 = h // patch + 0.1, w // patch + 0.1
    out = F.interpolate(grid, scale_factor=(h0 / side, w0 / side), mode="bicubic")
    return torch.cat([pos_embed[:, :1], out.permute(0, 2, 3, 1).reshape(1, -1, pos_embed.shape[-1])], dim=1)


def _pos_tokens(model: torch.nn.Module, size: int) -> torch.Tensor:
    """What _pos_embed adds: run it on zero patch embeddings (the class token is zeroed too)."""
    with torch.no_grad():
        model.cls_token.zero_()
        x = torch.zeros(1, size // 4, size // 4, model.embed_dim)
        return model._pos_embed(x)


def test_local_crops_use_the_published_interpolation_by_default() -> None:
    torch.manual_seed(0)
    model = timm.create_model("ibot_vit_tiny_patch4_32", num_classes=0, **KW).eval()
    with torch.no_grad():
        model.pos_embed.normal_()
    assert model.pos_embed_interp == "ibot"
    for size in (16, 24, 48):  # 4x4 and 6x6 local crops, 12x12 larger than native
        got = _pos_tokens(model, size)
        torch.testing.assert_close(got, _published(model.pos_embed, size, size, 4), atol=1e-6, rtol=0)
        timm_way = resample_abs_pos_embed(model.pos_embed, new_size=(size // 4,) * 2, num_prefix_tokens=1)
        assert (got - timm_way).abs().max() > 1e-3, size  # the two rules differ away from the native size
    torch.testing.assert_close(_pos_tokens(model, 32), model.pos_embed.detach())  # native: unchanged


def test_timm_interpolation_is_an_option() -> None:
    torch.manual_seed(0)
    model = timm.create_model("ibot_vit_tiny_patch4_32", num_classes=0, pos_embed_interp="timm", **KW).eval()
    with torch.no_grad():
        model.pos_embed.normal_()
    timm_way = resample_abs_pos_embed(model.pos_embed, new_size=(4, 4), num_prefix_tokens=1)
    torch.testing.assert_close(_pos_tokens(model, 16), timm_way)
    with pytest.raises(ValueError, match="pos_embed_interp"):
        timm.create_model("ibot_vit_tiny_patch4_32", pos_embed_interp="bilinear", **KW)


def test_interpolation_scale_factor_stretches_the_sampling_grid() -> None:
    """The +0.1 scale factor maps the coordinates too (14 -> 6 samples at a step of 14 / 6.1, not 14 / 6), so the
    result differs from bicubic to the size 6 x 6 even without anti-aliasing."""
    torch.manual_seed(0)
    pos = torch.randn(1, 196, 8)
    out = interpolate_pos_embed_ibot(pos, (14, 14), (6, 6))
    grid = pos.reshape(1, 14, 14, 8).permute(0, 3, 1, 2)
    by_size = F.interpolate(grid, size=(6, 6), mode="bicubic").permute(0, 2, 3, 1).reshape(1, 36, 8)
    assert out.shape == (1, 36, 8) and (out - by_size).abs().max() > 1e-2
    ramp = torch.arange(14.0).reshape(1, 14, 1, 1).expand(1, 14, 14, 1).reshape(1, 196, 1)
    rows = interpolate_pos_embed_ibot(ramp, (14, 14), (6, 6)).reshape(6, 6)[:, 0]
    assert rows[-1] < (5 + 0.5) * 14 / 6 - 0.5 - 0.1  # the last sample sits short of the size-based grid's


def test_masked_forward_at_local_size() -> None:
    model = timm.create_model("ibot_vit_tiny_patch4_32", num_classes=0, **KW).eval()
    cls, patches = model.forward_features(torch.randn(2, 3, 16, 16), torch.zeros(2, 16, dtype=torch.bool))
    assert cls.shape == (2, 16) and patches.shape == (2, 16, 16)
