"""Backbones and heads; importing this module registers every tokenlab model with timm.

Create models through timm (``timm.create_model("fan_tiny_12_p16_224", num_classes=10)``) or
``tokenlab.models.create_model``, which adds a did-you-mean error for unknown names.
"""

from __future__ import annotations

import difflib
from typing import Any

import timm
from torch import nn

from tokenlab.models import detection, fan, segmentation, vit  # noqa: F401  (registration side effect)
from tokenlab.models._loading import (
    PREFER_CHOICES,
    check_state_dict,
    convert_checkpoint,
    find_state_dict,
    load_checkpoint,
    load_exported,
    load_pretrained,
    load_published,
    read_checkpoint,
    read_state_dict,
    save_exported,
    unwrap_state_dict,
)
from tokenlab.models._registry import list_tokenlab_models
from tokenlab.models.fan import FAN, TokenOutput
from tokenlab.models.vit import MaskedViT

__all__ = [
    "FAN",
    "MaskedViT",
    "PREFER_CHOICES",
    "TokenOutput",
    "check_state_dict",
    "convert_checkpoint",
    "create_model",
    "find_state_dict",
    "list_tokenlab_models",
    "load_checkpoint",
    "load_exported",
    "load_pretrained",
    "load_published",
    "read_checkpoint",
    "read_state_dict",
    "save_exported",
    "unwrap_state_dict",
]


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """``timm.create_model`` with a clear error naming the closest valid names for an unknown model."""
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, list_tokenlab_models() + timm.list_models(), n=5, cutoff=0.5)
        hint = f"; closest: {', '.join(close)}" if close else "; `tokenlab models` lists ours"
        raise ValueError(f"unknown model {name!r}{hint}")
    return timm.create_model(name, **kwargs)
