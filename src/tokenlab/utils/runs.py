"""The layout of a training run directory, in one place (``docs/design.md``: "Exported models and run directories").

``RUN/config.yaml``, ``RUN/metrics.jsonl``, ``RUN/tb/``, ``RUN/checkpoints/`` and the exported model
``RUN/model.safetensors`` + ``RUN/model.json`` (the last weights; ``RUN/model_best.*`` holds the best ones by the
run's validation metric when the engine keeps them), and what evaluation writes there (``eval.json``, ``tokens.json``,
``eval_ssl.json``, ``segmentation.json``). Evaluation, reports and studies find files through these helpers
instead of spelling the names again.
"""

from __future__ import annotations

import json
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
    "export_stem",
    "read_model_meta",
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
    """The stem of an exported model: ``RUN/model`` (``which="best"``: ``RUN/model_best``) for a run directory,
    else ``run`` without its suffix."""
    if which not in EXPORT_CHOICES:
        raise ValueError(f"unknown export {which!r}; choose one of {', '.join(EXPORT_CHOICES)}")
    run = Path(run)
    if run.is_dir():
        return run / (BEST_MODEL_STEM if which == "best" else MODEL_STEM)
    return run.with_suffix("") if run.suffix in (".json", ".safetensors") else run


def read_model_meta(run: str | Path) -> dict[str, Any]:
    """The exported ``model.json`` of a run directory (or of an export stem / file).

    Raises:
        FileNotFoundError: no exported model there.
        ValueError: the file is not valid JSON (naming it).
    """
    meta_file = export_stem(run).with_suffix(".json")
    if not meta_file.is_file():
        raise FileNotFoundError(f"no exported model at {run} (expected {meta_file})")
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{meta_file} is not valid JSON ({err}); re-export the model or restore the file") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{meta_file} does not hold a JSON object")
    return meta
