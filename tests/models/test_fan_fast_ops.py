"""FAN's rewritten ops (fewer copies, folded layer scales, the memory-lean GELU-BatchNorm-conv) against the
published formulation written out here, in fp32 to 1e-5; and the fast path's layouts and bf16 autocast."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F

import tokenlab  # noqa: F401
from tokenlab.models.layers import ChannelProcessing, DWConv, FANBlock, TokenMixing


def _reference_block(blk: FANBlock, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """One FAN block computed the published way: split heads, transposed copies, layer scales on the outputs."""

    def token_mixing(m: TokenMixing, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        h = m.num_heads
        q = m.q(x).reshape(B, N, h, C // h).transpose(1, 2)
        kv = m.kv(x).reshape(B, N, 2, h, C // h).permute(2, 0, 3, 1, 4)
        attn = (q @ kv[0].transpose(-2, -1) * (C // h) ** -0.5).softmax(-1)
        return m.proj((attn @ kv[1]).transpose(1, 2).reshape(B, N, C))

    def dwconv(m: DWConv, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        x = x.transpose(1, 2).reshape(B, C, H, W)
        return m.conv2(m.bn(m.act(m.conv1(x)))).reshape(B, C, N).transpose(1, 2)

    def channel_processing(m: ChannelProcessing, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        h = m.num_heads
        q = m.q(x).reshape(B, N, h, C // h).transpose(1, 2).softmax(-2).transpose(-1, -2)
        k = x.reshape(B, N, h, C // h).transpose(1, 2).softmax(-2).mean(-1, keepdim=True)
        attn = torch.sigmoid(q @ k) * m.temperature
        mlp = m.mlp_v
        hid = mlp.fc1(x)
        v = m.norm_v(mlp.fc2(hid + mlp.gamma * dwconv(mlp.dwconv, hid)))
        v = v.reshape(B, N, h, C // h).permute(0, 2, 3, 1)
        return (attn * v).permute(0, 3, 1, 2).reshape(B, N, C)

    x = x + blk.gamma1 * token_mixing(blk.attn, blk.norm1(x))
    return x + blk.gamma2 * channel_processing(blk.mlp, blk.norm2(x))


def _randomised_block(seed: int = 0) -> FANBlock:
    torch.manual_seed(seed)
    blk = FANBlock(24, 3).train()
    with torch.no_grad():  # move every parameter away from its init so folded scales and norms matter
        for p in blk.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return blk


@pytest.mark.parametrize("train", [True, False])
def test_block_outputs_gradients_and_bn_statistics_match_the_published_formulation(train: bool) -> None:
    blk = _randomised_block()
    ref = copy.deepcopy(blk)
    blk.train(train)
    ref.train(train)
    x = torch.randn(3, 20, 24, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    out, out_ref = blk(x, 4, 5), _reference_block(ref, x_ref, 4, 5)
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5)
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    (out_ref * weights).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-4, rtol=1e-4)  # fp32 summation order only
    ref_params = dict(ref.named_parameters())
    for name, p in blk.named_parameters():
        torch.testing.assert_close(p.grad, ref_params[name].grad, atol=1e-4, rtol=1e-4, msg=name)
    ref_buffers = dict(ref.named_buffers())
    for name, b in blk.named_buffers():  # BatchNorm running statistics move once per forward, as in nn.BatchNorm2d
        torch.testing.assert_close(b, ref_buffers[name], atol=1e-6, rtol=1e-6, msg=name)


def test_memory_lean_path_keeps_fewer_activations() -> None:
    """The GELU-BatchNorm-conv chain stores its input only: two hidden-size maps fewer per block."""
    blk = _randomised_block()
    x = torch.randn(2, 20, 24, requires_grad=True)

    def saved_bytes(lean: bool) -> int:
        storages: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        dw = blk.mlp.mlp_v.dwconv
        dw._lean = (lambda _x: DWConv._lean(dw, _x)) if lean else (lambda _x: False)  # type: ignore[method-assign]
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            blk(x, 4, 5)
        return sum(storages.values())

    hidden_map = 2 * 20 * 96 * 4  # (B, 4C, H, W) float32
    assert saved_bytes(False) - saved_bytes(True) >= 2 * hidden_map


@pytest.mark.parametrize("name", ["fan_nano_6_p16_224", "fan_tiny_8_p4_hybrid"])
def test_fast_path_layouts_and_bf16_agree_with_the_reference_logits(name: str) -> None:
    kwargs = {"patch_size": 8} if "p16" in name else {}
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5, **kwargs).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        fast = copy.deepcopy(model).to(memory_format=torch.channels_last)
        cl = fast(x.contiguous(memory_format=torch.channels_last))  # the fast path's CUDA layout, in fp32
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model(x)
    torch.testing.assert_close(cl, ref, atol=1e-5, rtol=1e-5)
    assert bf16.dtype == torch.bfloat16
    err = (bf16.float() - ref).abs().max() / ref.abs().max()
    assert err < 0.05  # bf16 keeps 8 bits of mantissa: a few % of the logit scale after 6-8 blocks
    assert F.cosine_similarity(bf16.float().flatten(), ref.flatten(), dim=0) > 0.999
