"""The tokenlab backbone contract as a type: what methods and evaluations call on a backbone (``FAN``, ``MaskedViT``).

Models travel as ``nn.Module`` (timm creates them, exports load them), and callers check at run time what they need
(``hasattr``, ``has_aux_head``); ``as_backbone`` gives the type checker the contract's signatures at those calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, cast

import torch
from torch import nn

if TYPE_CHECKING:
    from tokenlab.models.fan import TokenOutput

__all__ = ["TokenBackbone", "as_backbone"]


class TokenBackbone(Protocol):
    """A backbone following the tokenlab contract: class and patch tokens, a class head, an optional token head."""

    num_classes: int
    num_features: int
    pretrained_cfg: dict[str, Any]

    def forward_features(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cls (B, C), patches (B, N, C))`` after the final norm; ``mask`` (B, N) swaps in the mask token."""
        ...

    def forward_head(self, features: tuple[torch.Tensor, torch.Tensor], pre_logits: bool = False) -> torch.Tensor:
        """Class logits (B, K) from ``forward_features``' output."""
        ...

    def forward_tokens(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> TokenOutput:
        """Class logits, per-token logits and the token grid of one forward pass."""
        ...

    def grid_size(self, img_size: int | Sequence[int]) -> tuple[int, int]:
        """The (H, W) token grid for an input of ``img_size``."""
        ...

    def get_classifier(self) -> nn.Module:
        """The class head."""
        ...

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the class head by one with ``num_classes`` outputs (0: identity)."""
        ...


def as_backbone(model: nn.Module) -> TokenBackbone:
    """``model`` typed as a ``TokenBackbone`` (no run-time check: callers check what they rely on)."""
    return cast(TokenBackbone, model)
