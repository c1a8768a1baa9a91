"""Run metrics: JSON lines (``RUN/metrics.jsonl``), TensorBoard events (``RUN/tb/``) and a tqdm bar, rank 0 only.

Each JSONL record is one object with ``kind`` (``"step"``, ``"epoch"``, ``"val"``, ``"event"``), ``step``, ``epoch``
and the metrics, so plots and reports read one file. Other ranks get a ``MetricLogger`` that writes nothing.

The progress bar spans the whole run (``total_steps``: every epoch up to the stop step), moves on every optimizer
step (:meth:`MetricLogger.tick`), so its ETA is the remaining time of the run from the first steps on; after
:data:`ETA_STEPS` timed steps the log also states the estimated training time.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

try:
    from torch.utils.tensorboard import SummaryWriter as _SummaryWriter

    SummaryWriter: type[_SummaryWriter] | None = _SummaryWriter
except ImportError:  # tensorboard missing: JSONL only, said once at start-up
    SummaryWriter = None

__all__ = ["ETA_STEPS", "MetricLogger", "format_duration", "read_metrics"]

logger = logging.getLogger(__name__)

ETA_STEPS = 20  # timed steps (after the first, which carries the start-up) before the training time is estimated


def format_duration(seconds: float) -> str:
    """``seconds`` as ``"2 h 05 min"``, ``"12 min 30 s"`` or ``"45 s"``."""
    s = max(0, round(seconds))
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    if s >= 60:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s} s"


class MetricLogger:
    """Writes metrics of the main process.

    Args:
        run_dir: The run directory.
        enabled: False on ranks other than 0: every call is a no-op.
        tensorboard: Also write TensorBoard events under ``run_dir/tb``.
        progress: Show a tqdm bar.
        total_steps: Length of the bar.
        initial_step: Where the bar starts (resume).
    """

    def __init__(
        self,
        run_dir: str | Path,
        enabled: bool = True,
        tensorboard: bool = True,
        progress: bool = True,
        total_steps: int = 0,
        initial_step: int = 0,
    ) -> None:
        self.enabled = enabled
        self.total_steps = total_steps
        self._first: tuple[int, float] | None = None  # (step, time) of the first tick: timing starts after it
        self._estimated = False
        self._file = None
        self._tb = None
        self._bar = None
        if not enabled:
            return
        run_dir = Path(run_dir)
        self._file = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            if SummaryWriter is None:
                logger.warning("tensorboard is not installed; writing metrics.jsonl only")
            else:
                self._tb = SummaryWriter(log_dir=str(run_dir / "tb"), purge_step=initial_step or None)
        if progress:
            self._bar = tqdm(total=total_steps, initial=initial_step, dynamic_ncols=True, desc="train")

    def log(self, kind: str, step: int, epoch: int, metrics: Mapping[str, Any]) -> None:
        """Append one record and mirror scalar metrics to TensorBoard under ``<kind>/<name>``."""
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, "epoch": epoch}
        record.update({k: _plain(v) for k, v in metrics.items()})
        assert self._file is not None
        self._file.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if k not in ("kind", "step", "epoch") and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(f"{kind}/{k}", v, step)

    def tick(self, step: int) -> None:
        """One optimizer step done (``step`` is its number): advance the bar, and estimate the training time once.

        The estimate comes after :data:`ETA_STEPS` timed steps: the time per step and the rest of the run.
        """
        if not self.enabled:
            return
        now = time.perf_counter()
        if self._first is None:
            self._first = (step, now)  # the first step carries loader start-up and warm-up: not timed
        elif not self._estimated and step - self._first[0] >= ETA_STEPS:
            self._estimated = True
            timed = step - self._first[0]
            per_step = (now - self._first[1]) / timed
            left = max(0, self.total_steps - step)
            logger.info(
                "training time estimate: %.3g s per step (steps %d-%d); about %s for the remaining %d of %d steps, "
                "%s in all (validation and checkpoints add to it)", per_step, self._first[0] + 1, step,
                format_duration(per_step * left), left, self.total_steps, format_duration(per_step * self.total_steps),
            )  # fmt: skip
        if self._bar is not None and step > self._bar.n:
            self._bar.update(step - self._bar.n)

    def progress(self, step: int, metrics: Mapping[str, float]) -> None:
        """Move the bar to ``step`` and show ``metrics`` (loss, lr, images/s)."""
        if self._bar is None:
            return
        self._bar.n = step
        self._bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items()}, refresh=False)
        self._bar.refresh()

    def close(self) -> None:
        """Flush and close the progress bar, TensorBoard writer and JSONL file."""
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._file is not None:
            self._file.close()
        self._bar = self._tb = self._file = None


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def read_metrics(run: str | Path, kind: str | None = None) -> list[dict[str, Any]]:
    """Records of ``RUN/metrics.jsonl`` (``run`` is the run directory or the file), optionally of one ``kind``.

    A truncated last line (a run still writing) is ignored with a warning.

    Raises:
        FileNotFoundError: no metrics file.
        ValueError: a line other than the last is not valid JSON (naming it).
    """
    path = Path(run)
    path = path / "metrics.jsonl" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"metrics file not found: no metrics.jsonl at {run}")
    lines = path.read_text().splitlines()
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if n != len(lines):
                raise ValueError(f"{path}:{n} is not valid JSON") from None
            logger.warning("ignoring a truncated last line in %s", path)
    return [r for r in out if kind is None or r.get("kind") == kind]
