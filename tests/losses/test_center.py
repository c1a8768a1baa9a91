"""Center: the running mean of teacher outputs, c <- m c + (1 - m) mean(t)."""

import pytest
import torch

from tokenlab.losses.center import Center


def test_update_follows_momentum_formula() -> None:
    center = Center(2, momentum=0.9)
    # batch mean of [[1, 3], [3, 5]] is [2, 4]; c = 0.9 * 0 + 0.1 * [2, 4] = [0.2, 0.4]
    center.update(torch.tensor([[1.0, 3.0], [3.0, 5.0]]))
    assert torch.allclose(center.center, torch.tensor([0.2, 0.4]))
    # c = 0.9 * [0.2, 0.4] + 0.1 * [0, 0] = [0.18, 0.36]
    center.update(torch.zeros(1, 2))
    assert torch.allclose(center.center, torch.tensor([0.18, 0.36]))


def test_update_averages_every_leading_axis() -> None:
    center = Center(3, momentum=0.0)
    x = torch.randn(2, 5, 4, 3)
    center.update(x)
    assert torch.allclose(center.center, x.reshape(-1, 3).mean(0), atol=1e-6)


def test_forward_subtracts_without_updating() -> None:
    center = Center(2, momentum=0.5)
    center.center.copy_(torch.tensor([1.0, -1.0]))
    out = center(torch.tensor([[2.0, 2.0]]))
    assert torch.equal(out, torch.tensor([[1.0, 3.0]]))
    assert torch.equal(center.center, torch.tensor([1.0, -1.0]))


def test_center_is_saved_in_state_dict() -> None:
    center = Center(4)
    center.update(torch.ones(2, 4))
    other = Center(4)
    other.load_state_dict(center.state_dict())
    assert torch.equal(other.center, center.center)


def test_update_takes_no_gradient() -> None:
    center = Center(2)
    x = torch.randn(3, 2, requires_grad=True)
    center.update(x)
    assert not center.center.requires_grad


@pytest.mark.parametrize(("dim", "momentum", "match"), [(0, 0.9, "dim"), (2, 1.5, "momentum"), (2, -0.1, "momentum")])
def test_bad_arguments(dim: int, momentum: float, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Center(dim, momentum)


def test_wrong_last_dim() -> None:
    with pytest.raises(ValueError, match="last axis"):
        Center(3).update(torch.zeros(2, 4))


def test_accumulate_then_apply_is_one_update() -> None:
    x = torch.randn(6, 5)
    once, accumulated = Center(5, momentum=0.7), Center(5, momentum=0.7)
    once.update(x)
    accumulated.accumulate(x[:2])
    accumulated.accumulate(x[2:])
    assert torch.equal(accumulated.center, torch.zeros(5))  # nothing moves before apply
    accumulated.apply_pending()
    torch.testing.assert_close(accumulated.center, once.center, atol=1e-6, rtol=0)
    accumulated.apply_pending()  # the pending rows were consumed: an empty step only decays the center
    torch.testing.assert_close(accumulated.center, 0.7 * once.center, atol=1e-6, rtol=0)


@pytest.mark.parametrize("loss_name", ["dino_cls", "ibot_patch"])
def test_two_micro_batches_give_the_centre_of_one_big_batch(loss_name: str) -> None:
    """Gradient accumulation 2 x B moves each iBOT centre once, exactly as one batch of 2 B (and the losses of the
    micro-batches use the same, not yet moved, centre)."""
    from tokenlab.losses.dino_cls import DINOClsLoss
    from tokenlab.losses.ibot_patch import IBOTPatchLoss

    torch.manual_seed(0)
    b, k = 4, 8
    if loss_name == "dino_cls":
        make = lambda: DINOClsLoss(k, center_momentum=0.9)  # noqa: E731
        student, teacher = torch.randn(4, 2 * b, k), torch.randn(2, 2 * b, k)
        args = lambda sl: (student[:, sl], teacher[:, sl])  # noqa: E731
    else:
        make = lambda: IBOTPatchLoss(k, center_momentum=0.9)  # noqa: E731
        student, teacher, mask = torch.randn(2 * b, 6, k), torch.randn(2 * b, 6, k), torch.rand(2 * b, 6) > 0.5
        args = lambda sl: (student[sl], teacher[sl], mask[sl])  # noqa: E731
    big, acc = make(), make()
    for loss in (big, acc):
        loss.center.center.copy_(torch.linspace(-1, 1, k))
    big(*args(slice(None)), teacher_temp=0.05)
    first = acc(*args(slice(0, b)), teacher_temp=0.05, apply_center=False)
    assert torch.equal(acc.center.center, torch.linspace(-1, 1, k))
    second = acc(*args(slice(b, 2 * b)), teacher_temp=0.05, apply_center=True)
    torch.testing.assert_close(acc.center.center, big.center.center, atol=1e-6, rtol=0)
    fresh = make()
    fresh.center.center.copy_(torch.linspace(-1, 1, k))
    second_alone = fresh(*args(slice(b, 2 * b)), teacher_temp=0.05, update_center=False)
    assert torch.isfinite(first) and torch.equal(second, second_alone)  # same pre-step centre for both halves


def test_module_apply_reaches_the_center() -> None:
    """``nn.Module.apply(fn)`` recurses into every submodule: the center must not shadow it."""
    seen: list[type] = []
    torch.nn.Sequential(Center(3)).apply(lambda m: seen.append(type(m)))
    assert Center in seen
