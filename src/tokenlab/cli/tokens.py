"""``tokenlab tokens``: token-label maps and statistics of labelers / students on any image folder.

With object masks (the synthetic set) the table shows the mask-based metrics; without, the share of tokens labelled
with the image class, their mean confidence and the view stability.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tokenlab.cli.common import add_runtime_flags, resolve_device


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``tokens`` with every runtime flag (default batch 64, loading in the main process)."""
    p = sub.add_parser("tokens", help="token-label maps and analysis of labelers/students on any image folder")
    p.add_argument("checkpoints", nargs="+", help="run directories or exported models to compare")
    p.add_argument(
        "--data",
        required=True,
        help="images, DIR[:split] or a <class>/<image> tree; with DIR/<split>_masks (e.g. the synthetic set) "
        "also the mask-based metrics",
    )
    p.add_argument(
        "--source",
        default="auto",
        choices=["auto", "aux", "head"],
        help="token logits: aux head, or the class head on every patch token (auto: aux when present)",
    )
    p.add_argument(
        "--threshold", type=float, default=0.5, help="object fraction above which a token is object (with masks)"
    )
    p.add_argument("--examples", type=int, default=6, help="images drawn in token_labels.png / class_attention.png")
    add_runtime_flags(p, {"device": "cpu", "amp": "none", "batch_size": 64, "workers": 0})
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Analyse each checkpoint, draw its pictures next to it, then print one table row per checkpoint."""
    from tokenlab.eval.tokens import analyze_run
    from tokenlab.eval.visualize import save_token_pictures
    from tokenlab.utils.runs import check_writable, export_stem, require_classifier

    device = resolve_device(args.device, args.amp)
    for ckpt in args.checkpoints:  # every export is checked before the first analysis starts
        require_classifier(ckpt, "tokens")
        check_writable(export_stem(ckpt).parent, "run directory (for tokens.json and the pictures)")
    rows = []
    for ckpt in args.checkpoints:
        res = analyze_run(ckpt, args.data, source=args.source, threshold=args.threshold, device=device,
                          amp=args.amp, batch_size=args.batch_size, workers=args.workers,
                          num_examples=args.examples)  # fmt: skip
        out = Path(ckpt) if Path(ckpt).is_dir() else Path(ckpt).parent
        pics = save_token_pictures(res, out)
        rows.append((res, pics))
    if all(res.metrics["masks"] for res, _ in rows):
        print(f"{'run':<20} {'source':<6} {'fg acc':>7} {'bg=img':>7} {'bg conf':>7} {'IoU':>7} {'stable':>7}")
        for res, _ in rows:
            m = res.metrics
            print(f"{res.name:<20} {res.source:<6} {100 * m['fg_accuracy']:7.2f} "
                  f"{100 * m['bg_agree_with_image_label']:7.2f} {100 * m['bg_confidence']:7.2f} "
                  f"{100 * m['iou']:7.2f} {100 * m['stability']:7.2f}")  # fmt: skip
    else:
        print("no object masks: token maps and mask-free statistics only")
        print(f"{'run':<20} {'source':<6} {'tok=img':>7} {'conf':>7} {'stable':>7}")
        for res, _ in rows:
            m = res.metrics
            print(f"{res.name:<20} {res.source:<6} {100 * m['agree_with_image_label']:7.2f} "
                  f"{100 * m['confidence']:7.2f} {100 * m['stability']:7.2f}")  # fmt: skip
    for res, pics in rows:
        print(f"{res.name}: tokens.json" + "".join(f", {p}" for p in pics))
    return 0
