"""CIFAR-10 study: baseline FAN vs STL student (token labeler trained first), same budget and seed.

Runs three trainings from the shipped recipes (``cifar10_stl_labeler`` -> ``cifar10_fan_baseline`` ->
``cifar10_stl_student``, the student labelled online by the labeler run), then evaluates the baseline and the
student on the clean test set (and, with ``--corruptions``, on generated CIFAR-10-C style corruptions), and writes
``OUT/results.json``: per run the config, clean accuracy, per-epoch validation curves and per-step loss curves. The
stages run through ``tokenlab.studies.stl_study``, the same STL study pipeline as ``tokenlab demo``.

Examples::

    # the full budget (30 epochs each) on a GPU, all 15 corruptions at 5 severities:
    python scripts/cifar10_stl.py --device cuda --amp bf16 --out runs/cifar10_study --corruptions all
    # a short CPU run (a 5000-image subset, 3 epochs):
    python scripts/cifar10_stl.py --device cpu --epochs 3 --train-subset 5000 --val-subset 2000 --out runs/cifar10_cpu
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from tokenlab.cli.common import add_runtime_flags, resolve_device
from tokenlab.studies.stl_study import StlStudy, Trained, TrainStage, run_stages
from tokenlab.utils.metrics_log import read_metrics

logger = logging.getLogger("cifar10_stl")

STAGES = (("labeler", "cifar10_stl_labeler"), ("baseline", "cifar10_fan_baseline"), ("student", "cifar10_stl_student"))


def _overrides(args: argparse.Namespace) -> list[str]:
    """The budget shared by every stage (the study adds ``run_dir``, resume and the student's labeler)."""
    o = [f"train.device={args.device}", f"train.amp={args.amp}", f"seed={args.seed}",
         f"data.num_workers={args.workers}", "log.progress=false"]  # fmt: skip
    if args.epochs is not None:
        o.append(f"schedule.epochs={args.epochs}")
        o.append(f"schedule.warmup_epochs={min(2.0, args.epochs / 5)}")
    if args.batch_size is not None:
        o.append(f"data.batch_size={args.batch_size}")
    if args.train_subset:
        o.append(f"data.train_subset={args.train_subset}")
    if args.val_subset:
        o.append(f"data.val_subset={args.val_subset}")
    return o + list(args.override)


def _balanced_subset(root: Path, n: int) -> Path:
    """Hard-link the first ``n / 10`` test images of every class (sorted by name) into ``root``: a fixed subset."""
    from tokenlab.data.specs import EVAL_SPLITS, parse_data_spec

    src = parse_data_spec("cifar10").resolve(EVAL_SPLITS).root
    classes = sorted(d.name for d in src.iterdir() if d.is_dir())
    per_class = n // len(classes)
    if per_class < 1:
        raise SystemExit(f"--corruption-images {n}: need at least one image per class ({len(classes)})")
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for f in sorted((src / c).iterdir())[:per_class]:
            if not (root / c / f.name).exists():
                os.link(f, root / c / f.name)
    return root


def _record(trained: Trained, run_dir: Path) -> dict[str, Any]:
    """The results.json entry of one training: config, wall time, final validation, curves."""
    return {
        "recipe": trained.stage.recipe,
        "config": OmegaConf.to_container(trained.config),
        "seconds": trained.seconds,
        "steps": trained.result.step,
        "final_val": trained.result.val,
        "val_curve": [
            {k: r[k] for k in ("epoch", "step", "acc1", "loss") if k in r} for r in read_metrics(run_dir, "val")
        ],
        "loss_curve": [{k: r[k] for k in r if k not in ("kind",)} for r in read_metrics(run_dir, "step")],
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/cifar10_study", help="study directory (one run directory per stage)")
    add_runtime_flags(p, {"device": "cpu", "amp": "none", "batch_size": None, "workers": 2})
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=None, help="epochs per stage (default: the recipe's 30)")
    p.add_argument("--train-subset", type=int, default=None, help="train on a fixed random subset of this size")
    p.add_argument("--val-subset", type=int, default=None, help="validate on a fixed random subset of this size")
    p.add_argument("--corruptions", default=None, help="corruption names or 'all' (default: clean accuracy only)")
    p.add_argument("--severities", default="1-5")
    p.add_argument(
        "--corruption-images",
        type=int,
        default=None,
        help="corrupt a class-balanced subset of this many test images (default: all 10k)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep finished stages (OUT/results.json) and continue an interrupted stage from its checkpoint",
    )
    p.add_argument("--override", nargs="*", default=[], help="extra key=value overrides for every stage")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"settings": vars(args), "runs": {}}
    if args.resume and (out / "results.json").is_file():
        results["runs"] = json.loads((out / "results.json").read_text()).get("runs", {})
    stages = [TrainStage(name, recipe, tuple(_overrides(args)), labeler="labeler" if name == "student" else None)
              for name, recipe in STAGES]  # fmt: skip
    # training gets --device as given (the engine resolves auto per rank); evaluation needs a concrete device
    study = StlStudy(
        out,
        stages,
        device=resolve_device(args.device),
        resume=args.resume,
        progress=False,
        finished=lambda name: name in results["runs"],
    )  # a kept stage needs its results.json entry

    def on_trained(stage: TrainStage, trained: Trained | None) -> None:
        if trained is None:
            logger.info("%s: finished earlier, kept (%s)", stage.name, results["runs"][stage.name]["final_val"])
            return
        results["runs"][stage.name] = _record(trained, study.run_dir(stage.name))
        logger.info("%s done in %.0fs: %s", stage.name, trained.seconds, trained.result.val)
        (out / "results.json").write_text(json.dumps(results, indent=1))

    run_stages(study.training_stages(on_trained))
    if args.corruptions:
        subset = out / "corruption_test"
        data = _balanced_subset(subset, args.corruption_images) if args.corruption_images else "cifar10"
        evaluated = study.evaluate(
            ("baseline", "student"), data, args.corruptions, args.severities, keep_existing=False
        )
        for name, ev in evaluated.items():
            results["runs"][name]["eval"] = ev.to_dict()
    (out / "results.json").write_text(json.dumps(results, indent=1))
    summary = {n: r["final_val"] for n, r in results["runs"].items()}
    logger.info("summary (clean test top-1 / CE of the exported model): %s", summary)


if __name__ == "__main__":
    main()
