"""Device names to devices, in one place for training (``train.device``) and every command's ``--device``."""

from __future__ import annotations

import re

import torch

from tokenlab.utils.distributed import local_rank

__all__ = ["DEVICE_CHOICES", "is_device_name", "resolve_device"]

DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N")
_DEVICE_NAME = re.compile(r"auto|cpu|cuda(:\d+)?")


def is_device_name(name: str) -> bool:
    """Whether ``name`` is one of ``DEVICE_CHOICES`` (a syntax check; whether CUDA exists is checked on use)."""
    return _DEVICE_NAME.fullmatch(name) is not None


def resolve_device(name: str, what: str = "device") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` -> this process's local rank; checks that CUDA exists.

    Args:
        name: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        what: How the setting is called in error messages (``train.device``, ``--device``).

    Raises:
        ValueError: an unknown name, or CUDA asked for on a machine without it.
    """
    if not is_device_name(name):
        raise ValueError(f"unknown {what} {name!r}; valid: {', '.join(DEVICE_CHOICES)}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"{what}={name!r} but no CUDA device is available; use cpu or auto")
        if name == "cuda":
            name = f"cuda:{local_rank()}"
    return torch.device(name)
