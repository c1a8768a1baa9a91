"""Resumable training checkpoints, written atomically.

Layout of one checkpoint (``RUN/checkpoints/step_000001234/``):

- ``<name>.safetensors`` for every weight set (``method``: the method's ``state_dict``; ``ema``: the model EMA);
- ``state.pt``: optimizer, grad scaler, step, epoch, position inside the epoch, non-finite counters, method extras,
  the resolved config, and the RNG states (torch, CUDA, numpy, python) of every rank. It holds only tensors and
  plain containers, so it is read back with ``torch.load(weights_only=True)``.

A checkpoint is written into ``step_....tmp`` and renamed into place when complete, so a kill at any moment
leaves every earlier checkpoint intact; ``latest_checkpoint`` only ever sees complete directories. The trainer never
writes a checkpoint holding a non-finite tensor (``nonfinite_tensors``), so rotation never deletes the last finite
one. Reading one back (``load_checkpoint_dir``) turns every way a file can be broken (empty, truncated, pickled
objects, not a checkpoint) into a ``CheckpointError`` naming the file; ``resume_candidates`` lists what
``--resume auto`` may fall back to.
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import re
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from tokenlab.utils.runs import CHECKPOINT_DIR

__all__ = [
    "CheckpointError",
    "capture_rng_state",
    "check_writable",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint_dir",
    "load_method_and_optimizer",
    "method_state",
    "optimizer_layout",
    "optimizer_state",
    "nonfinite_tensors",
    "prune_checkpoints",
    "restore_rng_state",
    "resume_candidates",
    "resume_path",
    "save_checkpoint_dir",
]

logger = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d+)$")
STATE_FILE = "state.pt"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (unreadable, truncated, pickled objects, non-finite, another model)."""


def _float_leaves(tree: Any, prefix: str, out: list[tuple[str, torch.Tensor]]) -> None:
    if isinstance(tree, torch.Tensor):
        if tree.is_floating_point() or tree.is_complex():
            out.append((prefix or "tensor", tree))
    elif isinstance(tree, Mapping):
        for k, v in tree.items():
            _float_leaves(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            _float_leaves(v, f"{prefix}.{i}" if prefix else str(i), out)


def nonfinite_tensors(tree: Any, prefix: str = "") -> list[str]:
    """Names (dotted paths) of the floating-point tensors holding NaN or Inf anywhere inside ``tree``.

    ``tree`` is a tensor or nested mappings / lists / tuples of them (state dicts, an optimizer state). One device
    synchronisation per device, however many tensors.
    """
    leaves: list[tuple[str, torch.Tensor]] = []
    _float_leaves(tree, prefix, leaves)
    by_device: dict[torch.device, list[int]] = {}
    for i, (_, t) in enumerate(leaves):
        by_device.setdefault(t.device, []).append(i)
    bad: list[int] = []
    for idx in by_device.values():
        ok = torch.stack([torch.isfinite(leaves[i][1].detach()).all() for i in idx]).tolist()
        bad += [i for i, good in zip(idx, ok, strict=True) if not good]
    return [leaves[i][0] for i in sorted(bad)]


def capture_rng_state() -> dict[str, Any]:
    """The RNG states of this process as tensors and plain values (safe for ``weights_only`` loading)."""
    np_state = np.random.get_state(legacy=True)
    assert isinstance(np_state, tuple)  # legacy: ("MT19937", keys, pos, has_gauss, cached_gaussian)
    py_version, py_state, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": int(py_version), "state": torch.tensor(py_state, dtype=torch.int64), "gauss": py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of ``capture_rng_state``."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoint directories under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found) if (p / STATE_FILE).is_file()]


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under ``root``, or None."""
    found = list_checkpoints(root)
    return found[-1] if found else None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint_dir(
    root: str | Path, step: int, weights: Mapping[str, Mapping[str, torch.Tensor]], state: Mapping[str, Any]
) -> Path:
    """Write ``root/step_<step>`` atomically (temporary directory + rename) and return its path.

    Args:
        root: The run's ``checkpoints`` directory.
        step: Optimizer step the checkpoint resumes from.
        weights: ``{name: state_dict}``; each becomes ``<name>.safetensors``.
        state: Everything else (tensors and plain containers only).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:09d}"
    tmp = root / f"{final.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    for name, sd in weights.items():
        # clone: safetensors refuses tensors that share storage (tied weights)
        tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in sd.items()}
        save_file(tensors, str(tmp / f"{name}.safetensors"))
    with open(tmp / STATE_FILE, "wb") as f:
        torch.save(dict(state), f)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    if final.exists():
        old = root / f"{final.name}.old.{time.monotonic_ns()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
    _fsync_dir(root)
    return final


def _read_weights(file: Path) -> dict[str, torch.Tensor]:
    if file.stat().st_size == 0:
        raise CheckpointError(f"checkpoint file {file} is empty")
    try:
        return load_file(str(file))
    except Exception as err:  # safetensors raises its own SafetensorError (and OSError, ValueError, ...)
        raise CheckpointError(_unreadable(file, err)) from None


def _unreadable(file: Path, err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    reason = (lines[0] if lines else type(err).__name__)[:160]
    return f"checkpoint file {file} is unreadable (truncated or corrupt: {reason})"


def _read_state(file: Path) -> dict[str, Any]:
    if file.stat().st_size == 0:
        raise CheckpointError(f"checkpoint file {file} is empty")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # weights_only refused a global: the file holds pickled objects, never run
        raise CheckpointError(
            f"checkpoint file {file} holds pickled Python objects, not only tensors and plain values; tokenlab "
            f"never runs them (weights_only loading): use a checkpoint written by tokenlab"
        ) from None
    except Exception as err:  # a truncated zip, EOF, ...
        raise CheckpointError(_unreadable(file, err)) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint file {file} does not hold a tokenlab training state")
    return state


def load_checkpoint_dir(path: str | Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """Read a checkpoint directory: ``({name: state_dict}, state)``; ``state.pt`` is loaded with weights_only.

    Raises:
        CheckpointError: not a checkpoint directory, or a file in it is empty, truncated, corrupt or holds pickled
            Python objects (the message names the file).
    """
    path = Path(path)
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"{path} is not a complete tokenlab checkpoint directory (no {STATE_FILE} in it)")
    weights = {p.name[: -len(".safetensors")]: _read_weights(p) for p in sorted(path.glob("*.safetensors"))}
    return weights, _read_state(path / STATE_FILE)


def prune_checkpoints(root: str | Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints and any stale temporary directory."""
    root = Path(root)
    found = list_checkpoints(root)
    for p in found[: max(0, len(found) - keep)]:
        shutil.rmtree(p, ignore_errors=True)
    if root.is_dir():
        for p in root.iterdir():
            if p.is_dir() and (p.name.endswith(".tmp") or ".old." in p.name):
                shutil.rmtree(p, ignore_errors=True)


def check_writable(run_dir: str | Path, min_free_mb: float) -> None:
    """Fail before training when ``run_dir`` cannot be written or its disk has less than ``min_free_mb`` free.

    Raises:
        PermissionError: the directory cannot be created or written.
        ValueError: not enough free disk space.
    """
    from tokenlab.utils.runs import check_writable as probe_writable  # the one writability check

    run_dir = probe_writable(run_dir, "run directory")
    free_mb = shutil.disk_usage(run_dir).free / 2**20
    if free_mb < min_free_mb:
        raise ValueError(
            f"only {free_mb:.0f} MiB free under {run_dir}; train.min_free_disk_mb asks for {min_free_mb:.0f} MiB "
            f"(free some space or lower train.min_free_disk_mb)"
        )


# ---- what the trainer saves and restores (one process, DDP or FSDP2) ------------------------------------------------
def optimizer_layout(fsdp: bool) -> str:
    """How a checkpoint's optimizer state is keyed: FSDP2 saves it by parameter name, DDP / one process by index."""
    return "fsdp (keyed by parameter name)" if fsdp else "ddp or single-process (keyed by parameter index)"


def method_state(method: torch.nn.Module, fsdp: bool) -> dict[str, torch.Tensor]:
    """The method's full state dict (gathered to CPU under FSDP2: a collective, every rank calls it)."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(method, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return cast(dict[str, torch.Tensor], full)  # a model's state dict holds tensors only
    return method.state_dict()


def optimizer_state(method: torch.nn.Module, optimizer: torch.optim.Optimizer, fsdp: bool) -> dict[str, Any]:
    """The optimizer state (name-keyed and gathered under FSDP2: a collective)."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(method, optimizer, options=opts)
    return optimizer.state_dict()


def load_method_and_optimizer(
    method: torch.nn.Module, optimizer: torch.optim.Optimizer, weights: Mapping[str, Any], optim: Any, fsdp: bool
) -> None:
    """Inverse of ``method_state`` + ``optimizer_state`` (every rank loads the full state, FSDP2 keeps its shard)."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
        set_model_state_dict(method, dict(weights), options=opts)
        set_optimizer_state_dict(method, optimizer, optim, options=opts)
    else:
        method.load_state_dict(weights, strict=True)
        optimizer.load_state_dict(optim)


def resume_candidates(resume: str | None, run_dir: Path) -> list[Path]:
    """The checkpoints ``checkpoint.resume`` may resume from, to try in order.

    ``auto``: every complete checkpoint of ``RUN/checkpoints``, newest first (the trainer falls back to an older one
    when a newer one is unreadable); a run or checkpoints directory: its newest; a checkpoint directory (or a file
    inside one): just that one; None: nothing.
    """
    if resume is None:
        return []
    if resume == "auto":
        return list(reversed(list_checkpoints(run_dir / CHECKPOINT_DIR)))
    path = Path(resume)
    if path.is_file() and (path.parent / STATE_FILE).is_file():
        return [path.parent]  # a file inside a checkpoint directory names that checkpoint
    found = resume_path(resume, run_dir)
    return [found] if found is not None else []


def resume_path(resume: str | None, run_dir: Path) -> Path | None:
    """The checkpoint directory that ``checkpoint.resume`` names.

    ``resume`` is None, ``auto`` (the newest in ``RUN/checkpoints``, or None), a checkpoint directory, or a run /
    checkpoints directory (its newest complete checkpoint).
    """
    if resume is None:
        return None
    if resume == "auto":
        found = latest_checkpoint(run_dir / CHECKPOINT_DIR)
        if found is None:
            logger.info("--resume auto: no checkpoint in %s, starting fresh", run_dir / CHECKPOINT_DIR)
        return found
    path = Path(resume)
    if path.is_dir() and not (path / STATE_FILE).is_file():
        found = latest_checkpoint(path) or latest_checkpoint(path / CHECKPOINT_DIR)
        if found is None:
            raise FileNotFoundError(f"checkpoint.resume={resume}: no complete checkpoint there")
        return found
    return path
