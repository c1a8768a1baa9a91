"""The bottom layer: helpers every other part of tokenlab may use, and that import nothing else of tokenlab.

- ``distributed``: process-group set-up and the few collectives the engine and the losses need (no-ops in one process);
- ``schedules``: per-step value arrays (warm-up + cosine, poly, warm-up + constant) and ``build_schedule`` by kind;
- ``amp``: the one autocast vocabulary (``none``/``bf16``/``fp16``) and context manager;
- ``runs``: the layout of a run directory and the reader of its exported ``model.json``;
- ``metrics_log``: the writer (JSON lines, TensorBoard, progress bar) and the one reader of ``metrics.jsonl``.
"""
