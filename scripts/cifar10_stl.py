"""CIFAR-10 study: baseline FAN vs STL student (token labeler trained first), same budget and seed.

Runs three trainings from the shipped recipes (``cifar10_stl_labeler`` -> ``cifar10_fan_baseline`` ->
``cifar10_stl_student``, the student labelled online by the labeler run), then evaluates the baseline and the
student on the clean test set (and, with ``--corruptions``, on generated CIFAR-10-C style corruptions through
``tokenlab.eval.robustness.evaluate_run``), and writes ``OUT/results.json``: per run the config, clean accuracy,
per-epoch validation curves and per-step loss curves.

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
import time
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from tokenlab.engine import load_config, train
from tokenlab.utils.metrics_log import read_metrics

logger = logging.getLogger("cifar10_stl")

STAGES = (("labeler", "cifar10_stl_labeler"), ("baseline", "cifar10_fan_baseline"), ("student", "cifar10_stl_student"))


def _overrides(args: argparse.Namespace, run_dir: Path) -> list[str]:
    o = [f"run_dir={run_dir}", f"train.device={args.device}", f"train.amp={args.amp}", f"seed={args.seed}",
         f"data.num_workers={args.workers}", "log.progress=false"]
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
    from tokenlab.eval.robustness import resolve_data

    src = resolve_data("cifar10").root
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/cifar10_study", help="study directory (one run directory per stage)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    p.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=None, help="epochs per stage (default: the recipe's 30)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--train-subset", type=int, default=None, help="train on a fixed random subset of this size")
    p.add_argument("--val-subset", type=int, default=None, help="validate on a fixed random subset of this size")
    p.add_argument("--corruptions", default=None, help="corruption names or 'all' (default: clean accuracy only)")
    p.add_argument("--severities", default="1-5")
    p.add_argument("--corruption-images", type=int, default=None,
                   help="corrupt a class-balanced subset of this many test images (default: all 10k)")
    p.add_argument("--resume", action="store_true",
                   help="keep finished stages (OUT/results.json) and continue an interrupted stage from its checkpoint")
    p.add_argument("--override", nargs="*", default=[], help="extra key=value overrides for every stage")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"settings": vars(args), "runs": {}}
    if args.resume and (out / "results.json").is_file():
        results["runs"] = json.loads((out / "results.json").read_text()).get("runs", {})
    for name, recipe in STAGES:
        run_dir = out / name
        if args.resume and name in results["runs"] and (run_dir / "model.safetensors").is_file():
            logger.info("%s: finished earlier, kept (%s)", name, results["runs"][name]["final_val"])
            continue
        overrides = _overrides(args, run_dir) + (["checkpoint.resume=auto"] if args.resume else [])
        if name == "student":
            overrides.append(f"method.kwargs.labeler={out / 'labeler'}")
        cfg = load_config(recipe, overrides)
        t0 = time.perf_counter()
        result = train(cfg)
        results["runs"][name] = {
            "recipe": recipe,
            "config": OmegaConf.to_container(cfg),
            "seconds": time.perf_counter() - t0,
            "steps": result.step,
            "final_val": result.val,
            "val_curve": [{k: r[k] for k in ("epoch", "step", "acc1", "loss") if k in r}
                          for r in read_metrics(run_dir, "val")],
            "loss_curve": [{k: r[k] for k in r if k not in ("kind",)} for r in read_metrics(run_dir, "step")],
        }
        logger.info("%s done in %.0fs: %s", name, results["runs"][name]["seconds"], result.val)
        (out / "results.json").write_text(json.dumps(results, indent=1))
    if args.corruptions:
        from tokenlab.eval.robustness import evaluate_run

        data = _balanced_subset(out / "corruption_test", args.corruption_images) if args.corruption_images else "cifar10"
        for name in ("baseline", "student"):
            ev = evaluate_run(out / name, data, corruptions=args.corruptions, severities=args.severities,
                              device=args.device, progress=False, reference=str(out / "baseline") if name == "student"
                              else "none")
            results["runs"][name]["eval"] = ev.to_dict()
    (out / "results.json").write_text(json.dumps(results, indent=1))
    summary = {n: r["final_val"] for n, r in results["runs"].items()}
    logger.info("summary (clean test top-1 / CE of the exported model): %s", summary)


if __name__ == "__main__":
    main()
