"""The layout of a training run directory, in one place (``docs/design.md``: "Exported models and run directories").

``RUN/config.yaml``, ``RUN/metrics.jsonl``, ``RUN/tb/``, ``RUN/checkpoints/`` and the exported model
``RUN/model.safetensors`` + ``RUN/model.json`` (the last weights; ``RUN/model_best.*`` holds the best ones by the
run's validation metric when the engine keeps them), and what evaluation writes there (``eval.json``, ``tokens.json``,
``eval_ssl.json``, ``segmentation.json``). Evaluation, reports and studies find files through these helpers
instead of spelling the names again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = [
    "CHECKPOINT_DIR",
    "CONFIG_FILE",
    "EVAL_FILE",
    "EVAL_SSL_FILE",
    "METRICS_FILE",
    "BEST_MODEL_STEM",
    "EXPORT_CHOICES",
    "MODEL_STEM",
    "SEGMENTATION_FILE",
    "TENSORBOARD_DIR",
    "TOKENS_FILE",
    "check_writable",
    "export_stem",
    "read_model_meta",
    "require_classifier",
]

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tb"
CHECKPOINT_DIR = "checkpoints"
MODEL_STEM = "model"
BEST_MODEL_STEM = "model_best"
# which export of a run a consumer (the STL student's labeler, evaluation) takes: the last or the best weights
EXPORT_CHOICES = ("last", "best")
# what the evaluation commands write into a run directory (and reports and studies read back)
EVAL_FILE = "eval.json"
TOKENS_FILE = "tokens.json"
EVAL_SSL_FILE = "eval_ssl.json"
SEGMENTATION_FILE = "segmentation.json"


def export_stem(run: str | Path, which: str = "last") -> Path:
    """The stem of an exported model.

    ``RUN/model`` (``which="best"``: ``RUN/model_best``) for a run directory, else ``run`` without its suffix.
    """
    if which not in EXPORT_CHOICES:
        raise ValueError(f"unknown export {which!r}; choose one of {', '.join(EXPORT_CHOICES)}")
    run = Path(run)
    if run.is_dir():
        return run / (BEST_MODEL_STEM if which == "best" else MODEL_STEM)
    return run.with_suffix("") if run.suffix in (".json", ".safetensors") else run


def check_writable(directory: str | Path, what: str = "output directory") -> Path:
    """Fail before any work when ``directory`` cannot be created or written (a probe file is written and removed).

    The one writability check: training checks its run directory with it, the evaluation commands their outputs
    and caches, so an unwritable location costs one line instead of a traceback after the work.

    Args:
        directory: The directory the results go to (created when missing, as the writer would).
        what: How the message names it (e.g. ``--out``, ``run directory``).

    Raises:
        PermissionError: the directory cannot be created or written (a parent is a file, read-only, no access).
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise PermissionError(f"{what} {directory} is a file, not a directory; choose a writable directory")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write_probe_{os.getpid()}"
        probe.write_bytes(b"0" * 4096)
        probe.unlink()
    except OSError as err:
        raise PermissionError(
            f"{what} {directory} is not writable ({err.strerror or err}); choose a writable location"
        ) from None
    return directory


def read_model_meta(run: str | Path) -> dict[str, Any]:
    """The exported ``model.json`` of a run directory (or of an export stem / file), checked for its shape.

    Raises:
        FileNotFoundError: no exported model there.
        ValueError: the file is not UTF-8 JSON, not an object, or lacks the model name / has ill-typed entries
            (every message names the file).
    """
    meta_file = export_stem(run).with_suffix(".json")
    if not meta_file.is_file():
        raise FileNotFoundError(f"no exported model at {run} (expected {meta_file})")
    fix = "re-export the model or restore the file"
    try:
        meta = json.loads(meta_file.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{meta_file} is not valid JSON ({err}); {fix}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{meta_file} does not hold a JSON object (got {type(meta).__name__}); {fix}")
    if not isinstance(meta.get("model"), str) or not meta["model"]:
        raise ValueError(f"{meta_file} names no model (its 'model' entry is {meta.get('model')!r}); {fix}")
    for key, kind in (("model_kwargs", dict), ("classes", list), ("num_classes", int)):
        if key in meta and meta[key] is not None and not isinstance(meta[key], kind):
            raise ValueError(f"{meta_file}: {key!r} must be a JSON {'object' if kind is dict else kind.__name__}, "
                             f"got {meta[key]!r}; {fix}")  # fmt: skip
    return meta


def require_classifier(run: str | Path, command: str) -> dict[str, Any]:
    """The export's ``model.json``, refused when the model has no classifier (an iBOT backbone export).

    ``eval`` and ``tokens`` score class logits; a backbone (``num_classes`` 0) would give features instead.

    Raises:
        ValueError: the export has no classifier, pointing at ``tokenlab eval-ssl``.
    """
    meta = read_model_meta(run)
    kwargs = meta.get("model_kwargs") or {}
    num_classes = meta.get("num_classes", kwargs.get("num_classes"))
    if num_classes == 0 or kwargs.get("num_classes") == 0:
        method = f" by method {meta['method']!r}" if meta.get("method") else ""
        raise ValueError(
            f"{run} holds a backbone without a classifier (exported{method}, num_classes 0); `tokenlab {command}` "
            f"needs class logits: evaluate it with `tokenlab eval-ssl {run}` (k-NN / linear probe, or --finetune)"
        )
    return meta
