"""FAN-specific building blocks that timm does not provide.

Fully Attentional Networks (Zhou et al., "Understanding The Robustness in Vision Transformers", ICML 2022,
https://arxiv.org/abs/2204.12451) pair ordinary token self-attention with a *channel processing* module that
re-weights channels by an attention computed over tokens. Everything generic (Mlp, DropPath, the Fourier
positional encoding, the class-attention block, ConvNeXt stages) comes from timm; this file holds only:

- ``TokenMixing``: multi-head self-attention with separate ``q`` and ``kv`` projections (the published key
  layout), computed with ``scaled_dot_product_attention``;
- ``DWConv`` / ``DWConvMlp``: the MLP with a depthwise-conv branch, ``fc1 -> h + gamma * DWConv(h) -> fc2``;
- ``ChannelProcessing``: ``a = sigmoid(softmax_N(q)^T mean_d(softmax_N(k))) * t``, output ``a * LN(Mlp(x))``;
- ``FANBlock``: ``x + DropPath(g1 * TokenMixing(LN(x)))`` then ``x + DropPath(g2 * ChannelProcessing(LN(x)))``;
- ``ConvPatchEmbed`` (ViT stem: stride-2 3x3 conv+BN layers) and ``HybridPatchEmbed`` (truncated ConvNeXt).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import DropPath, LayerNorm2d, trunc_normal_
from timm.models.convnext import ConvNeXtStage
from torch import nn


class TokenMixing(nn.Module):
    """Multi-head self-attention over tokens, ``q`` and ``kv`` as separate linears (FAN key layout).

    Args:
        dim: Token width C.
        num_heads: Number of heads; ``dim`` must be divisible by it.
        qkv_bias: Bias on the q/kv projections (True in every published FAN).
        attn_drop: Dropout on the attention weights (training only).
        proj_drop: Dropout after the output projection.
    """

    def __init__(
        self, dim: int, num_heads: int = 8, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """Self-attention token mixing of ``(B, N, C)`` tokens; ``scale`` (C,) multiplies the output channels.

        ``scale`` (the block's layer scale) is folded into ``proj``'s weight and bias: a product over a (C, C)
        matrix instead of over every token, in the forward and the backward pass.
        """
        B, N, C = x.shape
        h = self.num_heads
        q = self.q(x).reshape(B, N, h, C // h).transpose(1, 2)  # (B, h, N, d)
        # unbind, not kv[0] / kv[1]: its backward is one stack, not a zero-filled buffer per index
        k, v = self.kv(x).reshape(B, N, 2, h, C // h).permute(2, 0, 3, 1, 4).unbind(0)  # 2 x (B, h, N, d)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(_scaled_linear(self.proj, x, scale))


def _scaled_linear(linear: nn.Linear, x: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """``linear(x) * scale`` computed as one linear with the output rows of weight and bias scaled."""
    if scale is None:
        return linear(x)
    bias = None if linear.bias is None else linear.bias * scale
    return F.linear(x, linear.weight * scale[:, None], bias)


def init_conv_fan_out_(conv: nn.Conv2d) -> None:
    """He-style normal init on the fan-out, ``std = sqrt(2 / (k_h * k_w * out_channels / groups))``, zero bias.

    The published FAN initialises the depthwise convolutions of its channel-processing MLP this way (its ``Mlp``
    and ``ChannelProcessing`` ``_init_weights``); for a depthwise 3x3 conv that is ``std = sqrt(2 / 9)``, far
    wider than PyTorch's default, so a from-scratch model starts where the published one does.
    """
    fan_out = conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels // conv.groups
    nn.init.normal_(conv.weight, mean=0.0, std=math.sqrt(2.0 / fan_out))
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


class DWConv(nn.Module):
    """Depthwise 3x3 conv -> activation -> BatchNorm -> depthwise 3x3 conv, applied on the token grid.

    Both convolutions start with the published fan-out normal init (``init_conv_fan_out_``).
    """

    def __init__(self, dim: int, act_layer: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.act = act_layer()
        self.bn = nn.BatchNorm2d(dim)
        self.conv2 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        init_conv_fan_out_(self.conv1)
        init_conv_fan_out_(self.conv2)

    def forward(self, x: torch.Tensor, H: int, W: int, scale: torch.Tensor | None = None) -> torch.Tensor:
        """Depth-wise 3x3 convolution of ``(B, N, C)`` tokens laid out on their ``H x W`` grid.

        ``scale`` (C,) multiplies the output channels; it is folded into ``conv2``'s weight and bias (one small
        product on the weights instead of a product over the whole activation, and no stored conv output for its
        gradient).

        The tokens are viewed as a channels-last ``(B, C, H, W)`` map (no copy), so the convolutions, the
        BatchNorm and the way back to ``(B, N, C)`` run without the two transposed copies of the naive layout.
        """
        B, N, C = x.shape
        x = x.reshape(B, H, W, C).permute(0, 3, 1, 2)  # (B, N, C) -> (B, C, H, W) view, channels-last strides
        conv = self.conv2
        weight, bias = conv.weight, conv.bias
        if scale is not None:
            bias = None if bias is None else bias * scale
            weight = weight * scale[:, None, None, None]
        x = self.conv1(x)
        if self._lean(x):  # the memory-lean path: GELU and BatchNorm outputs recomputed in the backward pass
            x = _GeluBatchNormConv.apply(x, self.bn.weight, self.bn.bias, self.bn, weight, bias, conv.groups)
        else:
            x = F.conv2d(self.bn(self.act(x)), weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        return x.permute(0, 2, 3, 1).reshape(B, N, C)  # (B, C, H, W) -> (B, N, C); a view for channels-last

    def _lean(self, x: torch.Tensor) -> bool:
        """Whether ``_GeluBatchNormConv`` computes exactly what ``conv2(bn(act(x)))`` would here."""
        bn, act, conv = self.bn, self.act, self.conv2
        return (
            self.training
            and torch.is_grad_enabled()
            and not torch.is_autocast_enabled(x.device.type)
            and type(act) is nn.GELU
            and act.approximate == "none"
            and type(bn) is nn.BatchNorm2d  # not SyncBatchNorm
            and bn.affine
            and bn.track_running_stats
            and bn.momentum is not None
            and conv.stride == (1, 1)
            and conv.padding == (1, 1)
            and conv.dilation == (1, 1)
        )


class _GeluBatchNormConv(torch.autograd.Function):
    """``conv2d(BatchNorm_train(gelu(u)), w, b)`` (3x3, stride 1, padding 1) storing only ``u`` for the backward.

    Autograd would keep three full-size maps for this chain (the GELU input, the BatchNorm input and the conv
    input); here only ``u`` and the per-channel batch statistics are kept, and the GELU and BatchNorm outputs are
    recomputed in the backward pass with the same kernels, so outputs and gradients are those of the modules. The
    BatchNorm running statistics are updated once, in the forward pass, as ``nn.BatchNorm2d`` does.
    """

    @staticmethod
    def forward(
        ctx: Any,
        u: torch.Tensor,
        bn_w: torch.Tensor,
        bn_b: torch.Tensor,
        bn: nn.BatchNorm2d,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        groups: int,
    ) -> torch.Tensor:
        assert bn.num_batches_tracked is not None and bn.momentum is not None
        bn.num_batches_tracked.add_(1)
        z, mean, invstd = torch.native_batch_norm(
            F.gelu(u), bn_w, bn_b, bn.running_mean, bn.running_var, True, bn.momentum, bn.eps
        )
        ctx.save_for_backward(u, bn_w, bn_b, mean, invstd, weight)
        ctx.eps, ctx.groups, ctx.has_bias = bn.eps, groups, bias is not None
        return F.conv2d(z, weight, bias, 1, 1, 1, groups)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        u, bn_w, bn_b, mean, invstd, weight = ctx.saved_tensors
        g = F.gelu(u)
        z = torch.native_batch_norm(g, bn_w, bn_b, None, None, True, 0.0, ctx.eps)[0]  # the forward's kernel again
        gz, gw, gb = torch.ops.aten.convolution_backward(
            grad, z, weight, [weight.shape[0]] if ctx.has_bias else None, [1, 1], [1, 1], [1, 1], False, [0, 0],
            ctx.groups, [True, True, ctx.has_bias],
        )  # fmt: skip
        gg, g_bn_w, g_bn_b = torch.ops.aten.native_batch_norm_backward(
            gz, g, bn_w, None, None, mean, invstd, True, ctx.eps, [True, True, True]
        )
        gu = torch.ops.aten.gelu_backward(gg, u)
        return gu, g_bn_w, g_bn_b, None, gw, gb if ctx.has_bias else None, None


class DWConvMlp(nn.Module):
    """``fc1 -> h + gamma * DWConv(h) -> fc2``; there is no activation after ``fc1`` in the published model."""

    def __init__(self, dim: int, hidden_dim: int, act_layer: type[nn.Module] = nn.GELU, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.dwconv = DWConv(hidden_dim, act_layer)
        self.gamma = nn.Parameter(torch.ones(hidden_dim))
        self.drop = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """The MLP on ``(B, N, C)`` tokens, with a depth-wise convolution over their ``H x W`` grid."""
        x = self.fc1(x)
        x = x + self.dwconv(x, H, W, scale=self.gamma)  # gamma folded into the last depthwise conv
        return self.drop(self.fc2(self.drop(x)))


class ChannelProcessing(nn.Module):
    """FAN's attentive channel processing (the ``mlp`` of a FAN block).

    Per head (width d): ``q = softmax_tokens(W_q x)``, ``k = mean_d softmax_tokens(x)``; the channel attention
    ``a = sigmoid(q^T k) * t`` (one learnable temperature per head) gates ``v = LN(DWConvMlp(x))`` channel-wise.

    Args:
        dim: Token width C.
        num_heads: Number of heads.
        mlp_ratio: Hidden width of the value MLP relative to ``dim``.
        qkv_bias: Bias on the ``q`` projection.
        drop: Dropout inside the value MLP.
        act_layer: Activation in the depthwise branch.
        norm_layer: Norm applied to the value MLP output. The published block builds it with PyTorch's default
            ``nn.LayerNorm`` (eps 1e-5), not the block's eps-1e-6 norm, so that is the default here and
            ``FANBlock`` does not pass its own norm on.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        act_layer: type[nn.Module] = nn.GELU,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.mlp_v = DWConvMlp(dim, int(dim * mlp_ratio), act_layer, drop)
        self.norm_v = norm_layer(dim)

    def channel_attention(self, x: torch.Tensor) -> torch.Tensor:
        """The gate ``a`` of shape (B, heads, d, 1)."""
        B, N, C = x.shape
        h = self.num_heads
        # The softmaxes run over the token axis of the (B, N, C) layout: every channel is its own softmax, so
        # splitting the channels into heads first changes nothing and only adds copies.
        q = self.q(x).softmax(dim=1).reshape(B, N, h, C // h).permute(0, 2, 3, 1)  # (B, h, d, N)
        k = x.softmax(dim=1).reshape(B, N, h, C // h).mean(dim=-1)  # mean over each head's channels: (B, N, h)
        return torch.sigmoid(q @ k.transpose(1, 2).unsqueeze(-1)) * self.temperature  # (B, h, d, 1)

    def forward(self, x: torch.Tensor, H: int, W: int, scale: torch.Tensor | None = None) -> torch.Tensor:
        """Channel attention of ``(B, N, C)`` tokens on an ``H x W`` grid; ``scale`` (C,) multiplies the channels.

        ``scale`` (the block's layer scale) is folded into the (B, 1, C) gate, not applied to every token.
        """
        B, N, C = x.shape
        attn = self.channel_attention(x).reshape(B, 1, C)  # (B, h, d, 1) -> one gate per channel, head-major
        if scale is not None:
            attn = attn * scale
        return self.norm_v(self.mlp_v(x, H, W)) * attn  # the gate broadcast over tokens: no permuted copies


class FANBlock(nn.Module):
    """Token mixing followed by channel processing, each with a layer-scale residual.

    Args:
        dim: Token width C.
        num_heads: Number of heads (shared by both halves).
        mlp_ratio: Hidden ratio of the channel-processing value MLP.
        qkv_bias: Bias on attention projections.
        drop: Dropout inside projections / MLP.
        attn_drop: Dropout on attention weights.
        drop_path: Stochastic-depth rate of this block.
        eta: Initial value of the layer-scale vectors ``gamma1``/``gamma2``.
        act_layer: Activation type.
        norm_layer: Norm type of ``norm1``/``norm2`` (LayerNorm with eps 1e-6 in FAN); the channel processing's
            ``norm_v`` keeps the PyTorch default eps 1e-5, as in the published block.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        eta: float = 1.0,
        act_layer: type[nn.Module] = nn.GELU,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = TokenMixing(dim, num_heads, qkv_bias, attn_drop, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = ChannelProcessing(dim, num_heads, mlp_ratio, qkv_bias, drop, act_layer)
        self.gamma1 = nn.Parameter(eta * torch.ones(dim))
        self.gamma2 = nn.Parameter(eta * torch.ones(dim))

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """One FAN block on ``(B, N, C)`` tokens on an ``H x W`` grid."""
        # the layer scales gamma1 / gamma2 are folded into the last linear map of each half (see their ``scale``)
        x = x + self.drop_path(self.attn(self.norm1(x), scale=self.gamma1))
        return x + self.drop_path(self.mlp(self.norm2(x), H, W, scale=self.gamma2))


def _conv3x3_bn(in_chs: int, out_chs: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_chs, out_chs, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(out_chs))


class ConvPatchEmbed(nn.Module):
    """ViT-variant stem: ``log2(patch_size)`` stride-2 3x3 conv+BN layers with GELU in between.

    Patch 16 uses widths C/8 -> C/4 -> C/2 -> C (the published layout, keys ``proj.{0,2,4,6}``); patch 8 and 4
    drop the first one or two layers so small images (CIFAR at 32 px) still get a useful token grid.
    """

    _WIDTHS = {16: (8, 4, 2, 1), 8: (4, 2, 1), 4: (2, 1)}

    def __init__(self, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768) -> None:
        super().__init__()
        if patch_size not in self._WIDTHS:
            raise ValueError(f"ViT-stem patch_size must be one of {sorted(self._WIDTHS)}, got {patch_size}")
        self.patch_size = patch_size
        layers: list[nn.Module] = []
        chs = in_chans
        for i, div in enumerate(self._WIDTHS[patch_size]):
            if i:
                layers.append(nn.GELU())
            layers.append(_conv3x3_bn(chs, embed_dim // div))
            chs = embed_dim // div
        self.proj = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Images ``(B, 3, H, W)`` -> tokens ``(B, N, C)`` and their ``(H, W)`` grid."""
        x = self.proj(x)
        H, W = x.shape[-2:]
        return x.flatten(2).transpose(1, 2), (H, W)  # (B, C, H, W) -> (B, N, C)


class UnbiasedLayerNorm2d(LayerNorm2d):
    """LayerNorm over channels of a (B, C, H, W) map that divides by the *unbiased* variance (C - 1).

    The published hybrid FAN normalises this way inside its ConvNeXt stages (block and downsample norms; the stem
    norm is the usual biased one): with it, tokenlab reproduces the published outputs to 1e-6 instead of 1e-3
    (``tests/models/reference/fan_golden.json``). timm's ``LayerNorm2d`` has no unbiased option, hence this subclass.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise the channels of ``(B, C, H, W)`` with the unbiased variance."""
        var, mean = torch.var_mean(x, dim=1, unbiased=True, keepdim=True)
        x = (x - mean) * torch.rsqrt(var + self.eps)
        return x * self.weight[:, None, None] + self.bias[:, None, None]


class _ConvNeXtTrunk(nn.Module):
    """The first two ConvNeXt stages (stride 8, 256 channels) used as the hybrid stem's backbone.

    Initialised as the published ConvNeXt backbone is (its ``ls_init_value`` default and ``_init_weights``): block
    layer scales start at 1e-6, so every block starts close to the identity, and every convolution gets
    truncated-normal std 0.02 weights and zero bias instead of PyTorch's fan-in uniform default.
    """

    LS_INIT_VALUE = 1e-6

    def __init__(self, in_chans: int, depths: tuple[int, int], dims: tuple[int, int] = (128, 256)) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_chans, dims[0], 4, stride=4), LayerNorm2d(dims[0]))
        stages = []
        prev = dims[0]
        for i, (depth, dim) in enumerate(zip(depths, dims, strict=True)):
            stages.append(
                ConvNeXtStage(
                    prev,
                    dim,
                    stride=1 if i == 0 else 2,
                    depth=depth,
                    conv_mlp=True,
                    ls_init_value=self.LS_INIT_VALUE,
                    norm_layer=UnbiasedLayerNorm2d,
                )
            )
            prev = dim
        self.stages = nn.Sequential(*stages)
        self.num_features = prev
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))


class HybridPatchEmbed(nn.Module):
    """Hybrid-variant stem: truncated ConvNeXt (stride 8) then a 2x2 stride-2 conv to the token width.

    Tokens come out at stride 16, as in the ViT stem with patch 16. ``proj`` keeps PyTorch's default init: it sits
    outside the published ConvNeXt backbone, and the published FAN's own ``_init_weights`` leaves convolutions alone.
    """

    def __init__(self, in_chans: int = 3, embed_dim: int = 768, depths: tuple[int, int] = (3, 3)) -> None:
        super().__init__()
        self.patch_size = 16
        self.backbone = _ConvNeXtTrunk(in_chans, depths)
        self.proj = nn.Conv2d(self.backbone.num_features, embed_dim, 2, stride=2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Images ``(B, 3, H, W)`` -> tokens ``(B, N, C)`` and their ``(H, W)`` grid."""
        x = self.proj(self.backbone(x))
        H, W = x.shape[-2:]
        return x.flatten(2).transpose(1, 2), (H, W)
