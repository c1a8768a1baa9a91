"""``tokenlab demo``: the whole system end to end on the built-in synthetic set, sized for a laptop CPU.

Stages, each resumable (a finished stage is skipped; an interrupted training resumes from its newest checkpoint):

1. ``data``      generate the synthetic shapes set (train / val / rendition / shortcut splits, with masks);
2. ``labeler``   STL stage 1: FAN token labeler, ``CE(cls) + CE(aux_head(mean of patch tokens))``;
3. ``baseline``  supervised FAN with the same budget;
4. ``student``   STL stage 2: FAN student taught per token by the frozen labeler;
5. ``ibot``      (``--ibot``) a short iBOT pre-training of a tiny ViT, scored by k-NN against random weights;
6. ``eval``      clean val, generated corruptions (mCE against the baseline, retention), rendition and shortcut;
7. ``tokens``    token-label analysis against the object masks;
8. ``report``    Markdown + HTML report with pictures, and a plain verdict.

Stages 2-4 and 6-8 are the STL study of :mod:`tokenlab.studies.stl_study`; this module adds the data, the budget,
the iBOT stage and the summary. Every number comes from this run: nothing is precomputed. The same seed gives the
same numbers (CPU, no data workers, deterministic seeding in data and engine).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from tokenlab.studies.stl_study import Stage, StageReport, StlStudy, TrainStage, noise_note, run_stages
from tokenlab.utils.runs import EVAL_SSL_FILE

__all__ = ["TRAIN_STAGES", "Demo", "DemoConfig"]

# (stage name, shipped recipe) in training order; the student is labelled by the labeler run
TRAIN_STAGES = (
    ("labeler", "synthetic_stl_labeler"),
    ("baseline", "synthetic_fan_baseline"),
    ("student", "synthetic_stl_student"),
)
IBOT_RECIPE = "ibot_synthetic_vit_tiny"


@dataclass
class DemoConfig:
    """Sizes of the demo. The default fits about six minutes on 2 CPU cores; ``minutes`` scales training.

    Attributes:
        seed: Seed of data generation, training and evaluation.
        minutes: Target wall time; the training epochs scale with ``minutes / 6``.
        img_size: Image side of the generated set (and the training resolution).
        counts: Images per generated split.
        epochs: Training epochs per model at ``minutes == 6``.
        batch_size: Training batch size.
        corruptions: Corruptions generated for evaluation (names or a group of ``tokenlab.eval.corruptions``).
        severities: Corruption severities.
        max_steps: Cap on optimizer steps per model (None: no cap); the tiny test preset uses it.
        ibot: Also run the short iBOT pre-training + k-NN stage.
        ibot_epochs: iBOT pre-training epochs.
        device: Training / evaluation device: ``cpu``, ``cuda`` or ``cuda:N`` (the CLI resolves ``auto``).
    """

    seed: int = 0
    minutes: float = 6.0
    img_size: int = 32
    counts: dict[str, int] = field(
        default_factory=lambda: {"train": 2560, "val": 500, "rendition": 500, "shortcut": 500}
    )
    epochs: int = 3
    batch_size: int = 64
    corruptions: str = "gaussian_noise,defocus_blur,fog,contrast,jpeg_compression"
    severities: str = "3"
    max_steps: int | None = None
    ibot: bool = False
    ibot_epochs: int = 2
    device: str = "cpu"

    @classmethod
    def tiny(cls, **kwargs: Any) -> DemoConfig:
        """A seconds-long preset for tests: a few images, two steps per model, one corruption."""
        base = cls(
            counts={"train": 64, "val": 32, "rendition": 32, "shortcut": 32},
            epochs=1,
            batch_size=16,
            corruptions="gaussian_noise",
            severities="3",
            max_steps=2,
            ibot_epochs=1,
        )
        return replace(base, **kwargs)

    def train_epochs(self) -> int:
        """Epochs per model for the ``minutes`` budget.

        Raises:
            ValueError: ``minutes`` is not positive.
        """
        if self.minutes <= 0:
            raise ValueError(f"--minutes must be positive, got {self.minutes}")
        return max(1, math.ceil(self.epochs * self.minutes / 6.0))


class Demo:
    """Runs the demo into ``out``; ``progress`` shows the trainers' bars; ``on_stage`` is called at each start.

    ``out/data`` holds the generated set, ``out/runs/<stage>`` the runs, ``out/report`` the report, and
    ``out/demo.json`` the settings (a resume must use the same ones), ``out/summary.json`` the numbers.
    """

    def __init__(
        self,
        out: str | Path,
        config: DemoConfig | None = None,
        progress: bool = True,
        on_stage: Callable[[str, int, int, float], None] | None = None,
    ) -> None:
        self.out = Path(out)
        self.cfg = config or DemoConfig()
        self.progress = progress
        self.on_stage = on_stage
        self.data_dir = self.out / "data"
        self.runs_dir = self.out / "runs"
        self.report_dir = self.out / "report"
        self.reports: list[StageReport] = []
        self.study = StlStudy(
            self.runs_dir,
            [
                TrainStage(name, recipe, self._train_overrides(), labeler="labeler" if name == "student" else None)
                for name, recipe in TRAIN_STAGES
            ],
            device=self.cfg.device,
            resume=True,
            progress=progress,
        )

    # ---- bookkeeping ------------------------------------------------------------------------------------------
    def _check_settings(self) -> None:
        """Refuse to mix results of different settings in one directory (resume needs the same settings)."""
        self.out.mkdir(parents=True, exist_ok=True)
        settings = self.out / "demo.json"
        mine = {k: v for k, v in asdict(self.cfg).items() if k != "device"}
        if settings.is_file():
            theirs = {k: v for k, v in json.loads(settings.read_text()).items() if k != "device"}
            if theirs != mine:
                diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
                raise ValueError(
                    f"{self.out} holds a demo with other settings ({', '.join(diff)}); use another --out or delete it"
                )
        else:
            settings.write_text(json.dumps(asdict(self.cfg), indent=2))

    def _common_overrides(self) -> list[str]:
        """Overrides of every training of the demo: the seed and the generated set."""
        return [
            f"seed={self.cfg.seed}",
            f"data.root={self.data_dir}",
        ]

    def _train_overrides(self) -> tuple[str, ...]:
        """The budget of the three STL study trainings (same for each, so the comparison is fair)."""
        epochs = self.cfg.train_epochs()
        overrides = [
            *self._common_overrides(),
            f"data.img_size={self.cfg.img_size}",
            f"data.batch_size={self.cfg.batch_size}",
            "data.num_workers=0",
            f"model.kwargs.img_size={self.cfg.img_size}",
            f"schedule.epochs={epochs}",
            f"schedule.warmup_epochs={min(1.0, epochs / 4)}",
            f"train.device={self.cfg.device}",
            "checkpoint.every_steps=25",
            f"log.progress={str(self.progress).lower()}",
            "log.every_steps=5",
            "log.tensorboard=false",
        ]
        if self.cfg.max_steps is not None:
            overrides.append(f"schedule.max_steps={self.cfg.max_steps}")
        return tuple(overrides)

    def stages(self) -> list[Stage]:
        """The stages in order; each returns True when it did the work, False when already done."""
        out = [Stage("data", self.make_data), *self.study.training_stages()]
        if self.cfg.ibot:
            out.append(Stage("ibot", self.ibot))
        out += [Stage("eval", self.evaluate), Stage("tokens", self.tokens), Stage("report", self.report)]
        return out

    def run(self) -> dict[str, Any]:
        """Run every stage not done yet; returns the summary (also written to ``out/summary.json``)."""
        self._check_settings()
        start = time.perf_counter()
        run_stages(self.stages(), self.on_stage, self.reports)
        summary = self.summary()
        summary["seconds"] = time.perf_counter() - start
        summary["stages"] = [asdict(r) for r in self.reports]
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary

    def run_dir(self, name: str) -> Path:
        """``out/runs/<name>``."""
        return self.study.run_dir(name)

    # ---- stages -----------------------------------------------------------------------------------------------
    def make_data(self) -> bool:
        """Generate the synthetic set into a temporary folder, renamed when complete (so a partial set never counts)."""
        from tokenlab.data.synthetic import SynthConfig, generate

        if (self.data_dir / "dataset.json").is_file():
            return False
        tmp = self.out / "data.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        generate(tmp, SynthConfig(seed=self.cfg.seed, img_size=self.cfg.img_size, counts=dict(self.cfg.counts)))
        tmp.rename(self.data_dir)
        return True

    def ibot(self) -> bool:
        """Pre-train a tiny ViT with iBOT (unless exported already), then k-NN it against its random weights."""
        from tokenlab.eval.linear import evaluate_ssl_run

        run_dir = self.run_dir("ibot")
        result_file = run_dir / EVAL_SSL_FILE
        if result_file.is_file():
            return False
        overrides = [
            *self._common_overrides(),
            "data.num_workers=0",
            f"schedule.epochs={self.cfg.ibot_epochs}",
            f"schedule.warmup_epochs={min(1.0, self.cfg.ibot_epochs / 4)}",
            f"train.device={self.cfg.device}",
            f"log.progress={str(self.progress).lower()}",
            "log.tensorboard=false",
        ]
        if self.cfg.max_steps is not None:
            overrides.append(f"schedule.max_steps={self.cfg.max_steps}")
        self.study.train(TrainStage("ibot", IBOT_RECIPE, tuple(overrides)))  # None when trained earlier
        evaluate_ssl_run(
            run_dir,
            str(self.data_dir),
            train_split="train",
            test_split="val",
            linear=False,
            random_init=True,
            device=self.cfg.device,
            seed=self.cfg.seed,
            out=result_file,
        )
        return True

    def evaluate(self) -> bool:
        """Clean val, the generated corruptions (mCE against the baseline), rendition and shortcut splits."""
        done = self.study.evaluate(
            self.study.names,
            self.data_dir,
            self.cfg.corruptions,
            self.cfg.severities,
            corruption_seed=self.cfg.seed,
            workers=0,
        )
        return bool(done)

    def tokens(self) -> bool:
        """Token-label analysis of every model against the object masks of the val split."""
        return self.study.analyze_tokens(self.study.names, self.data_dir, seed=self.cfg.seed, num_examples=6)

    def report(self) -> bool:
        """The report, rewritten on every run so it shows the numbers on disk now."""
        self.study.write_report(self.study.names, self.report_dir, "tokenlab demo: STL vs baseline", self.verdict())
        return True

    # ---- summary ----------------------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """Metrics per model, the verdict, and where the report is."""
        return {
            "metrics": self.metrics(),
            "ibot_knn": self.ibot_knn(),
            "verdict": self.verdict(),
            "report": str(self.report_dir / "report.md"),
            "config": asdict(self.cfg),
        }

    def metrics(self) -> dict[str, dict[str, float | None]]:
        """Per model: clean / corrupted / rendition / shortcut top-1, mCE vs baseline, retention, token IoU."""
        return self.study.metrics()

    def ibot_knn(self) -> dict[str, float] | None:
        """k-NN top-1 on val of the iBOT teacher and of the same ViT with random weights (``--ibot`` only)."""
        f = self.run_dir("ibot") / EVAL_SSL_FILE
        if not f.is_file():
            return None
        res = json.loads(f.read_text())["results"]
        return {which: res[which]["cls"]["knn"]["top1"] for which in ("pretrained", "random") if which in res}

    def verdict(self) -> str:
        """Plain sentences saying whether the STL student beat the baseline, from this run's numbers only."""
        lines = self.study.verdict_lines(self.metrics())
        if lines is None:
            return "The baseline or the student has no evaluation yet."
        knn = self.ibot_knn()
        if knn and "random" in knn:
            word = "beat" if knn["pretrained"] > knn["random"] else "did not beat"
            lines.append(f"- iBOT pre-training {word} random weights on k-NN top-1: {100 * knn['pretrained']:.1f} % vs "
                         f"{100 * knn['random']:.1f} %.")  # fmt: skip
        lines.append(noise_note(
            self.cfg.seed, self.cfg.train_epochs(), self.cfg.counts["train"], self.cfg.counts.get("val", 0),
            "Run with `--minutes 30` or more, and other `--seed`s, for a firmer answer.",
        ))  # fmt: skip
        return "\n".join(lines)
