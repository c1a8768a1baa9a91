"""``tokenlab train``: one recipe + ``key=value`` overrides through the engine (``torchrun`` for several processes)."""

from __future__ import annotations

import argparse

from tokenlab.cli.common import add_training_flags, run_training


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``train``; the device and AMP of a training are config keys, so it has no runtime flags."""
    p = sub.add_parser(
        "train",
        help="train a model (supervised, STL labeler/student, iBOT, ...) from a YAML recipe",
        description="Merge configs/default.yaml, the recipe and key=value overrides, validate, then train. "
        "Launch with torchrun for several processes.",
    )
    add_training_flags(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """The shared runner (``--resume`` / ``--overwrite`` included); the device and AMP are config keys here."""
    return run_training(args, [])
