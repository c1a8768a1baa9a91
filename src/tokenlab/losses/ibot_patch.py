"""iBOT masked-patch self-distillation loss (masked image modelling with an online tokenizer).

The student sees a global crop with some patches replaced by the mask token; the teacher (the online tokenizer)
sees the same crop unmasked. For every masked patch ``i`` of image ``b`` the student predicts the teacher's
centered, sharpened distribution over prototypes. The loss is averaged over the masked patches of each image,
then over the images (an image without masked patches contributes 0, as in iBOT):

    L_mim = -(1 / B) sum_b (1 / max(1, |M_b|)) sum_{i in M_b} sum_k softmax((t_bi - c) / tau_t)_k
                                                                    * log softmax(s_bi / tau_s)_k

The center ``c`` (separate from the [CLS] center) moves toward the mean of *all* teacher patch outputs of the step,
masked or not. ``B`` counts every (view, image) pair, so pass the global views stacked along the batch axis.

- [0]: iBOT: Image BERT Pre-Training with Online Tokenizer, 2021, https://arxiv.org/abs/2111.07832
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokenlab.losses.center import CenteredTeacherLoss

__all__ = ["IBOTPatchLoss"]


class IBOTPatchLoss(CenteredTeacherLoss):
    """Masked-token distillation from the teacher's patch outputs to the student's.

    Args:
        out_dim: K, the number of prototypes of the patch head.
        student_temp: tau_s (iBOT: 0.1).
        center_momentum: Momentum of the patch center (iBOT: 0.9).

    Raises:
        ValueError: a non-positive temperature (here or in ``forward``).

    Examples:
        >>> loss_fn = IBOTPatchLoss(out_dim=8)
        >>> s, t = torch.randn(2, 4, 8), torch.randn(2, 4, 8)
        >>> mask = torch.tensor([[True, False, False, True], [False, False, False, False]])
        >>> loss = loss_fn(s, t, mask, teacher_temp=0.04)
    """

    def forward(
        self,
        student_out: torch.Tensor,
        teacher_out: torch.Tensor,
        mask: torch.Tensor,
        teacher_temp: float,
        update_center: bool = True,
        apply_center: bool = True,
    ) -> torch.Tensor:
        """Compute ``L_mim`` and (by default) update the patch center.

        Args:
            student_out: (B, N, K) student patch-head outputs on the masked crops.
            teacher_out: (B, N, K) teacher patch-head outputs on the same crops, unmasked.
            mask: (B, N) bool, True where the student's patch was masked.
            teacher_temp: tau_t for this step.
            update_center: Add this batch to the patch center statistics after computing the loss.
            apply_center: Move the center now (the last micro-batch of an optimizer step); False only accumulates.

        Returns:
            Scalar loss (float32).

        Raises:
            ValueError: shapes that disagree or a non-boolean mask.
        """
        if student_out.ndim != 3 or student_out.shape != teacher_out.shape:
            raise ValueError(
                f"expected student and teacher outputs of equal shape (B, N, K); got {tuple(student_out.shape)} and "
                f"{tuple(teacher_out.shape)}"
            )
        _check_mask(mask, student_out.shape[:2])
        return self.forward_masked(student_out[mask], teacher_out, mask, teacher_temp, update_center, apply_center)

    def forward_masked(
        self,
        student_masked: torch.Tensor,
        teacher_out: torch.Tensor,
        mask: torch.Tensor,
        teacher_temp: float,
        update_center: bool = True,
        apply_center: bool = True,
    ) -> torch.Tensor:
        """``L_mim`` from the student outputs of the masked tokens only (the same value as ``forward``).

        The loss reads the student only where ``mask`` is True, so its projection head need not run elsewhere
        (in iBOT about 70-90 % of the patch tokens are not masked). The center moves toward the mean of all the
        teacher outputs given.

        Args:
            student_masked: (M, K) student patch outputs at ``mask``'s True entries, in row-major order
                (``student_out[mask]``), ``M = mask.sum()``.
            teacher_out: (B, N, K) teacher patch outputs on the unmasked crops.
            mask: (B, N) bool.
            teacher_temp: tau_t for this step.
            update_center: Add this batch to the patch center statistics after computing the loss.
            apply_center: Move the center now (the last micro-batch of an optimizer step); False only accumulates.

        Returns:
            Scalar loss (float32).

        Raises:
            ValueError: shapes that disagree or a non-boolean mask.
        """
        if teacher_out.ndim != 3:
            raise ValueError(f"expected teacher outputs of shape (B, N, K), got {tuple(teacher_out.shape)}")
        _check_mask(mask, teacher_out.shape[:2])
        loss = self.forward_sparse(student_masked, teacher_out[mask], mask, teacher_temp, update_center=False)
        if update_center:
            self.accumulate_center(teacher_out, apply=apply_center)
        return loss

    def forward_sparse(
        self,
        student_masked: torch.Tensor,
        teacher_masked: torch.Tensor,
        mask: torch.Tensor,
        teacher_temp: float,
        teacher_sum: tuple[torch.Tensor, int] | None = None,
        update_center: bool = True,
        apply_center: bool = True,
    ) -> torch.Tensor:
        """``L_mim`` from student *and* teacher outputs at the masked tokens, the center from a precomputed sum.

        iBOT's prototype layer is linear and bias-free, so the sum of the teacher's outputs over all tokens (all the
        center needs) is the layer applied to the sum of its inputs: the teacher head then runs its prototype layer
        on the masked tokens and one summed row instead of every token (``IBOTHead.forward_patches_masked``).

        Args:
            student_masked: (M, K) student patch outputs at ``mask``'s True entries, row-major.
            teacher_masked: (M, K) teacher patch outputs at the same entries.
            mask: (B, N) bool, which gives each masked row its image.
            teacher_temp: tau_t for this step.
            teacher_sum: ``(row_sum (K,), rows)``: the sum of the teacher outputs over every token of the crops and
                their number, for the center; required when ``update_center``.
            update_center: Add ``teacher_sum`` to the patch center statistics after computing the loss.
            apply_center: Move the center now (the last micro-batch of an optimizer step); False only accumulates.

        Returns:
            Scalar loss (float32).

        Raises:
            ValueError: shapes that disagree, a non-boolean mask, or ``update_center`` without ``teacher_sum``.
        """
        _check_mask(mask, mask.shape)
        m = int(mask.sum())
        k = self.center.dim
        for name, out in (("student", student_masked), ("teacher", teacher_masked)):
            if out.shape != (m, k):
                raise ValueError(
                    f"expected the {name} outputs of the {m} masked tokens, shape ({m}, {k}); got {tuple(out.shape)}"
                )
        if update_center and teacher_sum is None:
            raise ValueError("update_center needs teacher_sum, the sum of the teacher outputs over all tokens")
        targets = self.teacher_probs(teacher_masked.detach(), teacher_temp)  # (M, K)
        log_probs = F.log_softmax(student_masked.float() / self.student_temp, dim=-1)
        token_ce = -(targets * log_probs).sum(dim=-1)  # (M, K) -> (M,)
        image = mask.nonzero()[:, 0]  # the image of each masked token
        counts = mask.sum(dim=1).clamp(min=1).float()  # (B,)
        per_image = token_ce.new_zeros(mask.shape[0]).index_add(0, image, token_ce) / counts  # (M,) -> (B,)
        loss = per_image.mean()
        if update_center and teacher_sum is not None:
            self.center.accumulate_sum(*teacher_sum, apply=apply_center)
        return loss


def _check_mask(mask: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> None:
    if mask.dtype != torch.bool or mask.ndim != 2 or mask.shape != shape:
        raise ValueError(f"mask must be a bool tensor of shape {tuple(shape)}, got {mask.dtype} {tuple(mask.shape)}")
