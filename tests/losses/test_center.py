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
