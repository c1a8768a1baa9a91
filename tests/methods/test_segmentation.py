"""The segmentation method on the engine: loss with ignore index, poly schedule, a 2-step run through
``engine.train`` (no segmentation entry point of its own), CLI eval."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tokenlab.cli import main
from tokenlab.engine import load_config, train
from tokenlab.methods import build_method
from tokenlab.methods.segmentation import Segmentation
from tokenlab.models.segmentation import FANSegFormer

TINY = dict(backbone="fan_nano_6_p16_224", backbone_kwargs=dict(patch_size=4), decoder_dim=16)


class _Fixed(torch.nn.Module):
    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = torch.nn.Parameter(logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits


def test_loss_skips_ignored_pixels_and_never_nans() -> None:
    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 1.0]]]])  # (B=1, K=2, H=1, W=2)
    mask = torch.tensor([[[0, 255]]])
    method = Segmentation(_Fixed(logits))
    out = method.training_step({"image": torch.zeros(1, 3, 1, 2), "mask": mask}, None)
    # Only pixel 0 (label 0) counts: -log softmax([2, 0])_0 = log(1 + e^-2).
    assert out["loss"].item() == pytest.approx(math.log(1 + math.exp(-2)))
    empty = method.training_step({"image": torch.zeros(1, 3, 1, 2), "mask": torch.full((1, 1, 2), 255)}, None)
    assert empty["loss"].item() == 0.0 and empty["loss"].requires_grad
    val = method.validation_step(method.model, {"image": torch.zeros(1, 3, 1, 2), "mask": mask})
    assert val["correct"].item() == 1 and val["count"].item() == 1
    assert val["loss"].item() == pytest.approx(F.cross_entropy(logits[..., :1], mask[..., :1]).item())


def test_method_options_are_checked() -> None:
    # The schedule kind moved from method.kwargs.lr_schedule to the engine's schedule.kind (checked by the config).
    with pytest.raises(ValueError, match="'schedule.kind' is 'step'; valid: cosine, poly"):
        load_config("seg_synthetic", ["schedule.kind=step"])
    model = FANSegFormer(num_classes=3, **TINY)
    with pytest.raises(ValueError, match="unknown option"):
        build_method("segmentation", model=model, ignore=3)
    # Formerly poly was refused outside `tokenlab segment train`; now every path gets it from the engine.
    with pytest.raises(ValueError, match="unknown option.*lr_schedule"):
        build_method("segmentation", model=model, lr_schedule="poly")
    assert load_config("seg_synthetic").schedule.kind == "poly"


def test_two_step_run_exports_and_evaluates(synthetic_root, tmp_path) -> None:
    run = tmp_path / "run"
    cfg = load_config("seg_synthetic", [
        f"data.root={synthetic_root}", f"run_dir={run}", "schedule.epochs=1", "schedule.warmup_epochs=0",
        "data.batch_size=8", "log.progress=false", "log.tensorboard=false", "train.device=cpu",
        "model.kwargs.decoder_dim=16", "schedule.poly_power=2.0",
    ])  # fmt: skip
    result = train(cfg)
    assert result.step == 2 and set(result.val) == {"acc1", "loss"}
    meta = json.loads((run / "model.json").read_text())
    assert meta["model"] == "segformer_fan" and meta["num_classes"] == 11 and meta["ignore_index"] == 255
    lrs = [json.loads(line).get("lr") for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(lr is not None for lr in lrs)
    # the recipe's poly schedule over the 2 steps of the run (no warm-up), averaged over the logging window: lr0,
    # then (lr0 - min_lr) * (1 - 1/2) ** power + min_lr (a cosine would give the power-1 value)
    o, power = cfg.optim, cfg.schedule.poly_power
    expected = (o.lr + (o.lr - o.min_lr) * 0.5**power + o.min_lr) / 2
    np.testing.assert_allclose([lr for lr in lrs if lr is not None], [expected], rtol=1e-6)

    out = tmp_path / "eval"
    rc = main(
        [
            "segment",
            "eval",
            str(run),
            "--root",
            str(synthetic_root),
            "--out",
            str(out),
            "--overlays",
            "2",
            "--corruptions",
            "brightness",
            "--severities",
            "1",
            "--cache-dir",
            str(tmp_path / "cache"),
        ]
    )
    assert rc == 0
    res = json.loads((out / "segmentation.json").read_text())
    assert 0.0 <= res["clean"]["miou"] <= 1.0 and set(res["miou"]) == {"brightness"}
    assert res["retention"] == pytest.approx(res["robust_miou"] / res["clean"]["miou"])
    assert (out / "overlays.png").is_file()


def test_cli_errors(synthetic_root, tmp_path, capsys) -> None:
    assert main(["segment", "eval", str(tmp_path / "nope"), "--root", str(synthetic_root)]) == 2
    assert "no exported model" in capsys.readouterr().err
    assert main(["segment", "train", "data.root=" + str(tmp_path), "run_dir=" + str(tmp_path / "r")]) == 2
    assert "no dataset.json" in capsys.readouterr().err
