"""Segmentation transfer study: a FAN initialised from the STL student vs the supervised baseline vs random.

Every arm fine-tunes the same ``segformer_fan`` (same backbone architecture, same recipe, same number of steps) on
the synthetic set's masks, then is scored on the clean ``val`` split and on corrupted copies (the evaluation
issue's corruption cache): mIoU, pixel accuracy, robust mIoU (mean over corruption x severity cells) and retention.

Classification runs are taken from ``--supervised-run`` / ``--stl-run`` (exported tokenlab runs), or, with
``--train-classifiers``, trained here at a small budget through the engine's ``Trainer``: a supervised
``fan_nano_6_p16_224`` and an STL labeler + student (``fan_nano_6_p16_224_token``), all with 4x4 patches.

    python scripts/segmentation_study.py --data runs/synth32 --train-classifiers --device cpu \\
        --cls-epochs 3 --seg-epochs 4 --corruptions fast --severities 1,3,5 --out runs/seg_study
    python scripts/segmentation_study.py --data runs/synth64 --supervised-run R1 --stl-run R2 --device cuda --amp bf16

Writes ``OUT/study.json`` and ``OUT/study.md`` (a table ready for ``docs/results/segmentation.md``).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger("segmentation_study")

BACKBONE = "fan_nano_6_p16_224"


def _generate(data: Path, img_size: int, train: int, val: int, seed: int) -> None:
    from tokenlab.data.synthetic import SynthConfig, generate

    logger.info("generating the synthetic set into %s", data)
    generate(data, SynthConfig(seed=seed, img_size=img_size, counts={"train": train, "val": val}))


def _train_classifier(run: Path, method: str, model: str, data: Path, args: argparse.Namespace,
                      method_kwargs: dict[str, Any]) -> Path:  # fmt: skip
    """A small classification run through the engine (``engine.train`` builds the data for the method's view)."""
    from tokenlab.engine import load_config, train

    if (run / "model.json").is_file():
        logger.info("reusing classification run %s", run)
        return run
    img = args.img_size
    overrides = [
        f"run_dir={run}", f"model.name={model}", f"model.kwargs={{patch_size: 4, img_size: {img}}}",
        f"method.name={method}", f"data.root={data}", f"data.img_size={img}", f"data.batch_size={args.batch_size}",
        f"schedule.epochs={args.cls_epochs}", "schedule.warmup_epochs=0.5", f"optim.lr={args.cls_lr}",
        f"train.device={args.device}", f"train.amp={args.amp}", "log.progress=false", f"seed={args.seed}",
        "checkpoint.resume=auto",  # an interrupted run continues
    ]  # fmt: skip
    cfg = load_config(None, overrides)
    for k, v in method_kwargs.items():
        cfg.method.kwargs[k] = v
    train(cfg)
    return run


def _finetune(run: Path, data: Path, args: argparse.Namespace, backbone: str, init_from: Path | None) -> Path:
    from tokenlab.engine import load_config, train

    if (run / "model.json").is_file():
        logger.info("reusing segmentation run %s", run)
        return run
    overrides = [
        f"run_dir={run}", f"data.root={data}", f"data.img_size={args.img_size}", f"model.kwargs.backbone={backbone}",
        f"model.kwargs.img_size={args.img_size}", f"schedule.epochs={args.seg_epochs}", f"optim.lr={args.seg_lr}",
        f"data.batch_size={args.batch_size}", f"train.device={args.device}", f"train.amp={args.amp}",
        f"schedule.warmup_epochs={min(1.0, args.seg_epochs / 4)}", "log.progress=false", f"seed={args.seed}",
        "checkpoint.resume=auto",  # an interrupted run continues
    ]  # fmt: skip
    if init_from is not None:
        overrides.append(f"method.kwargs.init_from={init_from}")
    train(load_config("seg_synthetic", overrides))
    return run


def _backbone_of(run: Path) -> str:
    meta = json.loads((run / "model.json").read_text())
    kwargs = meta.get("model_kwargs", {})
    if kwargs.get("patch_size", 16) != 4:
        raise ValueError(f"{run} uses patch_size={kwargs.get('patch_size', 16)}; the study recipe uses 4x4 patches")
    return str(meta["model"])


def _table(rows: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| init | clean mIoU | pixel acc | corrupted mIoU | retention | cls run |",
        "|---|---|---|---|---|---|",
    ]
    for arm, r in rows.items():
        lines.append(
            f"| {arm} | {r['clean']['miou']:.4f} | {r['clean']['pixel_accuracy']:.4f} | "
            f"{r.get('robust_miou', float('nan')):.4f} | {r.get('retention', float('nan')):.3f} | "
            f"{r.get('init_from') or '-'} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="synthetic set directory (generated when missing)")
    p.add_argument("--out", default="runs/seg_study")
    p.add_argument("--supervised-run", default=None)
    p.add_argument("--stl-run", default=None)
    p.add_argument("--train-classifiers", action="store_true", help="train missing classification runs here")
    p.add_argument("--arms", default="random,supervised,stl", help="comma list of random, supervised, stl")
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", default="none", choices=["none", "bf16"])
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--train-count", type=int, default=2000)
    p.add_argument("--val-count", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--cls-epochs", type=int, default=3)
    p.add_argument("--cls-lr", type=float, default=1e-3)
    p.add_argument("--seg-epochs", type=int, default=4)
    p.add_argument("--seg-lr", type=float, default=6e-4)
    p.add_argument("--corruptions", default="fast")
    p.add_argument("--severities", default="1,3,5")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    data, out = Path(args.data), Path(args.out)
    if not (data / "dataset.json").is_file():
        _generate(data, args.img_size, args.train_count, args.val_count, args.seed)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    bad = sorted(set(arms) - {"random", "supervised", "stl"})
    if bad:
        raise ValueError(f"unknown arm(s) {bad}; valid: random, supervised, stl")

    cls_runs: dict[str, Path | None] = {"random": None}
    if "supervised" in arms:
        cls_runs["supervised"] = Path(args.supervised_run) if args.supervised_run else None
        if cls_runs["supervised"] is None and args.train_classifiers:
            cls_runs["supervised"] = _train_classifier(out / "cls_supervised", "supervised", BACKBONE, data, args, {})
    if "stl" in arms:
        cls_runs["stl"] = Path(args.stl_run) if args.stl_run else None
        if cls_runs["stl"] is None and args.train_classifiers:
            labeler = _train_classifier(out / "cls_stl_labeler", "stl_labeler", BACKBONE + "_token", data, args, {})
            cls_runs["stl"] = _train_classifier(
                out / "cls_stl_student", "stl_student", BACKBONE + "_token", data, args, {"labeler": str(labeler)}
            )
    missing = [a for a in arms if a != "random" and cls_runs.get(a) is None]
    if missing:
        raise ValueError(f"no classification run for {missing}: pass --supervised-run/--stl-run or --train-classifiers")

    from tokenlab.eval.segmentation import evaluate_segmentation_run

    rows: dict[str, dict[str, Any]] = {}
    for arm in arms:
        init = cls_runs.get(arm)
        backbone = _backbone_of(init) if init is not None else BACKBONE
        t0 = time.perf_counter()
        seg_run = _finetune(out / f"seg_{arm}", data, args, backbone, init)
        train_s = time.perf_counter() - t0
        res = evaluate_segmentation_run(seg_run, "synthetic", data, "val", seg_run / "segmentation", args.corruptions,
                                        args.severities, out / "corruption-cache", device=args.device,
                                        amp=args.amp).to_dict()  # fmt: skip
        res["init_from"] = str(init) if init else None
        res["finetune_seconds"] = round(train_s, 1)
        rows[arm] = res
        logger.info("%s: clean mIoU %.4f, corrupted mIoU %.4f", arm, res["clean"]["miou"], res["robust_miou"])
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items()}
    (out / "study.json").write_text(json.dumps({"settings": settings, "arms": rows}, indent=1, default=str))
    (out / "study.md").write_text(_table(rows))
    logger.info("wrote %s and %s", out / "study.json", out / "study.md")


if __name__ == "__main__":
    main()
