"""The STL study, written once: token labeler -> supervised baseline -> STL student, then evaluation.

After the trainings come evaluation, token analysis, a report and a verdict. ``tokenlab demo`` (synthetic set) and
``scripts/cifar10_stl.py`` (CIFAR-10) run it.

A study lives in one directory of runs, ``RUNS/<stage name>``. Its trainings are data (:class:`TrainStage`: name,
recipe, overrides, and for a student the stage whose run labels it), so the callers only choose recipes and
budgets. With ``resume`` on, a stage whose model is exported is skipped and an interrupted training continues from
its newest checkpoint (``checkpoint.resume=auto``); evaluations and token analyses already on disk are kept.

Every function here returns data and logs; it never prints (the CLI and the scripts print).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenlab.eval.verdict import compare_accuracies, comparison_sentence, paired_sentence, single_run_noise_note
from tokenlab.utils.runs import EVAL_FILE, MODEL_STEM, TOKENS_FILE

__all__ = [
    "Stage",
    "StageReport",
    "StlStudy",
    "TrainStage",
    "Trained",
    "format_table",
    "format_seed_table",
    "noise_note",
    "run_stages",
]

logger = logging.getLogger(__name__)


# ---- stages and their runner ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Stage:
    """One step of a study: ``run()`` returns True when it did work, False when it found the work already done."""

    name: str
    run: Callable[[], bool]


@dataclass
class StageReport:
    """How one stage went, for the progress log and the summary."""

    name: str
    seconds: float
    skipped: bool


def run_stages(
    stages: Sequence[Stage],
    on_stage: Callable[[str, int, int, float], None] | None = None,
    reports: list[StageReport] | None = None,
) -> list[StageReport]:
    """Run ``stages`` in order, calling ``on_stage(name, i, n, elapsed_s)`` before each (1-based ``i``).

    Args:
        stages: What to run.
        on_stage: Progress callback.
        reports: Appended to as each stage ends, so an interrupted run still says which stages finished.

    Returns:
        ``reports``: one :class:`StageReport` per finished stage (``skipped`` when it found its work done).
    """
    reports = [] if reports is None else reports
    start = time.perf_counter()
    for i, stage in enumerate(stages):
        if on_stage:
            on_stage(stage.name, i + 1, len(stages), time.perf_counter() - start)
        t0 = time.perf_counter()
        did = stage.run()
        reports.append(StageReport(stage.name, time.perf_counter() - t0, not did))
    return reports


# ---- the study ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainStage:
    """One training of a study.

    Attributes:
        name: Stage name, also the run directory ``RUNS/<name>`` and the name in tables and reports.
        recipe: Shipped recipe name or YAML path (``tokenlab.engine.load_config``).
        overrides: ``key=value`` overrides applied after ``run_dir=RUNS/<name>``.
        labeler: For an STL student, the stage whose run labels it online (``method.kwargs.labeler``).
    """

    name: str
    recipe: str
    overrides: tuple[str, ...] = ()
    labeler: str | None = None


@dataclass
class Trained:
    """What one training gave: the resolved config, the engine's result and the wall time."""

    stage: TrainStage
    config: Any
    result: Any
    seconds: float


class StlStudy:
    """Trains, evaluates, analyses and reports the runs of one STL study in ``runs_dir``.

    Args:
        runs_dir: Parent of the run directories.
        stages: The trainings, in order (a student after its labeler).
        device: Evaluation device (a concrete one: ``cpu``, ``cuda``, ``cuda:N``); training takes its device from
            the stage overrides.
        resume: Skip finished stages and continue interrupted trainings from their newest checkpoint.
        progress: Progress bars in evaluation.
        baseline: The stage every other run is compared with (mCE reference, verdict).
        student: The STL student of the verdict.
        finished: Extra condition for a trained stage to count as finished (besides its exported model), e.g. that
            the caller holds its record.
    """

    def __init__(
        self,
        runs_dir: str | Path,
        stages: Sequence[TrainStage],
        device: str = "cpu",
        resume: bool = True,
        progress: bool = True,
        baseline: str = "baseline",
        student: str = "student",
        finished: Callable[[str], bool] | None = None,
    ) -> None:
        self.runs_dir = Path(runs_dir)
        self.stages = list(stages)
        self.device = device
        self.resume = resume
        self.progress = progress
        self.baseline = baseline
        self.student = student
        self._finished = finished

    @property
    def names(self) -> list[str]:
        """Stage names in training order."""
        return [s.name for s in self.stages]

    def run_dir(self, name: str) -> Path:
        """``runs_dir/<name>``."""
        return self.runs_dir / name

    def is_trained(self, name: str) -> bool:
        """True when the stage's model is exported (``model.json`` is written last, so the weights are there)."""
        done = (self.run_dir(name) / f"{MODEL_STEM}.json").is_file()
        return done and (self._finished is None or self._finished(name))

    # ---- training -------------------------------------------------------------------------------------------
    def train(self, stage: TrainStage) -> Trained | None:
        """Train one stage; None when ``resume`` is on and the stage is finished already."""
        from tokenlab.engine import load_config, train

        if self.resume and self.is_trained(stage.name):
            return None
        overrides = [f"run_dir={self.run_dir(stage.name)}", *stage.overrides]
        overrides.append("checkpoint.resume=auto" if self.resume else "checkpoint.overwrite=true")
        if stage.labeler is not None:
            overrides.append(f"method.kwargs.labeler={self.run_dir(stage.labeler)}")
        cfg = load_config(stage.recipe, overrides)
        t0 = time.perf_counter()
        result = train(cfg)
        return Trained(stage, cfg, result, time.perf_counter() - t0)

    def training_stages(self, on_trained: Callable[[TrainStage, Trained | None], None] | None = None) -> list[Stage]:
        """One :class:`Stage` per training; ``on_trained(stage, trained)`` follows each (``trained`` None: kept)."""

        def make(stage: TrainStage) -> Stage:
            def run() -> bool:
                trained = self.train(stage)
                if on_trained is not None:
                    on_trained(stage, trained)
                return trained is not None

            return Stage(stage.name, run)

        return [make(s) for s in self.stages]

    # ---- evaluation -----------------------------------------------------------------------------------------
    def evaluate(
        self,
        names: Iterable[str],
        data: str | Path,
        corruptions: str | None,
        severities: str | None,
        corruption_seed: int = 0,
        workers: int | None = None,
        keep_existing: bool = True,
    ) -> dict[str, Any]:
        """Clean, corruption and OOD evaluation of runs (``RUN/eval.json``), the baseline first.

        The baseline has no mCE reference; every other run's mCE is relative to the baseline.

        Args:
            names: Stages to evaluate.
            data: Data spec of the evaluation set.
            corruptions: Corruption names or group; None for clean (and OOD) only.
            severities: Corruption severities, e.g. ``"3"`` or ``"1-5"``.
            corruption_seed: Base seed of the generated corruptions.
            workers: Data-loading processes (None: the evaluator's default).
            keep_existing: Skip runs that hold an ``eval.json`` already.

        Returns:
            Stage name -> ``EvalResult`` of the runs evaluated now (empty when all were kept).
        """
        from tokenlab.eval.robustness import evaluate_classifier_run

        names = list(names)
        order = [self.baseline] * (self.baseline in names) + [n for n in names if n != self.baseline]
        results: dict[str, Any] = {}
        for name in order:
            run_dir = self.run_dir(name)
            if keep_existing and (run_dir / EVAL_FILE).is_file():
                continue
            results[name] = evaluate_classifier_run(
                run_dir,
                str(data),
                corruptions=corruptions,
                severities=severities,
                corruption_seed=corruption_seed,
                reference="none" if name == self.baseline else str(self.run_dir(self.baseline)),
                device=self.device,
                progress=self.progress,
                workers=workers,
            )
        return results

    def analyze_tokens(self, names: Iterable[str], data: str | Path, seed: int = 0, num_examples: int = 6) -> bool:
        """Token-label analysis against the masks of ``data`` (``RUN/tokens.json`` + pictures); True if any ran."""
        from tokenlab.eval.tokens import analyze_run
        from tokenlab.eval.visualize import save_token_pictures

        did = False
        for name in names:
            run_dir = self.run_dir(name)
            if (run_dir / TOKENS_FILE).is_file():
                continue
            # a model without aux head: its class head read on every patch token stands in for token labels
            res = analyze_run(run_dir, str(data), source="auto", device=self.device, seed=seed,
                              num_examples=num_examples)  # fmt: skip
            save_token_pictures(res, run_dir)
            did = True
        return did

    def write_report(self, names: Sequence[str], out_dir: str | Path, title: str, verdict: str) -> Any:
        """``out_dir/report.md`` + ``report.html`` comparing ``names``, with this study's verdict as its verdict."""
        from tokenlab.eval.report import write_report

        files = write_report([self.run_dir(n) for n in names], out_dir, names=list(names), title=title,
                             verdict=verdict)  # fmt: skip
        logger.info("report written: %s", files)
        return files

    # ---- numbers and verdict --------------------------------------------------------------------------------
    def metrics(self, names: Iterable[str] | None = None) -> dict[str, dict[str, float | None]]:
        """Per evaluated run: clean / corrupted / rendition / shortcut top-1, mCE vs baseline, retention, token IoU."""
        from tokenlab.eval.report import load_run  # the one reader of a run's eval.json and tokens.json

        rows: dict[str, dict[str, float | None]] = {}
        for name in self.names if names is None else names:
            if not (self.run_dir(name) / EVAL_FILE).is_file():
                continue
            run = load_run(self.run_dir(name))
            ev = run.eval or {}
            corr = (ev.get("corruptions") or {}).get("official") or {}
            ood = ev.get("ood") or {}
            tok = run.tokens or {}
            rows[name] = {
                "clean_top1": ev["clean"]["official"]["top1"],
                "clean_top1_cls_only": (ev["clean"].get("cls") or {}).get("top1"),
                "corrupted_top1": corr.get("robust_accuracy"),
                "mce_vs_baseline": corr.get("mce"),
                "retention": corr.get("retention"),
                "rendition_top1": ((ood.get("rendition") or {}).get("official") or {}).get("top1"),
                "shortcut_top1": ((ood.get("shortcut") or {}).get("official") or {}).get("top1"),
                "token_fg_accuracy": tok.get("fg_accuracy"),
                "token_iou": tok.get("iou"),
            }
        return rows

    def verdict_lines(
        self, metrics: dict[str, dict[str, float | None]], counts: Mapping[str, int] | None = None
    ) -> list[str] | None:
        """Plain sentences: did the student beat the baseline, metric by metric; None when either is unevaluated.

        With ``counts`` (images per evaluation split: ``val``, ``rendition``, ``shortcut``), each accuracy gets its
        95 % Wilson interval and a difference whose intervals overlap is called within noise
        (:func:`tokenlab.eval.verdict.compare_accuracies`).
        """
        if self.baseline not in metrics or self.student not in metrics:
            return None
        b, s = metrics[self.baseline], metrics[self.student]
        lines = []
        for key, what in VERDICT_METRICS:
            base, student = b.get(key), s.get(key)
            if base is None or student is None:
                continue
            n = (counts or {}).get(VERDICT_SPLITS[key], 0)
            lines.append(comparison_sentence(what, "baseline", "the STL student", compare_accuracies(base, n, student)))
        mce = s.get("mce_vs_baseline")
        if mce is not None:
            lines.append(f"- Student mCE relative to the baseline (100 % = baseline): {100 * mce:.1f} %.")
        return lines

    def seed_verdict_lines(self, stats: dict[str, Any]) -> list[str]:
        """Plain sentences: the paired student - baseline difference per metric (``seed_statistics`` output)."""
        return [
            paired_sentence(what, "baseline", "the STL student", stats["difference"][key])
            for key, what in VERDICT_METRICS
            if key in stats["difference"]
        ]


# the metrics of the verdict, and the evaluation split each is measured on (for its noise band)
VERDICT_METRICS = (
    ("clean_top1", "clean accuracy"),
    ("corrupted_top1", "accuracy under the generated corruptions"),
    ("rendition_top1", "accuracy on the rendition split"),
    ("shortcut_top1", "accuracy on the shortcut (cue-conflict) split"),
)
VERDICT_SPLITS = {
    "clean_top1": "val",
    "corrupted_top1": "val",  # corrupted copies of val: counted as val alone, which keeps the band wide
    "rendition_top1": "rendition",
    "shortcut_top1": "shortcut",
}


def noise_note(seed: int, steps: int, n_train: int, n_val: int, advice: str) -> str:
    """The verdict's closing paragraph: one seed, its budget, and the size of a difference that is within noise."""
    return (
        f"\nOne seed ({seed}), {steps} optimizer steps per model on {n_train} generated training images. "
        f"{single_run_noise_note(n_val)} {advice}"
    )


def _percent_cell(value: float | None) -> str:
    """One cell of ``format_table``: ``value`` in percent, or a dash when unevaluated."""
    return f"{100 * value:>9.1f}%" if value is not None else f"{'-':>10}"


def format_table(rows: dict[str, dict[str, float | None]]) -> str:
    """A fixed-width terminal table of :meth:`StlStudy.metrics`, in percent."""
    cols = [
        ("clean_top1", "clean"),
        ("corrupted_top1", "corrupt"),
        ("mce_vs_baseline", "mCE/base"),
        ("retention", "retain"),
        ("rendition_top1", "rendit."),
        ("shortcut_top1", "shortcut"),
        ("token_iou", "tok IoU"),
    ]
    head = f"{'model':<10}" + "".join(f"{title:>10}" for _, title in cols)
    lines = [head, "-" * len(head)]
    for name, r in rows.items():
        cells = "".join(_percent_cell(r.get(k)) for k, _ in cols)
        lines.append(f"{name:<10}{cells}")
    return "\n".join(lines)


def format_seed_table(models: dict[str, dict[str, dict[str, Any]]]) -> str:
    """A fixed-width table of mean ± sd over seeds (``seed_statistics(...)["models"]``), in percent."""
    cols = [("clean_top1", "clean"), ("corrupted_top1", "corrupt"), ("rendition_top1", "rendit."),
            ("shortcut_top1", "shortcut"), ("token_fg_accuracy", "tok fg"), ("token_iou", "tok IoU")]  # fmt: skip

    def cell(v: dict[str, Any] | None) -> str:
        if v is None:
            return f"{'-':>14}"
        sd = "" if math.isnan(v["sd"]) else f" ± {100 * v['sd']:.1f}"
        return f"{100 * v['mean']:.1f}{sd}".rjust(14)

    head = f"{'model':<10}" + "".join(f"{title:>14}" for _, title in cols)
    lines = [head, "-" * len(head)]
    for name, r in models.items():
        lines.append(f"{name:<10}" + "".join(cell(r.get(k)) for k, _ in cols))
    return "\n".join(lines)
