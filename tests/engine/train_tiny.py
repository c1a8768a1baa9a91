"""Run a tiny training in its own process (used by the kill/resume and torchrun tests).

Usage: python train_tiny.py RUN_DIR [--sleep SECONDS] [--val N] [key=value ...]
``--sleep`` makes each training step slower (same maths) so a test can kill the process mid-run; ``--val`` sets the
number of validation samples (default 8).
``TINY_FAIL=RANK:STEP:exit|hang`` makes that rank exit (code 3) or hang at that step (the dying-rank tests).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))

from engine_helpers import TinySet, tiny_config  # noqa: E402

from tokenlab.engine.trainer import Trainer  # noqa: E402
from tokenlab.methods import StepContext, register_method  # noqa: E402
from tokenlab.methods.stl import STLLabeler  # noqa: E402
from tokenlab.utils import distributed as D  # noqa: E402

SLEEP = 0.0


@register_method("slow_stl_labeler")
class SlowLabeler(STLLabeler):
    def training_step(self, batch: dict[str, Any], ctx: StepContext) -> dict[str, torch.Tensor]:
        time.sleep(SLEEP)
        fail = os.environ.get("TINY_FAIL")
        if fail:
            rank, step, how = fail.split(":")
            if int(os.environ.get("RANK", 0)) == int(rank) and ctx.step == int(step):
                if how == "exit":
                    os._exit(3)
                time.sleep(3600)
        return super().training_step(batch, ctx)


def main(argv: list[str]) -> None:
    global SLEEP
    torch.set_num_threads(1)
    run_dir, rest = Path(argv[0]), argv[1:]
    val = 8
    while rest[:1] in (["--sleep"], ["--val"]):
        if rest[0] == "--sleep":
            SLEEP = float(rest[1])
        else:
            val = int(rest[1])
        rest = rest[2:]
    cfg = tiny_config(run_dir, *rest)
    try:
        Trainer(cfg, TinySet(32), TinySet(val, seed=1)).fit()
    finally:  # as engine.train does: a process group left open can abort at exit ("terminate called ...")
        D.cleanup_distributed()


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.INFO)
    main(sys.argv[1:])
