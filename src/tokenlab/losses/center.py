"""Teacher-output centering shared by the iBOT [CLS] and patch losses.

DINO [0] and iBOT [1] keep a running mean ``c`` of the teacher's projection outputs and subtract it before the
teacher softmax. Centering stops one prototype from dominating; the low teacher temperature (sharpening) stops the
output from becoming uniform. The two together are the only thing that prevents collapse, so the center follows
its definition exactly:

    c <- m * c + (1 - m) * (1 / R) sum_r t_r

where ``t_r`` are all teacher output rows of the optimizer step (every view, image and, for patches, token, of
every micro-batch) over every process, and ``m`` is the center momentum (iBOT: 0.9). With gradient accumulation the
rows of each micro-batch are summed (``accumulate``) and the EMA is applied once, at the step's last micro-batch
(``apply_pending``), so k micro-batches of B give the center of one batch of k B. iBOT keeps separate centers for
[CLS] and patch outputs; each loss owns one ``Center``.

Reductions over processes go through ``tokenlab.utils.distributed`` and are no-ops in one process.

- [0]: DINO: Emerging Properties in Self-Supervised Vision Transformers, 2021, https://arxiv.org/abs/2104.14294
- [1]: iBOT: Image BERT Pre-Training with Online Tokenizer, 2021, https://arxiv.org/abs/2111.07832
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokenlab.utils.distributed import all_reduce_sum

__all__ = ["Center", "CenteredTeacherLoss"]


class Center(nn.Module):
    """Exponential moving average of the teacher outputs, subtracted before the teacher softmax.

    Args:
        dim: K, the size of the last axis of the outputs.
        momentum: m in ``c <- m c + (1 - m) mean(t)``; 0 uses only the current batch, 1 freezes the center.

    Attributes:
        center: (K,) float32 buffer, saved in ``state_dict`` so a resumed run continues with the same center.

    Raises:
        ValueError: ``dim < 1`` or ``momentum`` outside [0, 1].

    Examples:
        >>> center = Center(4, momentum=0.5)
        >>> center.update(torch.ones(3, 4))
        >>> center.center.tolist()
        [0.5, 0.5, 0.5, 0.5]
    """

    center: torch.Tensor

    def __init__(self, dim: int, momentum: float = 0.9) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"center dim must be >= 1, got {dim}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"center momentum must be in [0, 1], got {momentum}")
        self.dim = dim
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(dim))
        # Row sums and row count of the current optimizer step's micro-batches so far (this process only). A plain
        # attribute, not a buffer: DDP would broadcast rank 0's buffer over the other ranks' own sums, and nothing is
        # pending when a checkpoint is written (between optimizer steps).
        self._pending: torch.Tensor | None = None

    def extra_repr(self) -> str:
        """The settings shown by ``repr``."""
        return f"dim={self.dim}, momentum={self.momentum}"

    def forward(self, teacher_out: torch.Tensor) -> torch.Tensor:
        """``teacher_out - c`` in float32; ``teacher_out`` is (..., K)."""
        self._check(teacher_out)
        return teacher_out.float() - self.center

    @torch.no_grad()
    def accumulate(self, teacher_out: torch.Tensor, apply: bool = False) -> None:
        """Add the rows of one micro-batch's ``teacher_out`` (..., K) to the pending statistics.

        ``apply``: then move the center (``apply_pending``); otherwise no EMA yet.
        """
        self._check(teacher_out)
        rows = teacher_out.detach().float().reshape(-1, self.dim)  # (..., K) -> (R, K)
        self.accumulate_sum(rows.sum(dim=0), rows.shape[0], apply)

    @torch.no_grad()
    def accumulate_sum(self, row_sum: torch.Tensor, rows: int, apply: bool = False) -> None:
        """Add ``rows`` teacher rows given by their sum ``row_sum`` (K,) to the pending statistics.

        ``apply``: then move the center (``apply_pending``); otherwise no EMA yet. For callers that have the sum
        without the rows (iBOT's patch head sums before its linear prototype layer).
        """
        self._check(row_sum)
        sums = torch.cat([row_sum.detach().float().reshape(self.dim), row_sum.new_tensor([rows], dtype=torch.float32)])
        self._pending = sums if self._pending is None else self._pending + sums.to(self._pending.device)
        if apply:
            self.apply_pending()

    @torch.no_grad()
    def apply_pending(self) -> None:
        """``c <- m c + (1 - m) mean(pending rows over every process)``, then clear the pending rows.

        A collective under ``torch.distributed``: every rank calls it once per optimizer step.
        """
        pending = self._pending if self._pending is not None else self.center.new_zeros(self.dim + 1)
        self._pending = None
        total = all_reduce_sum(pending.to(self.center.device))
        mean = total[:-1] / total[-1].clamp(min=1.0)
        self.center.mul_(self.momentum).add_(mean, alpha=1.0 - self.momentum)

    @torch.no_grad()
    def update(self, teacher_out: torch.Tensor) -> None:
        """``c <- m c + (1 - m) mean(teacher_out)`` (in place): ``accumulate`` then ``apply_pending``."""
        self.accumulate(teacher_out, apply=True)

    def _check(self, teacher_out: torch.Tensor) -> None:
        if teacher_out.shape[-1] != self.dim:
            raise ValueError(f"teacher output has {teacher_out.shape[-1]} dims on its last axis; center has {self.dim}")


class CenteredTeacherLoss(nn.Module):
    """Base of the DINO-[CLS] and iBOT-patch losses: a student temperature and a centered, sharpened teacher.

    Args:
        out_dim: K, the number of prototypes of the projection head.
        student_temp: tau_s (iBOT: 0.1).
        center_momentum: Momentum of this loss's own center (iBOT: 0.9).

    Raises:
        ValueError: a non-positive temperature (here or in ``teacher_probs``).
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        if student_temp <= 0:
            raise ValueError(f"student_temp must be > 0, got {student_temp}")
        self.student_temp = student_temp
        self.center = Center(out_dim, center_momentum)

    @torch.no_grad()
    def accumulate_center(self, teacher_out: torch.Tensor, apply: bool = True) -> None:
        """Add ``teacher_out`` to this optimizer step's center statistics; move the center when ``apply``.

        Pass ``apply=StepContext.last_micro_batch`` so the EMA moves once per optimizer step.
        """
        self.center.accumulate(teacher_out, apply)

    @torch.no_grad()
    def teacher_probs(self, teacher_out: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """``softmax((t - c) / tau_t)`` over the last axis, float32."""
        if teacher_temp <= 0:
            raise ValueError(f"teacher_temp must be > 0, got {teacher_temp}")
        return F.softmax(self.center(teacher_out) / teacher_temp, dim=-1)
