"""Linear probe on cached features: learns separable data, chooses the lr on held-out training features."""

import pytest
import torch

from tokenlab.eval.knn import FeatureSet
from tokenlab.eval.linear import linear_probe, train_linear


def _blobs(n: int, seed: int, noise: float = 1.0) -> FeatureSet:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(4, 12, generator=torch.Generator().manual_seed(99)) * 3
    labels = torch.randint(0, 4, (n,), generator=g)
    return FeatureSet(centers[labels] + noise * torch.randn(n, 12, generator=g) + 10.0, labels, "cls")


def test_probe_learns_separable_features() -> None:
    result = linear_probe(_blobs(200, 0), _blobs(100, 1), lrs=(0.01, 0.1), epochs=20, batch_size=32)
    assert result.top1 > 0.95 and result.top5 == 1.0
    assert set(result.val_top1) == {0.01, 0.1} and result.lr in result.val_top1


def test_random_labels_stay_near_chance() -> None:
    train, test = _blobs(200, 0), _blobs(200, 1)
    train.labels = torch.randint(0, 4, (200,), generator=torch.Generator().manual_seed(5))
    result = linear_probe(train, test, lrs=(0.1,), epochs=10, batch_size=32)
    assert result.top1 < 0.45 and result.val_top1 == {}


def test_probe_standardises_features() -> None:
    data = _blobs(64, 2)
    probe = train_linear(data.features, data.labels, 4, lr=0.1, epochs=2, batch_size=16)
    assert torch.allclose(probe.mean, data.features.mean(0))
    assert probe(data.features).shape == (64, 4)


def test_errors() -> None:
    data = _blobs(20, 0)
    with pytest.raises(ValueError, match="at least one"):
        linear_probe(data, data, lrs=())
    with pytest.raises(ValueError, match="val_fraction"):
        linear_probe(data, data, val_fraction=1.0)
    with pytest.raises(ValueError, match="feature sizes differ"):
        linear_probe(data, FeatureSet(torch.zeros(3, 5), torch.zeros(3, dtype=torch.long), "cls"))
    with pytest.raises(ValueError, match="lr > 0"):
        train_linear(data.features, data.labels, 4, lr=0.0)
