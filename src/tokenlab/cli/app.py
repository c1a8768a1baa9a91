"""Parser assembly and the one error policy of the ``tokenlab`` command.

Every sub-command module (``tokenlab.cli.<name>``) has ``add_parser(sub)``, which declares its arguments and sets
``handler``. Handlers import their heavy modules lazily so ``tokenlab --help`` stays fast. User mistakes
(``ValueError``, ``KeyError``, ``FileNotFoundError``, ...) become one ``error:`` line and exit status 2; a run that
stopped on purpose (``TrainingAborted``) one ``error:`` line and exit 1; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence

from tokenlab.errors import TrainingAborted

__all__ = ["SUBCOMMANDS", "build_parser", "main"]

Handler = Callable[[argparse.Namespace], int | None]

# One module per sub-command, in the order `tokenlab --help` shows them.
SUBCOMMANDS = ("demo", "models", "train", "data", "labels", "segment", "detect", "eval", "tokens", "report", "eval_ssl")

_USER_ERRORS = (ValueError, KeyError, FileNotFoundError, NotADirectoryError, PermissionError)


def build_parser() -> argparse.ArgumentParser:
    """The ``tokenlab`` parser with every sub-command of :data:`SUBCOMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="tokenlab",
        description="Train and evaluate vision transformers with token-level self-distillation (STL, iBOT).",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"tokenlab.cli.{name}").add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``tokenlab`` with ``argv`` (default ``sys.argv[1:]``) and return the exit status.

    Returns:
        0 on success, 2 for a user mistake, 1 for an aborted training, 130 after Ctrl-C.
    """
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
    except _USER_ERRORS as err:
        if args.debug:
            raise
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except TrainingAborted as err:  # non-finite losses, a dead peer rank: the message says what to do next
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 1
    return int(rc or 0)
