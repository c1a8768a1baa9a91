"""``tokenlab detect data|train|eval``: write the synthetic set, fine-tune Mask R-CNN, score AP / mPC / rPC."""

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
    """Register ``detect`` with its ``data``, ``train`` and ``eval`` actions."""
    p = sub.add_parser(
        "detect",
        help="object detection / instance segmentation: synthetic set (data), fine-tune (train), COCO AP (eval)",
        description="`detect data` writes the synthetic COCO-format set; `detect train` runs a detection recipe "
        "(e.g. det_synthetic) through the engine; `detect eval RUN` scores an exported detection run (box and mask "
        "AP, AP50, AP75, AP by size; with --corruptions the robustness protocol's mPC and rPC).",
    )
    det = p.add_subparsers(dest="detect_command", metavar="ACTION", required=True)
    d = det.add_parser("data", help="write the synthetic detection set (COCO JSON + PNG images)")
    d.add_argument("--out", required=True, help="output directory (annotations/ and one folder per split)")
    d.add_argument("--seed", type=int, default=0, help="same seed, same files")
    d.add_argument("--img-size", type=int, default=64, help="image side in pixels")
    d.add_argument("--train", type=int, default=512, help="train images")
    d.add_argument("--val", type=int, default=128, help="val images")
    d.add_argument("--max-objects", type=int, default=4, help="up to this many shapes per image")
    t = det.add_parser("train", help="fine-tune a detection model from a recipe")
    add_training_flags(t, "det_synthetic", config_example="det_coco_fan_small_hybrid", override_example="data.root=DIR")
    add_backbone_init_flag(t, "detector")
    e = det.add_parser("eval", help="evaluate an exported detection run")
    e.add_argument("run", help="run directory (or export stem) of a detection model")
    e.add_argument("--root", required=True, help="COCO-format root (annotations/instances_<split>.json + <split>/)")
    e.add_argument("--split", default="val", help="e.g. val (synthetic) or val2017 (COCO)")
    e.add_argument("--out", default=None, help="output folder (default RUN/detection)")
    e.add_argument("--corruptions", default=None, help="names or groups (common = the 15 of mPC); omit for clean")
    e.add_argument("--severities", default="1-5", help="e.g. 1-5 (the protocol) or 1,3,5")
    e.add_argument("--cache-dir", default=None, help="corruption cache (default ROOT/../corruption-cache)")
    e.add_argument("--seed", type=int, default=0, help="seed of the per-image corruptions")
    add_runtime_flags(e, {"device": "cpu", "amp": "none", "batch_size": 8, "workers": None})
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """``detect train`` goes through the shared training runner; ``data`` writes the set; ``eval`` prints AP."""
    if args.detect_command == "train":
        return run_dense_training(args)
    if args.detect_command == "data":
        return _data(args)
    return _eval(args)


def _data(args: argparse.Namespace) -> int:
    from tokenlab.data.detection import generate_detection_set
    from tokenlab.utils.runs import check_writable

    out = check_writable(Path(args.out), "--out")
    summary = generate_detection_set(out, seed=args.seed, counts={"train": args.train, "val": args.val},
                                     img_size=args.img_size, max_objects=args.max_objects)  # fmt: skip
    for split, s in summary.items():
        print(f"{split}: {s['images']} images, {s['instances']} instances")
    print(f"wrote {out} (train with `tokenlab detect train data.root={out}`)")
    return 0


def _fmt(metrics: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.4f}" if v == v else f"{k} n/a" for k, v in metrics.items())


def _eval(args: argparse.Namespace) -> int:
    from tokenlab.eval.detection import DETECTION_FILE, evaluate_detection_run
    from tokenlab.utils.runs import check_writable, read_model_meta

    device = resolve_device(args.device, args.amp)
    read_model_meta(args.run)  # a missing or corrupt model.json is named before anything else
    out = check_writable(Path(args.out) if args.out else Path(args.run) / "detection", "--out")
    if args.corruptions is not None:
        check_writable(Path(args.cache_dir) if args.cache_dir else Path(args.root).parent / "corruption-cache",
                       "--cache-dir")  # fmt: skip
    res = evaluate_detection_run(args.run, args.root, args.split, out, args.corruptions, args.severities,
                                 args.cache_dir, device, args.batch_size, args.amp, args.workers,
                                 args.seed)  # fmt: skip
    print(f"clean ({res.clean.images} images): box  {_fmt(res.clean.box)}")
    if res.clean.mask is not None:
        print(f"{'':>{len(str(res.clean.images)) + 17}}mask {_fmt(res.clean.mask)}")
    if res.robustness is not None:
        r = res.robustness
        for kind in r.mpc:
            print(f"corrupted {kind}: mPC {r.mpc[kind]:.4f}  rPC {r.rpc[kind]:.4f}  "
                  f"({len(r.corruptions)} corruptions x severities {r.severities})")  # fmt: skip
    skipped = {k: v for k, v in res.skipped.items() if v}
    if skipped:
        print(f"skipped / changed while reading: {skipped}")
    print(f"wrote {out / DETECTION_FILE}")
    return 0
