"""Which timm-registered models are tokenlab's own (timm's registry is global; we keep our names apart)."""

from __future__ import annotations

from typing import Any

import timm
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

_PREFIXES = ("fan_", "ibot_vit_")


def list_tokenlab_models() -> list[str]:
    """Names of every registered tokenlab model, sorted."""
    return sorted(n for n in timm.list_models() if n.startswith(_PREFIXES))


def base_cfg(**kwargs: Any) -> dict[str, Any]:
    """The pretrained cfg every tokenlab model starts from (no URL: nothing is downloaded); ``kwargs`` override."""
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "classifier": "head",
        **kwargs,
    }
