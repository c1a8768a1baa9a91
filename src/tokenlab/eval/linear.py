"""Linear probe on cached frozen features (the second standard SSL evaluation).

The backbone stays frozen; its features are extracted once (``tokenlab.eval.knn.extract_features``, kinds
``cls``, ``cls_avgpool``, ``last4_cls``, ...). The probe standardises each feature with the training mean and std
(a BatchNorm without affine parameters, as in DINO/iBOT's linear evaluation) and trains one linear layer with
softmax cross-entropy, SGD (momentum 0.9) and a cosine learning-rate schedule:

    z = (f - mu) / sigma,   logits = W z + b,   L = -(1/B) sum_b log softmax(logits_b)_{y_b}

The learning rate is picked from a small grid on a held-out part of the training features (never on the test
split), then the probe is retrained on every training feature with that rate and evaluated once on the test split.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tokenlab.eval.knn import FeatureSet

__all__ = ["LinearResult", "linear_probe", "train_linear"]

logger = logging.getLogger(__name__)


@dataclass
class LinearResult:
    """Linear-probe accuracy.

    Attributes:
        top1: Top-1 accuracy on the test features, in [0, 1].
        top5: Top-5 accuracy (1 with 5 classes or fewer).
        lr: Learning rate chosen on the held-out training features.
        val_top1: Held-out accuracy of every tried learning rate.
        epochs: Training epochs over the cached features.
    """

    top1: float
    top5: float
    lr: float
    val_top1: dict[float, float] = field(default_factory=dict)
    epochs: int = 0


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    ranked = logits.topk(min(5, logits.shape[1]), dim=1).indices
    top1 = (ranked[:, 0] == labels).float().mean().item()
    top5 = (ranked == labels.unsqueeze(1)).any(dim=1).float().mean().item()
    return top1, top5


def train_linear(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    lr: float,
    epochs: int = 100,
    batch_size: int = 256,
    weight_decay: float = 0.0,
    seed: int = 0,
) -> nn.Module:
    """Train ``Linear(D, C)`` on standardised ``features`` (N, D); returns a module that standardises then projects.

    Raises:
        ValueError: non-positive lr/epochs/batch size or mismatched lengths.
    """
    if lr <= 0 or epochs < 1 or batch_size < 1:
        raise ValueError(f"need lr > 0, epochs >= 1, batch_size >= 1; got {lr}, {epochs}, {batch_size}")
    if features.shape[0] != labels.shape[0]:
        raise ValueError(f"{features.shape[0]} features but {labels.shape[0]} labels")
    g = torch.Generator().manual_seed(seed)
    mean, std = features.mean(dim=0), features.std(dim=0).clamp(min=1e-6)
    z = (features - mean) / std
    linear = nn.Linear(features.shape[1], num_classes)
    with torch.no_grad():
        linear.weight.normal_(0.0, 0.01, generator=g)
        linear.bias.zero_()
    opt = torch.optim.SGD(linear.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    n = features.shape[0]
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    step = 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=g)
        for i in range(0, n, batch_size):
            idx = order[i : i + batch_size]
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * step / total))
            loss = F.cross_entropy(linear(z[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    return _Standardised(mean, std, linear)


class _Standardised(nn.Module):
    def __init__(self, mean: torch.Tensor, std: torch.Tensor, linear: nn.Linear) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear((x - self.mean) / self.std)


@torch.no_grad()
def _evaluate(probe: nn.Module, data: FeatureSet) -> tuple[float, float]:
    return _accuracy(probe(data.features.float()), data.labels)


def linear_probe(
    train: FeatureSet,
    test: FeatureSet,
    lrs: Sequence[float] = (0.01, 0.03, 0.1, 0.3),
    epochs: int = 100,
    batch_size: int = 256,
    weight_decay: float = 0.0,
    val_fraction: float = 0.1,
    num_classes: int | None = None,
    seed: int = 0,
) -> LinearResult:
    """Pick the lr on held-out training features, retrain on all of them, report test accuracy.

    Args:
        train: Cached training features.
        test: Cached test features (used once, at the end).
        lrs: Learning rates tried (one rate skips the selection).
        epochs: Epochs over the cached features.
        batch_size: Mini-batch size.
        weight_decay: L2 penalty of the SGD optimizer.
        val_fraction: Share of the training features held out for choosing the lr.
        num_classes: C (defaults to ``max label + 1``).
        seed: Seeds the split, the initialisation and the shuffling.

    Raises:
        ValueError: an empty lr grid, ``val_fraction`` outside (0, 1), or feature sizes that differ.
    """
    if not lrs:
        raise ValueError("lrs must hold at least one learning rate")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if train.features.shape[1] != test.features.shape[1]:
        raise ValueError(f"feature sizes differ: train {train.features.shape[1]}, test {test.features.shape[1]}")
    classes = int(num_classes or int(max(train.labels.max(), test.labels.max())) + 1)
    x, y = train.features.float(), train.labels
    val_top1: dict[float, float] = {}
    if len(lrs) > 1:
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed + 1))
        n_val = max(1, int(round(val_fraction * len(y))))
        val_idx, fit_idx = order[:n_val], order[n_val:]
        held_out = FeatureSet(x[val_idx], y[val_idx], train.kind)
        for lr in lrs:
            probe = train_linear(x[fit_idx], y[fit_idx], classes, lr, epochs, batch_size, weight_decay, seed)
            val_top1[float(lr)] = _evaluate(probe, held_out)[0]
            logger.info("linear probe lr %g: held-out top-1 %.4f", lr, val_top1[float(lr)])
        best = max(val_top1, key=lambda k: val_top1[k])
    else:
        best = float(lrs[0])
    probe = train_linear(x, y, classes, best, epochs, batch_size, weight_decay, seed)
    top1, top5 = _evaluate(probe, test)
    return LinearResult(top1, top5, best, val_top1, epochs)
