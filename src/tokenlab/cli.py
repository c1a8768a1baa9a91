"""The ``tokenlab`` command line: one entry point, one sub-command per job.

Each sub-command lives in a ``_add_<name>`` function that declares its arguments and a handler. Handlers import
their heavy modules lazily so ``tokenlab --help`` stays fast. User mistakes (``ValueError``, ``KeyError``,
``FileNotFoundError``) become one clear ``error:`` line and exit status 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Sequence

Handler = Callable[[argparse.Namespace], int | None]


def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list every registered model with its parameter count")
    p.add_argument("--filter", default="*", help="wildcard on the model name, e.g. 'fan_*hybrid*'")
    p.add_argument("--num-classes", type=int, default=1000, help="classes used when counting parameters")

    def run(args: argparse.Namespace) -> int:
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

    p.set_defaults(handler=run)


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a model (supervised, STL labeler/student, iBOT, ...) from a YAML recipe",
        description="Merge configs/default.yaml, the recipe and key=value overrides, validate, then train. "
        "Launch with torchrun for several processes.",
    )
    p.add_argument("--config", default=None, help="recipe file or shipped recipe name (e.g. cifar10_stl_student)")
    p.add_argument("--run-dir", default=None, help="output directory (same as run_dir=...)")
    p.add_argument("--resume", default=None, help="'auto' (newest complete checkpoint of the run) or a checkpoint path")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides, e.g. optim.lr=1e-3")

    def run(args: argparse.Namespace) -> int:
        from omegaconf import OmegaConf

        from tokenlab.engine import load_config, train

        overrides = list(args.overrides)
        if args.run_dir is not None:
            overrides.append(f"run_dir={args.run_dir}")
        if args.resume is not None:
            overrides.append(f"checkpoint.resume={args.resume}")
        cfg = load_config(args.config, overrides)
        if args.print_config:
            print(OmegaConf.to_yaml(cfg), end="")
            return 0
        result = train(cfg)
        val = ", ".join(f"{k} {v:.4f}" for k, v in result.val.items())
        print(f"trained {result.step} steps into {result.run_dir}" + (f"; validation: {val}" if val else ""))
        if result.nonfinite_steps:
            print(f"skipped {result.nonfinite_steps} steps with a non-finite loss")
        return 0

    p.set_defaults(handler=run)


# Each entry adds one sub-command. Keep the list in the order `tokenlab --help` should show.
_SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_models,
    _add_train,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokenlab",
        description="Train and evaluate vision transformers with token-level self-distillation (STL, iBOT).",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in _SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 0
    try:
        rc = handler(args)
    except KeyboardInterrupt:
        print("\ninterrupted: progress so far is kept; run the same command again to resume", file=sys.stderr)
        return 130
    except (ValueError, KeyError, FileNotFoundError, NotADirectoryError, PermissionError) as err:
        if args.debug:
            raise
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"error: {msg}", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
