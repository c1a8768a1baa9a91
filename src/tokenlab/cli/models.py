"""``tokenlab models``: every registered tokenlab model with its parameter count."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``models``."""
    p = sub.add_parser("models", help="list every registered model with its parameter count")
    p.add_argument("--filter", default="*", help="wildcard on the model name, e.g. 'fan_*hybrid*'")
    p.add_argument("--num-classes", type=int, default=1000, help="classes used when counting parameters")
    p.set_defaults(handler=run)


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
