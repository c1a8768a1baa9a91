"""``tokenlab data synth|show``: generate the synthetic set, or picture what a data set feeds the models."""

from __future__ import annotations

import argparse
from pathlib import Path

from tokenlab.cli.common import add_runtime_flags


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``data`` with its ``synth`` and ``show`` actions; ``--workers`` here are rendering threads."""
    p = sub.add_parser("data", help="generate the built-in synthetic data set, or picture what a data set feeds")
    actions = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    synth = actions.add_parser("synth", help="write the synthetic shapes data set (image folders + masks)")
    synth.add_argument("--out", required=True, help="output directory")
    synth.add_argument("--seed", type=int, default=0, help="same seed, byte-identical files")
    synth.add_argument("--img-size", type=int, default=64, help="image side in pixels")
    for split, count in (("train", 5000), ("val", 1000), ("rendition", 1000), ("shortcut", 1000)):
        synth.add_argument(f"--{split}", type=int, default=count, help=f"{split} images (0 skips the split)")
    synth.add_argument("--shortcut-p", type=float, default=0.8, help="train images whose texture matches the class")
    add_runtime_flags(synth, {"workers": 2})

    show = actions.add_parser("show", help="write PNG grids: samples with mask overlays, STL pairs, iBOT crops")
    show.add_argument("spec", help="synthetic set / image folder / CSV list / 'cifar10'")
    show.add_argument("--out", required=True, help="PNG path for the samples grid; pairs go to <stem>_pairs.png")
    show.add_argument("--split", default="train", help="split to show")
    show.add_argument("--count", type=int, default=16, help="samples in the grid")
    show.add_argument("--img-size", type=int, default=64, help="view side in pixels")
    show.add_argument("--teacher", default="spatial", help="teacher mode of the pairs grid: none, spatial or full")
    show.add_argument("--ibot", action="store_true", help="also write <stem>_ibot.png with multi-crops and masks")
    show.add_argument("--patch-size", type=int, default=8, help="token size of the iBOT masks")
    show.add_argument("--seed", type=int, default=0, help="which samples and augmentations")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Dispatch to the action; argparse requires one, the last line guards a parser change."""
    if args.data_command == "synth":
        return _synth(args)
    if args.data_command == "show":
        return _show(args)
    raise ValueError(f"unknown data action {args.data_command!r}; valid: synth, show")


def _synth(args: argparse.Namespace) -> int:
    from tokenlab.data.synthetic import SynthConfig, generate, shortcut_correlation
    from tokenlab.utils.runs import check_writable

    check_writable(args.out, "--out")
    counts = {s: getattr(args, s) for s in ("train", "val", "rendition", "shortcut")}
    config = SynthConfig(seed=args.seed, img_size=args.img_size, counts=counts, shortcut_p=args.shortcut_p)
    meta = generate(args.out, config, workers=args.workers)
    for split, entry in meta["splits"].items():
        print(f"{split:<10} {entry['count']:>6} images  texture = class: {shortcut_correlation(meta, split):.3f}")
    print(f"wrote {args.out} (classes: {', '.join(meta['classes'])})")
    return 0


def _show(args: argparse.Namespace) -> int:
    from tokenlab.data.show import crops_grid, pairs_grid, samples_grid
    from tokenlab.utils.runs import check_writable

    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise ValueError(f"--out must be a .png path, got {args.out!r}")
    check_writable(out.parent, "--out directory")
    written = [samples_grid(args.spec, args.split, out, args.count, args.seed, args.img_size)]
    pairs = out.with_name(f"{out.stem}_pairs.png")
    written.append(pairs_grid(args.spec, args.split, pairs, min(args.count, 8), args.seed, args.img_size,
                              args.teacher))  # fmt: skip
    if args.ibot:
        written.append(crops_grid(args.spec, args.split, out.with_name(f"{out.stem}_ibot.png"), 4, args.seed,
                                  args.img_size, args.patch_size))  # fmt: skip
    for path in written:
        print(f"wrote {path}")
    return 0
