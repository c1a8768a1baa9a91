"""STL token-label loss: formula, label types, Gumbel statistics, grid matching, errors."""

import math

import pytest
import torch
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy

from tokenlab.losses.stl_token import STLTokenLoss, make_token_labels, resize_token_logits, token_soft_ce


def test_uniform_student_gives_log_k():
    # log_softmax of all-zero logits is -log K for every class, and labels sum to 1 -> loss = log K exactly.
    student = torch.zeros(2, 6, 4)
    teacher = torch.randn(2, 6, 4)
    loss = STLTokenLoss("gumbel")(student, teacher, (2, 3), (2, 3))
    assert loss.item() == pytest.approx(math.log(4), abs=1e-6)


def test_argmax_labels_with_smoothing_pinned_value():
    # One image, two tokens, K = 2. Teacher argmax: token 0 -> class 0, token 1 -> class 1.
    # eps = 0.1 -> labels [0.95, 0.05] and [0.05, 0.95]. Student logits [0, ln 3] -> p = [0.25, 0.75];
    # [ln 3, 0] -> p = [0.75, 0.25]. Per token: -(0.95 ln 0.25 + 0.05 ln 0.75) (token 0) and the same for token 1
    # by symmetry, so the mean is 0.95 * ln 4 + 0.05 * ln(4/3) = 1.33134...
    teacher = torch.tensor([[[2.0, -1.0], [-3.0, 0.5]]])
    student = torch.tensor([[[0.0, math.log(3)], [math.log(3), 0.0]]])
    loss = STLTokenLoss("argmax", smoothing=0.1)(student, teacher, (1, 2), (1, 2))
    expected = 0.95 * math.log(4) + 0.05 * math.log(4 / 3)
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_soft_ce_matches_timm():
    s, y = torch.randn(3, 5, 7), F.softmax(torch.randn(3, 5, 7), -1)
    ref = SoftTargetCrossEntropy()(s.reshape(-1, 7), y.reshape(-1, 7))
    assert token_soft_ce(s, y).item() == pytest.approx(ref.item(), abs=1e-6)


def test_softmax_labels_and_smoothing():
    t = torch.randn(2, 3, 5)
    y = make_token_labels(t, "softmax", tau=2.0, smoothing=0.0)
    torch.testing.assert_close(y, F.softmax(t / 2.0, -1))
    ys = make_token_labels(t, "softmax", tau=2.0, smoothing=0.2)
    torch.testing.assert_close(ys, 0.8 * y + 0.2 / 5)
    torch.testing.assert_close(ys.sum(-1), torch.ones(2, 3))


def test_gumbel_hard_labels_are_one_hot_and_unbiased():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    t = logits.expand(1, 20000, 4)
    g = torch.Generator().manual_seed(0)
    y = make_token_labels(t, "gumbel", tau=1.0, hard=True, smoothing=0.0, generator=g)
    assert set(y.unique().tolist()) == {0.0, 1.0}
    torch.testing.assert_close(y.sum(-1), torch.ones(1, 20000))
    # Gumbel-max: P(argmax = k) = softmax(logits)_k; 20000 draws -> std of a frequency <= 0.0035
    freq = y.mean(dim=(0, 1))
    torch.testing.assert_close(freq, F.softmax(logits, -1), atol=0.015, rtol=0)


def test_gumbel_soft_labels_are_distributions():
    y = make_token_labels(torch.randn(2, 8, 3), "gumbel", hard=False, smoothing=0.0)
    assert (y > 0).all() and not set(y.unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(y.sum(-1), torch.ones(2, 8))


def test_resize_keeps_constant_maps_and_matches_grid():
    t = torch.randn(2, 1, 3).expand(2, 4, 3).contiguous()  # same logits on every token of a 2x2 grid
    r = resize_token_logits(t, (2, 2), (4, 4))
    assert r.shape == (2, 16, 3)
    torch.testing.assert_close(r, t[:, :1].expand(2, 16, 3))
    assert resize_token_logits(t, (2, 2), (2, 2)) is t


def test_heterogeneous_grid_loss_runs():
    loss = STLTokenLoss()(torch.randn(2, 16, 3, requires_grad=True), torch.randn(2, 4, 3), (4, 4), (2, 2))
    loss.backward()
    assert torch.isfinite(loss)


def test_errors():
    with pytest.raises(ValueError, match="label_type 'hardmax'"):
        STLTokenLoss("hardmax")
    with pytest.raises(ValueError, match="tau"):
        STLTokenLoss(tau=0.0)
    with pytest.raises(ValueError, match="smoothing"):
        STLTokenLoss(smoothing=1.0)
    with pytest.raises(ValueError, match="predicts 5 classes but the student has 3"):
        STLTokenLoss()(torch.randn(1, 4, 3), torch.randn(1, 4, 5), (2, 2), (2, 2))
    with pytest.raises(ValueError, match="grid 3x3"):
        resize_token_logits(torch.randn(1, 4, 2), (3, 3), (2, 2))


def test_no_gradient_reaches_teacher_logits():
    t = torch.randn(1, 4, 3, requires_grad=True)
    s = torch.randn(1, 4, 3, requires_grad=True)
    STLTokenLoss("softmax")(s, t, (2, 2), (2, 2)).backward()
    assert t.grad is None and s.grad is not None


def test_default_smoothing_is_the_published_one_per_label_type():
    # NVlabs/STL token_label_generation: Gumbel / argmax labels are smoothed 0.9 / 0.1, softmax labels returned raw.
    t = torch.randn(2, 4, 5)
    torch.testing.assert_close(make_token_labels(t, "softmax"), F.softmax(t, -1))
    y = make_token_labels(t, "argmax")
    torch.testing.assert_close(y, F.one_hot(t.argmax(-1), 5).float() * 0.9 + 0.1 / 5)
    assert STLTokenLoss("softmax").smoothing == 0.0 and STLTokenLoss("gumbel").smoothing == 0.1
    assert STLTokenLoss("softmax", smoothing=0.2).smoothing == 0.2


def test_per_image_labels_average_the_tokens_of_both_sides():
    # teacher tokens average to logits (0, 2) -> argmax class 1 -> label (0, 1) without smoothing; the student's
    # tokens average to (0, 0) -> loss = -log softmax(0, 0)_1 = log 2, whatever the grids (2x2 vs 1x2).
    teacher = torch.tensor([[[0.0, 4.0], [0.0, 0.0], [0.0, 4.0], [0.0, 0.0]]])
    student = torch.tensor([[[1.0, -1.0], [-1.0, 1.0]]], requires_grad=True)
    loss = STLTokenLoss("argmax", smoothing=0.0, per_image=True)(student, teacher, (1, 2), (2, 2))
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
