"""``tokenlab segment train|eval|corrupt``: fine-tune, score (mIoU) and write corrupted splits (Cityscapes-C)."""

from __future__ import annotations

import argparse
from pathlib import Path

from tokenlab.cli.common import (
    add_backbone_init_flag,
    add_runtime_flags,
    add_training_flags,
    resolve_device,
    run_dense_training,
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``segment`` with its ``train`` and ``eval`` actions (``eval`` has never taken ``--workers``)."""
    p = sub.add_parser(
        "segment",
        help="semantic segmentation with FAN backbones: fine-tune (train) and evaluate clean + corrupted mIoU (eval)",
        description="`segment train` runs a segmentation recipe (e.g. seg_synthetic) through the engine; "
        "`segment eval RUN` scores an exported segmentation run (mIoU, per-class IoU, pixel accuracy, corruptions).",
    )
    seg = p.add_subparsers(dest="segment_command", metavar="ACTION", required=True)
    t = seg.add_parser("train", help="fine-tune a segmentation model from a recipe")
    add_training_flags(t, "seg_synthetic", config_example="seg_cityscapes", override_example="data.root=DIR")
    add_backbone_init_flag(t, "model")
    e = seg.add_parser("eval", help="evaluate an exported segmentation run")
    e.add_argument("run", help="run directory (or export stem) of a segmentation model")
    e.add_argument("--data", default="synthetic", help="layout: synthetic | cityscapes | folder")
    e.add_argument("--root", required=True, help="data root")
    e.add_argument("--split", default="val")
    e.add_argument("--out", default=None, help="output folder (default RUN/segmentation)")
    e.add_argument("--corruptions", default=None, help="names or groups (common, fast, ...); omit for clean only")
    e.add_argument("--severities", default="1-5", help="e.g. 1-3 (the published Cityscapes-C test)")
    e.add_argument("--cache-dir", default=None, help="corruption cache (default ROOT/../corruption-cache)")
    e.add_argument("--mode", default="whole", help="whole | slide")
    e.add_argument("--crop", type=int, default=512, help="sliding-window size")
    e.add_argument("--stride", type=int, default=341, help="sliding-window stride")
    add_runtime_flags(e, {"device": "cpu", "amp": "none", "batch_size": 16})
    e.add_argument("--overlays", type=int, default=8, help="examples in overlays.png (0: none)")
    c = seg.add_parser("corrupt", help="write the corrupted copy of a split, e.g. Cityscapes-C from Cityscapes val")
    c.add_argument("--data", default="cityscapes", help="layout: synthetic | cityscapes | folder")
    c.add_argument("--root", required=True, help="data root")
    c.add_argument("--split", default="val")
    c.add_argument("--cache-dir", default=None, help="where the tree goes (default ROOT/../corruption-cache)")
    c.add_argument("--corruptions", default="all", help="names or groups (default all 19, as published)")
    c.add_argument("--severities", default="1-5")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--workers", type=int, default=None, help="processes (default: CPU count, at most 8)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """``segment train`` goes through the shared training runner; ``segment eval`` prints mIoU tables."""
    if args.segment_command == "train":
        return run_dense_training(args)
    if args.segment_command == "corrupt":
        return _corrupt(args)
    return _eval(args)


def _corrupt(args: argparse.Namespace) -> int:
    from tokenlab.eval.segmentation import generate_corrupted_split

    cache = generate_corrupted_split(args.data, args.root, args.split, args.cache_dir, args.corruptions,
                                     args.severities, args.seed, args.workers)  # fmt: skip
    print(f"{len(cache.corruptions)} corruptions x severities {cache.severities} of {cache.num_images} images "
          f"({len(cache.generated_cells)} cells generated now) at {cache.root}")  # fmt: skip
    return 0


def _eval(args: argparse.Namespace) -> int:
    from tokenlab.eval.segmentation import evaluate_segmentation_run
    from tokenlab.utils.runs import check_writable, read_model_meta

    device = resolve_device(args.device, args.amp)
    read_model_meta(args.run)  # a missing or corrupt model.json is named before anything else
    out = check_writable(Path(args.out) if args.out else Path(args.run) / "segmentation", "--out")
    if args.corruptions is not None:  # the cache default is the library's: ROOT/../corruption-cache
        check_writable(Path(args.cache_dir) if args.cache_dir else Path(args.root).parent / "corruption-cache",
                       "--cache-dir")  # fmt: skip
    res = evaluate_segmentation_run(
        args.run,
        args.data,
        args.root,
        args.split,
        out,
        args.corruptions,
        args.severities,
        args.cache_dir,
        args.mode,
        args.crop,
        args.stride,
        device,
        args.batch_size,
        args.overlays,
        args.amp,
    )
    clean = res.clean.to_dict()
    print(f"clean: mIoU {clean['miou']:.4f}  pixel acc {clean['pixel_accuracy']:.4f}  ({res.images} images)")
    for name, iou in clean["iou"].items():
        print(f"  {name:<20} IoU {iou:.4f}")
    if res.robustness is not None:
        print(f"corrupted: mIoU {res.robustness.robust_miou:.4f}  retention {res.robustness.retention:.4f}")
        for c, v in res.robustness.per_corruption.items():
            print(f"  {c:<20} mIoU {v:.4f}")
    print(f"wrote {out / 'segmentation.json'}")
    return 0
