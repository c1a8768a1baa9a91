"""[CLS] cross-view self-distillation loss of DINO / iBOT.

The teacher sees the global crops, the student sees every crop (global + local). Each teacher view ``q`` is the
target of every *other* student view ``v`` (the view pairs with ``v == q`` are left out; iBOT learns those through
the patch loss instead). With centered, sharpened teacher probabilities and student log-probabilities

    P_t(q) = softmax((t_q - c) / tau_t),   log P_s(v) = log_softmax(s_v / tau_s)

the loss is the cross-entropy averaged over images and over the view pairs:

    L_cls = (1 / |pairs|) sum_{(q, v), v != q} -(1 / B) sum_b sum_k P_t(q)_bk * log P_s(v)_bk

Then the center is moved toward the mean of the teacher outputs (``tokenlab.losses.center``). The teacher
temperature is a forward argument (iBOT warms it 0.04 -> 0.07 over 30 epochs; the schedule lives in the method).

- [0]: DINO: Emerging Properties in Self-Supervised Vision Transformers, 2021, https://arxiv.org/abs/2104.14294
- [1]: iBOT: Image BERT Pre-Training with Online Tokenizer, 2021, https://arxiv.org/abs/2111.07832
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokenlab.losses.center import CenteredTeacherLoss

__all__ = ["DINOClsLoss"]


class DINOClsLoss(CenteredTeacherLoss):
    """Cross-view [CLS] distillation with a centered, sharpened teacher.

    Args:
        out_dim: K, the number of prototypes of the projection head.
        student_temp: tau_s (iBOT: 0.1).
        center_momentum: Momentum of the [CLS] center (iBOT: 0.9).

    Raises:
        ValueError: a non-positive temperature (here or in ``forward``).

    Examples:
        >>> loss_fn = DINOClsLoss(out_dim=8)
        >>> student, teacher = torch.randn(4, 2, 8), torch.randn(2, 2, 8)
        >>> loss = loss_fn(student, teacher, teacher_temp=0.04)
    """

    def forward(
        self,
        student_out: torch.Tensor,
        teacher_out: torch.Tensor,
        teacher_temp: float,
        update_center: bool = True,
        apply_center: bool = True,
    ) -> torch.Tensor:
        """Compute ``L_cls`` and (by default) update the center.

        Args:
            student_out: (V_s, B, K) student head outputs; the first V_t views are the teacher's views, in order.
            teacher_out: (V_t, B, K) teacher head outputs on the global views (no gradient flows into them).
            teacher_temp: tau_t for this step.
            update_center: Add this batch to the center statistics after computing the loss (off to evaluate
                without side effects).
            apply_center: Move the center now (the last micro-batch of an optimizer step); False only accumulates.

        Returns:
            Scalar loss (float32).

        Raises:
            ValueError: bad ranks, mismatched B or K, more teacher than student views, or fewer than 2 views.
        """
        if student_out.ndim != 3 or teacher_out.ndim != 3:
            raise ValueError(
                f"expected student (V_s, B, K) and teacher (V_t, B, K); got {tuple(student_out.shape)} and "
                f"{tuple(teacher_out.shape)}"
            )
        n_student, n_teacher = student_out.shape[0], teacher_out.shape[0]
        if student_out.shape[1:] != teacher_out.shape[1:]:
            raise ValueError(f"student {tuple(student_out.shape)} and teacher {tuple(teacher_out.shape)} differ in B/K")
        if n_teacher > n_student or n_student < 2:
            raise ValueError(f"need V_s >= max(2, V_t) views, got V_s={n_student}, V_t={n_teacher}")
        targets = self.teacher_probs(teacher_out.detach(), teacher_temp)  # (V_t, B, K)
        log_probs = F.log_softmax(student_out.float() / self.student_temp, dim=-1)  # (V_s, B, K)
        # (V_t, B, K) x (V_s, B, K) -> (V_t, V_s): mean over B of the cross-entropy of every (teacher, student) pair
        pair_ce = -torch.einsum("qbk,vbk->qv", targets, log_probs) / student_out.shape[1]
        keep = ~torch.eye(n_teacher, n_student, dtype=torch.bool, device=pair_ce.device)
        loss = pair_ce[keep].mean()
        if update_center:
            self.accumulate_center(teacher_out, apply=apply_center)
        return loss
