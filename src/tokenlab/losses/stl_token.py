"""Token-label loss of STL stage 2 (Self-emerging Token Labeling).

- [0] Zhao et al., "Fully Attentional Networks with Self-emerging Token Labeling", ICCV 2023.
  https://arxiv.org/abs/2401.03844

A frozen token labeler (stage 1) gives per-token logits ``t`` on the teacher view; the student's ``aux_head`` gives
per-token logits ``s`` on the student view. Token labels are made from the teacher logits, then smoothed:

    y_hat = GumbelSoftmax(t, tau, hard)  |  softmax(t / tau)  |  one_hot(argmax t)
    y     = (1 - eps) * y_hat + eps / K

with the published defaults ``eps = 0.1`` for the Gumbel and argmax labels and ``eps = 0`` for the softmax ablation
(NVlabs/STL ``--softmax-token-label`` returns the raw ``softmax(t)``: no temperature, no smoothing; ``tau = 1`` here).

and the loss is the token-averaged soft cross-entropy (all tokens kept, background included):

    L_tok = -(1 / (B N)) sum_b sum_i sum_k y_bik * log softmax(s_bi)_k

When the teacher's token grid (H', W') differs from the student's (H, W) (heterogeneous labelers, other stems or
resolutions), the teacher logits are resized to the student grid by bilinear interpolation before labelling.

Single-token-label ablation (``per_image=True``, NVlabs/STL ``--single-token-label``): the teacher logits are
averaged over tokens into one label per image, ``y_b = label((1/M) sum_j t_bj)``, and the student's token logits are
averaged likewise: ``L = -(1/B) sum_b sum_k y_bk log softmax((1/N) sum_i s_bi)_k``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DEFAULT_TOKEN_SMOOTHING", "LABEL_TYPES", "STLTokenLoss", "make_token_labels", "resize_token_logits"]

LABEL_TYPES = ("gumbel", "softmax", "argmax")
#: Published token-label smoothing per label type (NVlabs/STL ``token_label_generation``): the soft labels of the
#: softmax ablation are returned unsmoothed.
DEFAULT_TOKEN_SMOOTHING = {"gumbel": 0.1, "argmax": 0.1, "softmax": 0.0}


def resize_token_logits(logits: torch.Tensor, grid: Sequence[int], target_grid: Sequence[int]) -> torch.Tensor:
    """Bilinearly resize token logits ``(B, H'W', K)`` on ``grid`` to ``(B, HW, K)`` on ``target_grid``."""
    (h, w), (th, tw) = tuple(grid), tuple(target_grid)
    B, N, K = logits.shape
    if N != h * w:
        raise ValueError(f"token logits have {N} tokens but the grid {h}x{w} has {h * w}")
    if (h, w) == (th, tw):
        return logits
    maps = logits.transpose(1, 2).reshape(B, K, h, w)  # (B, N, K) -> (B, K, H', W')
    maps = F.interpolate(maps.float(), size=(th, tw), mode="bilinear", align_corners=False)
    return maps.flatten(2).transpose(1, 2).to(logits.dtype)  # (B, K, H, W) -> (B, HW, K)


def make_token_labels(
    teacher_logits: torch.Tensor,
    label_type: str = "gumbel",
    tau: float = 1.0,
    hard: bool = True,
    smoothing: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Turn teacher token logits ``(B, N, K)`` into smoothed token labels ``(B, N, K)`` (rows sum to 1).

    Args:
        teacher_logits: (B, N, K) labeler logits, already on the student's grid.
        label_type: ``"gumbel"`` (Gumbel-softmax sample), ``"softmax"`` (``softmax(t / tau)``) or ``"argmax"``.
        tau: Temperature of the Gumbel-softmax / softmax.
        hard: For ``"gumbel"``: one-hot of the sample (the paper's choice) instead of the relaxed sample.
        smoothing: Label smoothing ``eps``: ``y = (1 - eps) * y_hat + eps / K``; None: the published value of the
            label type (``DEFAULT_TOKEN_SMOOTHING``: 0.1, and 0 for ``"softmax"``).
        generator: Optional generator for the Gumbel noise (default: the global torch RNG).

    Raises:
        ValueError: unknown ``label_type`` or a value out of range.
    """
    if label_type not in LABEL_TYPES:
        raise ValueError(f"unknown token label_type {label_type!r}; valid: {', '.join(LABEL_TYPES)}")
    if tau <= 0:
        raise ValueError(f"token label temperature tau must be > 0, got {tau}")
    if smoothing is None:
        smoothing = DEFAULT_TOKEN_SMOOTHING[label_type]
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"token label smoothing must be in [0, 1), got {smoothing}")
    t = teacher_logits.float()
    K = t.shape[-1]
    if label_type == "gumbel":
        u = torch.rand(t.shape, generator=generator, device=t.device, dtype=t.dtype)
        u = u.clamp(1e-20, 1.0 - 1e-7)
        gumbel = -torch.log(-torch.log(u))  # Gumbel(0, 1) noise
        soft = F.softmax((t + gumbel) / tau, dim=-1)
        y = F.one_hot(soft.argmax(dim=-1), K).to(t.dtype) if hard else soft
    elif label_type == "softmax":
        y = F.softmax(t / tau, dim=-1)
    elif label_type == "argmax":
        y = F.one_hot(t.argmax(dim=-1), K).to(t.dtype)
    else:
        raise AssertionError(label_type)
    return y * (1.0 - smoothing) + smoothing / K


class STLTokenLoss(nn.Module):
    """Token-averaged soft cross-entropy between student token logits and labels from a frozen labeler.

    ``L = -(1/(B N)) sum_{b,i,k} y_bik log softmax(s_bi)_k`` with ``y = make_token_labels(resize(t))``.

    Args:
        label_type: ``"gumbel" | "softmax" | "argmax"`` (paper default ``"gumbel"``).
        tau: Gumbel / softmax temperature (paper: 1).
        hard: Hard (one-hot) Gumbel labels (paper: True).
        smoothing: Label smoothing of token labels; None (default): the published value of the label type
            (0.1, i.e. 0.9 / 0.1, for Gumbel and argmax labels; 0 for the raw softmax labels).
        per_image: Single-token-label ablation: one label per image from the token-averaged teacher logits, learnt
            by the token-averaged student logits (default off, as published).

    Raises:
        ValueError: bad option, or teacher and student class counts differ.
    """

    def __init__(
        self,
        label_type: str = "gumbel",
        tau: float = 1.0,
        hard: bool = True,
        smoothing: float | None = None,
        per_image: bool = False,
    ) -> None:
        super().__init__()
        make_token_labels(torch.zeros(1, 1, 2), label_type, tau, hard, smoothing)  # validates the options
        self.label_type, self.tau, self.hard, self.per_image = label_type, tau, hard, per_image
        self.smoothing = DEFAULT_TOKEN_SMOOTHING[label_type] if smoothing is None else smoothing

    def labels(
        self, teacher_logits: torch.Tensor, teacher_grid: Sequence[int], student_grid: Sequence[int]
    ) -> torch.Tensor:
        """Token labels ``(B, H*W, K)`` on the student grid (``(B, 1, K)`` with ``per_image``); no gradient."""
        with torch.no_grad():
            if self.per_image:
                t = teacher_logits.detach().mean(dim=1, keepdim=True)  # (B, M, K) -> (B, 1, K)
            else:
                t = resize_token_logits(teacher_logits.detach(), teacher_grid, student_grid)
            return make_token_labels(t, self.label_type, self.tau, self.hard, self.smoothing)

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        student_grid: Sequence[int],
        teacher_grid: Sequence[int],
    ) -> torch.Tensor:
        """Args: student_logits (B, N, K); teacher_logits (B, M, K); grids (H, W) with N = H*W, M = H'*W'.

        Returns: the scalar loss.
        """
        if student_logits.shape[-1] != teacher_logits.shape[-1]:
            raise ValueError(
                f"token labeler predicts {teacher_logits.shape[-1]} classes but the student has "
                f"{student_logits.shape[-1]}; train the labeler on the same data set (same classes)"
            )
        if student_logits.shape[0] != teacher_logits.shape[0]:
            raise ValueError(
                f"batch sizes differ: student {student_logits.shape[0]}, teacher {teacher_logits.shape[0]}"
            )
        y = self.labels(teacher_logits, teacher_grid, student_grid)
        if self.per_image:
            student_logits = student_logits.mean(dim=1, keepdim=True)  # (B, N, K) -> (B, 1, K)
        return token_soft_ce(student_logits, y)


def token_soft_ce(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``-(1/(B N)) sum y * log_softmax(s)`` for logits and labels of shape (B, N, K)."""
    logp = F.log_softmax(student_logits.float(), dim=-1)
    return -(labels * logp).sum(dim=-1).mean()
