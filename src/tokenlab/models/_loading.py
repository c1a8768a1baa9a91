"""Reading and writing model weights safely.

- ``load_checkpoint(model, path)``: published FAN/STL (``.pth``/``.pth.tar``, read with ``weights_only=True`` so
  no arbitrary object is ever unpickled) and safetensors files; nested ``state_dict``/``model``/``model_ema``
  entries and ``module.`` prefixes are unwrapped; loading is strict and every missing, unexpected or mis-shaped
  key is listed in the error. Nothing is interpolated silently.
- ``save_exported`` / ``load_exported``: a trained model as ``<stem>.safetensors`` + ``<stem>.json`` (timm name,
  constructor kwargs, classes, preprocessing), the hand-off format between training and evaluation.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from tokenlab.utils.runs import export_stem, read_model_meta

logger = logging.getLogger(__name__)

_NESTED_KEYS = ("state_dict", "model", "model_ema", "state_dict_ema", "module")
_PREFIXES = ("module.", "_orig_mod.")


def unwrap_state_dict(obj: Mapping[str, Any], prefer: str | None = None) -> dict[str, torch.Tensor]:
    """Find the tensor dict inside a checkpoint object and strip ``module.``/``_orig_mod.`` prefixes.

    Args:
        obj: A state dict, or a dict holding one under ``state_dict``/``model``/``model_ema``/...
        prefer: Nested key to take first when several exist (e.g. ``"model_ema"``).
    """
    order = ((prefer,) if prefer else ()) + _NESTED_KEYS
    while not _is_tensor_dict(obj):
        for key in order:
            if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
        else:
            keys = sorted(obj)[:10] if isinstance(obj, Mapping) else type(obj).__name__
            raise ValueError(f"no state dict found in checkpoint (top-level keys: {keys})")
    out = {}
    for k, v in obj.items():
        for p in _PREFIXES:
            while k.startswith(p):
                k = k[len(p) :]
        out[k] = v
    return out


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def read_state_dict(path: str | Path, prefer: str | None = None) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors``, ``.pth`` or ``.pth.tar`` file into a flat, unwrapped state dict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        try:
            return unwrap_state_dict(load_file(str(path)), prefer)
        except SafetensorError as err:
            raise ValueError(f"{path} is not a valid safetensors file: {err}") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises many unrelated types on junk input (IndexError, EOFError, ...)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"{path} is not a readable PyTorch checkpoint (loaded with weights_only=True, so only tensors and plain "
            f"containers are accepted): {first}"
        ) from None
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return unwrap_state_dict(obj, prefer)


def check_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Raise a ValueError listing missing, unexpected and mis-shaped keys; do nothing when all match."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = sorted(
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state_dict)
        if tuple(own[k].shape) != tuple(state_dict[k].shape)
    )
    if not (missing or unexpected or shapes):
        return

    def _list(title: str, items: list[str]) -> str:
        shown = "\n    ".join(items[:20]) + (f"\n    ... and {len(items) - 20} more" if len(items) > 20 else "")
        return f"\n  {title} ({len(items)}):\n    {shown}" if items else ""

    raise ValueError(
        f"{source} does not match {type(model).__name__}"
        + _list("missing keys", missing)
        + _list("unexpected keys", unexpected)
        + _list("shape mismatches", shapes)
    )


def load_checkpoint(model: nn.Module, path: str | Path, prefer: str | None = None) -> nn.Module:
    """Load weights from ``path`` into ``model`` strictly; raises ValueError listing every bad key."""
    state_dict = read_state_dict(path, prefer)
    check_state_dict(model, state_dict, source=str(path))
    model.load_state_dict(state_dict, strict=True)
    return model


def save_exported(model: nn.Module, path: str | Path, meta: Mapping[str, Any]) -> Path:
    """Write ``<path>.safetensors`` and ``<path>.json``; ``meta`` must hold ``model`` (the timm name).

    Writes go to temporary files that are renamed into place, so a crash never leaves a half-written pair.
    """
    if "model" not in meta:
        raise ValueError("meta must name the timm model under 'model'")
    stem = export_stem(path)
    stem.parent.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp_w = stem.with_name(stem.name + ".safetensors.tmp")
    tmp_j = stem.with_name(stem.name + ".json.tmp")
    save_file(weights, str(tmp_w), metadata={"format": "pt", "model": str(meta["model"])})
    tmp_j.write_text(json.dumps(dict(meta), indent=2, default=str))
    tmp_w.replace(stem.with_suffix(".safetensors"))
    tmp_j.replace(stem.with_suffix(".json"))
    return stem


def load_exported(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model written by ``save_exported`` (``path`` with or without suffix, or a run directory)."""
    stem = export_stem(path)
    meta, meta_file = read_model_meta(stem), stem.with_suffix(".json")
    if not timm.is_model(meta["model"]):
        raise ValueError(f"{meta_file} names an unknown model {meta['model']!r} (see `tokenlab models`)")
    try:
        model = timm.create_model(meta["model"], **meta.get("model_kwargs", {}))
    except TypeError as err:  # model_kwargs that do not fit the model: the file is corrupt or from elsewhere
        raise ValueError(f"{meta_file}: model_kwargs do not fit {meta['model']!r} ({err})") from None
    load_checkpoint(model, stem.with_suffix(".safetensors"))
    return model.to(device).eval(), meta
