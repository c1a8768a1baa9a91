"""Semantic segmentation with a FAN backbone and a SegFormer-style all-MLP decoder.

Papers:
- [0] Xie et al., "SegFormer: Simple and Efficient Design for Semantic Segmentation with Transformers",
  NeurIPS 2021. https://arxiv.org/abs/2105.15203 (the decoder, §3.2)
- [1] Zhao et al., "Fully Attentional Networks with Self-emerging Token Labeling", ICCV 2023.
  https://arxiv.org/abs/2401.03844 (FAN/STL backbones transferred to Cityscapes with a SegFormer head)

SegFormer's decoder, quoted: "First, multi-level features F_i from the MiT encoder go through an MLP layer to
unify the channel dimension. Then, in a second step, features are up-sampled to 1/4th and concatenated together.
Third, a MLP layer is adopted to fuse the concatenated features F. Finally, another MLP layer takes the fused
feature to predict the segmentation mask M":

    F_i' = Linear(C_i, D)(F_i)                       for every level i
    F_i' = Upsample(H/s, W/s)(F_i')                   s = the finest stride among the levels
    F    = Linear(L*D, D)(Concat(F_i'))               (+ BatchNorm + ReLU, as in the released head)
    M    = Linear(D, K)(F)                            then bilinear up-sampling to the input size

Where the decoder's four inputs come from (``taps``):

- ``"hybrid"``, the published FAN-hybrid SegFormer setting (NVlabs/FAN ``segmentation/mmseg/models/backbones/
  fan.py`` and ``local_configs/fan/fan_hybrid/*.city.160k.py``): the ConvNeXt stem's stage outputs at strides 4 and
  8 (128 and 256 channels), the output of one FAN block (published: the last block; block 18 of 22 for the large
  model) and the patch tokens after the two class-attention blocks (no final norm), both at stride 16, e.g.
  ``in_channels=[128, 256, 192, 192]`` for ``fan_tiny_8_p4_hybrid``. Needs a hybrid stem; no neck.
- ``"blocks"``: four block outputs. FAN is isotropic, every block works at the token stride (``patch_size``), so an
  optional ``SimplePyramidNeck`` (the ViT-for-detection recipe: transposed convs up by 4 and 2, identity, max-pool
  down by 2) turns them into strides {s/4, s/2, s, 2s}. With ``neck="none"`` the levels stay at the token stride
  and the decoder only fuses them.

The published recipe trains the decoder at 10x the backbone's learning rate; ``head_lr_mult`` declares that
multiplier through ``lr_scales()``, which the engine's optimizer builder turns into per-group ``lr_scale``.

``segformer_fan`` is registered with timm, so ``timm.create_model("segformer_fan", backbone=..., num_classes=K)``
(and hence a training config) builds it by name. The classification-only parts of the backbone (class-attention
blocks, class token, heads) are dropped, except the class token and class-attention blocks with ``taps="hybrid"``
(they produce its last level): only ``forward_intermediates`` is used. Backbone weights from a ``tokenlab``
classification run are loaded with ``load_backbone_weights`` (strict on the kept keys).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.models import register_model
from torch import nn

from tokenlab.models._loading import check_state_dict, read_state_dict, resolve_weights_file
from tokenlab.models._registry import list_tokenlab_models
from tokenlab.models.fan import FAN
from tokenlab.utils.runs import read_model_meta

__all__ = [
    "PUBLISHED_HYBRID_BLOCK",
    "FANSegFormer",
    "SegFormerHead",
    "SimplePyramidNeck",
    "default_indices",
    "load_backbone_weights",
]

logger = logging.getLogger(__name__)

NECKS = ("pyramid", "none")
TAPS = ("blocks", "hybrid")
_TIMM_FACTORY_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")
# Parameters a classification FAN has that a segmentation backbone never uses (dropped after construction).
_CLASSIFICATION_ONLY = ("cls_token", "cls_attn_blocks", "norm", "head", "aux_head")
# ... except the class token and class-attention blocks, which make the last level of the published hybrid taps.
_HYBRID_TAPS_DROP = ("norm", "head", "aux_head")
# The block tapped by the published FAN-hybrid segmentation backbones (``out_idx``); other FANs: the last block.
PUBLISHED_HYBRID_BLOCK = {
    "fan_tiny_8_p4_hybrid": 7,
    "fan_small_12_p4_hybrid": 9,
    "fan_base_16_p4_hybrid": 15,
    "fan_large_16_p4_hybrid": 18,
}


def default_indices(depth: int, levels: int = 4) -> list[int]:
    """Evenly spaced block indices ending at the last block, e.g. depth 12 -> [2, 5, 8, 11]."""
    if levels < 1 or levels > depth:
        raise ValueError(f"cannot take {levels} feature levels from a backbone of depth {depth}")
    return [round((i + 1) * depth / levels) - 1 for i in range(levels)]


class SimplePyramidNeck(nn.Module):
    """Turn four same-stride maps into a pyramid at strides {s/4, s/2, s, 2s} (ViTDet-style simple pyramid).

    Args:
        dim: Channels of every input map (the backbone width C).
        levels: Number of input maps; must be 4.
    """

    def __init__(self, dim: int, levels: int = 4) -> None:
        super().__init__()
        if levels != 4:
            raise ValueError(f"the pyramid neck needs exactly 4 feature levels, got {levels}; use neck='none'")
        self.up4 = nn.Sequential(
            nn.ConvTranspose2d(dim, dim, 2, stride=2),
            nn.BatchNorm2d(dim),
            nn.GELU(),
            nn.ConvTranspose2d(dim, dim, 2, stride=2),
        )
        self.up2 = nn.ConvTranspose2d(dim, dim, 2, stride=2)
        self.down2 = nn.MaxPool2d(2, ceil_mode=True)

    def forward(self, maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Resample the maps to strides s/4, s/2, s, 2s."""
        return [self.up4(maps[0]), self.up2(maps[1]), maps[2], self.down2(maps[3])]


class SegFormerHead(nn.Module):
    """SegFormer's all-MLP decoder over a list of NCHW maps (any strides; fused at the finest one).

    "A lightweight All-MLP decoder ... aggregating information from different layers" [0]: a per-level linear
    projection to ``embed_dim``, bilinear up-sampling to the finest level, a fusing linear (+BN+ReLU), dropout
    and a linear classifier. 1x1 convolutions are the linears applied per pixel. The fusing convolution starts
    as the released head's (mmcv ``ConvModule``): Kaiming normal on the fan-out for ReLU; the others keep PyTorch's
    default, as the released head's ``nn.Linear`` / ``nn.Conv2d`` do.

    Args:
        in_channels: Channels of each input level.
        num_classes: Output classes K.
        embed_dim: Decoder width D.
        dropout: Dropout before the classifier.
    """

    def __init__(
        self, in_channels: Sequence[int], num_classes: int, embed_dim: int = 256, dropout: float = 0.1
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.proj = nn.ModuleList(nn.Conv2d(c, embed_dim, 1) for c in in_channels)
        fuse = nn.Conv2d(embed_dim * len(in_channels), embed_dim, 1, bias=False)
        nn.init.kaiming_normal_(fuse.weight, mode="fan_out", nonlinearity="relu")
        self.fuse = nn.Sequential(fuse, nn.BatchNorm2d(embed_dim), nn.ReLU())
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(embed_dim, num_classes, 1)

    def forward(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        """Logits ``(B, K, h, w)`` at the finest input resolution ``(h, w)``."""
        if len(maps) != len(self.proj):
            raise ValueError(f"expected {len(self.proj)} feature maps, got {len(maps)}")
        size = max((m.shape[-2:] for m in maps), key=lambda s: s[0] * s[1])
        feats = [
            F.interpolate(p(m), size=size, mode="bilinear", align_corners=False) if m.shape[-2:] != size else p(m)
            for p, m in zip(self.proj, maps, strict=True)
        ]
        return self.classifier(self.dropout(self.fuse(torch.cat(feats, dim=1))))


class FANSegFormer(nn.Module):
    """A FAN backbone (any registered FAN, ViT or hybrid stem) with multi-level features and a SegFormer head.

    ``forward(x)`` returns per-pixel logits ``(B, K, H, W)`` with the input's spatial size.

    Args:
        backbone: Name of a registered FAN, e.g. ``"fan_tiny_12_p16_224"`` or ``"fan_tiny_8_p4_hybrid_token"``.
        num_classes: Segmentation classes K (the ignore index is not a class).
        indices: Blocks whose outputs feed the decoder; default: 4 evenly spaced blocks ending at the last
            (``taps="blocks"``), or the published block (``PUBLISHED_HYBRID_BLOCK``, else the last) for
            ``taps="hybrid"``, which takes exactly one.
        neck: ``"pyramid"`` (strides s/4, s/2, s, 2s; needs 4 levels) or ``"none"`` (all at the token stride).
            ``taps="hybrid"`` needs ``"none"``.
        taps: ``"blocks"`` or ``"hybrid"`` (the published FAN-hybrid features), see the module docstring.
        head_lr_mult: Learning-rate multiplier of the decoder (and neck) relative to the backbone (published: 10).
        decoder_dim: Width D of the decoder.
        decoder_dropout: Dropout before the classifier.
        backbone_kwargs: Extra constructor kwargs of the backbone (``patch_size``, ``img_size``,
            ``drop_path_rate``, ...). They must match a classification checkpoint loaded later.
        img_size: Nominal training size, recorded for exporting; any size divisible by the patch size works.
    """

    def __init__(
        self,
        backbone: str = "fan_tiny_12_p16_224",
        num_classes: int = 19,
        indices: Sequence[int] | None = None,
        neck: str = "pyramid",
        decoder_dim: int = 256,
        decoder_dropout: float = 0.1,
        backbone_kwargs: dict[str, Any] | None = None,
        img_size: int | None = None,
        taps: str = "blocks",
        head_lr_mult: float = 1.0,
    ) -> None:
        super().__init__()
        fans = [n for n in list_tokenlab_models() if n.startswith("fan_")]
        if backbone not in fans:
            raise ValueError(f"unknown FAN backbone {backbone!r}; valid: {', '.join(fans)}")
        if neck not in NECKS:
            raise ValueError(f"unknown neck {neck!r}; valid: {', '.join(NECKS)}")
        if taps not in TAPS:
            raise ValueError(f"unknown taps {taps!r}; valid: {', '.join(TAPS)}")
        if taps == "hybrid" and "_hybrid" not in backbone:
            raise ValueError(f"taps='hybrid' needs a hybrid-stem FAN (e.g. fan_tiny_8_p4_hybrid), got {backbone!r}")
        if taps == "hybrid" and neck != "none":
            raise ValueError(
                "taps='hybrid' already gives strides 4, 8, 16, 16 (the published setting); set neck='none'"
            )
        if head_lr_mult <= 0:
            raise ValueError(f"head_lr_mult must be > 0, got {head_lr_mult}")
        bkw = dict(backbone_kwargs or {})
        if img_size is not None:
            bkw.setdefault("img_size", img_size)
        self.backbone_name = backbone
        model = timm.create_model(backbone, num_classes=0, **bkw)
        if not isinstance(model, FAN):
            raise ValueError(f"backbone {backbone!r} is not a FAN model ({type(model).__name__})")
        self.backbone: FAN = model
        if taps == "hybrid" and model.stem != "hybrid":
            raise ValueError(f"taps='hybrid' needs a hybrid-stem FAN (e.g. fan_tiny_8_p4_hybrid), got {backbone!r}")
        self.taps = taps
        self.dropped = _HYBRID_TAPS_DROP if taps == "hybrid" else _CLASSIFICATION_ONLY
        for name in self.dropped:
            if hasattr(self.backbone, name):
                delattr(self.backbone, name)
        self.backbone.has_aux_head = False
        depth = len(self.backbone.blocks)
        if indices is not None:
            self.indices = list(indices)
        elif taps == "hybrid":
            self.indices = [PUBLISHED_HYBRID_BLOCK.get(backbone.removesuffix("_token"), depth - 1)]
        else:
            self.indices = default_indices(depth, 4)
        bad = [i for i in self.indices if not -depth <= i < depth]
        if bad:
            raise ValueError(f"block indices {bad} out of range for {backbone} with depth {depth}")
        if taps == "hybrid" and len(self.indices) != 1:
            raise ValueError(f"taps='hybrid' takes exactly one block index (the third level), got {self.indices}")
        self.indices = [i % depth for i in self.indices]
        dim = self.backbone.num_features
        if taps == "hybrid":  # stem stages, the tapped block (its own width), the class-attention tokens
            stem: Any = self.backbone.patch_embed  # a HybridPatchEmbed (checked above)
            tapped: Any = self.backbone.blocks[self.indices[0]]
            in_channels = [int(stage.blocks[-1].conv_dw.out_channels) for stage in stem.backbone.stages]
            in_channels += [int(tapped.norm1.normalized_shape[0]), dim]
        else:
            in_channels = [dim] * len(self.indices)
        self.neck: nn.Module = SimplePyramidNeck(dim, len(self.indices)) if neck == "pyramid" else nn.Identity()
        self.decode_head = SegFormerHead(in_channels, num_classes, decoder_dim, decoder_dropout)
        self.head_lr_mult = float(head_lr_mult)
        self.num_classes = num_classes
        self.patch_size = self.backbone.patch_size
        self.num_features = dim
        self.img_size = img_size or self.backbone.img_size

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Backbone parameters excluded from weight decay (timm API)."""
        return {f"backbone.{n}" for n in ("pos_embed", "mask_token")}

    @torch.jit.ignore
    def lr_scales(self) -> dict[str, float]:
        """Learning-rate multipliers by parameter-name prefix: the decoder (and neck) at ``head_lr_mult``."""
        return {"decode_head": self.head_lr_mult, "neck": self.head_lr_mult} if self.head_lr_mult != 1.0 else {}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Stem, then one group per backbone block, then class attention, then neck + decoder (layer-wise lr decay)."""
        return dict(
            stem=r"^backbone\.(?:mask_token|pos_embed|patch_embed)",
            blocks=[
                (r"^backbone\.blocks\.(\d+)", None),
                (r"^backbone\.(?:cls_token|cls_attn_blocks)", (99998,)),
                (r"^(?:neck|decode_head)\.", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the backbone blocks in the backward pass to save memory (timm API)."""
        self.backbone.set_grad_checkpointing(enable)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The decoder's inputs: backbone maps (after the neck), each ``(B, C, h_i, w_i)``."""
        if self.taps == "hybrid":
            return self.backbone.forward_intermediates(x, self.indices, stem_stages=True, class_tokens=True)
        maps = self.backbone.forward_intermediates(x, self.indices)
        return self.neck(maps) if isinstance(self.neck, SimplePyramidNeck) else maps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Per-pixel logits ``(B, K, H, W)`` at the input's size."""
        logits = self.decode_head(self.forward_features(x))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def _classification_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Weights (and the exported meta, if any) of a classification model: run dir, export stem or weights file."""
    try:
        weights = resolve_weights_file(path)  # the one resolution of run dir / export stem / file to weights
    except FileNotFoundError as err:
        raise FileNotFoundError(f"no classification model at {path}: {err}") from None
    exported = weights.suffix == ".safetensors" and weights.with_suffix(".json").is_file()
    meta = read_model_meta(weights) if exported else None
    return read_state_dict(weights, prefer="model_ema"), meta


def load_backbone_weights(model: FANSegFormer, path: str | Path) -> dict[str, Any] | None:
    """Initialise ``model.backbone`` from a tokenlab classification model (a run dir, export stem or file).

    Head weights are dropped, and so are the class-token and class-attention ones unless the model keeps them
    (``taps="hybrid"``); every other key must match exactly, or a ValueError lists the differences (e.g. another
    ``patch_size``). Returns the exported meta when there is one, so callers can check the architecture.
    """
    state, meta = _classification_state_dict(path)
    # a token model (``*_token``) differs from its plain FAN only by ``aux_head``, which is dropped anyway
    same = str(meta.get("model")).removesuffix("_token") == model.backbone_name.removesuffix("_token") if meta else True
    if meta is not None and meta.get("model") is not None and not same:
        raise ValueError(
            f"{path} holds a {meta['model']!r} but the segmentation backbone is {model.backbone_name!r}; "
            f"set backbone={meta['model']!r} (and backbone_kwargs={meta.get('model_kwargs', {})})"
        )
    kept = {k: v for k, v in state.items() if k.split(".", 1)[0] not in model.dropped}
    check_state_dict(model.backbone, kept, source=str(path))
    model.backbone.load_state_dict(kept, strict=True)
    logger.info("initialised %s backbone from %s (%d tensors)", model.backbone_name, path, len(kept))
    return meta


@register_model
def segformer_fan(pretrained: bool = False, **kwargs: Any) -> FANSegFormer:
    """FAN backbone + SegFormer head; pick the backbone with ``backbone=`` (any registered FAN)."""
    if pretrained:
        raise ValueError("segformer_fan has no pretrained weights; initialise the backbone with load_backbone_weights")
    for key in _TIMM_FACTORY_KWARGS:  # timm's factory passes these to every model function
        kwargs.pop(key, None)
    return FANSegFormer(**kwargs)
