"""Which timm-registered models are tokenlab's own (timm's registry is global; we keep our names apart)."""

from __future__ import annotations

import timm

_PREFIXES = ("fan_", "ibot_vit_")


def list_tokenlab_models() -> list[str]:
    """Names of every registered tokenlab model, sorted."""
    return sorted(n for n in timm.list_models() if n.startswith(_PREFIXES))
