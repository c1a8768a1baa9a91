"""`tokenlab labels build` end to end: a stage-1 labeler, its label store, a 2-step student from the store."""

import json
import logging
import os
import shutil
import subprocess
import sys

import pytest
from evalhelpers import TINY_TRAIN

from tokenlab.cli import main
from tokenlab.data import SynthConfig, generate
from tokenlab.data.label_store import LabelStore
from tokenlab.models import load_exported

TINY = [*TINY_TRAIN, "schedule.max_steps=2", "data.val_subset=8"]


@pytest.fixture(scope="module")
def labeler(tmp_path_factory):
    root = tmp_path_factory.mktemp("labels")
    synth = root / "synth"
    generate(synth, SynthConfig(img_size=32, counts={"train": 32, "val": 16, "rendition": 0, "shortcut": 0}), workers=1)
    run = root / "labeler"
    assert main(["train", f"data.root={synth}", f"run_dir={run}", "method.name=stl_labeler", *TINY]) == 0
    return synth, run


def test_flip_view_store_holds_the_mirrored_image_and_refuses_a_resume_without_it(labeler, tmp_path, capsys):
    synth, run = labeler
    out = tmp_path / "store"
    build = ["labels", "build", "--labeler", str(run), "--data", str(synth), "--out", str(out), "--topk", "2",
             "--flip-view", "--device", "cpu", "--workers", "0", "--no-progress"]  # fmt: skip
    assert main(build) == 0
    assert "32 images x 2 view(s)" in capsys.readouterr().out
    store = LabelStore.open(out)
    assert json.loads((out / "manifest.json").read_text())["flip_view"] is True
    assert store.read([0])["theta"][0, 1, 0, 0].item() == pytest.approx(-1.0)  # view 1: x mirrored
    assert main([a for a in build if a != "--flip-view"]) == 2
    assert "other settings" in capsys.readouterr().err


def test_build_then_train_a_student_from_the_store(labeler, tmp_path, capsys, caplog):
    synth, run = labeler
    out = tmp_path / "store"
    build = ["labels", "build", "--labeler", str(run), "--data", str(synth), "--out", str(out), "--topk", "2",
             "--views", "1", "--device", "cpu", "--workers", "0", "--batch-size", "8", "--no-progress"]  # fmt: skip
    assert main(build) == 0
    assert "32 images x 2 view(s), grid 4x4, top-2" in capsys.readouterr().out
    store = LabelStore.open(out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["labeler"]["sha256"] and manifest["data"]["num_images"] == 32
    assert manifest["img_size"] == 32 and manifest["grid"] == [4, 4] and store.num_views == 2
    assert main(build) == 0  # run again: a finished store is kept as it is
    student = tmp_path / "student"
    train = ["train", f"data.root={synth}", f"run_dir={student}", "method.name=stl_student",
             f"method.kwargs.label_store={out}", "method.kwargs.mixup_alpha=0.8", *TINY]  # fmt: skip
    assert main(train) == 0
    assert "trained 2 steps" in capsys.readouterr().out
    _, meta = load_exported(student / "model")
    assert meta["labeler"]["label_store"] == str(out) and meta["labeler"]["sha256"] == manifest["labeler"]["sha256"]
    # on the store's own crops (FKD-style): the student's crop boxes are the stored random views
    with caplog.at_level(logging.INFO, logger="tokenlab.data.transforms"):
        crops = [*train[:2], f"run_dir={tmp_path / 'crops'}", *train[3:], "method.kwargs.store_crops=true",
                 "data.transform.rand_augment=rand-m9-mstd0.5-inc1"]  # fmt: skip
        assert main(crops) == 0
    assert "trained 2 steps" in capsys.readouterr().out
    assert "student crops: the 1 random-crop views of label store" in caplog.text


def test_store_of_other_data_or_labeler_is_refused(labeler, tmp_path, capsys):
    synth, run = labeler
    out = tmp_path / "store"
    build = ["labels", "build", "--labeler", str(run), "--data", str(synth), "--out", str(out), "--topk", "2",
             "--device", "cpu", "--workers", "0", "--no-progress"]  # fmt: skip
    assert main(build) == 0
    capsys.readouterr()
    assert main([*build[:-1], "--topk", "3", "--no-progress"]) == 2
    assert "other settings (k: store 2, now 3)" in capsys.readouterr().err
    other = tmp_path / "other"
    generate(other, SynthConfig(seed=5, img_size=32, counts={"train": 32, "val": 16, "rendition": 0, "shortcut": 0}),
             workers=1)  # fmt: skip
    train = ["train", f"data.root={other}", f"run_dir={tmp_path / 's'}", "method.name=stl_student",
             f"method.kwargs.label_store={out}", *TINY]  # fmt: skip
    assert main(train) == 2
    assert "missing from label store" in capsys.readouterr().err
    crops = [*train, f"data.root={synth}", "method.kwargs.store_crops=true"]  # a store of the full view only
    assert main(crops) == 2
    assert "no random-crop views to train on" in capsys.readouterr().err


@pytest.mark.slow
def test_two_ranks_under_torchrun_write_the_same_store_as_one_process(labeler, tmp_path):
    synth, run = labeler
    args = ["labels", "build", "--labeler", str(run), "--data", str(synth), "--topk", "2", "--views", "1",
            "--device", "cpu", "--workers", "0", "--batch-size", "4", "--no-progress"]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    torchrun = shutil.which("torchrun")
    cmd = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    cmd += ["--standalone", "--nproc_per_node=2", "-m", "tokenlab.cli", *args, "--out", str(tmp_path / "two")]
    proc = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("values.f16", "indices.u16", "rest.f16", "theta.f32", "done.u8", "files.txt"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
