"""iBOT: masked image modelling with an online tokenizer (self-distillation on [CLS] and masked patch tokens).

- [0]: iBOT: Image BERT Pre-Training with Online Tokenizer, Zhou et al., ICLR 2022, https://arxiv.org/abs/2111.07832
- [1]: DINO: Emerging Properties in Self-Supervised Vision Transformers, 2021, https://arxiv.org/abs/2104.14294

A student backbone ``f_s`` (``self.model``, any tokenlab backbone with a mask token: the iBOT ViT or a FAN with
``use_mask_token=True``) and a projection head ``h_s`` (``IBOTHead``) learn from an EMA teacher ``(f_t, h_t)`` that
starts as a copy of the student, is never trained by gradients (``requires_grad_(False)``, eval mode) and moves
only by

    theta_t <- m(s) theta_t + (1 - m(s)) theta_s,      m(s): cosine 0.996 -> 1 over the run.

Per step, with global crops u_1, u_2 (their masks M_1, M_2 from the data layer's block-mask generator) and local
crops u_3 .. u_V:

    [CLS] term  L_cls = mean_{q in {1,2}, v != q} CE(P_t(h_t(f_t(u_q))_cls), h_s(f_s(u_v, M_v))_cls)
    patch term  L_mim = mean_{q} (1/B) sum_b (1/|M_qb|) sum_{i in M_qb} CE(P_t(h_t(f_t(u_q))_i), h_s(f_s(u_q, M_q))_i)
    loss        L = lambda_1 L_cls + lambda_2 L_mim

where ``P_t(t) = softmax((t - c) / tau_t(s))`` with a separate center ``c`` and a separate teacher temperature for
[CLS] (``tau_t``) and patches (``tau_p``, iBOT's ``teacher_patch_temp``), centres with momentum 0.9,
and ``CE(p, s) = -sum_k p_k log softmax(s / tau_s)_k``; the losses are ``tokenlab.losses.dino_cls`` and
``tokenlab.losses.ibot_patch``. Local crops are never masked. Per-step values come from schedules built up front
from the engine's step plan: the teacher temperatures warm linearly 0.04 -> 0.07 (30 epochs in the paper), the
teacher momentum follows the cosine above. ``pred_start_epoch`` delays masked image modelling (iBOT: 50 for Swin):
before it no patch is masked (the patch loss is 0) and the patch temperature stays at its warm-up value, and its
warm-up starts at that epoch. The learning rate (5e-4 x batch / 256, warm-up, cosine) and the weight
decay (cosine 0.04 -> 0.4) are the engine's ``optim`` schedules; set them in the recipe.

Heads: ``shared_head=True`` (the published ViT recipes) uses one head for [CLS] and patches; ``False`` shares the MLP
and gives the patches their own prototype layer (the published ``iBOTHead``). The teacher's head is then still
shared by default (published ``shared_head_teacher=True``): its patch targets come from its [CLS] prototype layer,
the EMA of the student's, and the student's patch prototype layer has no teacher counterpart.

Cost: the student's projection head runs on the [CLS] tokens and only on the *masked* patch tokens (the patch loss
reads nothing else), and the student softmax of the patch loss only there. The teacher's MLP sees every patch token,
but its prototype layer (8192 outputs, the largest matrix of the head) only the masked ones plus one row: the patch
center needs the mean of all teacher outputs, and the layer is linear and bias-free, so that mean is the layer of
the mean input. The losses are those of the all-token computation (tested to 1e-6); with ``use_bn`` the head's
batch statistics would change, so both heads then see every token (``head_on_masked_only`` False).

Safeguards: the engine clips gradients (iBOT recipes: ``optim.clip_grad: 3.0`` with ``train.clip_mode: per_param``,
each parameter's gradient norm capped separately as in iBOT, after the fp16 scaler unscales them); done here through
the method hooks: the prototype layers frozen during the first epoch (their gradients are dropped, so the optimizer
skips them), and a collapse detector logged every step:
``teacher_entropy`` (mean entropy of the teacher's [CLS] distribution), ``teacher_marginal_entropy`` (entropy of
its batch mean; collapse to one prototype sends both to 0, collapse to uniform sends the first to log K) and
``teacher_feature_std`` (per-dimension std over the batch of the L2-normalised teacher [CLS] features, averaged
over dimensions: about 1/sqrt(C) when healthy, 0 when every image maps to one point). Non-finite losses are caught
by the engine (``train.max_nonfinite: 1`` stops at the first one, like iBOT).

Small batches: DINO/iBOT advise a higher starting teacher momentum for small batches (e.g. 0.9995 at batch 256
instead of 0.996 at 1024); set ``teacher_momentum`` in the recipe. Short CPU runs with a few hundred steps need the
opposite (e.g. 0.99), or the teacher barely moves.

Export: the backbone's classifier is removed (``reset_classifier(0)``), so ``RUN/model`` written by the engine is
the backbone alone (the teacher by default, ``export="student"`` for the student). ``timm.create_model(name,
pretrained=True, pretrained_cfg_overlay=dict(file="RUN/model.safetensors"), num_classes=K)`` loads it for
fine-tuning, with the position embedding resampled when ``img_size`` differs. Official iBOT checkpoints load through
the same timm path (``tokenlab.models.vit.checkpoint_filter_fn``, or ``tokenlab.models.vit.import_ibot_checkpoint``
to choose the student and get a report).
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tokenlab.losses.dino_cls import DINOClsLoss
from tokenlab.losses.ibot_patch import IBOTPatchLoss
from tokenlab.methods import Method, StepContext, TrainPlan, register_method
from tokenlab.models.contract import as_backbone
from tokenlab.models.heads import IBOTHead
from tokenlab.utils.schedules import cosine_schedule, linear_warmup_then_constant

__all__ = ["IBOT", "EXPORT_CHOICES", "collapse_metrics"]

logger = logging.getLogger(__name__)

EXPORT_CHOICES = ("teacher", "student")


@torch.no_grad()
def collapse_metrics(teacher_probs: torch.Tensor, teacher_features: torch.Tensor) -> dict[str, torch.Tensor]:
    """Collapse detector on the teacher's [CLS] outputs.

    Args:
        teacher_probs: (R, K) teacher distributions (rows sum to 1).
        teacher_features: (R, C) teacher backbone [CLS] features.

    Returns:
        ``teacher_entropy`` = mean_r H(p_r), ``teacher_marginal_entropy`` = H(mean_r p_r) and
        ``teacher_feature_std`` = mean_c std_r(f_rc / ||f_r||), all scalars (nats for the entropies).
    """
    p = teacher_probs.float()
    entropy = -(p * p.clamp(min=1e-12).log()).sum(dim=-1).mean()
    marginal = p.mean(dim=0)
    marginal_entropy = -(marginal * marginal.clamp(min=1e-12).log()).sum()
    feats = F.normalize(teacher_features.float(), dim=-1)
    std = feats.std(dim=0).mean() if feats.shape[0] > 1 else feats.new_zeros(())
    return {"teacher_entropy": entropy, "teacher_marginal_entropy": marginal_entropy, "teacher_feature_std": std}


@register_method("ibot")
class IBOT(Method):
    """iBOT self-distillation (see the module docstring for the losses and schedules).

    Args:
        model: Student backbone with a mask token (``forward_features(x, mask) -> (cls, patches)``); its
            classifier is removed.
        out_dim: K prototypes of the [CLS] head (iBOT: 8192).
        patch_out_dim: K of the patch head (defaults to ``out_dim``; must equal it with a shared head).
        shared_head: One head for [CLS] and patches (iBOT's ViT recipes) or a separate patch prototype layer (the
            MLP stays shared, as published).
        shared_head_teacher: Keep the teacher's head shared even when the student's is not (published default).
        hidden_dim: Hidden size of the head MLP (2048).
        bottleneck_dim: L2-normalised bottleneck size (256).
        head_layers: Linear layers in the head MLP (3).
        use_bn: BatchNorm in the head MLP (off for ViTs).
        norm_last_layer: Fix the prototype layer's weight-norm gains to 1.
        student_temp: tau_s (0.1).
        teacher_temp: Final tau_t (0.07).
        warmup_teacher_temp: First tau_t (0.04).
        warmup_teacher_temp_epochs: Epochs of the linear warm-up of both teacher temperatures (30).
        teacher_patch_temp: Final teacher temperature of the patch loss tau_p (0.07).
        warmup_teacher_patch_temp: First tau_p (0.04).
        pred_start_epoch: Epochs without masked image modelling at the start (0; iBOT uses 50 for Swin).
        teacher_momentum: First EMA momentum m (0.996; 0.9995 advised at batch 256; lower for short runs).
        teacher_momentum_end: Last EMA momentum (1.0).
        center_momentum: Momentum of both centers (0.9).
        cls_weight: lambda_1.
        patch_weight: lambda_2.
        freeze_last_layer_epochs: Epochs during which the prototype layers are not updated (1).
        export: Which backbone the engine evaluates and exports: ``"teacher"`` or ``"student"``.

    Raises:
        ValueError: a backbone without mask token or the contract's ``forward_features``, an unknown ``export``,
            or out-of-range temperatures / momenta / weights.
    """

    data_view = "multicrop"

    def __init__(
        self,
        model: nn.Module,
        out_dim: int = 8192,
        patch_out_dim: int | None = None,
        shared_head: bool = True,
        shared_head_teacher: bool = True,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        head_layers: int = 3,
        use_bn: bool = False,
        norm_last_layer: bool = True,
        student_temp: float = 0.1,
        teacher_temp: float = 0.07,
        warmup_teacher_temp: float = 0.04,
        warmup_teacher_temp_epochs: float = 30,
        teacher_patch_temp: float = 0.07,
        warmup_teacher_patch_temp: float = 0.04,
        pred_start_epoch: float = 0,
        teacher_momentum: float = 0.996,
        teacher_momentum_end: float = 1.0,
        center_momentum: float = 0.9,
        cls_weight: float = 1.0,
        patch_weight: float = 1.0,
        freeze_last_layer_epochs: float = 1,
        export: str = "teacher",
    ) -> None:
        super().__init__(model)
        if getattr(model, "mask_token", None) is None or not hasattr(model, "forward_features"):
            raise ValueError(
                f"iBOT needs a backbone with a learned mask token; {type(model).__name__} has none (create it with "
                f"model.kwargs.use_mask_token=true, e.g. ibot_vit_tiny_patch4_32 or a FAN)"
            )
        if export not in EXPORT_CHOICES:
            raise ValueError(f"unknown export {export!r}; valid: {', '.join(EXPORT_CHOICES)}")
        if min(teacher_temp, warmup_teacher_temp, teacher_patch_temp, warmup_teacher_patch_temp) <= 0:
            raise ValueError(
                f"teacher temperatures must be > 0, got {warmup_teacher_temp} -> {teacher_temp} ([CLS]) and "
                f"{warmup_teacher_patch_temp} -> {teacher_patch_temp} (patches)"
            )
        if not 0.0 <= teacher_momentum <= teacher_momentum_end <= 1.0:
            raise ValueError(
                f"teacher momentum must satisfy 0 <= start <= end <= 1, got {teacher_momentum} -> "
                f"{teacher_momentum_end}"
            )
        if cls_weight < 0 or patch_weight < 0 or cls_weight + patch_weight == 0:
            raise ValueError(f"loss weights must be >= 0 and not both 0, got {cls_weight}, {patch_weight}")
        if min(warmup_teacher_temp_epochs, freeze_last_layer_epochs, pred_start_epoch) < 0:
            raise ValueError("warmup_teacher_temp_epochs, freeze_last_layer_epochs and pred_start_epoch must be >= 0")
        patch_dim = out_dim if patch_out_dim is None else patch_out_dim
        if not shared_head and shared_head_teacher and patch_dim != out_dim:
            raise ValueError(
                f"with shared_head_teacher=true the teacher's patch targets have out_dim={out_dim} prototypes; got "
                f"patch_out_dim={patch_dim} (set shared_head_teacher=false for a separate patch size)"
            )
        backbone = as_backbone(model)
        if getattr(model, "num_classes", 0):
            logger.info("iBOT: removing the %d-class classifier of %s", backbone.num_classes, type(model).__name__)
            backbone.reset_classifier(0)
        self.head = IBOTHead(
            backbone.num_features,
            out_dim,
            patch_out_dim,
            shared_head,
            hidden_dim=hidden_dim,
            bottleneck_dim=bottleneck_dim,
            num_layers=head_layers,
            use_bn=use_bn,
            norm_last_layer=norm_last_layer,
        )
        teacher_head = copy.deepcopy(self.head)
        if shared_head_teacher:
            teacher_head.share_prototypes()  # the teacher's patch targets use its [CLS] prototypes (published)
        self.teacher = nn.ModuleDict({"backbone": copy.deepcopy(model), "head": teacher_head})
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        self.cls_loss = DINOClsLoss(out_dim, student_temp, center_momentum)
        self.patch_loss = IBOTPatchLoss(teacher_head.patch_out_dim, student_temp, center_momentum)
        self.teacher_temp, self.warmup_teacher_temp = teacher_temp, warmup_teacher_temp
        self.warmup_teacher_temp_epochs = warmup_teacher_temp_epochs
        self.teacher_patch_temp, self.warmup_teacher_patch_temp = teacher_patch_temp, warmup_teacher_patch_temp
        self.pred_start_epoch = pred_start_epoch
        self.teacher_momentum, self.teacher_momentum_end = teacher_momentum, teacher_momentum_end
        self.cls_weight, self.patch_weight = cls_weight, patch_weight
        self.freeze_last_layer_epochs = freeze_last_layer_epochs
        self.export = export
        # Student patch head only on the masked tokens (same losses, less work); with BatchNorm in the head its
        # batch statistics would change, so then the head sees every token as published.
        self.head_on_masked_only = not use_bn
        self._plan: TrainPlan | None = None
        self.teacher_temp_schedule = np.zeros(0)
        self.teacher_patch_temp_schedule = np.zeros(0)
        self.momentum_schedule = np.zeros(0)

    # ---- the engine's hooks -------------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> IBOT:
        """Put the student in ``mode``; the teacher always stays in eval mode."""
        super().train(mode)
        self.teacher.eval()
        return self

    def trainable_module(self) -> nn.Module:
        """Student backbone and head (the teacher and the centers are not optimised)."""
        return nn.ModuleDict({"backbone": self.model, "head": self.head})

    def export_module(self) -> nn.Module:
        """The exported backbone: the EMA teacher's (``export='teacher'``) or the student."""
        return self.teacher["backbone"] if self.export == "teacher" else self.model

    def export_meta(self) -> dict[str, Any]:
        """Which backbone ``RUN/model`` holds (``teacher`` or ``student``); it has no classifier."""
        return {"backbone": self.export}

    def on_train_start(self, plan: TrainPlan) -> None:
        """Per-iteration teacher temperatures and momentum.

        Temperatures: linear warm-up, then constant; the patch one is held at its warm-up value until
        ``pred_start_epoch``. Momentum: cosine.
        """
        warm = int(round(self.warmup_teacher_temp_epochs * plan.steps_per_epoch))
        self.teacher_temp_schedule = linear_warmup_then_constant(
            self.teacher_temp, plan.total_steps, warm, self.warmup_teacher_temp
        )
        delay = min(plan.total_steps, int(round(self.pred_start_epoch * plan.steps_per_epoch)))
        self.teacher_patch_temp_schedule = np.concatenate(
            [
                np.full(delay, self.warmup_teacher_patch_temp),
                linear_warmup_then_constant(
                    self.teacher_patch_temp, plan.total_steps - delay, warm, self.warmup_teacher_patch_temp
                ),
            ]
        )
        self.momentum_schedule = cosine_schedule(self.teacher_momentum, self.teacher_momentum_end, plan.total_steps)
        self._plan = plan
        if plan.global_batch_size < 256 and self.teacher_momentum <= 0.996 and plan.total_steps > 10_000:
            logger.warning(
                "iBOT: global batch %d with teacher_momentum %.4f; DINO/iBOT advise a higher start (e.g. 0.9995) "
                "for small batches",
                plan.global_batch_size,
                self.teacher_momentum,
            )

    def _ensure_schedules(self, ctx: StepContext) -> None:
        if self._plan != ctx.plan:
            self.on_train_start(ctx.plan)

    def current_teacher_temp(self, step: int) -> float:
        """The teacher temperature at optimizer step ``step`` (the last value past the schedule)."""
        return float(self.teacher_temp_schedule[min(step, len(self.teacher_temp_schedule) - 1)])

    def current_teacher_patch_temp(self, step: int) -> float:
        """The teacher temperature of the patch loss at optimizer step ``step``."""
        return float(self.teacher_patch_temp_schedule[min(step, len(self.teacher_patch_temp_schedule) - 1)])

    def current_momentum(self, step: int) -> float:
        """The teacher EMA momentum at optimizer step ``step`` (the last value past the schedule)."""
        return float(self.momentum_schedule[min(step, len(self.momentum_schedule) - 1)])

    def training_step(self, batch: dict[str, Any], ctx: StepContext) -> dict[str, torch.Tensor]:
        """The iBOT losses of one micro-batch (see the class docstring)."""
        self._ensure_schedules(ctx)
        crops: list[torch.Tensor] = list(batch["crops"])
        n_global = _count_global(crops, batch.get("masks"))
        b = crops[0].shape[0]
        globals_ = torch.cat(crops[:n_global])  # G x (B, 3, H, W) -> (G B, 3, H, W)
        mask = _global_mask(batch.get("masks"), self.model, globals_, n_global)  # (G B, N) bool
        if ctx.epoch < self.pred_start_epoch:
            mask = torch.zeros_like(mask)  # no masked image modelling yet (published pred_start_epoch)
        temp = self.current_teacher_temp(ctx.step)
        patch_temp = self.current_teacher_patch_temp(ctx.step)

        with torch.no_grad():
            t_feat, t_patch_feat = as_backbone(self.teacher["backbone"]).forward_features(globals_)
            if self.head_on_masked_only:  # the teacher's prototype layer: the masked tokens and one summed row
                t_head: IBOTHead = self.teacher["head"]  # type: ignore[assignment]
                t_cls = t_head(t_feat)[0]
                t_patch, t_patch_sum = t_head.forward_patches_masked(t_patch_feat, mask)
            else:
                t_cls, t_patch = self.teacher["head"](t_feat, t_patch_feat)

        s_feat, s_patch_feat = as_backbone(self.model).forward_features(globals_, mask)
        if self.head_on_masked_only:  # the patch loss reads the student only at the masked tokens
            s_cls = self.head(s_feat)[0]
            s_patch = self.head.forward_patches(s_patch_feat[mask])  # (M, K): the masked tokens, row-major
        else:
            s_cls, s_patch = self.head(s_feat, s_patch_feat)
        student_cls = [s_cls]
        if len(crops) > n_global:
            local_feat, _ = as_backbone(self.model).forward_features(torch.cat(crops[n_global:]))
            student_cls.append(self.head(local_feat)[0])
        student_cls_views = torch.cat(student_cls).reshape(len(crops), b, -1)  # (V B, K) -> (V, B, K)
        teacher_cls_views = t_cls.reshape(n_global, b, -1)

        with torch.no_grad():
            probs = self.cls_loss.teacher_probs(teacher_cls_views, temp).reshape(n_global * b, -1)
            metrics = collapse_metrics(probs, t_feat)
        apply = ctx.last_micro_batch  # the centres move once per optimizer step, over all its micro-batches
        loss_cls = self.cls_loss(student_cls_views, teacher_cls_views, temp, apply_center=apply)
        if self.head_on_masked_only:
            loss_patch = self.patch_loss.forward_sparse(
                s_patch, t_patch, mask, patch_temp, t_patch_sum, apply_center=apply
            )
        else:
            loss_patch = self.patch_loss(s_patch, t_patch, mask, patch_temp, apply_center=apply)
        loss = self.cls_weight * loss_cls + self.patch_weight * loss_patch
        out = {
            "loss": loss,
            "loss_cls": loss_cls.detach(),
            "loss_patch": loss_patch.detach(),
            "teacher_temp": loss.new_tensor(temp),
            "teacher_patch_temp": loss.new_tensor(patch_temp),
            "teacher_momentum": loss.new_tensor(self.current_momentum(ctx.step)),
            "mask_ratio": mask.float().mean().detach(),
        }
        return out | metrics

    def before_optimizer_step(self, ctx: StepContext) -> None:
        """Drop the prototype layers' gradients during the first ``freeze_last_layer_epochs`` epochs."""
        if ctx.step < self.freeze_last_layer_epochs * ctx.plan.steps_per_epoch:
            for p in self.head.last_layer_parameters():
                p.grad = None

    @torch.no_grad()
    def after_step(self, ctx: StepContext) -> None:
        """EMA of the teacher toward the student with this step's momentum (buffers are copied)."""
        self._ensure_schedules(ctx)
        self.update_teacher(self.current_momentum(ctx.step))

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """``theta_t <- m theta_t + (1 - m) theta_s`` for backbone and head, matched by name.

        A student parameter without teacher counterpart (the patch prototype layer when only the student's head is
        not shared) is left out, as in iBOT's EMA over the common parameter names.
        """
        student = nn.ModuleDict({"backbone": self.model, "head": self.head})
        s_named = dict(student.named_parameters())
        pairs = [(t, s_named[name]) for name, t in self.teacher.named_parameters() if name in s_named]
        t_params: list[torch.Tensor] = [t for t, _ in pairs]
        torch._foreach_mul_(t_params, momentum)
        torch._foreach_add_(t_params, [s.detach() for _, s in pairs], alpha=1.0 - momentum)
        s_buffers = dict(student.named_buffers())
        for name, t_buf in self.teacher.named_buffers():  # the teacher is a copy
            if name in s_buffers:
                t_buf.copy_(s_buffers[name])

    @torch.no_grad()
    def validation_step(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """No classifier exists during pre-training: evaluate with ``tokenlab eval-ssl`` (k-NN, linear probe)."""
        return {}


def _count_global(crops: list[torch.Tensor], masks: Any) -> int:
    """Global crops are the leading crops of the first crop's size (and there is one mask per global crop)."""
    if len(crops) < 2:
        raise ValueError(f"iBOT needs at least 2 crops per image (2 global + locals), got {len(crops)}")
    n_global = 1
    while n_global < len(crops) and crops[n_global].shape == crops[0].shape:
        n_global += 1
    if masks is not None and len(masks) != n_global:
        raise ValueError(f"got {len(masks)} masks for {n_global} global crops (crops of {tuple(crops[0].shape[-2:])})")
    return n_global


def _global_mask(masks: Any, model: nn.Module, globals_: torch.Tensor, n_global: int) -> torch.Tensor:
    b = globals_.shape[0] // n_global
    backbone = as_backbone(model)
    grid = backbone.grid_size(tuple(globals_.shape[-2:])) if hasattr(model, "grid_size") else None
    if masks is None:
        n = math.prod(grid) if grid is not None else backbone.forward_features(globals_[:1])[1].shape[1]
        return torch.zeros(globals_.shape[0], n, dtype=torch.bool, device=globals_.device)
    mask = torch.cat([torch.as_tensor(m) for m in masks]).to(globals_.device)  # G x (B, H, W) -> (G B, H, W)
    if grid is not None and tuple(mask.shape[1:]) != tuple(grid):
        raise ValueError(f"masks are {tuple(mask.shape[1:])} but the model's token grid is {tuple(grid)}")
    if mask.shape[0] != b * n_global:
        raise ValueError(f"masks hold {mask.shape[0]} images, crops {b * n_global}")
    return mask.flatten(1).bool()  # (G B, H, W) -> (G B, N)
