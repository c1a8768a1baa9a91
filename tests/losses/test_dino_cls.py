"""DINO/iBOT [CLS] loss: cross-entropy of every (teacher view, other student view) pair."""

import math

import pytest
import torch
import torch.nn.functional as F

from tokenlab.losses.dino_cls import DINOClsLoss

LN3 = math.log(3.0)


def _reference(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor, ts: float, tt: float) -> float:
    """Written from the formula with explicit loops: mean over pairs v != q of mean_b CE."""
    terms = []
    for q in range(teacher.shape[0]):
        p_t = F.softmax((teacher[q] - center) / tt, dim=-1)
        for v in range(student.shape[0]):
            if v == q:
                continue
            terms.append(-(p_t * F.log_softmax(student[v] / ts, dim=-1)).sum(-1).mean())
    return float(torch.stack(terms).mean())


def test_pinned_value() -> None:
    # B = 1, K = 2, 2 teacher views, 3 student views; logits are pre-multiplied by the temperatures so that
    # softmax(x / tau) has the hand-picked probabilities:
    #   student s0 -> (.5, .5), s1 -> (.25, .75), s2 -> (.75, .25);  teacher t0 -> (.5, .5), t1 -> (.75, .25)
    # pairs (t0,s1) = (t0,s2) = -(.5 ln .25 + .5 ln .75) = 0.836988; (t1,s0) = ln 2 = 0.693147;
    # (t1,s2) = -(.75 ln .75 + .25 ln .25) = 0.562335;  mean of the four = 0.732365
    ts, tt = 0.1, 0.04
    student = torch.tensor([[[0.0, 0.0]], [[0.0, LN3]], [[LN3, 0.0]]]) * ts
    teacher = torch.tensor([[[0.0, 0.0]], [[LN3, 0.0]]]) * tt
    loss = DINOClsLoss(out_dim=2, student_temp=ts)(student, teacher, teacher_temp=tt)
    assert loss.item() == pytest.approx(0.732365, abs=1e-5)


@pytest.mark.parametrize(("n_student", "n_teacher", "batch", "dim"), [(2, 2, 3, 5), (4, 2, 2, 7), (12, 2, 3, 16)])
@pytest.mark.parametrize("tt", [0.04, 0.07])
def test_matches_loop_reference_with_center(n_student: int, n_teacher: int, batch: int, dim: int, tt: float) -> None:
    loss_fn = DINOClsLoss(out_dim=dim, student_temp=0.1)
    loss_fn.center.center.copy_(torch.randn(dim))
    center = loss_fn.center.center.clone()
    student, teacher = torch.randn(n_student, batch, dim), torch.randn(n_teacher, batch, dim)
    loss = loss_fn(student, teacher, teacher_temp=tt)
    assert loss.item() == pytest.approx(_reference(student, teacher, center, 0.1, tt), rel=1e-5)


def test_center_moves_after_the_loss() -> None:
    loss_fn, fresh = DINOClsLoss(out_dim=3, center_momentum=0.9), DINOClsLoss(out_dim=3)
    student, teacher = torch.randn(3, 4, 3), torch.randn(2, 4, 3)
    loss = loss_fn(student, teacher, teacher_temp=0.04)
    assert torch.allclose(loss_fn.center.center, 0.1 * teacher.reshape(-1, 3).mean(0), atol=1e-6)
    # the step's loss used the center from before its own update (here: zero)
    assert loss.item() == pytest.approx(fresh(student, teacher, 0.04, update_center=False).item())
    before = loss_fn.center.center.clone()
    loss_fn(student, teacher, teacher_temp=0.04, update_center=False)
    assert torch.equal(loss_fn.center.center, before)


def test_no_gradient_reaches_the_teacher() -> None:
    student = torch.randn(4, 2, 6, requires_grad=True)
    teacher = torch.randn(2, 2, 6, requires_grad=True)
    DINOClsLoss(out_dim=6)(student, teacher, teacher_temp=0.04).backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_errors() -> None:
    loss_fn = DINOClsLoss(out_dim=4)
    with pytest.raises(ValueError, match=r"\(V_s, B, K\)"):
        loss_fn(torch.randn(2, 4), torch.randn(2, 2, 4), 0.04)
    with pytest.raises(ValueError, match="V_s >= max"):
        loss_fn(torch.randn(1, 2, 4), torch.randn(2, 2, 4), 0.04)
    with pytest.raises(ValueError, match="teacher_temp"):
        loss_fn(torch.randn(3, 2, 4), torch.randn(2, 2, 4), 0.0)
    with pytest.raises(ValueError, match="student_temp"):
        DINOClsLoss(out_dim=4, student_temp=0)
