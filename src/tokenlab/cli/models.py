"""``tokenlab models``: every registered model with its parameter count, and ``models convert``.

``tokenlab models convert`` turns a published checkpoint (e.g. an STL FAN-TL ``.pth.tar``) into a tokenlab export
(``STEM.safetensors`` + ``STEM.json``) that ``tokenlab eval``, ``tokenlab tokens`` and the STL student
(``method.kwargs.labeler=STEM``) take.
"""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``models`` and ``models convert``."""
    p = sub.add_parser("models", help="list every registered model with its parameter count; convert checkpoints")
    p.add_argument("--filter", default="*", help="wildcard on the model name, e.g. 'fan_*hybrid*'")
    p.add_argument("--num-classes", type=int, default=1000, help="classes used when counting parameters")
    p.set_defaults(handler=run)
    actions = p.add_subparsers(dest="models_command", metavar="ACTION")
    c = actions.add_parser(
        "convert",
        help="write a tokenlab export (STEM.safetensors + STEM.json) from a published .pth/.pth.tar checkpoint",
        description="Read a published checkpoint (flat, or timm CheckpointSaver's state_dict / state_dict_ema; loaded "
        "with torch.load(weights_only=True)), load it strictly into --model and write a tokenlab export with the "
        "model's published evaluation preprocessing.",
    )
    c.add_argument("checkpoint", help="the published file, e.g. fan_tiny_8_p4_hybrid_token_labeler.pth.tar")
    c.add_argument("--model", required=True, help="its architecture, e.g. fan_tiny_8_p4_hybrid_token")
    c.add_argument("--out", required=True, help="export stem to write: STEM.safetensors and STEM.json")
    c.add_argument(
        "--prefer",
        choices=("ema", "model"),
        default="ema",
        help="which weights to take when the file has both: the EMA ones (default, as the published STL student) "
        "or the model's",
    )
    c.add_argument("--num-classes", type=int, default=None, help="default: read from the checkpoint's head")
    c.add_argument("--classes", default=None, help="a text file with one class name per line, in label order")
    c.set_defaults(handler=run_convert)


def run(args: argparse.Namespace) -> int:
    """Print one row per matching model; the models are built on the meta device, so nothing is allocated."""
    import fnmatch

    import timm
    import torch

    from tokenlab.models import list_tokenlab_models

    names = [n for n in list_tokenlab_models() if fnmatch.fnmatch(n, args.filter)]
    if not names:
        raise ValueError(f"no model matches {args.filter!r}")
    width = max(len(n) for n in names)
    print(f"{'model':<{width}}  {'params':>10}")
    for name in names:
        with torch.device("meta"):
            model = timm.create_model(name, num_classes=args.num_classes)
        count = sum(p.numel() for p in model.parameters())
        print(f"{name:<{width}}  {count / 1e6:>9.2f}M")
    return 0


def run_convert(args: argparse.Namespace) -> int:
    """Convert one checkpoint and say what was written and which weights it holds."""
    from pathlib import Path

    from tokenlab.models import convert_checkpoint

    classes = None
    if args.classes:
        path = Path(args.classes)
        if not path.is_file():
            raise FileNotFoundError(f"class list not found: {path}")
        classes = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    stem, meta = convert_checkpoint(args.checkpoint, args.model, args.out, args.prefer, args.num_classes, classes)
    entry = meta["source"]["entry"] or "flat state dict"
    print(f"wrote {stem}.safetensors and {stem}.json: {meta['model']}, {meta['num_classes']} classes, weights from "
          f"'{entry}', eval {meta['img_size']} px {meta['interpolation']} crop_pct {meta['crop_pct']}")  # fmt: skip
    return 0
