"""Fully Attentional Networks (FAN) and their STL token-labeling variants.

Papers:
- [0] Zhou et al., "Understanding The Robustness in Vision Transformers", ICML 2022. https://arxiv.org/abs/2204.12451
- [1] Zhao et al., "Fully Attentional Networks with Self-emerging Token Labeling", ICCV 2023.
  https://arxiv.org/abs/2401.03844

Written from the papers' descriptions; state-dict names follow the published
checkpoints so they load with ``strict=True``. Structure: stem (ViT conv stem or truncated ConvNeXt) -> Fourier
positional encoding -> ``depth`` FAN blocks -> class token + 2 class-attention blocks (XCiT style,
``tokens_norm=True``) -> final LayerNorm -> ``head`` on the class token, and for ``_token`` models an ``aux_head``
on every patch token. The official token-model prediction is ``cls_logits + 0.5 * max_tokens(aux_logits)``.

Blocks may change width (``channel_dims``, the published ``fan_Xlarge_16_p4_hybrid``): where block ``i`` and block
``i + 1`` differ, block ``i`` carries a ``downsample`` (overlapping 3x3 stride-2 conv + LayerNorm, timm's
``OverlapPatchEmbed``) applied after it, so the later blocks work on a grid of half the size (token stride 32).

For visualisation, ``forward_attention_maps`` returns every block's token-mixing attention ``softmax(q k^T / sqrt(d))``
and ``class_attention_maps`` the class token's attention in the last class-attention block.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from timm.layers import trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.pvt_v2 import OverlapPatchEmbed
from timm.models.xcit import ClassAttentionBlock, ClassAttn, PositionalEncodingFourier
from torch import nn
from torch.utils.checkpoint import checkpoint

from tokenlab.models._registry import base_cfg
from tokenlab.models.layers import ConvPatchEmbed, FANBlock, HybridPatchEmbed, TokenMixing, init_conv_fan_out_

__all__ = ["FAN", "TokenOutput"]

AUX_WEIGHT = 0.5  # weight of the max-over-tokens aux logits in the official STL evaluation rule


#: FAN's default norm layer (one shared module-level default rather than a call in the signature).
_LAYER_NORM = partial(nn.LayerNorm, eps=1e-6)


@dataclass
class TokenOutput:
    """Outputs of a token model: class-token logits, per-token logits and the token grid.

    Attributes:
        cls_logits: (B, K) logits of the class-token head.
        token_logits: (B, N, K) ``aux_head`` logits of every patch token (row-major over ``grid``), or None for a
            model without ``aux_head``.
        grid: (H, W) token grid, ``H * W == N``.
    """

    cls_logits: torch.Tensor
    token_logits: torch.Tensor | None
    grid: tuple[int, int]

    def combined(self, aux_weight: float = AUX_WEIGHT) -> torch.Tensor:
        """The official STL prediction ``cls + aux_weight * max_over_tokens(aux)``; plain cls logits without aux."""
        if self.token_logits is None:
            return self.cls_logits
        return self.cls_logits + aux_weight * self.token_logits.max(dim=1).values


class FAN(nn.Module):
    """Fully Attentional Network with a ViT or hybrid (ConvNeXt) stem.

    Args:
        img_size: Nominal input size (for the pretrained cfg); any size divisible by the patch size works.
        patch_size: Token stride of the ViT stem: 4, 8 or 16. The hybrid stem is always 16.
        in_chans: Input channels.
        num_classes: Classes of ``head`` (and ``aux_head``); 0 makes both identities.
        embed_dim: Token width C.
        depth: Number of FAN blocks.
        num_heads: Heads of every block and of the class-attention blocks, or one number per block (the
            class-attention blocks take the last).
        mlp_ratio: MLP hidden ratio.
        qkv_bias: Bias on attention projections.
        drop_rate: Dropout rate in blocks and before the head.
        attn_drop_rate: Attention dropout rate.
        drop_path_rate: Stochastic depth, the same rate for every block (as published).
        stem: ``"vit"`` (conv stem) or ``"hybrid"`` (truncated ConvNeXt).
        hybrid_depths: ConvNeXt stage depths of the hybrid stem.
        cls_attn_layers: Number of class-attention blocks.
        eta: Layer-scale init.
        aux_head: Add the STL per-token classifier ``aux_head``.
        use_mask_token: Add a learned, zero-initialised mask embedding for masked image modelling (iBOT).
        norm_layer: Norm type of the transformer part.
        head_init_scale: Factor on the initial ``head`` weight and bias. The published ``fan_large_16_p4_hybrid``
            uses 0.001 so the large model starts with near-zero logits; ``aux_head`` is never scaled (as published).
        channel_dims: Width of each block (default ``embed_dim`` for all; the first must equal ``embed_dim``).
            Between two blocks of different width a stride-2 downsample halves the token grid (see the module
            docstring); the class-attention blocks, norm and heads take the last width.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int | Sequence[int] = 8,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        stem: str = "vit",
        hybrid_depths: tuple[int, int] = (3, 3),
        cls_attn_layers: int = 2,
        eta: float = 1.0,
        aux_head: bool = False,
        use_mask_token: bool = False,
        norm_layer: Callable[[int], nn.Module] = _LAYER_NORM,
        head_init_scale: float = 1.0,
        channel_dims: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        dims = [embed_dim] * depth if channel_dims is None else [int(d) for d in channel_dims]
        heads = [num_heads] * depth if isinstance(num_heads, int) else [int(h) for h in num_heads]
        if len(dims) != depth or len(heads) != depth:
            raise ValueError(f"channel_dims ({len(dims)}) and num_heads ({len(heads)}) need one entry per block "
                             f"(depth={depth})")  # fmt: skip
        if dims[0] != embed_dim:
            raise ValueError(f"the first block width channel_dims[0]={dims[0]} must equal embed_dim={embed_dim}")
        self.num_classes = num_classes
        self.num_features = self.embed_dim = dims[-1]
        self.num_prefix_tokens = 1
        self.in_chans = in_chans
        self.img_size = img_size
        self.grad_checkpointing = False
        if stem == "vit":
            self.patch_embed: nn.Module = ConvPatchEmbed(patch_size, in_chans, embed_dim)
        elif stem == "hybrid":
            if patch_size != 16:
                raise ValueError(f"the hybrid stem has a fixed token stride of 16, got patch_size={patch_size}")
            if len(hybrid_depths) != 2:
                raise ValueError(f"hybrid_depths holds the depths of the 2 ConvNeXt stages, got {hybrid_depths}")
            self.patch_embed = HybridPatchEmbed(in_chans, embed_dim, (hybrid_depths[0], hybrid_depths[1]))
        else:
            raise ValueError(f"unknown FAN stem {stem!r}; expected 'vit' or 'hybrid'")
        self.patch_size = patch_size
        self.stem = stem
        self.pos_embed = PositionalEncodingFourier(dim=embed_dim)
        self.pos_drop = nn.Dropout(drop_rate)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if use_mask_token else None
        self.blocks = nn.ModuleList(
            FANBlock(
                dims[i],
                heads[i],
                mlp_ratio,
                qkv_bias,
                drop_rate,
                attn_drop_rate,
                drop_path_rate,
                eta,
                norm_layer=norm_layer,
            )
            for i in range(depth)
        )
        for i in range(depth - 1):
            if dims[i] != dims[i + 1]:  # published key layout: blocks.<i>.downsample.{proj,norm}
                self.blocks[i].downsample = _overlap_downsample(dims[i], dims[i + 1])
        final_dim = dims[-1]
        self.cls_token = nn.Parameter(torch.zeros(1, 1, final_dim))
        self.cls_attn_blocks = nn.ModuleList(
            ClassAttentionBlock(
                final_dim,
                heads[-1],
                mlp_ratio,
                qkv_bias=qkv_bias,
                proj_drop=drop_rate,
                attn_drop=attn_drop_rate,
                norm_layer=norm_layer,  # type: ignore[arg-type]  # timm says type[Module]; it only calls it with dim
                eta=eta,
                tokens_norm=True,
            )
            for _ in range(cls_attn_layers)
        )
        self.norm = norm_layer(final_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(final_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.has_aux_head = aux_head
        if aux_head:
            self.aux_head = nn.Linear(final_dim, num_classes) if num_classes > 0 else nn.Identity()
        trunc_normal_(self.cls_token, std=0.02)
        self.apply(self._init_weights)
        if isinstance(self.head, nn.Linear):
            with torch.no_grad():
                self.head.weight.mul_(head_init_scale)
                self.head.bias.mul_(head_init_scale)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # ---- timm model API -------------------------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameters excluded from weight decay (timm API)."""
        return {"pos_embed", "cls_token", "mask_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups for layer-wise lr decay: stem, then blocks, then the class-attention blocks."""
        return dict(
            stem=r"^cls_token|^mask_token|^pos_embed|^patch_embed",
            blocks=r"^blocks\.(\d+)" if coarse else [(r"^blocks\.(\d+)", None), (r"^cls_attn_blocks\.(\d+)", (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the FAN blocks in the backward pass to save memory (timm API)."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """The class head (timm API)."""
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the class head (and the aux head when present) by fresh ones with ``num_classes`` outputs."""
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        if self.has_aux_head:
            self.aux_head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    # ---- input checks -----------------------------------------------------------------------------------------
    def grid_size(self, img_size: int | Sequence[int]) -> tuple[int, int]:
        """Token grid (H, W) for an input of ``img_size`` (int or (H, W))."""
        h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        h, w = h // self.patch_size, w // self.patch_size
        for blk in self.blocks:
            if getattr(blk, "downsample", None) is not None:
                h, w = (h + 1) // 2, (w + 1) // 2  # 3x3 conv, stride 2, padding 1
        return h, w

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4:
            raise ValueError(f"expected an image batch of shape (B, C, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_chans:
            raise ValueError(
                f"expected {self.in_chans} input channels, got {x.shape[1]} (input shape {tuple(x.shape)})"
            )
        h, w = x.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(
                f"image size {h}x{w} is not divisible by the patch size {self.patch_size}; "
                f"resize or crop to a multiple of {self.patch_size} (e.g. {h - h % self.patch_size or self.patch_size})"
            )

    # ---- forward ----------------------------------------------------------------------------------------------
    def _embed(
        self, x: torch.Tensor, mask: torch.Tensor | None, stem_maps: list[torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        """Stem + mask token + positional encoding; ``stem_maps`` (a list) collects the hybrid stem's stage outputs."""
        self._check_input(x)
        if stem_maps is None:
            x, (H, W) = self.patch_embed(x)
        else:
            pe = self.patch_embed
            if not isinstance(pe, HybridPatchEmbed):
                raise ValueError(
                    f"stem feature maps need the hybrid (ConvNeXt) stem; this FAN has the {self.stem!r} stem"
                )
            y = pe.backbone.stem(x)
            for stage in pe.backbone.stages:  # stride 4 (128 channels), then stride 8 (256 channels)
                y = stage(y)
                stem_maps.append(y)
            y = pe.proj(y)
            H, W = y.shape[-2:]
            x = y.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, N, C)
        if mask is not None:
            if self.mask_token is None:
                raise ValueError("this model has no mask token; create it with use_mask_token=True to pass a mask")
            if mask.shape != x.shape[:2]:
                raise ValueError(f"mask shape {tuple(mask.shape)} does not match the token grid {tuple(x.shape[:2])}")
            x = torch.where(mask.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        pos = self.pos_embed(x.shape[0], H, W).flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, N, C)
        return self.pos_drop(x + pos), (H, W)

    def _run_blocks(
        self, x: torch.Tensor, H: int, W: int, indices: set[int] | None = None
    ) -> tuple[torch.Tensor, tuple[int, int], list[tuple[torch.Tensor, tuple[int, int]]]]:
        """Run the FAN blocks: final tokens, their grid, and ``(tokens, grid)`` after each block in ``indices``.

        A block's output is taken before its ``downsample`` (if any), on the grid the block worked on.
        """
        taken = []
        for i, blk in enumerate(self.blocks):
            if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
                x = checkpoint(blk, x, H, W, use_reentrant=False)
            else:
                x = blk(x, H, W)
            if indices is not None and i in indices:
                taken.append((x, (H, W)))
            x, (H, W) = self._downsample(blk, x, H, W)
        return x, (H, W), taken

    @staticmethod
    def _downsample(blk: nn.Module, x: torch.Tensor, H: int, W: int) -> tuple[torch.Tensor, tuple[int, int]]:
        """Apply ``blk.downsample`` (when the next block is wider) to ``(B, N, C)`` tokens on an ``H x W`` grid."""
        down = getattr(blk, "downsample", None)
        if down is None:
            return x, (H, W)
        x = down(x.transpose(1, 2).reshape(x.shape[0], -1, H, W))  # (B, N, C) -> (B, C, H, W) -> (B, h, w, C')
        return x.flatten(1, 2), (x.shape[1], x.shape[2])

    def _class_attention(self, x: torch.Tensor, norm: bool = True) -> torch.Tensor:
        """Class token + patch tokens through the class-attention blocks (and the final norm): ``(B, 1 + N, C)``."""
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        for blk in self.cls_attn_blocks:
            x = blk(x)
        return self.norm(x) if norm else x

    def forward_features(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(cls (B, C), patches (B, N, C))`` after the class-attention blocks and the final norm."""
        x, (H, W) = self._embed(x, mask)
        x = self._run_blocks(x, H, W)[0]
        x = self._class_attention(x)
        return x[:, 0], x[:, 1:]

    def forward_head(self, features: tuple[torch.Tensor, torch.Tensor], pre_logits: bool = False) -> torch.Tensor:
        """Class logits (B, K) from ``forward_features``' output; ``pre_logits`` returns the class token."""
        cls = self.head_drop(features[0])
        return cls if pre_logits else self.head(cls)

    def forward_tokens(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> TokenOutput:
        """Class logits, per-token ``aux_head`` logits (None without aux head) and the token grid."""
        grid = self.grid_size(x.shape[-2:])
        cls, patches = self.forward_features(x, mask)
        token_logits = self.aux_head(patches) if self.has_aux_head else None
        return TokenOutput(self.forward_head((cls, patches)), token_logits, grid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits; for token models the official STL rule ``cls + 0.5 * max_tokens(aux)``."""
        if self.has_aux_head and self.num_classes > 0:
            return self.forward_tokens(x).combined()
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] = 1,
        norm: bool = False,
        stem_stages: bool = False,
        class_tokens: bool = False,
    ) -> list[torch.Tensor]:
        """Feature maps ``(B, C, H, W)`` after the given FAN blocks (an int n means the last n blocks).

        Used by dense heads (SegFormer-style decoders). ``norm`` applies the final LayerNorm to each block map.
        ``stem_stages`` puts the hybrid stem's ConvNeXt stage outputs (strides 4 and 8) first; ``class_tokens``
        appends the patch tokens after the class-attention blocks (without the final norm). Both together with
        one block index give the published FAN-hybrid segmentation features (``tokenlab.models.segmentation``).
        """
        depth = len(self.blocks)
        idx = list(range(depth - indices, depth)) if isinstance(indices, int) else [i % depth for i in indices]
        if not idx or any(i < 0 or i >= depth for i in idx):
            raise ValueError(f"block indices {indices!r} out of range for depth {depth}")
        maps: list[torch.Tensor] = []
        x, (H, W) = self._embed(x, None, maps if stem_stages else None)
        x, (H, W), taken = self._run_blocks(x, H, W, set(idx))
        for t, (h, w) in taken:
            if norm and t.shape[-1] != self.num_features:
                raise ValueError(f"norm=True needs blocks of the final width {self.num_features}; a tapped block is "
                                 f"{t.shape[-1]} wide (channel_dims)")  # fmt: skip
            t = self.norm(t) if norm else t
            maps.append(t.transpose(1, 2).reshape(t.shape[0], -1, h, w))  # (B, N, C) -> (B, C, H, W)
        if class_tokens:
            t = self._class_attention(x, norm=False)[:, 1:]
            maps.append(t.transpose(1, 2).reshape(t.shape[0], -1, H, W))
        return maps

    @torch.no_grad()
    def forward_attention_maps(self, x: torch.Tensor, indices: Sequence[int] | None = None) -> list[torch.Tensor]:
        """Token-mixing attention of FAN blocks, one ``(B, heads, H, W, H, W)`` tensor per block (default: all).

        ``maps[k][b, h, qi, qj]`` is the ``(H, W)`` map of how much query token ``(qi, qj)`` attends to every key
        token: ``softmax(q k^T / sqrt(d))`` of the block's self-attention, the published FAN's ``attn`` (dropout is
        off: this runs the blocks as they are, usually in eval mode).
        """
        depth = len(self.blocks)
        wanted = set(range(depth)) if indices is None else {i % depth for i in indices}
        x, (H, W) = self._embed(x, None)
        maps = []
        for i, blk in enumerate(self.blocks):
            assert isinstance(blk, FANBlock) and isinstance(blk.attn, TokenMixing)
            if i in wanted:
                maps.append(_token_attention(blk.attn, blk.norm1(x)).reshape(x.shape[0], -1, H, W, H, W))
            x, (H, W) = self._downsample(blk, blk(x, H, W), H, W)
        return maps

    @torch.no_grad()
    def class_attention_maps(self, x: torch.Tensor) -> torch.Tensor:
        """Attention of the class token over the patch tokens in the last class-attention block, ``(B, h, H, W)``."""
        x, (H, W) = self._embed(x, None)
        x, (H, W), _ = self._run_blocks(x, H, W)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        for blk in self.cls_attn_blocks[:-1]:
            x = blk(x)
        last = self.cls_attn_blocks[-1]
        assert isinstance(last, ClassAttentionBlock) and isinstance(last.attn, ClassAttn)
        xn = last.norm1(x)
        B, N, C = xn.shape
        h = last.attn.num_heads
        q = last.attn.q(xn[:, :1]).reshape(B, 1, h, C // h).transpose(1, 2)  # (B, h, 1, d)
        k = last.attn.k(xn).reshape(B, N, h, C // h).transpose(1, 2)  # (B, h, N, d)
        attn = (q @ k.transpose(-2, -1) * last.attn.scale).softmax(dim=-1)  # (B, h, 1, N)
        return attn[:, :, 0, 1:].reshape(B, h, H, W)


def _token_attention(attn: TokenMixing, x: torch.Tensor) -> torch.Tensor:
    """The attention matrix ``softmax(q k^T / sqrt(d))`` ``(B, h, N, N)`` that ``TokenMixing`` applies to ``x``."""
    B, N, C = x.shape
    h = attn.num_heads
    q = attn.q(x).reshape(B, N, h, C // h).transpose(1, 2)  # (B, h, N, d)
    k = attn.kv(x).reshape(B, N, 2, h, C // h)[:, :, 0].transpose(1, 2)  # keys: first half of kv, (B, h, N, d)
    return (q @ k.transpose(-2, -1) * (C // h) ** -0.5).softmax(dim=-1)


def _overlap_downsample(in_dim: int, out_dim: int) -> nn.Module:
    """Stride-2 overlapping 3x3 conv + LayerNorm between blocks of different width (``(B, C, H, W) -> (B, h, w, C')``).

    As published: the conv gets the fan-out normal init of FAN's convolutions and a zero bias; the LayerNorm keeps
    PyTorch's default eps (1e-5).
    """
    down = OverlapPatchEmbed(patch_size=3, stride=2, in_chans=in_dim, embed_dim=out_dim)
    init_conv_fan_out_(down.proj)
    return down


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: FAN) -> dict[str, torch.Tensor]:
    """Adapt an official FAN/STL checkpoint: unwrap ``model``/``state_dict``, drop ``module.``.

    Names already match the published layout, so nothing is renamed; nothing is resized silently.
    """
    from tokenlab.models._loading import unwrap_state_dict

    return unwrap_state_dict(state_dict)


def _create_fan(variant: str, pretrained: bool = False, **kwargs: Any) -> FAN:
    return build_model_with_cfg(FAN, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs)


def _cfg(**kwargs: Any) -> dict[str, Any]:
    defaults = {  # published FAN/STL evaluation (NVlabs/FAN, NVlabs/STL `_cfg`): bicubic resize, no crop margin
        "crop_pct": 1.0,
        "interpolation": "bicubic",
        "first_conv": "patch_embed.proj.0.0",
        "license": "see the FAN/STL release for the published weights' licence",
    }
    return base_cfg(**{**defaults, **kwargs})


_HYBRID_CFG = {"first_conv": "patch_embed.backbone.stem.0"}
_NANO_CFG = {"input_size": (3, 64, 64), "crop_pct": 1.0}

default_cfgs = generate_default_cfgs(
    {
        "fan_nano_6_p16_224.untrained": _cfg(**_NANO_CFG),
        "fan_tiny_12_p16_224.untrained": _cfg(),
        "fan_small_12_p16_224.untrained": _cfg(),
        "fan_base_18_p16_224.untrained": _cfg(),
        "fan_large_24_p16_224.untrained": _cfg(),
        "fan_tiny_8_p4_hybrid.untrained": _cfg(**_HYBRID_CFG),
        "fan_small_12_p4_hybrid.untrained": _cfg(**_HYBRID_CFG),
        "fan_base_16_p4_hybrid.untrained": _cfg(**_HYBRID_CFG),
        "fan_large_16_p4_hybrid.untrained": _cfg(**_HYBRID_CFG),
        "fan_xlarge_16_p4_hybrid.untrained": _cfg(**_HYBRID_CFG),
        "fan_nano_6_p16_224_token.untrained": _cfg(**_NANO_CFG),
        "fan_tiny_12_p16_224_token.untrained": _cfg(),
        "fan_small_12_p16_224_token.untrained": _cfg(),
        "fan_base_18_p16_224_token.untrained": _cfg(),
        "fan_large_24_p16_224_token.untrained": _cfg(),
        "fan_tiny_8_p4_hybrid_token.untrained": _cfg(**_HYBRID_CFG),
        "fan_small_12_p4_hybrid_token.untrained": _cfg(**_HYBRID_CFG),
        "fan_base_16_p4_hybrid_token.untrained": _cfg(**_HYBRID_CFG),
        "fan_large_16_p4_hybrid_token.untrained": _cfg(**_HYBRID_CFG),
    }
)

# Architecture of every size: (embed_dim, depth, num_heads) plus stem-specific arguments.
_SIZES: dict[str, dict[str, Any]] = {
    "fan_nano_6_p16_224": dict(embed_dim=128, depth=6, num_heads=4),
    "fan_tiny_12_p16_224": dict(embed_dim=192, depth=12, num_heads=4),
    "fan_small_12_p16_224": dict(embed_dim=384, depth=12, num_heads=8),
    "fan_base_18_p16_224": dict(embed_dim=448, depth=18, num_heads=8),
    "fan_large_24_p16_224": dict(embed_dim=480, depth=24, num_heads=10),
    "fan_tiny_8_p4_hybrid": dict(embed_dim=192, depth=8, num_heads=8, stem="hybrid"),
    "fan_small_12_p4_hybrid": dict(embed_dim=384, depth=10, num_heads=8, stem="hybrid"),
    "fan_base_16_p4_hybrid": dict(embed_dim=448, depth=16, num_heads=8, stem="hybrid"),
    "fan_large_16_p4_hybrid": dict(embed_dim=480, depth=22, num_heads=10, stem="hybrid", hybrid_depths=(3, 5)),
    # published as ``fan_Xlarge_16_p4_hybrid`` (no released weights): 20 blocks at 528 wide / 11 heads, a stride-2
    # downsample, 3 blocks at 768 wide / 16 heads; ConvNeXt stem stages of depth 3 and 7
    "fan_xlarge_16_p4_hybrid": dict(
        embed_dim=528,
        depth=23,
        num_heads=(11,) * 20 + (16,) * 3,
        channel_dims=(528,) * 20 + (768,) * 3,
        stem="hybrid",
        hybrid_depths=(3, 7),
    ),
}


# Published per-variant init that is not architecture: only the large hybrid baseline scales its head (the STL
# ``_token`` variant of the same size does not).
_HEAD_INIT_SCALE = {("fan_large_16_p4_hybrid", False): 0.001}


def _fan(size: str, token: bool, pretrained: bool, kwargs: dict[str, Any]) -> FAN:
    model_args = dict(_SIZES[size], aux_head=token, head_init_scale=_HEAD_INIT_SCALE.get((size, token), 1.0))
    return _create_fan(size + ("_token" if token else ""), pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def fan_nano_6_p16_224(pretrained: bool = False, **kwargs: Any) -> FAN:
    return _fan("fan_nano_6_p16_224", False, pretrained, kwargs)


@register_model
def fan_tiny_12_p16_224(pretrained: bool = False, **kwargs: Any) -> FAN:
    return _fan("fan_tiny_12_p16_224", False, pretrained, kwargs)


@register_model
def fan_small_12_p16_224(pretrained: bool = False, **kwargs: Any) -> FAN:
    return _fan("fan_small_12_p16_224", False, pretrained, kwargs)


@register_model
def fan_base_18_p16_224(pretrained: bool = False, **kwargs: Any) -> FAN:
    return _fan("fan_base_18_p16_224", False, pretrained, kwargs)


@register_model
def fan_large_24_p16_224(pretrained: bool = False, **kwargs: Any) -> FAN:
    return _fan("fan_large_24_p16_224", False, pretrained, kwargs)


@register_model
def fan_tiny_8_p4_hybrid(pretrained: bool = False, **kwargs: Any) -> FAN:
    return _fan("fan_tiny_8_p4_hybrid", False, pretrained, kwargs)


@register_model
def fan_small_12_p4_hybrid(pretrained: bool = False, **kwargs: Any) -> FAN:
    return _fan("fan_small_12_p4_hybrid", False, pretrained, kwargs)


@register_model
def fan_base_16_p4_hybrid(pretrained: bool = False, **kwargs: Any) -> FAN:
    return _fan("fan_base_16_p4_hybrid", False, pretrained, kwargs)


@register_model
def fan_large_16_p4_hybrid(pretrained: bool = False, **kwargs: Any) -> FAN:
    return _fan("fan_large_16_p4_hybrid", False, pretrained, kwargs)


@register_model
def fan_xlarge_16_p4_hybrid(pretrained: bool = False, **kwargs: Any) -> FAN:
    return _fan("fan_xlarge_16_p4_hybrid", False, pretrained, kwargs)


@register_model
def fan_nano_6_p16_224_token(pretrained: bool = False, **kwargs: Any) -> FAN:
    return _fan("fan_nano_6_p16_224", True, pretrained, kwargs)


@register_model
def fan_tiny_12_p16_224_token(pretrained: bool = False, **kwargs: Any) -> FAN:
    return _fan("fan_tiny_12_p16_224", True, pretrained, kwargs)


@register_model
def fan_small_12_p16_224_token(pretrained: bool = False, **kwargs: Any) -> FAN:
    return _fan("fan_small_12_p16_224", True, pretrained, kwargs)


@register_model
def fan_base_18_p16_224_token(pretrained: bool = False, **kwargs: Any) -> FAN:
    return _fan("fan_base_18_p16_224", True, pretrained, kwargs)


@register_model
def fan_large_24_p16_224_token(pretrained: bool = False, **kwargs: Any) -> FAN:
    return _fan("fan_large_24_p16_224", True, pretrained, kwargs)


@register_model
def fan_tiny_8_p4_hybrid_token(pretrained: bool = False, **kwargs: Any) -> FAN:
    return _fan("fan_tiny_8_p4_hybrid", True, pretrained, kwargs)


@register_model
def fan_small_12_p4_hybrid_token(pretrained: bool = False, **kwargs: Any) -> FAN:
    return _fan("fan_small_12_p4_hybrid", True, pretrained, kwargs)


@register_model
def fan_base_16_p4_hybrid_token(pretrained: bool = False, **kwargs: Any) -> FAN:
    return _fan("fan_base_16_p4_hybrid", True, pretrained, kwargs)


@register_model
def fan_large_16_p4_hybrid_token(pretrained: bool = False, **kwargs: Any) -> FAN:
    return _fan("fan_large_16_p4_hybrid", True, pretrained, kwargs)
