"""``tokenlab demo``: the whole system end to end on the built-in synthetic set, sized for a laptop CPU.

Stages, each resumable (a finished stage is skipped; an interrupted training resumes from its newest checkpoint):

1. ``data``      generate the synthetic shapes set (train / val / rendition / shortcut splits, with masks; the
   object's colour tied to its class in train and val, broken in the shortcut split);
2. ``labeler``   STL stage 1: FAN token labeler, ``CE(cls) + CE(top-k mean over tokens of aux_head(p_i))`` (the
   published token average spreads the class over every token here; ``DEMO_LABELER_KWARGS``);
3. ``baseline``  supervised FAN with the same budget;
4. ``student``   STL stage 2: FAN student taught per token by the frozen labeler;
5. ``ibot``      (``--ibot``) a short iBOT pre-training of a tiny ViT, scored by k-NN against random weights;
6. ``eval``      clean val, generated corruptions (mCE against the baseline, retention), rendition and shortcut;
7. ``tokens``    token-label analysis against the object masks;
8. ``seed N``    (``--seeds`` > 1) the whole demo again for each extra seed, in ``out/seeds/<seed>``;
9. ``report``    Markdown + HTML report with pictures, and a plain verdict: differences within two standard errors
   of the evaluation set are called within noise; over seeds, mean ± sd per model and the paired student - baseline
   difference with a 95 % t-interval.

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
from functools import partial
from pathlib import Path
from typing import Any

from tokenlab.eval.verdict import seed_statistics
from tokenlab.studies.stl_study import (
    Stage,
    StageReport,
    StlStudy,
    TrainStage,
    noise_note,
    run_stages,
)
from tokenlab.utils.runs import EVAL_SSL_FILE

__all__ = ["TRAIN_STAGES", "Demo", "DemoConfig"]

# (stage name, shipped recipe) in training order; the student is labelled by the labeler run
TRAIN_STAGES = (
    ("labeler", "synthetic_stl_labeler"),
    ("baseline", "synthetic_fan_baseline"),
    ("student", "synthetic_stl_student"),
)
IBOT_RECIPE = "ibot_synthetic_vit_tiny"
IBOT_IMAGES = 2560  # training images of the iBOT stage (its budget before the demo moved to fresh images)
# metrics summarised over seeds (mean ± sd per model; paired student - baseline difference)
SEED_KEYS = ("clean_top1", "corrupted_top1", "rendition_top1", "shortcut_top1", "token_fg_accuracy", "token_iou")


DEFAULT_MINUTES = 6.0  # the budget the default step count is sized for
# The demo's labeler: a top-k-over-tokens (multiple-instance) term, the mean of each class's top quarter of token
# logits, in place of the published token-average term (options of stl_labeler, not the published loss): with the
# average the image class spreads over every token (docs/results/demo.md, third pass); with this it lands on the object.
DEMO_LABELER_KWARGS: dict[str, Any] = {"aux_loss_weight": 0.0, "aux_max_weight": 1.0, "aux_max_topk": 0.25}


@dataclass
class DemoConfig:
    """Sizes of the demo. The default fits about six minutes on 2 CPU cores; ``minutes`` scales training.

    Training draws fresh generated images rather than repeating a small set: the train split holds
    ``steps * batch_size`` images (one epoch) up to ``max_train_images``; longer budgets repeat that set in epochs.

    Attributes:
        seed: Seed of data generation, training and evaluation.
        seeds: Number of seeds (``seed``, ``seed + 1``, ...): the extra ones run in ``out/seeds/<seed>`` and the
            verdict reports mean ± sd per model and the paired student - baseline difference with a 95 % interval.
        minutes: Time budget; the optimizer steps scale with ``minutes / 6``.
        img_size: Image side of the generated set (and the training resolution).
        counts: Images per generated evaluation split (``val``, ``rendition``, ``shortcut``).
        steps: Optimizer steps per model at ``minutes == 6``.
        batch_size: Training batch size.
        max_train_images: Cap on the generated train split.
        shortcut_p: Fraction of train images whose shortcut cue is their class's cue.
        shortcut_cue: The cue tied to the class: ``"texture"`` (background) or ``"colour"`` (the object's fill).
        val_tied: The val split shares the train split's tie (in-distribution); the shortcut split breaks it.
        object_scale: Object radius range as a fraction of the image half-side.
        max_fragments: Distractor fragments per image.
        distractor_shapes: Small whole shapes of other classes per image (background in the masks).
        labeler_kwargs: Extra ``method.kwargs`` of the labeler stage (``stl_labeler`` options; default
            ``DEMO_LABELER_KWARGS``, ``{}`` for the published loss).
        corruptions: Corruptions generated for evaluation (names or a group of ``tokenlab.eval.corruptions``).
        severities: Corruption severities.
        ibot: Also run the short iBOT pre-training + k-NN stage.
        ibot_epochs: iBOT pre-training epochs.
        ibot_max_steps: Cap on iBOT optimizer steps (None: the epochs decide); the tiny test preset uses it.
        device: Training / evaluation device: ``cpu``, ``cuda`` or ``cuda:N`` (the CLI resolves ``auto``).
    """

    seed: int = 0
    seeds: int = 1
    minutes: float = DEFAULT_MINUTES
    img_size: int = 32
    counts: dict[str, int] = field(default_factory=lambda: {"val": 1000, "rendition": 500, "shortcut": 500})
    steps: int = 800
    batch_size: int = 32
    max_train_images: int = 32768
    shortcut_p: float = 0.8
    shortcut_cue: str = "colour"
    val_tied: bool = True
    object_scale: tuple[float, float] = (0.7, 1.0)
    max_fragments: int = 1
    distractor_shapes: int = 0
    labeler_kwargs: dict[str, Any] = field(default_factory=lambda: dict(DEMO_LABELER_KWARGS))
    corruptions: str = "gaussian_noise,defocus_blur,fog,contrast,jpeg_compression"
    severities: str = "3"
    ibot: bool = False
    ibot_epochs: int = 2
    ibot_max_steps: int | None = None
    device: str = "cpu"

    @classmethod
    def tiny(cls, **kwargs: Any) -> DemoConfig:
        """A seconds-long preset for tests: a few images, two steps per model, one corruption."""
        base = cls(
            counts={"val": 32, "rendition": 32, "shortcut": 32},
            steps=2,
            batch_size=16,
            corruptions="gaussian_noise",
            severities="3",
            ibot_epochs=1,
            ibot_max_steps=2,
        )
        return replace(base, **kwargs)

    def validate(self) -> None:
        """Reject settings the demo cannot honour.

        Raises:
            ValueError: ``minutes`` not positive, or fewer than one seed.
        """
        if not self.minutes > 0:
            raise ValueError(f"--minutes must be positive, got {self.minutes}")
        if self.seeds < 1:
            raise ValueError(f"--seeds must be at least 1, got {self.seeds}")

    def train_steps(self) -> int:
        """Optimizer steps per model for the ``minutes`` budget (a whole number of epochs of the train split).

        Raises:
            ValueError: ``minutes`` is not positive.
        """
        epochs, per_epoch = self._plan()
        return epochs * per_epoch

    def train_epochs(self) -> int:
        """Passes over the generated train split (1 unless the budget needs more than ``max_train_images``)."""
        return self._plan()[0]

    def train_images(self) -> int:
        """Images in the generated train split."""
        return self._plan()[1] * self.batch_size

    def _plan(self) -> tuple[int, int]:
        """``(epochs, steps per epoch)`` for the budget: fresh images first, epochs only past the cap."""
        self.validate()
        steps = max(1, round(self.steps * self.minutes / DEFAULT_MINUTES))
        epochs = max(1, math.ceil(steps * self.batch_size / self.max_train_images))
        return epochs, math.ceil(steps / epochs)

    def synth_config(self) -> Any:
        """The generator settings of this demo's data set (``tokenlab.data.synthetic.SynthConfig``)."""
        from tokenlab.data.synthetic import SynthConfig

        return SynthConfig(
            seed=self.seed,
            img_size=self.img_size,
            counts={"train": self.train_images(), **self.counts},
            shortcut_p=self.shortcut_p,
            shortcut_cue=self.shortcut_cue,
            val_tied=self.val_tied,
            object_scale=self.object_scale,
            max_fragments=self.max_fragments,
            distractor_shapes=self.distractor_shapes,
        )


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
                TrainStage(name, recipe, self._train_overrides(name), labeler="labeler" if name == "student" else None)
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
        free = ("device", "seeds")  # a resume may change where it runs and add seeds
        mine = {k: v for k, v in json.loads(json.dumps(asdict(self.cfg))).items() if k not in free}
        if settings.is_file():
            theirs = {k: v for k, v in json.loads(settings.read_text()).items() if k not in free}
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

    def _train_overrides(self, name: str = "") -> tuple[str, ...]:
        """The budget of the three STL study trainings (same for each, so the comparison is fair).

        The ``labeler`` stage also gets ``labeler_kwargs`` as ``method.kwargs``.
        """
        epochs = self.cfg.train_epochs()
        warmup = min(0.1 * epochs, 0.5)  # in epochs: 10 % of a one-epoch run
        overrides = [
            *self._common_overrides(),
            f"data.img_size={self.cfg.img_size}",
            f"data.batch_size={self.cfg.batch_size}",
            "data.num_workers=0",
            f"model.kwargs.img_size={self.cfg.img_size}",
            f"schedule.epochs={epochs}",
            f"schedule.warmup_epochs={warmup}",
            f"train.device={self.cfg.device}",
            "checkpoint.every_steps=50",
            f"log.progress={str(self.progress).lower()}",
            "log.every_steps=5",
            "log.tensorboard=false",
        ]
        if name == "labeler":
            overrides += [f"method.kwargs.{k}={json.dumps(v)}" for k, v in sorted(self.cfg.labeler_kwargs.items())]
        return tuple(overrides)

    def stages(self) -> list[Stage]:
        """The stages in order; each returns True when it did the work, False when already done."""
        out = [Stage("data", self.make_data), *self.study.training_stages()]
        if self.cfg.ibot:
            out.append(Stage("ibot", self.ibot))
        out += [Stage("eval", self.evaluate), Stage("tokens", self.tokens)]
        out += [Stage(f"seed {seed}", partial(self.run_seed, seed)) for seed in self.extra_seeds()]
        out.append(Stage("report", self.report))
        return out

    def extra_seeds(self) -> list[int]:
        """The seeds after the first (``--seeds N``): ``seed + 1 .. seed + N - 1``."""
        return [self.cfg.seed + i for i in range(1, self.cfg.seeds)]

    def seed_demo(self, seed: int) -> Demo:
        """The demo of an extra seed, in ``out/seeds/<seed>`` (same settings, another seed, its own report)."""
        cfg = replace(self.cfg, seed=seed, seeds=1)
        return Demo(self.out / "seeds" / str(seed), cfg, progress=self.progress)

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
    def run_seed(self, seed: int) -> bool:
        """Run (or resume) the whole demo for one extra seed; False when it had finished earlier."""
        demo = self.seed_demo(seed)
        if (demo.out / "summary.json").is_file():
            return False
        demo.run()
        return True

    def make_data(self) -> bool:
        """Generate the synthetic set into a temporary folder, renamed when complete (so a partial set never counts)."""
        from tokenlab.data.synthetic import generate

        if (self.data_dir / "dataset.json").is_file():
            return False
        tmp = self.out / "data.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        generate(tmp, self.cfg.synth_config())
        tmp.rename(self.data_dir)
        return True

    def ibot(self) -> bool:
        """Pre-train a tiny ViT with iBOT (unless exported already), then k-NN it against its random weights."""
        from tokenlab.eval.linear import evaluate_ssl_run

        run_dir = self.run_dir("ibot")
        result_file = run_dir / EVAL_SSL_FILE
        if result_file.is_file():
            return False
        # iBOT keeps its pre-fresh-data budget: epochs over the first IBOT_IMAGES training images, batch <= 64
        images = min(IBOT_IMAGES, self.cfg.train_images())
        overrides = [
            *self._common_overrides(),
            "data.num_workers=0",
            f"data.train_subset={images}",
            f"data.batch_size={min(64, images)}",
            f"schedule.epochs={self.cfg.ibot_epochs}",
            f"schedule.warmup_epochs={min(1.0, self.cfg.ibot_epochs / 4)}",
            f"train.device={self.cfg.device}",
            f"log.progress={str(self.progress).lower()}",
            "log.tensorboard=false",
        ]
        if self.cfg.ibot_max_steps is not None:
            overrides.append(f"schedule.max_steps={self.cfg.ibot_max_steps}")
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
        """Metrics per model (of ``seed``), the seed statistics (``--seeds`` > 1), the verdict and the report."""
        return {
            "metrics": self.metrics(),
            "seeds": self.seed_stats(),
            "ibot_knn": self.ibot_knn(),
            "verdict": self.verdict(),
            "report": str(self.report_dir / "report.md"),
            "config": asdict(self.cfg),
        }

    def metrics(self) -> dict[str, dict[str, float | None]]:
        """Per model: clean / corrupted / rendition / shortcut top-1, mCE vs baseline, retention, token IoU."""
        return self.study.metrics()

    def seed_metrics(self) -> dict[int, dict[str, dict[str, float | None]]]:
        """Seed -> metrics per model, for every seed evaluated so far (the first seed, then the extra ones)."""
        out = {self.cfg.seed: self.metrics()}
        for seed in self.extra_seeds():
            metrics = self.seed_demo(seed).metrics()
            if metrics:
                out[seed] = metrics
        return out

    def seed_stats(self) -> dict[str, Any] | None:
        """Mean ± sd per model and the paired student - baseline difference over seeds; None for one seed."""
        if self.cfg.seeds < 2:
            return None
        per_seed = self.seed_metrics()
        stats = seed_statistics(per_seed, SEED_KEYS, self.study.baseline, self.study.student)
        return {"seeds": sorted(per_seed), "per_seed": {str(k): v for k, v in per_seed.items()}, **stats}

    def ibot_knn(self) -> dict[str, float] | None:
        """k-NN top-1 on val of the iBOT teacher and of the same ViT with random weights (``--ibot`` only)."""
        f = self.run_dir("ibot") / EVAL_SSL_FILE
        if not f.is_file():
            return None
        res = json.loads(f.read_text())["results"]
        return {which: res[which]["cls"]["knn"]["top1"] for which in ("pretrained", "random") if which in res}

    def verdict(self) -> str:
        """Plain sentences saying whether the STL student beat the baseline, from this run's numbers only."""
        lines = self.study.verdict_lines(self.metrics(), self.cfg.counts)
        if lines is None:
            return "The baseline or the student has no evaluation yet."
        stats = self.seed_stats()
        if stats is not None:
            lines = [f"Seed {self.cfg.seed} alone:", "", *lines, "",
                     f"Over {len(stats['seeds'])} seeds ({', '.join(map(str, stats['seeds']))}), paired by seed:",
                     "", *self.study.seed_verdict_lines(stats)]  # fmt: skip
        knn = self.ibot_knn()
        if knn and "random" in knn:
            word = "beat" if knn["pretrained"] > knn["random"] else "did not beat"
            lines.append(f"- iBOT pre-training {word} random weights on k-NN top-1: {100 * knn['pretrained']:.1f} % vs "
                         f"{100 * knn['random']:.1f} %.")  # fmt: skip
        if stats is None:
            lines.append(noise_note(
                self.cfg.seed, self.cfg.train_steps(), self.cfg.train_images(), self.cfg.counts.get("val", 0),
                "Run with `--seeds 5` for the seed-to-seed spread and a 95 % interval of the difference.",
            ))  # fmt: skip
        return "\n".join(lines)
