"""One autocast vocabulary for training, evaluation and feature extraction.

``amp`` is ``"none"`` (full precision), ``"bf16"`` or ``"fp16"``. fp16 needs a CUDA device (it needs a gradient
scaler in training, and CPU kernels for it are incomplete); bf16 runs on CPUs and GPUs.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["AMP_CHOICES", "amp_dtype", "autocast"]

AMP_CHOICES = ("none", "bf16", "fp16")
_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def amp_dtype(amp: str | None, device: torch.device | str | None = None) -> torch.dtype | None:
    """The autocast dtype for ``amp`` (None for ``"none"``/None); checks the name and that fp16 runs on CUDA.

    Raises:
        ValueError: an unknown name (listing the valid ones), or fp16 on a non-CUDA device.
    """
    if amp is None:
        return None
    if amp not in _DTYPES:
        raise ValueError(f"unknown amp {amp!r}; valid: {', '.join(AMP_CHOICES)}")
    if amp == "fp16" and device is not None and torch.device(device).type != "cuda":
        raise ValueError("amp=fp16 needs a CUDA device (use bf16 on CPU)")
    return _DTYPES[amp]


def autocast(device: torch.device | str, amp: str | torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` on ``device`` for an ``amp`` name or dtype; a no-op for ``"none"``/None."""
    dtype = amp if isinstance(amp, torch.dtype) or amp is None else amp_dtype(amp, device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)
