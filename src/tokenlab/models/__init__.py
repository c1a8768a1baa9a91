"""Backbones and heads; importing this module registers every tokenlab model with timm."""

from tokenlab.models._registry import list_tokenlab_models

__all__ = ["list_tokenlab_models"]
