"""Segmentation trains through ``engine.train`` like every method: `tokenlab train` with a segmentation recipe
(the engine builds the segmentation data view and the poly schedule; there is no per-method entry point)."""

from pathlib import Path

from tokenlab.cli import main
from tokenlab.data.synthetic import SynthConfig, generate


def test_tokenlab_train_runs_a_segmentation_recipe(tmp_path: Path) -> None:
    data = tmp_path / "data"
    generate(data, SynthConfig(img_size=32, counts={"train": 16, "val": 8}))
    run = tmp_path / "run"
    rc = main(
        [
            "train",
            "--config",
            "seg_synthetic",
            f"data.root={data}",
            f"run_dir={run}",
            "schedule.max_steps=2",
            "schedule.epochs=1",
            "schedule.warmup_epochs=0",
            "data.batch_size=4",
            "log.progress=false",
        ]
    )
    assert rc == 0
    assert (run / "model.safetensors").is_file() and (run / "model.json").is_file()
