"""STL stage 1 (token labeler) and stage 2 (student) training methods.

- [0] Zhao et al., "Fully Attentional Networks with Self-emerging Token Labeling", ICCV 2023.
  https://arxiv.org/abs/2401.03844

Stage 1, ``stl_labeler`` (FAN-TL): a token model learns an ``aux_head`` on the average of its patch tokens
alongside the class-token head:

    L_1 = CE(cls_logits, y) + lambda * CE(aux_head(mean_i p_i), y)

Stage 2, ``stl_student``: a frozen labeler from a stage-1 run (loaded with ``tokenlab.models.load_exported``, any
FAN size or stem) labels every token of the teacher view online; the student learns

    L_2 = CE(cls_logits, y_mix) + lambda * (1/N) sum_i CE(aux_logits_i, y_hat_i)

with ``y_hat`` from ``tokenlab.losses.stl_token`` (Gumbel-softmax tau = 1, hard, smoothed 0.9 / 0.1). The labeler
runs in eval mode under ``torch.inference_mode`` and autocast; it is kept outside the module tree, so it is never
trained, never put in train mode, never wrapped by DDP and never written into checkpoints (it is re-loaded from
its run on resume). Mixup/CutMix touch only the student image and the class target.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tokenlab.losses.stl_token import STLTokenLoss
from tokenlab.methods import Method, StepContext, register_method
from tokenlab.methods.supervised import ClassTargets, soft_cross_entropy
from tokenlab.models.contract import as_backbone

__all__ = ["STLLabeler", "STLStudent", "TEACHER_AUGS"]

logger = logging.getLogger(__name__)

TEACHER_AUGS = ("none", "spatial", "full")
_DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _require_token_model(model: nn.Module, role: str) -> None:
    if not getattr(model, "has_aux_head", False) or not hasattr(model, "forward_tokens"):
        raise ValueError(
            f"the {role} must be an STL token model with an aux_head (a '*_token' FAN, e.g. "
            f"fan_nano_6_p16_224_token); got {type(model).__name__} without one"
        )


@register_method("stl_labeler")
class STLLabeler(Method):
    """STL stage 1: ``CE(cls, y) + lambda * CE(aux_head(mean of patch tokens), y)``.

    Args:
        model: A token FAN (``*_token``).
        num_classes: K (defaults to ``model.num_classes``).
        aux_loss_weight: lambda (paper: 1).
        label_smoothing, mixup_alpha, cutmix_alpha, mix_prob, switch_prob: class targets, see ``ClassTargets``.
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int | None = None,
        aux_loss_weight: float = 1.0,
        label_smoothing: float = 0.1,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        mix_prob: float = 1.0,
        switch_prob: float = 0.5,
    ) -> None:
        super().__init__(model)
        _require_token_model(model, "stl_labeler model")
        if aux_loss_weight < 0:
            raise ValueError(f"aux_loss_weight must be >= 0, got {aux_loss_weight}")
        self.aux_loss_weight = aux_loss_weight
        k = int(num_classes or as_backbone(model).num_classes)
        self.targets = ClassTargets(k, label_smoothing, mixup_alpha, cutmix_alpha, mix_prob, switch_prob)

    def training_step(self, batch: dict[str, Any], ctx: StepContext) -> dict[str, torch.Tensor]:
        """STL losses of one micro-batch (see the class docstring)."""
        images, targets = self.targets(batch["image"], batch["label"])
        model = as_backbone(self.model)
        cls, patches = model.forward_features(images)
        cls_loss = soft_cross_entropy(model.forward_head((cls, patches)), targets)
        aux_loss = soft_cross_entropy(
            self.model.get_submodule("aux_head")(patches.mean(dim=1)), targets
        )  # (B, N, C) -> (B, C)
        loss = cls_loss + self.aux_loss_weight * aux_loss
        return {"loss": loss, "cls": cls_loss.detach(), "aux": aux_loss.detach()}


@register_method("stl_student")
class STLStudent(Method):
    """STL stage 2: ``CE(cls, y_mix) + lambda * mean_tokens CE(aux_logits, y_hat)`` with a frozen labeler.

    Args:
        model: The student, a token FAN (``*_token``).
        labeler: Stage-1 run directory or exported model stem (``RUN`` or ``RUN/model``); a ready module is also
            accepted (tests, notebooks).
        num_classes: K (defaults to ``model.num_classes``).
        token_loss_weight: lambda.
        label_type: ``"gumbel" | "softmax" | "argmax"``.
        tau: Gumbel / softmax temperature.
        hard: One-hot Gumbel labels.
        token_smoothing: Label smoothing of the token labels.
        teacher_aug: The teacher view the data layer's paired transform makes (``batch["teacher_image"]``):
            ``"spatial"`` same crop/flip/geometric ops as the student, no colour ops, erasing or mixing (the
            paper's choice); ``"full"`` the student's augmentations too; ``"none"`` a centre crop of the clean image
            (token grids then differ in content from the student's crop: the paper's ablation).
        teacher_dtype: Autocast dtype of the labeler: ``"auto"`` (the trainer's AMP dtype; bfloat16 on CUDA),
            ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        label_smoothing, mixup_alpha, cutmix_alpha, mix_prob, switch_prob: class targets, see ``ClassTargets``.

    Raises:
        FileNotFoundError: no exported labeler at ``labeler``.
        ValueError: the labeler has no ``aux_head`` or predicts another number of classes; bad option.
    """

    data_view = "stl_paired"

    def __init__(
        self,
        model: nn.Module,
        labeler: str | Path | nn.Module | None = None,
        num_classes: int | None = None,
        token_loss_weight: float = 1.0,
        label_type: str = "gumbel",
        tau: float = 1.0,
        hard: bool = True,
        token_smoothing: float = 0.1,
        teacher_aug: str = "spatial",
        teacher_dtype: str = "auto",
        label_smoothing: float = 0.1,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        mix_prob: float = 1.0,
        switch_prob: float = 0.5,
    ) -> None:
        super().__init__(model)
        _require_token_model(model, "stl_student model")
        if labeler is None:
            raise ValueError(
                "stl_student needs method.kwargs.labeler: the run directory of a stage-1 (stl_labeler) run"
            )
        if teacher_aug not in TEACHER_AUGS:
            raise ValueError(f"unknown teacher_aug {teacher_aug!r}; valid: {', '.join(TEACHER_AUGS)}")
        if teacher_dtype not in _DTYPES:
            raise ValueError(f"unknown teacher_dtype {teacher_dtype!r}; valid: {', '.join(_DTYPES)}")
        if token_loss_weight < 0:
            raise ValueError(f"token_loss_weight must be >= 0, got {token_loss_weight}")
        k = int(num_classes or as_backbone(model).num_classes)
        teacher = self._load_labeler(labeler)
        _require_token_model(teacher, "labeler")
        if teacher.num_classes != k:
            raise ValueError(
                f"the labeler predicts {teacher.num_classes} classes but the student has {k}; "
                f"train the labeler (stage 1) on the same data set"
            )
        teacher.eval().requires_grad_(False)
        # A plain list hides the labeler from the module tree: no train(), no DDP, no optimizer, no checkpoint.
        self._teacher: list[nn.Module] = [teacher]
        self.token_loss_weight = token_loss_weight
        self.teacher_aug = teacher_aug
        self.teacher_dtype = _DTYPES[teacher_dtype]
        self.token_loss = STLTokenLoss(label_type, tau, hard, token_smoothing)
        self.targets = ClassTargets(k, label_smoothing, mixup_alpha, cutmix_alpha, mix_prob, switch_prob)

    @staticmethod
    def _load_labeler(labeler: str | Path | nn.Module) -> nn.Module:
        if isinstance(labeler, nn.Module):
            return labeler
        from tokenlab.models import load_exported

        path = Path(labeler)
        model, meta = load_exported(path)
        logger.info("loaded token labeler %s (%s) from %s", meta.get("model"), meta.get("num_classes"), path)
        return model

    @property
    def teacher(self) -> nn.Module:
        """The frozen labeler."""
        return self._teacher[0]

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], *args: Any, **kwargs: Any) -> STLStudent:
        super()._apply(fn, *args, **kwargs)
        self._teacher[0]._apply(fn, *args, **kwargs)  # follow .to(device) / .float() of the method
        return self

    @classmethod
    def transform_options(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The paired STL transform, with the teacher view chosen by ``teacher_aug``."""
        return {"teacher": kwargs.get("teacher_aug", "spatial")}

    def _teacher_input(self, batch: dict[str, Any]) -> torch.Tensor:
        if "teacher_image" not in batch:
            raise KeyError(
                f"stl_student needs batch['teacher_image'] (the data layer's stl_pair transform); the batch has "
                f"{sorted(batch)}"
            )
        return batch["teacher_image"]

    def teacher_logits(self, images: torch.Tensor, amp_dtype: torch.dtype | None) -> tuple[torch.Tensor, tuple]:
        """Labeler token logits ``(B, M, K)`` (a normal tensor, safe to use in autograd) and its grid."""
        dtype = self.teacher_dtype or amp_dtype or (torch.bfloat16 if images.device.type == "cuda" else None)
        amp = (
            torch.autocast(images.device.type, dtype=dtype)
            if dtype not in (None, torch.float32)
            else contextlib.nullcontext()
        )
        self.teacher.eval()
        with torch.inference_mode(), amp:
            out = as_backbone(self.teacher).forward_tokens(images)
        assert out.token_logits is not None  # the labeler was checked for an aux_head
        return out.token_logits.float().clone(), out.grid  # clone: inference tensors cannot enter autograd

    def training_step(self, batch: dict[str, Any], ctx: StepContext) -> dict[str, torch.Tensor]:
        """STL losses of one micro-batch (see the class docstring)."""
        t_logits, t_grid = self.teacher_logits(self._teacher_input(batch), ctx.amp_dtype)
        images, targets = self.targets(batch["image"], batch["label"])
        out = as_backbone(self.model).forward_tokens(images)
        cls_loss = soft_cross_entropy(out.cls_logits, targets)
        token_loss = self.token_loss(out.token_logits, t_logits, out.grid, t_grid)
        loss = cls_loss + self.token_loss_weight * token_loss
        return {"loss": loss, "cls": cls_loss.detach(), "token": token_loss.detach()}
