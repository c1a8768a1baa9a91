"""Every plot writes a non-empty PNG from plain data; bad input raises."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from evalhelpers import make_run
from PIL import Image

from tokenlab.eval.metrics import expected_calibration_error
from tokenlab.eval.visualize import (
    plot_block_attention,
    plot_class_attention,
    plot_corruption_bars,
    plot_reliability,
    plot_severity_curves,
    plot_token_labels,
    plot_training_curves,
)
from tokenlab.utils.metrics_log import read_metrics


def _png(path: Path) -> tuple[int, int]:
    assert path.is_file() and path.stat().st_size > 1000
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def test_token_and_attention_maps(tmp_path: Path):
    images = torch.rand(2, 3, 32, 32)
    pred = torch.randint(0, 3, (2, 8, 8))
    masks = torch.zeros(2, 32, 32, dtype=torch.long)
    masks[:, 8:24, 8:24] = 1
    p = plot_token_labels(images, pred, torch.rand(2, 8, 8), torch.tensor([0, 2]), ["a", "b", "c"],
                          tmp_path / "tok.png", masks=masks, title="t")  # fmt: skip
    w, h = _png(p)
    assert w > 3 * 32 and h > 2 * 32
    _png(plot_class_attention(images, torch.rand(2, 4, 8, 8).softmax(-1), tmp_path / "attn.png"))


def test_block_attention_from_a_fan(tmp_path: Path):
    import timm

    import tokenlab  # noqa: F401  (registers the FAN models)

    model = timm.create_model("fan_nano_6_p16_224", num_classes=2, patch_size=8).eval()
    images = torch.rand(2, 3, 32, 32)
    maps = model.forward_attention_maps(images, indices=[0, 5])
    w, h = _png(plot_block_attention(images, maps, tmp_path / "blocks.png", query=(0.25, 0.75), blocks=[0, 5]))
    assert w > 3 * 64 and h > 2 * 64
    small = [maps[0], maps[1][..., :2, :2, :2, :2]]  # grids may differ between blocks (xlarge downsample)
    _png(plot_block_attention(images, small, tmp_path / "mixed.png"))
    with pytest.raises(ValueError, match="nothing to plot"):
        plot_block_attention(images, [], tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"\(n, heads, H, W, H, W\)"):
        plot_block_attention(images, [torch.rand(2, 4, 4, 4)], tmp_path / "x.png")
    with pytest.raises(ValueError, match="fractions"):
        plot_block_attention(images, maps, tmp_path / "x.png", query=(2.0, 0.5))


def test_robustness_plots(tmp_path: Path):
    per_c = {"base": {"fog": 0.5, "snow": 0.3}, "stl": {"fog": 0.6, "snow": 0.45}}
    _png(plot_corruption_bars(per_c, tmp_path / "bars.png", clean={"base": 0.8, "stl": 0.82}))
    _png(plot_severity_curves({"base": {"1": 0.7, "2": 0.5}, "stl": {1: 0.75, 2: 0.6}}, tmp_path / "sev.png",
                              clean={"base": 0.8, "stl": 0.82}))  # fmt: skip
    rel = expected_calibration_error(torch.randn(50, 3), torch.randint(0, 3, (50,)), 10).to_dict()
    _png(plot_reliability({"base": rel, "stl": rel}, tmp_path / "rel.png"))
    with pytest.raises(ValueError, match="nothing to plot"):
        plot_corruption_bars({}, tmp_path / "x.png")


def test_training_curves(tmp_path: Path):
    a, b = make_run(tmp_path / "a"), make_run(tmp_path / "b", seed=1)
    with (b / "metrics.jsonl").open("a") as f:
        f.write('{"kind": "step", "st')  # a run still writing: truncated last line is ignored
    _png(plot_training_curves({"a": a, "b": b}, tmp_path / "curves.png"))
    assert len(read_metrics(b / "metrics.jsonl")) == 6
    with pytest.raises(FileNotFoundError, match="metrics file not found"):
        plot_training_curves({"x": tmp_path}, tmp_path / "c.png")
