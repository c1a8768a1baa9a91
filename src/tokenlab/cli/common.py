"""What several sub-commands share: the runtime flags and the ``train`` / ``segment train`` runner.

The runtime flags (``--device``, ``--amp``, ``--batch-size``, ``--workers``) are declared here once, with one
vocabulary: a sub-command picks which of them it has, and its defaults, through :func:`add_runtime_flags`. Nothing
heavy is imported at module level, so ``tokenlab --help`` stays fast.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Mapping
from typing import Any

from tokenlab.utils.amp import AMP_CHOICES
from tokenlab.utils.device import DEVICE_CHOICES as _DEVICES
from tokenlab.utils.device import is_device_name

__all__ = [
    "DEVICE_CHOICES",
    "RUNTIME_FLAGS",
    "add_runtime_flags",
    "add_training_flags",
    "parse_device",
    "resolve_device",
    "run_training",
]

DEVICE_CHOICES = ", ".join(_DEVICES)


def parse_device(value: str) -> str:
    """Argparse type of ``--device``: the syntax check shared by every sub-command (CUDA is checked at run time)."""
    if not is_device_name(value):
        raise argparse.ArgumentTypeError(f"invalid device {value!r}; valid: {DEVICE_CHOICES}")
    return value


# flag -> argparse keyword arguments except the default: the one declaration of each runtime flag
RUNTIME_FLAGS: dict[str, dict[str, Any]] = {
    "device": {
        "type": parse_device,
        "metavar": "DEVICE",
        "help": f"where to run: {DEVICE_CHOICES} (auto: cuda when available)",
    },
    "amp": {"choices": AMP_CHOICES, "help": "autocast dtype (fp16 needs CUDA)"},
    "batch_size": {"type": int, "metavar": "N", "help": "images per batch"},
    "workers": {"type": int, "metavar": "N", "help": "data-loading (or rendering / corruption) worker processes"},
}


def add_runtime_flags(parser: argparse.ArgumentParser, defaults: Mapping[str, Any]) -> None:
    """Add the runtime flags named in ``defaults`` (keys: ``device``, ``amp``, ``batch_size``, ``workers``).

    Args:
        parser: The sub-command's parser.
        defaults: Flag name (as the ``args`` attribute) -> that sub-command's default; only these flags are added.

    Raises:
        KeyError: a name that is not a runtime flag (a programming error, listed with the valid names).
    """
    for name, default in defaults.items():
        if name not in RUNTIME_FLAGS:
            raise KeyError(f"unknown runtime flag {name!r}; valid: {', '.join(RUNTIME_FLAGS)}")
        spec = dict(RUNTIME_FLAGS[name])
        if default is not None:
            spec["help"] += f" (default: {default})"
        parser.add_argument("--" + name.replace("_", "-"), default=default, **spec)


def resolve_device(name: str, amp: str | None = None) -> str:
    """``--device`` (and ``--amp``) checked up front: the device name for the library calls.

    Args:
        name: The ``--device`` value.
        amp: The ``--amp`` value of commands that have it; fp16 is refused off CUDA before any work starts.

    Raises:
        ValueError: CUDA asked for on a machine without one, or fp16 on a CPU.
    """
    from tokenlab.utils.amp import amp_dtype
    from tokenlab.utils.device import resolve_device as to_device

    device = to_device(name, "--device")
    amp_dtype(amp, device)
    return str(device)


def add_training_flags(
    parser: argparse.ArgumentParser,
    config_default: str | None = None,
    config_example: str = "cifar10_stl_student",
    override_example: str = "optim.lr=1e-3",
) -> None:
    """The inputs of :func:`run_training`: recipe, run directory, how to start, ``--print-config``, overrides.

    ``--resume`` and ``--overwrite`` (``checkpoint.resume`` / ``checkpoint.overwrite``) exclude each other.

    Args:
        parser: The sub-command's parser (``train``, ``segment train``).
        config_default: The recipe used without ``--config``.
        config_example: A shipped recipe named in the help.
        override_example: An override shown in the help.
    """
    parser.add_argument("--config", default=config_default,
                        help=f"recipe file or shipped recipe name (e.g. {config_example})")  # fmt: skip
    parser.add_argument("--run-dir", default=None, help="output directory (same as run_dir=...)")
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--resume", default=None, metavar="auto|PATH",
                       help="continue a run: 'auto' (its newest usable checkpoint) or a checkpoint dir")  # fmt: skip
    start.add_argument("--overwrite", action="store_true",
                       help="start over in a run directory that holds checkpoints (deletes them)")  # fmt: skip
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help=f"dotted config overrides, e.g. {override_example}")  # fmt: skip


def run_training(args: argparse.Namespace, extra_overrides: list[str]) -> int:
    """``train`` and the dense-task trainers: recipe + overrides -> ``engine.train``, then a one-line summary."""
    from omegaconf import OmegaConf

    from tokenlab import engine  # looked up at call time, so tests can replace engine.train

    overrides = list(args.overrides) + ([f"run_dir={args.run_dir}"] if args.run_dir is not None else [])
    if args.resume is not None:
        overrides.append(f"checkpoint.resume={args.resume}")
    if args.overwrite:
        overrides.append("checkpoint.overwrite=true")
    cfg = engine.load_config(args.config, overrides + extra_overrides)
    if args.print_config:
        print(OmegaConf.to_yaml(cfg), end="")
        return 0
    main = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 reports
    try:
        result = engine.train(cfg)
    except KeyboardInterrupt as err:  # Ctrl-C / SIGTERM: the engine wrote a checkpoint first (TrainingInterrupted)
        if main:
            print(f"\n{_interrupted_advice(cfg.run_dir, err, args.overwrite)}", file=sys.stderr)
        return 128 + int(getattr(err, "signum", signal.SIGINT))
    if not main:
        return 0
    val = ", ".join(f"{k} {v:.4f}" for k, v in result.val.items())
    print(f"trained {result.step} steps into {result.run_dir}" + (f"; validation: {val}" if val else ""))
    if result.nonfinite_steps:
        print(f"skipped {result.nonfinite_steps} steps with a non-finite loss")
    return 0


def _interrupted_advice(run_dir: str, err: BaseException, overwrite: bool) -> str:
    """What to run after an interrupted training: true whether or not a checkpoint was written."""
    from tokenlab.engine.checkpoint import latest_checkpoint
    from tokenlab.utils.runs import CHECKPOINT_DIR

    last = getattr(err, "checkpoint", None) or latest_checkpoint(os.path.join(run_dir, CHECKPOINT_DIR))
    if last is None:
        return "interrupted before the first checkpoint: nothing to resume; run the same command again to start over"
    how = "with --resume auto instead of --overwrite" if overwrite else "plus --resume auto"
    return f"interrupted: checkpoint {last} is kept; continue with the same command {how}"


def add_backbone_init_flag(parser: argparse.ArgumentParser, what: str) -> None:
    """``--init-from RUN`` of the dense-task trainers (segmentation, detection): the backbone's starting weights."""
    parser.add_argument("--init-from", default=None, help=f"classification run whose backbone initialises the {what}")


def run_dense_training(args: argparse.Namespace) -> int:
    """``segment train`` / ``detect train``: the shared runner with ``--init-from`` as ``method.kwargs.init_from``."""
    extra = [f"method.kwargs.init_from={args.init_from}"] if args.init_from is not None else []
    return run_training(args, extra)  # engine.train builds the task's data from the recipe's data view
