"""Reading and writing model weights safely.

- ``load_checkpoint(model, path, prefer="ema")``: published FAN/STL (``.pth``/``.pth.tar``) and safetensors files,
  read with ``torch.load(weights_only=True)`` so no arbitrary object is ever unpickled (the one exception allowed is
  ``argparse.Namespace``, which timm's ``CheckpointSaver`` stores under ``args`` in every published training
  checkpoint). Nested entries are unwrapped: the EMA weights (``state_dict_ema``, timm's ``CheckpointSaver``;
  ``model_ema``) first by default, as the published STL student loads its labeler (``use_ema=True``), then the
  plain weights (``state_dict``, ``model``); ``prefer="model"`` reverses that. ``module.``/``_orig_mod.`` prefixes
  are stripped; loading is strict and every missing, unexpected or mis-shaped key is listed in the error. Nothing
  is interpolated silently.
- ``save_exported`` / ``load_exported``: a trained model as ``<stem>.safetensors`` + ``<stem>.json`` (timm name,
  constructor kwargs, classes, preprocessing), the hand-off format between training and evaluation;
  ``convert_checkpoint`` writes that pair from a published checkpoint (``tokenlab models convert``).
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from timm.layers import resample_abs_pos_embed
from torch import nn

from tokenlab.utils.runs import export_stem, read_model_meta

logger = logging.getLogger(__name__)

#: Which weights of a checkpoint that holds both to take: the EMA ones (published STL labeler choice) or the model's.
PREFER_CHOICES = ("ema", "model")
_EMA_KEYS = ("state_dict_ema", "model_ema")  # timm CheckpointSaver; DeiT/ConvNeXt-style training scripts
_MODEL_KEYS = ("state_dict", "model", "module")
# Published iBOT (and DINO) full checkpoints hold ``teacher`` (the momentum encoder, iBOT's default
# ``--checkpoint_key``: taken with "ema") and ``student`` (taken with "model"), each with a projection head.
_IBOT_TEACHER, _IBOT_STUDENT = ("teacher",), ("student",)
_PREFIXES = ("module.", "_orig_mod.")
# iBOT / DINO wrap the encoder as ``backbone`` beside the projection ``head`` (MultiCropWrapper).
_BACKBONE_PREFIX = "backbone."
#: Classifier modules a fine-tune (:func:`load_pretrained`) always re-initialises for the new classes.
CLASSIFIER_MODULES = ("head", "aux_head")
# Older spellings of ``prefer`` (a nested key name) map to the choice they meant.
_PREFER_ALIASES = {**{k: "ema" for k in _EMA_KEYS}, **{k: "model" for k in _MODEL_KEYS}}
# timm's CheckpointSaver pickles the training arguments; an argparse.Namespace only sets attributes, so it is safe.
_SAFE_GLOBALS: list[Any] = [argparse.Namespace]


def _prefer_order(prefer: str | None) -> tuple[str, ...]:
    choice = _PREFER_ALIASES.get(prefer or "ema", prefer or "ema")
    if choice not in PREFER_CHOICES:
        raise ValueError(f"unknown prefer={prefer!r}; choose one of {', '.join(PREFER_CHOICES)}")
    if choice == "ema":
        return _EMA_KEYS + _IBOT_TEACHER + _MODEL_KEYS + _IBOT_STUDENT
    return _MODEL_KEYS + _IBOT_STUDENT + _EMA_KEYS + _IBOT_TEACHER


def find_state_dict(obj: Mapping[str, Any], prefer: str | None = "ema") -> tuple[dict[str, torch.Tensor], str]:
    """The tensor dict inside a checkpoint object, prefixes stripped, and the nested entry it came from.

    Args:
        obj: A state dict, or a dict holding one under ``state_dict_ema``/``model_ema``/``state_dict``/``model``
            (or iBOT's ``teacher``/``student``).
        prefer: ``"ema"`` (default: EMA weights first when the file has them, iBOT's teacher) or ``"model"``
            (the plain weights, iBOT's student).

    Returns:
        ``(state_dict, source)`` where ``source`` is the nested key path (``"state_dict_ema"``; ``""`` for a flat
        state dict).

    Raises:
        ValueError: no tensor dict inside ``obj``, or an unknown ``prefer``.
    """
    order = _prefer_order(prefer)
    path: list[str] = []
    while not _is_tensor_dict(obj):
        for key in order:
            if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
                obj = obj[key]
                path.append(key)
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
    return out, "/".join(path)


def unwrap_state_dict(obj: Mapping[str, Any], prefer: str | None = "ema") -> dict[str, torch.Tensor]:
    """The tensor dict inside a checkpoint object (see :func:`find_state_dict`), prefixes stripped."""
    return find_state_dict(obj, prefer)[0]


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def read_state_dict(path: str | Path, prefer: str | None = "ema") -> dict[str, torch.Tensor]:
    """Read a ``.safetensors``, ``.pth`` or ``.pth.tar`` file into a flat, unwrapped state dict (EMA first)."""
    return read_checkpoint(path, prefer)[0]


def read_checkpoint(path: str | Path, prefer: str | None = "ema") -> tuple[dict[str, torch.Tensor], str]:
    """Read a ``.safetensors``, ``.pth`` or ``.pth.tar`` file: ``(state dict, nested entry it came from)``.

    Args:
        path: The file.
        prefer: ``"ema"`` (default) or ``"model"``: which weights to take when the file holds both.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a readable checkpoint (or one holding pickled objects other than plain containers).
    """
    _prefer_order(prefer)  # a bad choice fails before the file is read
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        try:
            return find_state_dict(load_file(str(path)), prefer)
        except SafetensorError as err:
            raise ValueError(f"{path} is not a valid safetensors file: {err}") from None
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises many unrelated types on junk input (IndexError, EOFError, ...)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"{path} is not a readable PyTorch checkpoint (loaded with weights_only=True, so only tensors and plain "
            f"containers are accepted): {first}"
        ) from None
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
    try:
        return find_state_dict(obj, prefer)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def check_state_dict(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    source: str = "checkpoint",
    allow_missing: Collection[str] = (),
    hint: str = "",
) -> None:
    """Raise a ValueError listing missing, unexpected and mis-shaped keys; do nothing when all match.

    ``allow_missing``: model keys the checkpoint may lack (a fine-tune's re-initialised classifier); ``hint`` ends
    the first line of the message (what to do).
    """
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict) - set(allow_missing))
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
        f"{source} does not match {type(model).__name__}{hint}"
        + _list("missing keys", missing)
        + _list("unexpected keys", unexpected)
        + _list("shape mismatches", shapes)
    )


def load_checkpoint(model: nn.Module, path: str | Path, prefer: str | None = "ema") -> nn.Module:
    """Load weights from ``path`` into ``model`` strictly; raises ValueError listing every bad key.

    ``prefer``: ``"ema"`` (default; the EMA weights when the file has them, as timm's ``load_checkpoint(...,
    use_ema=True)`` the published STL student uses for its labeler) or ``"model"``.
    """
    state_dict = read_state_dict(path, prefer)
    check_state_dict(model, state_dict, source=str(path))
    model.load_state_dict(state_dict, strict=True)
    return model


def resolve_weights_file(path: str | Path) -> Path:
    """The file of weights ``path`` names.

    A checkpoint file as it is; a tokenlab export (a run directory, a stem such as ``RUN/model_best``, or its
    ``.json``) as its ``.safetensors``.

    Raises:
        FileNotFoundError: nothing there, or a directory without an exported model.
    """
    p = Path(path)
    if p.is_dir():
        weights = export_stem(p).with_suffix(".safetensors")
        if not weights.is_file():
            raise FileNotFoundError(
                f"{p} is a directory without an exported model ({weights.name}); give a training run directory, an "
                f"export stem (RUN/model_best) or a checkpoint file (.pth, .pth.tar, .safetensors)"
            )
        return weights
    if p.suffix == ".json" or (not p.exists() and p.with_name(p.name + ".safetensors").is_file()):
        return export_stem(p).with_suffix(".safetensors")
    if not p.is_file():
        raise FileNotFoundError(f"pretrained weights not found: {p}")
    return p


def _classifier_keys(model: nn.Module, own: Mapping[str, torch.Tensor], loaded: Mapping[str, torch.Tensor]) -> set[str]:
    """Model keys a fine-tune re-initialises.

    ``head``, ``aux_head``, the default cfg's ``classifier`` and any other ``*head*`` tensor whose class dimension
    differs from the checkpoint's.
    """
    names = set(CLASSIFIER_MODULES)
    cfg_name = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    names |= {cfg_name} if isinstance(cfg_name, str) else set(cfg_name or ())
    keys = {k for k in own if any(k == n or k.startswith(n + ".") for n in names)}
    num_classes = getattr(model, "num_classes", None)
    for k, v in own.items():
        other = loaded.get(k)
        if (
            "head" in k.split(".")[0]
            and other is not None
            and other.shape != v.shape
            and v.ndim > 0
            and v.shape[0] == num_classes
        ):
            keys.add(k)
    return keys


def _resample_pos_embed(model: nn.Module, value: torch.Tensor, own: torch.Tensor) -> torch.Tensor | None:
    """An absolute position embedding ``(1, prefix + h*w, C)`` resampled to the model's grid.

    None when the two shapes are not two grids of one embedding (the shape mismatch is then reported).
    """
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if grid is None or value.ndim != 3 or own.ndim != 3 or value.shape[-1] != own.shape[-1]:
        return None
    prefix = int(getattr(model, "num_prefix_tokens", 1))
    if own.shape[1] != prefix + int(grid[0]) * int(grid[1]):
        return None
    # bicubic without anti-aliasing: the published fine-tuning rule (iBOT run_class_finetuning.py, F.interpolate)
    return resample_abs_pos_embed(
        value, new_size=[int(g) for g in grid], num_prefix_tokens=prefix, interpolation="bicubic", antialias=False
    )


def load_pretrained(model: nn.Module, path: str | Path, prefer: str = "ema") -> dict[str, Any]:
    """Initialise a freshly built ``model`` for fine-tuning from published or exported weights (``model.pretrained``).

    ``path`` is a published FAN / STL checkpoint (``.pth``, ``.pth.tar``: flat, timm ``CheckpointSaver`` with or
    without EMA), a published iBOT checkpoint (``checkpoint.pth`` with ``teacher`` / ``student`` dicts whose keys
    carry ``backbone.`` / ``module.backbone.``, or the extracted backbone ``checkpoint_teacher.pth``) or a tokenlab
    export (a run directory, ``RUN/model_best``, a ``.safetensors`` file). It is read by :func:`read_checkpoint`
    (``prefer``: EMA / teacher weights first, or ``"model"``: the plain / student weights). Then:

    - the classifier (``head``, ``aux_head``, any head whose class dimension differs) is not loaded: it keeps the
      model's fresh initialisation for the new classes; a checkpoint's classifier the model lacks is dropped;
    - iBOT's projection head (the keys outside ``backbone.``) is dropped, ``masked_embed`` becomes ``mask_token``;
      a pre-training mask token the model lacks is dropped, one the file lacks keeps its initial value;
    - a position embedding for another grid is resampled (timm ``resample_abs_pos_embed``, bicubic, no
      anti-aliasing as iBOT's fine-tuning) and logged;
    - every other key must match: missing, unexpected and mis-shaped keys are listed in one ValueError.

    Returns:
        The record stored in the run's ``model.json`` (``pretrained``): ``path`` (the file read), ``entry`` (the
        nested entry used, ``""`` for a flat file), ``prefer``, ``loaded`` (count), ``reinitialised`` (model keys
        left at their initial values), ``dropped`` (checkpoint keys not used) and ``resized``.

    Raises:
        FileNotFoundError: nothing at ``path``.
        ValueError: an unreadable file, or weights of another architecture.
    """
    file = resolve_weights_file(path)
    state_dict, entry = read_checkpoint(file, prefer)
    own = model.state_dict()
    dropped: list[str] = []
    if any(k.startswith(_BACKBONE_PREFIX) for k in state_dict) and not any(k.startswith(_BACKBONE_PREFIX) for k in own):
        dropped = sorted(k for k in state_dict if not k.startswith(_BACKBONE_PREFIX))  # the projection head
        state_dict = {k[len(_BACKBONE_PREFIX) :]: v for k, v in state_dict.items() if k.startswith(_BACKBONE_PREFIX)}
    if "masked_embed" in state_dict:  # iBOT's name of the learned mask embedding
        value = state_dict.pop("masked_embed")
        state_dict["mask_token"] = value.reshape(own["mask_token"].shape) if "mask_token" in own else value
    if "mask_token" in state_dict and "mask_token" not in own:  # pre-training only; this model masks nothing
        state_dict.pop("mask_token")
        dropped.append("mask_token")
    classifier = _classifier_keys(model, own, state_dict)
    for k in sorted(state_dict):
        if k in classifier or k.split(".")[0] in CLASSIFIER_MODULES:
            state_dict.pop(k)
            dropped.append(k)
    resized: list[str] = []
    for k in sorted(state_dict):
        if k.endswith("pos_embed") and k in own and state_dict[k].shape != own[k].shape:
            new = _resample_pos_embed(model, state_dict[k], own[k])
            if new is not None:
                resized.append(f"{k} {tuple(state_dict[k].shape)} -> {tuple(new.shape)}")
                state_dict[k] = new
    source = f"{path} ({entry or 'flat state dict'})"
    keep_init = classifier | ({"mask_token"} if "mask_token" in own else set())
    check_state_dict(
        model, state_dict, source, allow_missing=keep_init, hint=" (model.pretrained needs the same model.name and "
        "architecture model.kwargs as the checkpoint)",
    )  # fmt: skip
    model.load_state_dict(state_dict, strict=False)
    reinitialised = sorted(set(own) - set(state_dict))
    modules = sorted({k.rsplit(".", 1)[0] if "." in k else k for k in reinitialised})
    logger.info("initialised %s from %s: %d tensors loaded; re-initialised for %s classes: %s",
                type(model).__name__, source, len(state_dict), getattr(model, "num_classes", "?"),
                ", ".join(modules) or "nothing")  # fmt: skip
    if resized:
        logger.info("resampled to the model's grid (bicubic): %s", "; ".join(resized))
    return {
        "path": str(file.resolve()),
        "entry": entry,
        "prefer": prefer,
        "loaded": len(state_dict),
        "reinitialised": reinitialised,
        "dropped": dropped,
        "resized": resized,
    }


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
    weights = stem.with_suffix(".safetensors")
    state_dict = read_state_dict(weights)
    try:
        model = _build_loaded(meta["model"], meta.get("model_kwargs", {}), state_dict, str(weights))
    except TypeError as err:  # model_kwargs that do not fit the model: the file is corrupt or from elsewhere
        raise ValueError(f"{meta_file}: model_kwargs do not fit {meta['model']!r} ({err})") from None
    return model.to(device).eval(), meta


def _build_loaded(
    name: str, kwargs: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor], source: str
) -> nn.Module:
    """``timm.create_model(name, **kwargs)`` holding ``state_dict`` (strict), without initialising it first.

    The model is built on the meta device and the checkpoint's tensors are assigned to it (cast to the model's
    dtypes), which saves the random initialisation (seconds for the large FANs). A model with buffers outside its
    state dict (which assignment would leave on the meta device) is built and loaded the ordinary way.
    """
    with torch.device("meta"):
        model = timm.create_model(name, **kwargs)
    check_state_dict(model, state_dict, source=source)
    own = model.state_dict()
    if {n for n, _ in model.named_buffers()} - set(own):  # non-persistent buffers: build the ordinary way
        model = timm.create_model(name, **kwargs)
        model.load_state_dict(state_dict, strict=True)
        return model
    cast = {k: v.to(own[k].dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    model.load_state_dict(cast, strict=True, assign=True)
    return model


def load_published(
    path: str | Path,
    model_name: str,
    prefer: str = "ema",
    num_classes: int | None = None,
    classes: list[str] | None = None,
    **model_kwargs: Any,
) -> tuple[nn.Module, dict[str, Any]]:
    """Build ``model_name`` and load a published checkpoint (e.g. an STL FAN-TL ``.pth.tar``) into it strictly.

    The weights are read with :func:`read_checkpoint` (``prefer`` picks the EMA or the plain weights when the file
    has both); the class count K is read from the checkpoint's ``head.weight`` unless given. The returned meta is an
    export meta: the evaluation preprocessing comes from the model's default cfg (published FAN: 224 px, bicubic,
    crop_pct 1.0, ImageNet mean/std); without ``classes`` it lists no class names and evaluation takes the sorted
    class-folder names (the order timm's ImageFolder gives ImageNet); ``source`` names the file, entry and ``prefer``.

    Returns:
        ``(model in eval mode, meta)``.

    Raises:
        FileNotFoundError: no such checkpoint.
        ValueError: unknown model name, unreadable file, or weights that do not fit the model (every bad key listed).
    """
    if not timm.is_model(model_name):
        raise ValueError(f"unknown model {model_name!r}; `tokenlab models` lists the registered ones")
    state_dict, entry = read_checkpoint(path, prefer)
    if num_classes is None:
        head = state_dict.get("head.weight")
        if head is None:
            raise ValueError(f"{path} has no head.weight to read the number of classes from; pass num_classes")
        num_classes = int(head.shape[0])
    if classes is not None and len(classes) != num_classes:
        raise ValueError(f"{len(classes)} class names given for a {num_classes}-class checkpoint {path}")
    model_kwargs = {**model_kwargs, "num_classes": num_classes}
    model = _build_loaded(model_name, model_kwargs, state_dict, f"{path} ({entry or 'flat state dict'})")
    cfg: dict[str, Any] = dict(getattr(model, "pretrained_cfg", None) or {})
    meta: dict[str, Any] = {
        "model": model_name,
        "model_kwargs": model_kwargs,
        "num_classes": num_classes,
        "classes": classes,
        "img_size": int(model_kwargs.get("img_size", cfg["input_size"][-1])),
        "mean": [float(v) for v in cfg["mean"]],
        "std": [float(v) for v in cfg["std"]],
        "crop_pct": float(cfg["crop_pct"]),
        "interpolation": str(cfg["interpolation"]),
        "source": {"file": str(Path(path).resolve()), "entry": entry, "prefer": prefer},
    }
    logger.info("loaded %s from %s (%s)", model_name, path, entry or "flat state dict")
    return model.eval(), meta


def convert_checkpoint(
    path: str | Path,
    model_name: str,
    out: str | Path,
    prefer: str = "ema",
    num_classes: int | None = None,
    classes: list[str] | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Write a tokenlab export (``<out>.safetensors`` + ``<out>.json``) from a published checkpoint.

    ``tokenlab models convert``; see :func:`load_published` for how the file is read and what the meta holds. The
    export is what ``tokenlab eval``, ``tokens`` and the STL student (``labeler=<out>``) take.

    Returns:
        ``(stem, meta)`` of the written export.
    """
    model, meta = load_published(path, model_name, prefer, num_classes, classes)
    stem = save_exported(model, out, meta)
    logger.info("wrote %s.safetensors / .json", stem)
    return stem, meta
