"""iBOT patch loss: CE over masked tokens, averaged per image, then over the batch."""

import math

import pytest
import torch
import torch.nn.functional as F

from tokenlab.losses.ibot_patch import IBOTPatchLoss

LN3 = math.log(3.0)


def test_pinned_value() -> None:
    # B = 2, N = 2, K = 2. Image 0 masks token 0 only: teacher softmax (.75, .25), student softmax (.25, .75):
    # CE = -(.75 ln .25 + .25 ln .75) = 1.111642. Token 1 of image 0 is unmasked and must not count (its student
    # logits are extreme). Image 1 masks nothing and contributes 0. Loss = (1.111642 + 0) / 2 = 0.555821.
    ts, tt = 0.1, 0.04
    student = torch.tensor([[[0.0, LN3], [50.0, -50.0]], [[1.0, 2.0], [3.0, 4.0]]]) * ts
    teacher = torch.tensor([[[LN3, 0.0], [-50.0, 50.0]], [[0.0, 1.0], [2.0, 0.0]]]) * tt
    mask = torch.tensor([[True, False], [False, False]])
    loss = IBOTPatchLoss(out_dim=2, student_temp=ts)(student, teacher, mask, teacher_temp=tt)
    assert loss.item() == pytest.approx(0.555821, abs=1e-5)


def test_per_image_average_then_batch_mean() -> None:
    # image 0 masks 1 token with CE a, image 1 masks 3 tokens with CEs b1..b3: loss = (a + mean(b)) / 2,
    # not the mean over all 4 masked tokens.
    torch.manual_seed(1)
    student, teacher = torch.randn(2, 4, 5), torch.randn(2, 4, 5)
    mask = torch.tensor([[False, True, False, False], [True, True, True, False]])
    loss_fn = IBOTPatchLoss(out_dim=5, student_temp=0.1)
    loss = loss_fn(student, teacher, mask, teacher_temp=0.07)
    ce = -(F.softmax(teacher / 0.07, -1) * F.log_softmax(student / 0.1, -1)).sum(-1)
    expected = (ce[0, 1] + ce[1, :3].mean()) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert loss.item() != pytest.approx(ce[mask].mean().item(), rel=1e-3)


def test_no_masked_tokens_gives_finite_zero() -> None:
    student = torch.randn(3, 4, 6, requires_grad=True)
    loss = IBOTPatchLoss(out_dim=6)(student, torch.randn(3, 4, 6), torch.zeros(3, 4, dtype=torch.bool), 0.04)
    assert torch.isfinite(loss) and loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(student.grad).all()


def test_center_uses_every_teacher_token() -> None:
    loss_fn = IBOTPatchLoss(out_dim=3, center_momentum=0.9)
    loss_fn.center.center.copy_(torch.tensor([1.0, 2.0, 3.0]))
    teacher = torch.randn(2, 5, 3)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, 0] = True
    before = loss_fn.center.center.clone()
    loss = loss_fn(torch.randn(2, 5, 3), teacher, mask, teacher_temp=0.04)
    assert torch.isfinite(loss)
    expected = 0.9 * before + 0.1 * teacher.reshape(-1, 3).mean(0)
    assert torch.allclose(loss_fn.center.center, expected, atol=1e-6)


def test_teacher_probs_are_centered() -> None:
    loss_fn = IBOTPatchLoss(out_dim=2)
    loss_fn.center.center.copy_(torch.tensor([LN3 * 0.04, 0.0]))
    # (t - c) / 0.04 = (0, 0) -> uniform
    probs = loss_fn.teacher_probs(torch.tensor([[[LN3 * 0.04, 0.0]]]), teacher_temp=0.04)
    assert torch.allclose(probs, torch.tensor([[[0.5, 0.5]]]))


def test_no_gradient_reaches_the_teacher() -> None:
    student = torch.randn(2, 3, 4, requires_grad=True)
    teacher = torch.randn(2, 3, 4, requires_grad=True)
    mask = torch.ones(2, 3, dtype=torch.bool)
    IBOTPatchLoss(out_dim=4)(student, teacher, mask, 0.04).backward()
    assert teacher.grad is None and student.grad is not None


def test_errors() -> None:
    loss_fn = IBOTPatchLoss(out_dim=4)
    ok = torch.zeros(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="equal shape"):
        loss_fn(torch.randn(2, 3, 4), torch.randn(2, 2, 4), ok, 0.04)
    with pytest.raises(ValueError, match="bool tensor"):
        loss_fn(torch.randn(2, 3, 4), torch.randn(2, 3, 4), ok.float(), 0.04)
    with pytest.raises(ValueError, match="teacher_temp"):
        loss_fn(torch.randn(2, 3, 4), torch.randn(2, 3, 4), ok, -1.0)


def _dense_reference(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, tt: float, ts: float):
    """The loss as it was computed before ``forward_masked``: CE on every token, weighted by the mask."""
    ce = -(F.softmax(teacher / tt, -1) * F.log_softmax(student / ts, -1)).sum(-1)  # (B, N)
    w = mask.float()
    return ((ce * w).sum(1) / w.sum(1).clamp(min=1.0)).mean()


def test_forward_masked_equals_the_dense_computation_with_gradients() -> None:
    torch.manual_seed(3)
    student = torch.randn(4, 9, 16, requires_grad=True)
    teacher = torch.randn(4, 9, 16)
    mask = torch.rand(4, 9) < 0.4
    mask[2] = False  # an image without masked tokens contributes 0
    ref = _dense_reference(student, teacher, mask, 0.04, 0.1)
    (g_ref,) = torch.autograd.grad(ref, student)
    fn = IBOTPatchLoss(out_dim=16)
    masked = fn.forward_masked(student[mask], teacher, mask, teacher_temp=0.04)
    (g_masked,) = torch.autograd.grad(masked, student)
    torch.testing.assert_close(masked, ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(g_masked, g_ref, atol=1e-7, rtol=1e-5)
    # the center saw every teacher token, not only the masked ones
    torch.testing.assert_close(fn.center.center, 0.1 * teacher.reshape(-1, 16).mean(0))
    with pytest.raises(ValueError, match="masked tokens"):
        fn.forward_masked(student[:, 0], teacher, mask, teacher_temp=0.04)


def test_forward_masked_without_masked_tokens_is_zero() -> None:
    fn = IBOTPatchLoss(out_dim=5)
    student = torch.zeros(0, 5, requires_grad=True)
    loss = fn.forward_masked(student, torch.randn(2, 3, 5), torch.zeros(2, 3, dtype=torch.bool), 0.04)
    assert loss.item() == 0.0
    loss.backward()


def test_forward_sparse_matches_forward_masked() -> None:
    """Teacher rows at the mask plus the teacher sum give the loss and centre of the full teacher outputs."""
    torch.manual_seed(0)
    student, teacher = torch.randn(3, 6, 8), torch.randn(3, 6, 8)
    mask = torch.rand(3, 6) < 0.5
    full, sparse = IBOTPatchLoss(out_dim=8), IBOTPatchLoss(out_dim=8)
    ref = full.forward_masked(student[mask], teacher, mask, teacher_temp=0.04)
    got = sparse.forward_sparse(student[mask], teacher[mask], mask, 0.04, (teacher.reshape(-1, 8).sum(0), 18))
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(sparse.center.center, full.center.center)
    with pytest.raises(ValueError, match="needs teacher_sum"):
        sparse.forward_sparse(student[mask], teacher[mask], mask, 0.04)
    with pytest.raises(ValueError, match="teacher outputs of the"):
        sparse.forward_sparse(student[mask], teacher[:, 0], mask, 0.04, (teacher.sum((0, 1)), 18))
