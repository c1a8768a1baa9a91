"""One autocast vocabulary for training, evaluation and feature extraction.

``amp`` is ``"none"`` (full precision), ``"bf16"`` or ``"fp16"``. fp16 needs a CUDA device (it needs a gradient
scaler in training, and CPU kernels for it are incomplete); bf16 runs on CPUs and GPUs.

The training fast path (``train.fast``, ``resolve_fast``) is decided here too, because its main lever is the
autocast dtype: ``auto`` turns bf16 on only where the hardware computes in bf16 (a CUDA GPU with bf16, a CPU with
AVX512-BF16 or AMX; on an AVX2-only CPU bf16 is emulated and slower than fp32) and, on CUDA, lays the convolution
stems out channels-last; ``on`` adds ``torch.compile``; ``off`` leaves ``train.amp``/``channels_last``/``compile``
as set.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

__all__ = ["AMP_CHOICES", "FAST_CHOICES", "FastPath", "amp_dtype", "autocast", "native_bf16", "resolve_fast"]

AMP_CHOICES = ("none", "bf16", "fp16")
_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
FAST_CHOICES = ("auto", "on", "off")


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


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` computes in bf16 natively: a CUDA GPU with bf16, or a CPU with AVX512-BF16 or AMX."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if dev.type == "cpu":
        amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
        return bool(torch.cpu._is_avx512_bf16_supported() or amx())
    return False


@dataclass(frozen=True)
class FastPath:
    """The effective training settings after ``train.fast`` (see ``resolve_fast``)."""

    amp: str
    channels_last: bool
    compile: bool
    fused_optimizer: bool = False


def resolve_fast(
    fast: str,
    device: torch.device | str,
    amp: str = "none",
    channels_last: bool = False,
    compile: bool = False,
    fsdp: bool = False,
) -> FastPath:
    """The settings ``train.fast`` gives on ``device``, starting from ``train.amp``/``channels_last``/``compile``.

    - ``off``: the three settings as given.
    - ``auto`` (default): ``amp: none`` becomes ``bf16`` where ``native_bf16(device)``; channels-last on CUDA
      (not under FSDP, ``fsdp``). Channels-last leaves fp32 results unchanged to ~1e-6 (tested), so this is safe
      by default. The optimizer runs fused (one kernel over all parameters) where torch has a fused version of it
      (Adam, AdamW, SGD; not under FSDP): the same update to float rounding, and on CPU 4-5x faster than torch's
      default per-parameter loop (measured in ``benchmarks/models.py``), which matters for small models.
    - ``on``: ``auto`` plus ``torch.compile`` (minutes of compilation first: worth it for long runs only).

    An explicit ``amp: fp16``/``bf16`` is never changed.

    Raises:
        ValueError: an unknown ``fast`` value.
    """
    if fast not in FAST_CHOICES:
        raise ValueError(f"config key 'train.fast' is {fast!r}; valid: {', '.join(FAST_CHOICES)}")
    if fast == "off":
        return FastPath(amp, channels_last, compile, fused_optimizer=False)
    amp = "bf16" if amp == "none" and native_bf16(device) else amp
    # channels-last helps the conv stems on GPUs; on CPU it measured no faster (0.96x, FAN-T hybrid), and FSDP2
    # cannot shard the non-contiguous weights it makes
    channels_last = channels_last or (torch.device(device).type == "cuda" and not fsdp)
    return FastPath(amp, channels_last, compile or fast == "on", fused_optimizer=not fsdp)
