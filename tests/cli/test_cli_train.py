"""`tokenlab train` end to end on a tiny synthetic set: stage 1 labeler, then stage 2 student from its run."""

import pytest
from evalhelpers import TINY_TRAIN

from tokenlab.cli import main
from tokenlab.data import SynthConfig, generate
from tokenlab.models import load_exported
from tokenlab.utils.metrics_log import read_metrics

TINY = [
    *TINY_TRAIN,
    "schedule.max_steps=2",
    "data.val_subset=8",
]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate(root, SynthConfig(img_size=32, counts={"train": 32, "val": 16, "rendition": 0, "shortcut": 0}), workers=1)
    return root


def test_stage1_then_stage2_through_the_cli(synth, tmp_path, capsys):
    labeler = tmp_path / "labeler"
    assert main(["train", f"data.root={synth}", f"run_dir={labeler}", "method.name=stl_labeler", *TINY]) == 0
    student = tmp_path / "student"
    args = [
        "train",
        "--run-dir",
        str(student),
        f"data.root={synth}",
        "method.name=stl_student",
        f"method.kwargs.labeler={labeler}",
        "method.kwargs.mixup_alpha=0.8",
        *TINY,
    ]
    assert main(args) == 0
    assert "trained 2 steps" in capsys.readouterr().out
    model, meta = load_exported(student)
    assert meta["method"] == "stl_student" and meta["num_classes"] == 10 and len(meta["classes"]) == 10
    assert meta["labeler"]["export"] == "last" and meta["labeler"]["step"] == 2  # which labeler taught it
    assert {"cls", "token", "loss"} <= set(read_metrics(student, "step")[-1])
    assert (student / "config.yaml").read_text().count("stl_student") == 1


def test_cli_errors_are_one_line(synth, tmp_path, capsys):
    assert main(["train", "optim.lrr=1"]) == 2
    assert "optim.lrr" in capsys.readouterr().err
    args = [
        "train",
        f"data.root={synth}",
        f"run_dir={tmp_path / 's'}",
        "method.name=stl_student",
        f"method.kwargs.labeler={tmp_path / 'missing'}",
        *TINY,
    ]
    assert main(args) == 2
    assert "no exported model" in capsys.readouterr().err
    assert main(["train", "method.name=stl_studnt", f"data.root={synth}"]) == 2
    assert "did you mean 'stl_student'" in capsys.readouterr().err
