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

Every number comes from this run: nothing is precomputed. The same seed gives the same numbers (CPU, no data
workers, deterministic seeding in data and engine).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

logger = logging.getLogger(__name__)

TRAIN_STAGES = (
    ("labeler", "synthetic_stl_labeler"),
    ("baseline", "synthetic_fan_baseline"),
    ("student", "synthetic_stl_student"),
)


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
        device: Training / evaluation device.
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
    def tiny(cls, **kwargs: Any) -> "DemoConfig":
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
        if self.minutes <= 0:
            raise ValueError(f"--minutes must be positive, got {self.minutes}")
        return max(1, math.ceil(self.epochs * self.minutes / 6.0))


@dataclass
class StageReport:
    """How one stage went, for the progress log and the summary."""

    name: str
    seconds: float
    skipped: bool


class Demo:
    """Runs the stages into ``out``; ``progress`` shows the trainers' bars; ``on_stage`` is called at each start."""

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

    def stages(self) -> list[tuple[str, Callable[[], bool]]]:
        """(name, function) in order; a function returns True when it did the work, False when already done."""
        out: list[tuple[str, Callable[[], bool]]] = [("data", self.make_data)]
        out += [(name, lambda n=name, r=recipe: self.train(n, r)) for name, recipe in TRAIN_STAGES]
        if self.cfg.ibot:
            out.append(("ibot", self.ibot))
        out += [("eval", self.evaluate), ("tokens", self.tokens), ("report", self.report)]
        return out

    def run(self) -> dict[str, Any]:
        """Run every stage not done yet; returns the summary (also written to ``out/summary.json``)."""
        self._check_settings()
        stages = self.stages()
        start = time.perf_counter()
        for i, (name, fn) in enumerate(stages):
            if self.on_stage:
                self.on_stage(name, i + 1, len(stages), time.perf_counter() - start)
            t0 = time.perf_counter()
            did = fn()
            self.reports.append(StageReport(name, time.perf_counter() - t0, not did))
        summary = self.summary()
        summary["seconds"] = time.perf_counter() - start
        summary["stages"] = [asdict(r) for r in self.reports]
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary

    # ---- stages -----------------------------------------------------------------------------------------------
    def make_data(self) -> bool:
        from tokenlab.data.synthetic import SynthConfig, generate

        if (self.data_dir / "dataset.json").is_file():
            return False
        tmp = self.out / "data.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        generate(tmp, SynthConfig(seed=self.cfg.seed, img_size=self.cfg.img_size, counts=dict(self.cfg.counts)))
        tmp.rename(self.data_dir)
        return True

    def run_dir(self, name: str) -> Path:
        return self.runs_dir / name

    def train(self, name: str, recipe: str) -> bool:
        from tokenlab.engine import load_config, train

        run_dir = self.run_dir(name)
        if (run_dir / "model.json").is_file():
            return False
        overrides = [
            f"run_dir={run_dir}",
            f"seed={self.cfg.seed}",
            f"data.root={self.data_dir}",
            f"data.img_size={self.cfg.img_size}",
            f"data.batch_size={self.cfg.batch_size}",
            "data.num_workers=0",
            f"model.kwargs.img_size={self.cfg.img_size}",
            f"schedule.epochs={self.cfg.train_epochs()}",
            f"schedule.warmup_epochs={min(1.0, self.cfg.train_epochs() / 4)}",
            f"train.device={self.cfg.device}",
            "checkpoint.every_steps=25",
            "checkpoint.resume=auto",
            f"log.progress={str(self.progress).lower()}",
            "log.every_steps=5",
            "log.tensorboard=false",
        ]
        if self.cfg.max_steps is not None:
            overrides.append(f"schedule.max_steps={self.cfg.max_steps}")
        if name == "student":
            overrides.append(f"method.kwargs.labeler={self.run_dir('labeler')}")
        train(load_config(recipe, overrides))
        return True

    def ibot(self) -> bool:
        from tokenlab.engine import load_config, train
        from tokenlab.eval.linear import evaluate_ssl_run

        run_dir = self.run_dir("ibot")
        result_file = run_dir / "eval_ssl.json"
        if result_file.is_file():
            return False
        if not (run_dir / "model.json").is_file():
            overrides = [
                f"run_dir={run_dir}",
                f"seed={self.cfg.seed}",
                f"data.root={self.data_dir}",
                "data.num_workers=0",
                f"schedule.epochs={self.cfg.ibot_epochs}",
                f"schedule.warmup_epochs={min(1.0, self.cfg.ibot_epochs / 4)}",
                f"train.device={self.cfg.device}",
                "checkpoint.resume=auto",
                f"log.progress={str(self.progress).lower()}",
                "log.tensorboard=false",
            ]
            if self.cfg.max_steps is not None:
                overrides.append(f"schedule.max_steps={self.cfg.max_steps}")
            train(load_config("ibot_synthetic_vit_tiny", overrides))
        evaluate_ssl_run(
            run_dir, str(self.data_dir), train_split="train", test_split="val", linear=False, random_init=True,
            device=self.cfg.device, seed=self.cfg.seed, out=result_file,
        )
        return True

    def _eval_names(self) -> list[str]:
        return [name for name, _ in TRAIN_STAGES]

    def evaluate(self) -> bool:
        from tokenlab.eval.robustness import evaluate_run

        names = ["baseline"] + [n for n in self._eval_names() if n != "baseline"]
        did = False
        for name in names:
            run_dir = self.run_dir(name)
            if (run_dir / "eval.json").is_file():
                continue
            evaluate_run(
                run_dir,
                str(self.data_dir),
                corruptions=self.cfg.corruptions,
                severities=self.cfg.severities,
                corruption_seed=self.cfg.seed,
                reference="none" if name == "baseline" else str(self.run_dir("baseline")),
                device=self.cfg.device,
                progress=self.progress,
                workers=0,
            )
            did = True
        return did

    def tokens(self) -> bool:
        from tokenlab.eval.tokens import analyze_run
        from tokenlab.eval.visualize import save_token_pictures

        did = False
        for name in self._eval_names():
            run_dir = self.run_dir(name)
            if (run_dir / "tokens.json").is_file():
                continue
            # the baseline has no aux head: its class head read on every patch token stands in for token labels
            res = analyze_run(run_dir, str(self.data_dir), source="auto", device=self.cfg.device, seed=self.cfg.seed,
                              num_examples=6)
            save_token_pictures(res, run_dir)
            did = True
        return did

    def report(self) -> bool:
        from tokenlab.eval.report import write_report

        names = self._eval_names()
        files = write_report(
            [self.run_dir(n) for n in names], self.report_dir, names=names, title="tokenlab demo: STL vs baseline"
        )
        verdict = self.verdict()
        md = Path(self.report_dir / "report.md")
        md.write_text(md.read_text() + "\n## Verdict\n\n" + verdict + "\n")
        html = Path(self.report_dir / "report.html")
        text = html.read_text()
        block = "<h2>Verdict</h2>\n<p>" + verdict.replace("\n\n", "</p><p>") + "</p>\n"
        html.write_text(text.replace("</body>", block + "</body>") if "</body>" in text else text + block)
        logger.info("report written: %s", files)
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
        rows: dict[str, dict[str, float | None]] = {}
        for name in self._eval_names():
            ev_file = self.run_dir(name) / "eval.json"
            if not ev_file.is_file():
                continue
            ev = json.loads(ev_file.read_text())
            corr = (ev.get("corruptions") or {}).get("official") or {}
            ood = ev.get("ood") or {}
            tok_file = self.run_dir(name) / "tokens.json"
            tok = json.loads(tok_file.read_text()) if tok_file.is_file() else {}
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

    def ibot_knn(self) -> dict[str, float] | None:
        """k-NN top-1 on val of the iBOT teacher and of the same ViT with random weights (``--ibot`` only)."""
        f = self.run_dir("ibot") / "eval_ssl.json"
        if not f.is_file():
            return None
        res = json.loads(f.read_text())["results"]
        return {which: res[which]["cls"]["knn"]["top1"] for which in ("pretrained", "random") if which in res}

    def verdict(self) -> str:
        """Plain sentences saying whether the STL student beat the baseline, from this run's numbers only."""
        m = self.metrics()
        if "baseline" not in m or "student" not in m:
            return "The baseline or the student has no evaluation yet."
        b, s = m["baseline"], m["student"]
        lines = []
        for key, what in (
            ("clean_top1", "clean accuracy"),
            ("corrupted_top1", "accuracy under the generated corruptions"),
            ("rendition_top1", "accuracy on the rendition split"),
            ("shortcut_top1", "accuracy on the shortcut (texture cue-conflict) split"),
        ):
            if b.get(key) is None or s.get(key) is None:
                continue
            diff = 100 * (s[key] - b[key])
            word = "beat" if diff > 0 else ("tied with" if diff == 0 else "did not beat")
            lines.append(f"- The STL student {word} the baseline on {what}: {100 * s[key]:.1f} % vs "
                         f"{100 * b[key]:.1f} % ({diff:+.1f} points).")
        if s.get("mce_vs_baseline") is not None:
            lines.append(f"- Student mCE relative to the baseline (100 % = baseline): {100 * s['mce_vs_baseline']:.1f} %.")
        knn = self.ibot_knn()
        if knn and "random" in knn:
            word = "beat" if knn["pretrained"] > knn["random"] else "did not beat"
            lines.append(f"- iBOT pre-training {word} random weights on k-NN top-1: {100 * knn['pretrained']:.1f} % vs "
                         f"{100 * knn['random']:.1f} %.")
        n_val = self.cfg.counts.get("val", 0)
        se = 100 * math.sqrt(0.25 / n_val) if n_val else float("nan")
        lines.append(
            f"\nOne seed ({self.cfg.seed}) at a {self.cfg.train_epochs()}-epoch budget on {self.cfg.counts['train']} "
            f"images: differences below about {2 * se:.0f} points (two binomial standard errors on {n_val} val "
            "images) are within noise. Run with `--minutes 30` or more, and other `--seed`s, for a firmer answer."
        )
        return "\n".join(lines)


def format_table(rows: dict[str, dict[str, float | None]]) -> str:
    """A fixed-width terminal table of :meth:`Demo.metrics`."""
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
        cells = "".join(f"{100 * r[k]:>9.1f}%" if r.get(k) is not None else f"{'-':>10}" for k, _ in cols)
        lines.append(f"{name:<10}{cells}")
    return "\n".join(lines)
