"""`tokenlab train` under interruption and reruns: true advice after Ctrl-C, no silent overwrite, one-line errors."""

import os
import signal
from typing import Any

import pytest
import torch
from evalhelpers import TINY_TRAIN

from tokenlab.cli import main
from tokenlab.data import SynthConfig, generate
from tokenlab.engine import checkpoint as ckpt
from tokenlab.methods import StepContext, register_method
from tokenlab.methods.supervised import Supervised
from tokenlab.utils.metrics_log import read_metrics

TINY = [
    *TINY_TRAIN,
    "data.val_split=null",
]


@register_method("ctrl_c_at_step")
class CtrlCAtStep(Supervised):
    """Supervised; the user presses Ctrl-C during optimizer step ``step``."""

    def __init__(self, model: torch.nn.Module, step: int = -1) -> None:
        super().__init__(model)
        self.at = step

    def training_step(self, batch: dict[str, Any], ctx: StepContext) -> dict[str, torch.Tensor]:
        if ctx.step == self.at:
            os.kill(os.getpid(), signal.SIGINT)
        return super().training_step(batch, ctx)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate(root, SynthConfig(img_size=32, counts={"train": 24, "val": 0, "rendition": 0, "shortcut": 0}), workers=1)
    return root


def _train(synth, run, *extra: str) -> int:
    return main(["train", "--run-dir", str(run), f"data.root={synth}", *TINY, *extra])


def test_ctrl_c_advice_is_true_and_a_rerun_never_overwrites(synth, tmp_path, capsys):
    run = tmp_path / "run"
    # Ctrl-C during step 1 of 6 (3 per epoch, no mid-epoch interval): a checkpoint at step 2, advice naming it
    rc = _train(synth, run, "method.name=ctrl_c_at_step", "method.kwargs.step=1", "schedule.epochs=2")
    assert rc == 130
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1] == (
        f"interrupted: checkpoint {run / 'checkpoints' / 'step_000000002'} is kept; continue with the same command "
        f"plus --resume auto"
    )
    # the same command again: refused in one line, the checkpoint untouched
    assert _train(synth, run, "method.name=ctrl_c_at_step", "method.kwargs.step=1", "schedule.epochs=2") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds checkpoints" in err[0] and "--resume auto" in err[0]
    assert "--overwrite" in err[0]
    assert [p.name for p in ckpt.list_checkpoints(run / "checkpoints")] == ["step_000000002"]
    # what the advice says: it continues from step 2 to the end
    assert _train(synth, run, "method.name=ctrl_c_at_step", "schedule.epochs=2", "--resume", "auto") == 0
    assert "trained 6 steps" in capsys.readouterr().out
    assert [r["event"] for r in read_metrics(run, "event")] == ["start", "resume"]
    # --overwrite starts over (and cannot be combined with --resume)
    assert _train(synth, run, "schedule.max_steps=1", "--overwrite") == 0
    assert [r["event"] for r in read_metrics(run, "event")] == ["start"]
    capsys.readouterr()
    assert _train(synth, run, "method.name=ctrl_c_at_step", "method.kwargs.step=0", "--overwrite") == 130
    assert (
        capsys.readouterr()
        .err.strip()
        .splitlines()[-1]
        .endswith("continue with the same command with --resume auto instead of --overwrite")
    )
    with pytest.raises(SystemExit):
        _train(synth, run, "--overwrite", "--resume", "auto")


def test_resume_from_a_broken_checkpoint_is_one_line_naming_it(synth, tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(synth, run, "schedule.max_steps=2") == 0
    newest = ckpt.latest_checkpoint(run / "checkpoints")
    (newest / "method.safetensors").write_bytes(b"")
    capsys.readouterr()
    assert _train(synth, run, "schedule.max_steps=3", "--resume", str(newest)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: checkpoint file {newest / 'method.safetensors'} is empty"]
