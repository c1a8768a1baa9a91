"""Token-label metrics on hand-made grids (exact values), the masked and mask-less data sets and a tiny model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from evalhelpers import TINY_KW, make_masked_set, make_run, make_tree

from tokenlab.eval.tokens import (
    TokenStats,
    analyze_run,
    label_stability,
    mask_to_token_grid,
    token_predictions,
)


def test_mask_to_token_grid_area_threshold():
    mask = torch.zeros(1, 4, 4, dtype=torch.long)
    mask[0, :2, :2] = 3  # top-left token fully object
    mask[0, 0, 2] = 3  # top-right token 1/4 object -> background at threshold 0.5
    mask[0, 2:, 2:] = 1
    mask[0, 3, 3] = 0  # bottom-right token 3/4 object -> object
    fg = mask_to_token_grid(mask, (2, 2))
    assert fg.tolist() == [[[True, False], [False, True]]]
    assert mask_to_token_grid(mask, (2, 2), threshold=0.2).tolist() == [[[True, True], [False, True]]]


def test_token_metrics_exact_on_hand_grid():
    # one image of class 1 on a 3x3 grid; object = the middle column
    fg = torch.tensor([[[False, True, False], [False, True, False], [False, True, False]]])
    pred = torch.tensor([[[0, 1, 1], [0, 1, 2], [0, 0, 0]]])
    conf = torch.tensor([[[0.5, 0.9, 0.6], [0.5, 0.7, 0.8], [0.5, 0.2, 0.5]]])
    other = torch.tensor([[[0, 1, 1], [0, 1, 2], [0, 1, 1]]])  # differs in 2 of 9 tokens
    st = TokenStats(num_classes=3)
    st.update(pred, conf, torch.tensor([1]), fg, other)
    m = st.summary()
    # object tokens: labels 1, 1, 0 -> 2/3 correct; their mean confidence (0.9 + 0.7 + 0.2) / 3
    assert m["fg_accuracy"] == pytest.approx(2 / 3)
    assert m["fg_confidence"] == pytest.approx(0.6)
    # background tokens (6): labels 0, 1, 0, 2, 0, 0 -> 1/6 agree with class 1; distribution [4, 1, 1] / 6
    assert m["bg_agree_with_image_label"] == pytest.approx(1 / 6)
    assert m["bg_distribution"] == pytest.approx([4 / 6, 1 / 6, 1 / 6])
    assert m["bg_confidence"] == pytest.approx((0.5 + 0.6 + 0.5 + 0.8 + 0.5 + 0.5) / 6)
    # A = {(0,1), (0,2), (1,1)}, M = middle column: |A∩M| = 2, |A∪M| = 4
    assert m["iou"] == pytest.approx(0.5)
    assert m["stability"] == pytest.approx(7 / 9)
    assert label_stability(pred, other) == pytest.approx(7 / 9)


def test_iou_averages_over_images_and_skips_empty_union():
    fg = torch.tensor([[[True, False]], [[False, False]], [[True, True]]])
    pred = torch.tensor([[[0, 0]], [[1, 1]], [[0, 1]]])
    st = TokenStats(num_classes=2)
    st.update(pred, torch.ones(3, 1, 2), torch.tensor([0, 0, 0]), fg)
    # image 0: A={0,1}, M={0} -> 1/2 ; image 1: A=M=∅ -> left out ; image 2: A={0}, M={0,1} -> 1/2
    assert st.summary()["iou"] == pytest.approx(0.5) and len(st.ious) == 2
    assert np.isnan(st.summary()["stability"])
    with pytest.raises(ValueError, match="shape mismatch"):
        st.update(pred, torch.ones(3, 2, 2), torch.tensor([0, 0, 0]), fg)


def test_analyze_run_writes_tokens_json(tmp_path: Path):
    data = make_masked_set(tmp_path / "synth")
    run = make_run(tmp_path / "run")
    res = analyze_run(run, data, num_examples=3)
    out = json.loads((run / "tokens.json").read_text())
    assert out["source"] == "aux" and out["images"] == 4 and out["masks"] is True and out["threshold"] == 0.5
    # 32 px, patch 4 -> 8x8 grid; the 16x16 object square covers exactly 4x4 tokens
    assert out["fg_tokens"] == 4 * 16 and out["bg_tokens"] == 4 * 48
    assert set(out["bg_distribution"]) == {"cat", "dog"}
    assert 0 <= out["stability"] <= 1 and 0 <= out["iou"] <= 1
    ex = res.examples
    assert ex is not None and ex.pred.shape == (3, 8, 8) and ex.images.shape == (3, 3, 32, 32)
    assert ex.attention is not None and ex.attention.shape[-2:] == (8, 8)
    # a model without aux head falls back to the class head on the patch tokens
    plain = make_run(tmp_path / "plain", token=False)
    assert analyze_run(plain, data).source == "head"
    with pytest.raises(ValueError, match="source 'aux' needs a model with an aux_head"):
        analyze_run(plain, data, source="aux")


def test_head_source_uses_class_head_per_token():
    model = timm.create_model("fan_nano_6_p16_224_token", num_classes=3, **TINY_KW).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        logits, grid = token_predictions(model, x, "head")
        _, patches = model.forward_features(x)
        assert torch.allclose(logits, model.head(patches)) and grid == (8, 8)
        aux, _ = token_predictions(model, x, "aux")
        assert torch.allclose(aux, model.aux_head(patches))


def test_mask_free_statistics_exact_on_hand_grid():
    # the grid of the masked test, without its mask: only the statistics over all tokens
    pred = torch.tensor([[[0, 1, 1], [0, 1, 2], [0, 0, 0]]])
    conf = torch.tensor([[[0.5, 0.9, 0.6], [0.5, 0.7, 0.8], [0.5, 0.2, 0.5]]])
    other = torch.tensor([[[0, 1, 1], [0, 1, 2], [0, 1, 1]]])
    st = TokenStats(num_classes=3)
    st.update(pred, conf, torch.tensor([1]), None, other)
    m = st.summary()
    assert m["masks"] is False and m["images"] == 1 and m["tokens"] == 9
    assert m["agree_with_image_label"] == pytest.approx(3 / 9)  # labels 1 at three of nine tokens
    assert m["confidence"] == pytest.approx(5.2 / 9)
    assert m["distribution"] == pytest.approx([5 / 9, 3 / 9, 1 / 9])
    assert m["stability"] == pytest.approx(7 / 9)
    assert not {"fg_accuracy", "fg_tokens", "bg_agree_with_image_label", "bg_distribution", "iou"} & set(m)
    fg = torch.zeros(1, 3, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="mix batches with and without object masks"):
        st.update(pred, conf, torch.tensor([1]), fg)
    # with masks the same statistics come on top of the mask-based ones
    masked = TokenStats(num_classes=3)
    masked.update(pred, conf, torch.tensor([1]), fg, other)
    mm = masked.summary()
    assert mm["masks"] is True and mm["agree_with_image_label"] == pytest.approx(3 / 9) and "iou" in mm


def test_analyze_run_without_masks_writes_mask_free_tokens_json(tmp_path: Path):
    data = make_masked_set(tmp_path / "synth")
    shutil.rmtree(data / "val_masks")
    run = make_run(tmp_path / "run")
    res = analyze_run(run, data, num_examples=3)
    out = json.loads((run / "tokens.json").read_text())
    assert out["masks"] is False and out["images"] == 4 and out["tokens"] == 4 * 64
    assert "threshold" not in out and not {"fg_accuracy", "bg_confidence", "iou"} & set(out)
    assert set(out["distribution"]) == {"cat", "dog"} and sum(out["distribution"].values()) == pytest.approx(1)
    assert 0 <= out["agree_with_image_label"] <= 1 and 0 < out["confidence"] <= 1 and 0 <= out["stability"] <= 1
    ex = res.examples
    assert ex is not None and ex.masks is None and ex.pred.shape == (3, 8, 8) and ex.conf.shape == (3, 8, 8)
    assert ex.attention is not None and ex.attention.shape[-2:] == (8, 8)


def test_analyze_run_on_a_bare_class_tree(tmp_path: Path):
    tree = make_tree(tmp_path / "imgs", per_class=2)
    res = analyze_run(make_run(tmp_path / "run"), tree, num_examples=2)
    assert res.metrics["masks"] is False and res.metrics["images"] == 4
    assert json.loads((tmp_path / "run" / "tokens.json").read_text())["data"] == str(tree)
