"""Supervised classification (the baseline FAN): cross-entropy on the class token.

Loss: ``L = CE(f(x_mix), y_mix)`` where ``x_mix, y_mix`` come from Mixup/CutMix (timm ``Mixup``) with label
smoothing folded into the soft target, or the plain smoothed CE when mixing is off:

    y_mix = lam * smooth(y_a) + (1 - lam) * smooth(y_b),   smooth(y) = (1 - eps) * one_hot(y) + eps / K
    CE(z, y) = -sum_k y_k log softmax(z)_k

The same ``ClassTargets`` helper makes the class targets of the STL methods (``tokenlab.methods.stl``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.data import Mixup
from torch import nn

from tokenlab.methods import Method, StepContext, register_method

__all__ = ["ClassTargets", "Supervised", "soft_cross_entropy"]


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``-sum_k target_k log softmax(logits)_k``; ``target`` is (B, K) soft or (B,) hard."""
    if target.ndim == 1:
        return F.cross_entropy(logits.float(), target)
    return -(target * F.log_softmax(logits.float(), dim=-1)).sum(dim=-1).mean()


class ClassTargets:
    """Mixup/CutMix of images + class targets, with label smoothing.

    Args:
        num_classes: K.
        label_smoothing: eps of the class targets.
        mixup_alpha: Beta(alpha, alpha) of Mixup; 0 turns Mixup off.
        cutmix_alpha: Beta(alpha, alpha) of CutMix; 0 turns CutMix off.
        mix_prob: Probability of mixing a batch at all.
        switch_prob: Probability of CutMix instead of Mixup when both are on.

    The mixing draws come from timm's ``Mixup`` (numpy's global RNG, which the engine checkpoints).
    """

    def __init__(
        self,
        num_classes: int,
        label_smoothing: float = 0.0,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        mix_prob: float = 1.0,
        switch_prob: float = 0.5,
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if mixup_alpha < 0 or cutmix_alpha < 0:
            raise ValueError(f"mixup_alpha and cutmix_alpha must be >= 0, got {mixup_alpha}, {cutmix_alpha}")
        if not 0.0 <= mix_prob <= 1.0 or not 0.0 <= switch_prob <= 1.0:
            raise ValueError(f"mix_prob and switch_prob must be in [0, 1], got {mix_prob}, {switch_prob}")
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing
        self.mixup: Mixup | None = None
        if (mixup_alpha > 0 or cutmix_alpha > 0) and mix_prob > 0:
            self.mixup = Mixup(
                mixup_alpha=mixup_alpha,
                cutmix_alpha=cutmix_alpha,
                prob=mix_prob,
                switch_prob=switch_prob,
                label_smoothing=label_smoothing,
                num_classes=num_classes,
            )

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(images, targets (B, K))``; images are mixed in a copy, never in place on the caller's batch."""
        if self.mixup is not None:
            if images.shape[0] % 2:
                raise ValueError(f"Mixup/CutMix needs an even batch size, got {images.shape[0]}")
            return self.mixup(images.clone(), labels)
        off = self.label_smoothing / self.num_classes
        targets = torch.full((labels.shape[0], self.num_classes), off, device=labels.device)
        return images, targets.scatter_(1, labels.unsqueeze(1), 1.0 - self.label_smoothing + off)


@register_method("supervised")
class Supervised(Method):
    """Plain supervised training: ``CE(model(x_mix), y_mix)``.

    Args:
        model: A classifier (for a token model its ``forward`` is the official combined rule; the baseline uses a
            plain FAN).
        num_classes: K (defaults to ``model.num_classes``).
        label_smoothing, mixup_alpha, cutmix_alpha, mix_prob, switch_prob: see ``ClassTargets``.
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int | None = None,
        label_smoothing: float = 0.1,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        mix_prob: float = 1.0,
        switch_prob: float = 0.5,
    ) -> None:
        super().__init__(model)
        k = num_classes or int(getattr(model, "num_classes", 0))
        self.targets = ClassTargets(k, label_smoothing, mixup_alpha, cutmix_alpha, mix_prob, switch_prob)

    def training_step(self, batch: dict[str, Any], ctx: StepContext) -> dict[str, torch.Tensor]:
        """Soft-target cross-entropy of one micro-batch (after mixup / cutmix)."""
        images, targets = self.targets(batch["image"], batch["label"])
        loss = soft_cross_entropy(self.model(images), targets)
        return {"loss": loss, "ce": loss.detach()}
