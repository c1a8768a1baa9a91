"""The ViT backbone for iBOT: timm's ``VisionTransformer`` with a learned mask token and tokenlab's contract.

iBOT (Zhou et al., "iBOT: Image BERT Pre-Training with Online Tokenizer", ICLR 2022,
https://arxiv.org/abs/2111.07832) replaces masked patch embeddings by a learned, zero-initialised mask embedding
before the positional embedding. We do not write a second ViT: ``MaskedViT`` subclasses timm's and only changes
``forward_features`` to accept the ``(B, N)`` mask and to return ``(cls, patches)`` like FAN does.
``dynamic_img_size`` is on, so global (224) and local (96) crops share one model, with the position embedding
interpolated per input size. ``pos_embed_interp`` chooses how: ``"ibot"`` (default) is the published iBOT/DINO
``interpolate_pos_encoding``: bicubic, no anti-aliasing, with the scale factor ``(n_new + 0.1) / n_old`` per axis
given to ``F.interpolate`` (so the sampling grid is stretched by that factor, not by ``n_new / n_old``);
``"timm"`` is timm's ``resample_abs_pos_embed`` (bicubic to the exact size, anti-aliased when shrinking). The two
differ at every size but the native one (local crops 96 px: 6 x 6 from 14 x 14).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from timm.layers import resample_abs_pos_embed
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from tokenlab.models._loading import unwrap_state_dict
from tokenlab.models._registry import base_cfg
from tokenlab.models.fan import TokenOutput

__all__ = [
    "IBOT_ENTRIES",
    "POS_EMBED_INTERPOLATIONS",
    "ImportReport",
    "MaskedViT",
    "checkpoint_filter_fn",
    "import_ibot_checkpoint",
    "interpolate_pos_embed_ibot",
]

logger = logging.getLogger(__name__)

#: How ``MaskedViT`` resizes its position embedding for other input sizes (see the module docstring).
POS_EMBED_INTERPOLATIONS = ("ibot", "timm")


def interpolate_pos_embed_ibot(
    pos_embed: torch.Tensor, old_grid: Sequence[int], new_grid: Sequence[int]
) -> torch.Tensor:
    """iBOT/DINO's position-embedding interpolation of the patch part of ``pos_embed`` (1, N_old, C).

    Bicubic, ``align_corners=False``, no anti-aliasing, with ``scale_factor = (n_new + 0.1) / n_old`` per axis (the
    +0.1 avoids a floating-point floor below ``n_new``; PyTorch then maps coordinates with that factor). Returns
    (1, H_new * W_new, C) in the input's dtype.
    """
    (gh, gw), (nh, nw) = tuple(old_grid), tuple(new_grid)
    dim = pos_embed.shape[-1]
    grid = pos_embed.float().reshape(1, gh, gw, dim).permute(0, 3, 1, 2)  # (1, N, C) -> (1, C, gh, gw)
    out = nn.functional.interpolate(grid, scale_factor=((nh + 0.1) / gh, (nw + 0.1) / gw), mode="bicubic")
    if tuple(out.shape[-2:]) != (nh, nw):
        raise ValueError(f"position-embedding interpolation gave {tuple(out.shape[-2:])}, expected {(nh, nw)}")
    return out.permute(0, 2, 3, 1).reshape(1, nh * nw, dim).to(pos_embed.dtype)  # (1, C, nh, nw) -> (1, N, C)


class MaskedViT(VisionTransformer):
    """timm ``VisionTransformer`` taking a boolean patch mask; see ``VisionTransformer`` for all other args.

    Args:
        use_mask_token: Add the learned mask embedding (``mask_token``, zero-initialised).
        pos_embed_interp: ``"ibot"`` (published iBOT interpolation for other input sizes) or ``"timm"``.
        **kwargs: Passed to ``timm.models.vision_transformer.VisionTransformer``.

    Raises:
        ValueError: an unknown ``pos_embed_interp``.
    """

    def __init__(self, use_mask_token: bool = True, pos_embed_interp: str = "ibot", **kwargs: Any) -> None:
        if pos_embed_interp not in POS_EMBED_INTERPOLATIONS:
            raise ValueError(
                f"unknown pos_embed_interp {pos_embed_interp!r}; valid: {', '.join(POS_EMBED_INTERPOLATIONS)}"
            )
        kwargs.setdefault("dynamic_img_size", True)
        super().__init__(**kwargs)
        self.pos_embed_interp = pos_embed_interp
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim)) if use_mask_token else None
        self.has_aux_head = False
        self.patch_size = self.patch_embed.patch_size[0]

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameters excluded from weight decay (timm API), the mask token included."""
        return super().no_weight_decay() | {"mask_token"}

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        """Prefix tokens + position embedding; other grid sizes use ``pos_embed_interp`` (timm's path otherwise)."""
        native = tuple(self.patch_embed.grid_size)
        if (
            self.pos_embed_interp == "timm"
            or not self.dynamic_img_size
            or self.pos_embed is None
            or self.cls_token is None
            or self.no_embed_class
            or self.reg_token is not None
            or tuple(x.shape[1:3]) == native
        ):
            return super()._pos_embed(x)
        b, h, w, c = x.shape
        prefix = self.pos_embed[:, : self.num_prefix_tokens]
        patches = interpolate_pos_embed_ibot(self.pos_embed[:, self.num_prefix_tokens :], native, (h, w))
        tokens = torch.cat([self.cls_token.expand(b, -1, -1), x.reshape(b, h * w, c)], dim=1)
        return self.pos_drop(tokens + torch.cat([prefix, patches], dim=1))

    def grid_size(self, img_size: int | Sequence[int]) -> tuple[int, int]:
        """The (H, W) token grid for an input of ``img_size``."""
        h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        return h // self.patch_size, w // self.patch_size

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.patch_embed.proj.in_channels:
            raise ValueError(
                f"expected an image batch (B, {self.patch_embed.proj.in_channels}, H, W), got shape {tuple(x.shape)}"
            )
        h, w = x.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"image size {h}x{w} is not divisible by the patch size {self.patch_size}")

    def forward_features(  # type: ignore[override]
        self, x: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(cls (B, C), patches (B, N, C))`` after the final norm; ``mask`` (B, N) True = masked."""
        self._check_input(x)
        x = self.patch_embed(x)  # (B, H, W, C) with dynamic_img_size, else (B, N, C)
        if mask is not None:
            if self.mask_token is None:
                raise ValueError("this model has no mask token; create it with use_mask_token=True to pass a mask")
            if mask.shape != (x.shape[0], x.shape[1:-1].numel()):
                raise ValueError(f"mask shape {tuple(mask.shape)} does not match the token grid {tuple(x.shape[1:-1])}")
            x = torch.where(mask.reshape(x.shape[:-1]).unsqueeze(-1), self.mask_token.to(x.dtype), x)
        x = self.norm_pre(self.patch_drop(self._pos_embed(x)))
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        x = self.norm(x)
        return x[:, 0], x[:, self.num_prefix_tokens :]

    def forward_head(  # type: ignore[override]
        self, features: tuple[torch.Tensor, torch.Tensor], pre_logits: bool = False
    ) -> torch.Tensor:
        """Class logits (B, K) from ``forward_features``' output; ``pre_logits`` returns the features."""
        cls, patches = features
        x = patches.mean(dim=1) if self.global_pool == "avg" else cls
        x = self.head_drop(self.fc_norm(x))
        return x if pre_logits else self.head(x)

    def forward_tokens(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> TokenOutput:
        """Class logits and the token grid (no token head: ``token_logits`` is None)."""
        grid = self.grid_size(x.shape[-2:])
        return TokenOutput(self.forward_head(self.forward_features(x, mask)), None, grid)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        """Class logits (B, K) of whole images (timm's attention-mask arguments are not supported)."""
        if attn_mask is not None or is_causal:
            raise ValueError("MaskedViT.forward takes images only: attn_mask / is_causal are not supported")
        return self.forward_head(self.forward_features(x))


IBOT_ENTRIES = ("teacher", "student")


@dataclass
class ImportReport:
    """What ``checkpoint_filter_fn`` / ``import_ibot_checkpoint`` did.

    Attributes:
        loaded: Model keys filled from the checkpoint.
        skipped: Checkpoint keys the model has no place for (projection head, optimizer leftovers, ...).
        missing: Model keys the checkpoint lacked, left at their initial values (only the classifier and the mask
            token may be missing).
        resized: Keys resampled to the model's shape (``pos_embed`` at another resolution).
    """

    loaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)


def checkpoint_filter_fn(
    state_dict: dict[str, Any], model: MaskedViT, which: str = "teacher", report: ImportReport | None = None
) -> dict[str, torch.Tensor]:
    """Import an official iBOT checkpoint (or any ViT state dict) into ``MaskedViT``: the one iBOT importer.

    timm calls it for ``create_model(..., pretrained=True, pretrained_cfg_overlay=dict(file=...))``. Takes the
    ``teacher`` (default) or ``student`` entry when the file has them, strips ``module.``/``backbone.`` prefixes,
    renames iBOT's ``masked_embed`` (C,) to our ``mask_token`` (1, 1, C) (kept, so a checkpoint's mask embedding
    survives), drops the projection head and anything else the model lacks (logged by name), and resamples
    ``pos_embed`` to the model's grid.

    Raises:
        ValueError: an unknown ``which``, or backbone keys of the model missing from the checkpoint (only the
            classifier and the mask token may be missing).
    """
    if which not in IBOT_ENTRIES:
        raise ValueError(f"unknown entry {which!r}; valid: {', '.join(IBOT_ENTRIES)}")
    if isinstance(state_dict.get(which), Mapping):
        state_dict = dict(state_dict[which])
    elif not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        state_dict = unwrap_state_dict(state_dict)
    report = report if report is not None else ImportReport()
    own = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        name = key
        for prefix in ("module.", "backbone."):
            name = name[len(prefix) :] if name.startswith(prefix) else name
        if name == "masked_embed" and "mask_token" in own:
            name, value = "mask_token", value.reshape(own["mask_token"].shape)
        if name not in own:
            report.skipped.append(key)
            continue
        if name == "pos_embed" and value.shape != own[name].shape:
            value = resample_abs_pos_embed(
                value, new_size=model.patch_embed.grid_size, num_prefix_tokens=model.num_prefix_tokens
            )
            report.resized.append(name)
        out[name] = value
        report.loaded.append(name)
    report.missing = sorted(set(own) - set(out))
    bad = [k for k in report.missing if not (k.startswith("head.") or k == "mask_token")]
    if bad:
        raise ValueError(f"the checkpoint lacks backbone keys of {type(model).__name__}: {bad[:20]}")
    if report.skipped:
        logger.info("iBOT import skipped %d keys not in %s: %s", len(report.skipped), type(model).__name__,
                    report.skipped[:12])  # fmt: skip
    return out


def import_ibot_checkpoint(model: MaskedViT, path: str | Path, which: str = "teacher") -> ImportReport:
    """Load an official iBOT checkpoint file's ``teacher`` or ``student`` backbone into ``model`` in place.

    The same mapping as timm's pretrained path (``checkpoint_filter_fn``), for a model that already exists. The
    file is read with ``weights_only=True``; the pickled ``args`` namespace of official files is the only extra
    type allowed.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: see ``checkpoint_filter_fn``.
    """
    path = Path(path)
    if which not in IBOT_ENTRIES:
        raise ValueError(f"unknown entry {which!r}; valid: {', '.join(IBOT_ENTRIES)}")
    if not path.is_file():
        raise FileNotFoundError(f"iBOT checkpoint not found: {path}")
    with torch.serialization.safe_globals([argparse.Namespace]):
        obj = torch.load(path, map_location="cpu", weights_only=True)
    report = ImportReport()
    try:
        state = checkpoint_filter_fn(obj, model, which, report)
    except ValueError as err:
        raise ValueError(f"{path} ({which}): {err}") from None
    model.load_state_dict(state, strict=False)
    return report


def _create_vit(variant: str, pretrained: bool = False, **kwargs: Any) -> MaskedViT:
    return build_model_with_cfg(MaskedViT, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs)


def _cfg(**kwargs: Any) -> dict[str, Any]:
    defaults = {
        "first_conv": "patch_embed.proj",
    }
    return base_cfg(**{**defaults, **kwargs})


default_cfgs = generate_default_cfgs(
    {
        "ibot_vit_tiny_patch4_32.untrained": _cfg(input_size=(3, 32, 32), crop_pct=1.0),
        "ibot_vit_small_patch16_224.untrained": _cfg(),
        "ibot_vit_base_patch16_224.untrained": _cfg(),
        "ibot_vit_large_patch16_224.untrained": _cfg(),
    }
)


@register_model
def ibot_vit_tiny_patch4_32(pretrained: bool = False, **kwargs: Any) -> MaskedViT:
    model_args = dict(img_size=32, patch_size=4, embed_dim=192, depth=12, num_heads=3)
    return _create_vit("ibot_vit_tiny_patch4_32", pretrained, **dict(model_args, **kwargs))


@register_model
def ibot_vit_small_patch16_224(pretrained: bool = False, **kwargs: Any) -> MaskedViT:
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
    return _create_vit("ibot_vit_small_patch16_224", pretrained, **dict(model_args, **kwargs))


@register_model
def ibot_vit_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> MaskedViT:
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)
    return _create_vit("ibot_vit_base_patch16_224", pretrained, **dict(model_args, **kwargs))


@register_model
def ibot_vit_large_patch16_224(pretrained: bool = False, **kwargs: Any) -> MaskedViT:
    model_args = dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16)
    return _create_vit("ibot_vit_large_patch16_224", pretrained, **dict(model_args, **kwargs))
