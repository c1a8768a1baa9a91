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

Where the labeler comes from (``labeler``): a stage-1 run directory, whose last (``RUN/model``) or best
(``RUN/model_best``, the published choice: the best EMA checkpoint by top-1) export is taken by ``labeler_export``;
an export stem; a published FAN-TL checkpoint (``.pth.tar``, with ``labeler_model`` naming the architecture; EMA
weights first); or ``"self"``, the published online self-labelling (the student labels its own teacher view). The
student's export meta records which labeler was used (``labeler``: path, export, step, source entry).

Cached labels (``label_store``, not in the published code): ``tokenlab labels build`` runs the labeler once per
training image (full view, optionally K augmented views) and stores top-k token logits
(``tokenlab.data.label_store``); the student then reads each sample's map, makes it dense, cuts it with the student
view's crop / flip / affine onto its token grid and labels it with the same ``STLTokenLoss`` (Gumbel resampled every
step; argmax / softmax ablations). Labels then come from the whole image rather than from the crop the labeler
would have seen, and from the un-augmented geometry (RandAugment's rotate/shear fill is not seen by the labeler).

Options the published code has, each off by default as published (NVlabs/STL ``main.py`` /
``train_token_labeler.py`` flags in brackets):
- ``dense_weight_ramp_epochs`` [``--dynamic-dense-weight``, 300]: ``lambda_e = lambda * sqrt(min(e, R) / R)`` at
  epoch ``e`` (0-based);
- ``single_token_label`` [``--single-token-label``]: one label per image for the student (see the loss);
- ``labeler="self"`` [``--online-training``]: online self-labelling; the published code leaves the model in eval mode
  after labelling, here its train mode is restored;
- ``aux_only`` of ``stl_labeler`` [``--single-token-label`` in ``train_token_labeler.py``]: the labeler learns only
  ``CE(aux_head(mean of patch tokens), y)``.

Labeler options that are not in the published code (off by default; ``tokenlab demo`` documents what it turns on):
- ``aux_max_weight`` mu: a multiple-instance term on the token that scores a class highest, the pooling of the
  published evaluation rule: ``L_1 += mu * CE(max_i aux_head(p_i), y)`` (per region under token CutMix), or with
  ``aux_max_topk`` f the mean of the top ``f * N`` token logits of each class (top-k pooling);
  ``aux_loss_weight=0`` leaves it alone, without the GAP term;
- ``token_cutmix_alpha`` / ``token_cutmix_prob``: CutMix of a token-aligned box (LV-ViT's MixToken) whose aux
  target is per region: ``lambda * [(1 - a) CE(aux_head(mean_{i outside} p_i), y) + a CE(aux_head(mean_{i inside}
  p_i), y')]`` with ``a`` the box's share of the tokens and ``y'`` the pasted image's class (the class head learns
  the area-mixed label), so the tokens of each region have to say the class of the image they show.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tokenlab.data.label_store import LabelStore, StoredCrops, crop_token_map, dense_logits, select_views
from tokenlab.losses.stl_token import STLTokenLoss
from tokenlab.methods import Method, StepContext, register_method
from tokenlab.methods.supervised import ClassTargets, soft_cross_entropy
from tokenlab.models.contract import as_backbone
from tokenlab.utils.runs import EXPORT_CHOICES, export_stem

__all__ = ["SELF_LABELER", "STLLabeler", "STLStudent", "TEACHER_AUGS", "region_cross_entropy", "token_cutmix"]

logger = logging.getLogger(__name__)

TEACHER_AUGS = ("none", "spatial", "full")
SELF_LABELER = "self"  # labeler value of online self-labelling
_CHECKPOINT_SUFFIXES = (".pth", ".tar", ".pt", ".bin")  # a published (torch.save) checkpoint, not a tokenlab export
_DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _require_token_model(model: nn.Module, role: str) -> None:
    if not getattr(model, "has_aux_head", False) or not hasattr(model, "forward_tokens"):
        raise ValueError(
            f"the {role} must be an STL token model with an aux_head (a '*_token' FAN, e.g. "
            f"fan_nano_6_p16_224_token); got {type(model).__name__} without one"
        )


def load_labeler(
    labeler: str | Path | nn.Module,
    which: str = "last",
    model_name: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    prefer: str = "ema",
) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """A token labeler, what to record about it, and its export meta (for ``stl_student`` and ``tokenlab labels``).

    Args:
        labeler: A stage-1 run directory, an export stem, a published checkpoint (``.pth``/``.pth.tar``, with
            ``model_name``) or a ready module.
        which: For a run directory: ``"last"`` or ``"best"`` export.
        model_name: timm name of a published checkpoint's architecture.
        model_kwargs: Extra ``timm.create_model`` kwargs for ``model_name``.
        prefer: ``"ema"`` or ``"model"`` weights of a published checkpoint.

    Returns:
        ``(module, info, meta)``: ``info`` has ``path`` (the export stem or the checkpoint file; None for a
        module), ``export``, ``model`` (and ``step`` for exports, the checkpoint entry for published files);
        ``meta`` is the export meta (``img_size``, ``mean``, ``std``, ...; empty for a module).

    Raises:
        FileNotFoundError: no exported labeler at ``labeler`` (or no best export when ``which="best"``).
        ValueError: a published checkpoint without ``model_name``; an unknown ``which``.
    """
    if isinstance(labeler, nn.Module):
        return labeler, {"path": None, "export": "module", "model": type(labeler).__name__}, {}
    from tokenlab.models import load_exported, load_published

    if which not in EXPORT_CHOICES:
        raise ValueError(f"unknown labeler_export {which!r}; valid: {', '.join(EXPORT_CHOICES)}")
    path = Path(labeler)
    if model_name is not None or path.suffix in _CHECKPOINT_SUFFIXES:
        if model_name is None:
            raise ValueError(
                f"labeler {path} is a published checkpoint; name its architecture with "
                f"method.kwargs.labeler_model (e.g. fan_tiny_8_p4_hybrid_token)"
            )
        model, meta = load_published(path, model_name, prefer, **(model_kwargs or {}))
        info = {"path": str(path), "export": "published", "model": model_name, **meta["source"]}
        info.pop("file", None)
    else:
        stem = export_stem(path, which)
        if path.is_dir() and which == "best" and not stem.with_suffix(".json").is_file():
            raise FileNotFoundError(
                f"labeler run {path} has no best export ({stem.name}.json/.safetensors): the engine writes it "
                f"when the run validates; use method.kwargs.labeler_export=last or re-run stage 1 with validation"
            )
        model, meta = load_exported(stem)
        info = {"path": str(stem), "export": which if path.is_dir() else "given", "model": meta.get("model"),
                "step": meta.get("step")}  # fmt: skip
    logger.info("token labeler: %s", info)
    return model, info, meta


def token_cutmix(images: torch.Tensor, grid: tuple[int, int], alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """CutMix of a box aligned with the token ``grid``: ``(mixed images, inside (H*W,) bool, row-major)``.

    The box comes from timm's CutMix (``rand_bbox`` on the grid, ``lambda ~ Beta(alpha, alpha)``, numpy's global
    RNG, which the engine checkpoints); image ``b`` gets the box from image ``B - 1 - b`` (the batch flipped, as
    timm's batch mode). Images are mixed in a copy.
    """
    from timm.data.mixup import rand_bbox

    gh, gw = grid
    h, w = images.shape[-2:]
    if h % gh or w % gw:
        raise ValueError(f"token CutMix needs an image side divisible by the token grid; got {h}x{w} on {gh}x{gw}")
    yl, yh, xl, xh = (int(v) for v in rand_bbox((gh, gw), float(np.random.beta(alpha, alpha))))
    inside = torch.zeros(gh, gw, dtype=torch.bool, device=images.device)
    inside[yl:yh, xl:xh] = True
    ph, pw = h // gh, w // gw
    mixed = images.clone()
    mixed[..., yl * ph : yh * ph, xl * pw : xh * pw] = images.flip(0)[..., yl * ph : yh * ph, xl * pw : xh * pw]
    return mixed, inside.flatten()


def region_cross_entropy(
    token_logits: torch.Tensor,
    targets: torch.Tensor,
    inside: torch.Tensor | None = None,
    pool: str = "mean",
    topk: float = 0.0,
) -> torch.Tensor:
    """``CE(pool_i z_i, y)`` of token logits ``(B, N, K)`` and targets ``(B, K)``, per token-CutMix region.

    ``pool`` is ``"mean"`` (the published GAP term) or ``"max"`` (per class over tokens: the multiple-instance
    term); with ``topk`` f > 0, ``"max"`` is the mean of each class's ``max(1, round(f * n))`` highest logits over
    the n tokens (top-k pooling, between max and mean). With a box ``inside`` (N,) bool:
    ``(1 - a) CE(pool_{outside} z, y) + a CE(pool_{inside} z, y_flipped)``, ``a`` the box's share of the tokens (a
    region without tokens drops out).
    """
    if pool not in ("mean", "max"):
        raise ValueError(f"unknown token pooling {pool!r}; valid: mean, max")

    def pooled(z: torch.Tensor) -> torch.Tensor:
        if pool == "mean":
            return z.mean(dim=1)
        k = max(1, round(topk * z.shape[1]))
        return z.topk(k, dim=1).values.mean(dim=1)  # (B, n, K) -> (B, K)

    if inside is None:
        return soft_cross_entropy(pooled(token_logits), targets)
    loss = token_logits.new_zeros(())
    for region, target in ((~inside, targets), (inside, targets.flip(0))):
        share = region.float().mean()
        if share > 0:
            loss = loss + share * soft_cross_entropy(pooled(token_logits[:, region]), target)
    return loss


@register_method("stl_labeler")
class STLLabeler(Method):
    """STL stage 1: ``CE(cls, y) + lambda * CE(aux_head(mean of patch tokens), y)``.

    Args:
        model: A token FAN (``*_token``).
        num_classes: K (defaults to ``model.num_classes``).
        aux_loss_weight: lambda (paper: 1).
        aux_only: Published ``--single-token-label`` labeler ablation: the loss is ``lambda * CE(aux_head(mean of
            patch tokens), y)`` alone and validation scores the token-averaged aux logits (default off; the
            published recipes train cls + aux, ``--cls-with-single-token-label``). The class head stays in the graph
            with weight 0, so DDP sees a gradient for every parameter.
        label_smoothing, mixup_alpha, cutmix_alpha, mix_prob, switch_prob: class targets, see ``ClassTargets``.
        aux_max_weight: Weight mu of the max-over-tokens term ``CE(max_i aux_head(p_i), y)`` (not published;
            default 0: off).
        aux_max_topk: Fraction f of the tokens that term pools per class: the mean of the ``round(f * N)``
            highest token logits (top-k pooling); 0 (default): the single highest, the max.
        token_cutmix_alpha: Beta(alpha, alpha) of the token-aligned CutMix with per-region aux targets (not
            published; default 0: off). Cannot be combined with ``mixup_alpha`` / ``cutmix_alpha``.
        token_cutmix_prob: Probability that a batch is token-CutMixed.
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int | None = None,
        aux_loss_weight: float = 1.0,
        aux_only: bool = False,
        label_smoothing: float = 0.1,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        mix_prob: float = 1.0,
        switch_prob: float = 0.5,
        aux_max_weight: float = 0.0,
        aux_max_topk: float = 0.0,
        token_cutmix_alpha: float = 0.0,
        token_cutmix_prob: float = 0.5,
    ) -> None:
        super().__init__(model)
        _require_token_model(model, "stl_labeler model")
        if aux_loss_weight < 0:
            raise ValueError(f"aux_loss_weight must be >= 0, got {aux_loss_weight}")
        if aux_only and aux_loss_weight == 0:
            raise ValueError("aux_only=true trains only the aux term; it needs aux_loss_weight > 0")
        if aux_max_weight < 0:
            raise ValueError(f"aux_max_weight must be >= 0, got {aux_max_weight}")
        if not 0.0 <= aux_max_topk <= 1.0:
            raise ValueError(f"aux_max_topk must be in [0, 1], got {aux_max_topk}")
        if token_cutmix_alpha < 0 or not 0.0 <= token_cutmix_prob <= 1.0:
            raise ValueError(f"token_cutmix_alpha must be >= 0 and token_cutmix_prob in [0, 1], got "
                             f"{token_cutmix_alpha}, {token_cutmix_prob}")  # fmt: skip
        if token_cutmix_alpha > 0 and (mixup_alpha > 0 or cutmix_alpha > 0):
            raise ValueError("token_cutmix_alpha replaces Mixup/CutMix of the labeler; set mixup_alpha and "
                             "cutmix_alpha to 0")  # fmt: skip
        self.aux_loss_weight = aux_loss_weight
        self.aux_only = bool(aux_only)
        self.aux_max_weight = aux_max_weight
        self.aux_max_topk = aux_max_topk
        self.token_cutmix_alpha = token_cutmix_alpha
        self.token_cutmix_prob = token_cutmix_prob
        k = int(num_classes or as_backbone(model).num_classes)
        self.targets = ClassTargets(k, label_smoothing, mixup_alpha, cutmix_alpha, mix_prob, switch_prob)

    def training_step(self, batch: dict[str, Any], ctx: StepContext) -> dict[str, torch.Tensor]:
        """STL losses of one micro-batch (see the class docstring)."""
        images, targets = self.targets(batch["image"], batch["label"])
        model = as_backbone(self.model)
        aux_targets, inside = targets, None
        if self.token_cutmix_alpha > 0 and np.random.rand() < self.token_cutmix_prob:
            grid = model.grid_size(tuple(images.shape[-2:]))
            images, inside = token_cutmix(images, grid, self.token_cutmix_alpha)
            area = inside.float().mean()
            targets = (1 - area) * aux_targets + area * aux_targets.flip(0)  # the class head: area-mixed label
        cls, patches = model.forward_features(images)
        cls_loss = soft_cross_entropy(model.forward_head((cls, patches)), targets)
        aux_head = self.model.get_submodule("aux_head")
        out = {"cls": cls_loss.detach()}
        mil = None
        if inside is None and self.aux_max_weight == 0:  # the published loss
            aux_loss = soft_cross_entropy(aux_head(patches.mean(dim=1)), targets)  # (B, N, C) -> (B, C)
        else:
            token_logits = aux_head(patches)  # (B, N, K); aux_head is linear: their mean is the GAP logit
            aux_loss = region_cross_entropy(token_logits, aux_targets, inside)
            if self.aux_max_weight > 0:
                mil = region_cross_entropy(token_logits, aux_targets, inside, "max", self.aux_max_topk)
        cls_weight = 0.0 if self.aux_only else 1.0
        loss = cls_weight * cls_loss + self.aux_loss_weight * aux_loss
        if mil is not None:
            loss = loss + self.aux_max_weight * mil
            out["aux_max"] = mil.detach()
        return {"loss": loss, **out, "aux": aux_loss.detach()}

    @torch.no_grad()
    def validation_step(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """As ``Method.validation_step``; with ``aux_only`` the logits are the token-averaged aux logits."""
        if not self.aux_only:
            return super().validation_step(model, batch)
        _, patches = as_backbone(model).forward_features(batch["image"])
        logits = model.get_submodule("aux_head")(patches.mean(dim=1))  # (B, N, C) -> (B, K)
        labels = batch["label"]
        return {
            "correct": (logits.argmax(dim=-1) == labels).sum().float(),
            "loss": F.cross_entropy(logits.float(), labels, reduction="sum"),
            "count": torch.tensor(float(labels.numel()), device=logits.device),
        }

    def export_meta(self) -> dict[str, Any]:
        """``aux_only`` labelers predict with their aux head; say so in ``model.json``."""
        return {"stl_labeler": {"aux_only": True}} if self.aux_only else {}


@register_method("stl_student")
class STLStudent(Method):
    """STL stage 2: ``CE(cls, y_mix) + lambda * mean_tokens CE(aux_logits, y_hat)`` with a frozen labeler.

    Args:
        model: The student, a token FAN (``*_token``).
        labeler: Stage-1 run directory, exported model stem (``RUN/model``), published FAN-TL checkpoint
            (``.pth``/``.pth.tar``, with ``labeler_model``) or ``"self"`` (online self-labelling: the student labels
            its own teacher view, in eval mode, and is put back in train mode afterwards); a ready module is also
            accepted (tests, notebooks).
        labeler_export: For a run directory: ``"last"`` (``RUN/model``) or ``"best"`` (``RUN/model_best``, the
            published choice: the best EMA checkpoint by top-1; the run must have written it).
        labeler_model: timm name of a published checkpoint's architecture (e.g. ``fan_tiny_8_p4_hybrid_token``).
        labeler_model_kwargs: Extra ``timm.create_model`` kwargs for ``labeler_model`` (the class count is read
            from the checkpoint).
        labeler_prefer: ``"ema"`` (default, as published: ``state_dict_ema`` when the file has it) or ``"model"``.
        num_classes: K (defaults to ``model.num_classes``).
        token_loss_weight: lambda.
        dense_weight_ramp_epochs: R > 0 ramps lambda as ``lambda * sqrt(min(epoch, R) / R)`` (published
            ``--dynamic-dense-weight`` uses R = 300, a constant of its loss); 0 (default): constant lambda.
        label_type: ``"gumbel" | "softmax" | "argmax"``.
        tau: Gumbel / softmax temperature (published: 1; the published softmax ablation has no temperature).
        hard: One-hot Gumbel labels.
        token_smoothing: Label smoothing of the token labels; None (default): the published value of
            ``label_type`` (0.1; 0 for the raw softmax labels).
        single_token_label: One label per image (the token-averaged labeler logits), learnt by the token-averaged
            student aux logits (published ``--single-token-label``; default off).
        teacher_aug: The teacher view the data layer's paired transform makes (``batch["teacher_image"]``):
            ``"spatial"`` same crop/flip/geometric ops as the student, no colour ops, erasing or mixing (the
            paper's choice); ``"full"`` the student's augmentations too; ``"none"`` a centre crop of the clean image
            (token grids then differ in content from the student's crop: the paper's ablation).
        teacher_dtype: Autocast dtype of the labeler: ``"auto"`` (the trainer's AMP dtype; bfloat16 on CUDA),
            ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        label_smoothing, mixup_alpha, cutmix_alpha, mix_prob, switch_prob: class targets, see ``ClassTargets``.
        label_store: A store of cached labels (``tokenlab labels build``) instead of ``labeler``: the data view
            then gives each sample's ``index`` and view geometry (``view_theta``) and no teacher image; the stored
            map is cut to the student view (``cached_logits``) and labelled by the same ``STLTokenLoss``.
        store_crops: With a ``label_store`` built with ``--views N``: the student's crop box and flip are one of
            the sample's N stored random crops (FKD-style; ``data.label_store.StoredCrops``) instead of a fresh
            random crop, so its cached labels are the labeler's logits of that very crop, as online (the full-image
            map resampled to a crop costs accuracy: docs/results/cached_labels.md). Fewer distinct crops per image
            (N) over a run; the store's ``--view-scale`` replaces ``data.transform.scale``.

    Raises:
        FileNotFoundError: no exported labeler at ``labeler`` (or no best export when ``labeler_export="best"``).
        ValueError: the labeler has no ``aux_head`` or predicts another number of classes; bad option.
    """

    data_view = "stl_paired"

    def __init__(
        self,
        model: nn.Module,
        labeler: str | Path | nn.Module | None = None,
        labeler_export: str = "last",
        labeler_model: str | None = None,
        labeler_model_kwargs: dict[str, Any] | None = None,
        labeler_prefer: str = "ema",
        num_classes: int | None = None,
        token_loss_weight: float = 1.0,
        dense_weight_ramp_epochs: int = 0,
        label_type: str = "gumbel",
        tau: float = 1.0,
        hard: bool = True,
        token_smoothing: float | None = None,
        single_token_label: bool = False,
        teacher_aug: str = "spatial",
        teacher_dtype: str = "auto",
        label_smoothing: float = 0.1,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        mix_prob: float = 1.0,
        switch_prob: float = 0.5,
        label_store: str | Path | None = None,
        store_crops: bool = False,
    ) -> None:
        super().__init__(model)
        _require_token_model(model, "stl_student model")
        if labeler is None and label_store is None:
            raise ValueError(
                "stl_student needs method.kwargs.labeler: the run directory of a stage-1 (stl_labeler) run, a "
                "published FAN-TL .pth.tar (with labeler_model) or 'self'; or method.kwargs.label_store: a store "
                "written by `tokenlab labels build`"
            )
        if label_store is not None and teacher_aug != "spatial":
            raise ValueError(
                f"teacher_aug={teacher_aug!r} does not apply with a label_store: the stored labels are cut to the "
                f"student view's geometry; leave teacher_aug at 'spatial'"
            )
        if labeler is not None and label_store is not None:
            raise ValueError(
                "give stl_student either method.kwargs.labeler (online labels) or method.kwargs.label_store "
                "(cached labels; the store names its labeler), not both"
            )
        if labeler_export not in EXPORT_CHOICES:
            raise ValueError(f"unknown labeler_export {labeler_export!r}; valid: {', '.join(EXPORT_CHOICES)}")
        if teacher_aug not in TEACHER_AUGS:
            raise ValueError(f"unknown teacher_aug {teacher_aug!r}; valid: {', '.join(TEACHER_AUGS)}")
        if teacher_dtype not in _DTYPES:
            raise ValueError(f"unknown teacher_dtype {teacher_dtype!r}; valid: {', '.join(_DTYPES)}")
        if token_loss_weight < 0:
            raise ValueError(f"token_loss_weight must be >= 0, got {token_loss_weight}")
        if dense_weight_ramp_epochs < 0:
            raise ValueError(f"dense_weight_ramp_epochs must be >= 0 (0: off), got {dense_weight_ramp_epochs}")
        k = int(num_classes or as_backbone(model).num_classes)
        self.self_labelling = isinstance(labeler, str) and labeler == SELF_LABELER
        # A plain list hides the labeler from the module tree: no train(), no DDP, no optimizer, no checkpoint.
        self._teacher: list[nn.Module] = []
        self.store: LabelStore | None = None
        self.crops: StoredCrops | None = None
        self.labeler_info: dict[str, Any]
        if label_store is not None:
            self.store = LabelStore.open(label_store)
            if self.store.num_classes != k:
                raise ValueError(
                    f"label store {label_store} holds labels of {self.store.num_classes} classes but the student "
                    f"has {k}; build the store with a labeler of this data set"
                )
            self.labeler_info = {**self.store.manifest["labeler"], "label_store": str(label_store)}
            # the stored view of each given crop: StoredCrops.first + batch["given_crop"]; no random crops: an error
            self.crops = StoredCrops(label_store) if store_crops else None
        elif store_crops:
            raise ValueError(
                "store_crops=true takes the student's crops from a label store; set method.kwargs.label_store (a "
                "store built with `tokenlab labels build --views N`)"
            )
        elif self.self_labelling:
            self.labeler_info = {"path": SELF_LABELER, "export": "online"}
        else:
            assert labeler is not None
            teacher, self.labeler_info, _ = load_labeler(
                labeler, labeler_export, labeler_model, labeler_model_kwargs, labeler_prefer
            )
            _require_token_model(teacher, "labeler")
            if teacher.num_classes != k:
                raise ValueError(
                    f"the labeler predicts {teacher.num_classes} classes but the student has {k}; "
                    f"train the labeler (stage 1) on the same data set"
                )
            teacher.eval().requires_grad_(False)
            self._teacher.append(teacher)
        self.token_loss_weight = token_loss_weight
        self.dense_weight_ramp_epochs = int(dense_weight_ramp_epochs)
        self.teacher_aug = teacher_aug
        self.teacher_dtype = _DTYPES[teacher_dtype]
        self.token_loss = STLTokenLoss(label_type, tau, hard, token_smoothing, per_image=single_token_label)
        self.targets = ClassTargets(k, label_smoothing, mixup_alpha, cutmix_alpha, mix_prob, switch_prob)

    @property
    def teacher(self) -> nn.Module:
        """The frozen labeler (the student itself with online self-labelling)."""
        return self.model if self.self_labelling else self._teacher[0]

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], *args: Any, **kwargs: Any) -> STLStudent:
        super()._apply(fn, *args, **kwargs)
        for teacher in self._teacher:
            teacher._apply(fn, *args, **kwargs)  # follow .to(device) / .float() of the method
        return self

    def export_meta(self) -> dict[str, Any]:
        """Which labeler taught this student (``labeler``: path, export last|best|published|online, step)."""
        return {"labeler": dict(self.labeler_info)}

    @classmethod
    def transform_options(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The paired STL transform, with the teacher view chosen by ``teacher_aug``.

        With a ``label_store``: no teacher image but the student view's geometry (``teacher="geometry"``); with
        ``store_crops`` the crop boxes come from the store (``crops_from``).
        """
        if kwargs.get("label_store") is not None:
            crops = {"crops_from": kwargs["label_store"]} if kwargs.get("store_crops") else {}
            return {"teacher": "geometry", **crops}
        return {"teacher": kwargs.get("teacher_aug", "spatial")}

    def _teacher_input(self, batch: dict[str, Any]) -> torch.Tensor:
        if "teacher_image" not in batch:
            raise KeyError(
                f"stl_student needs batch['teacher_image'] (the data layer's stl_pair transform); the batch has "
                f"{sorted(batch)}"
            )
        return batch["teacher_image"]

    def teacher_logits(self, images: torch.Tensor, amp_dtype: torch.dtype | None) -> tuple[torch.Tensor, tuple]:
        """Labeler token logits ``(B, M, K)`` (a normal tensor, safe to use in autograd) and its grid.

        The labeler runs in eval mode; with self-labelling the student's own mode is restored afterwards (the
        published ``token_label_generation`` leaves it in eval mode for the rest of the epoch).
        """
        dtype = self.teacher_dtype or amp_dtype or (torch.bfloat16 if images.device.type == "cuda" else None)
        amp = (
            torch.autocast(images.device.type, dtype=dtype)
            if dtype not in (None, torch.float32)
            else contextlib.nullcontext()
        )
        teacher = self.teacher
        was_training = teacher.training
        teacher.eval()
        try:
            with torch.inference_mode(), amp:
                out = as_backbone(teacher).forward_tokens(images)
        finally:
            teacher.train(was_training and self.self_labelling)
        assert out.token_logits is not None  # the labeler was checked for an aux_head
        return out.token_logits.float().clone(), out.grid  # clone: inference tensors cannot enter autograd

    def cached_logits(self, batch: dict[str, Any], grid: tuple[int, int]) -> torch.Tensor:
        """Stored labeler logits cut to the student views: ``(B, H*W, K)`` on the student's token ``grid``.

        Per sample: the stored view that best covers the student view (view 0, the full image, unless the store
        holds augmented views; with ``store_crops`` the stored crop the view was cut from), its top-k map made dense
        (``dense_logits``) and sampled at the student's token centres through the student view's crop / flip /
        affine (``batch["view_theta"]``).
        """
        assert self.store is not None
        crops = self.crops is not None
        for key in ("index", "view_theta") + (("given_crop",) if crops else ()):
            if key not in batch:
                raise KeyError(f"stl_student with a label_store needs batch[{key!r}] (the stl_paired view with "
                               f"teacher='geometry'{' and crops_from' if crops else ''}); the batch has "
                               f"{sorted(batch)}")  # fmt: skip
        theta_s = batch["view_theta"].float()
        device = theta_s.device
        rec = self.store.read(batch["index"].cpu().numpy())
        source = self.crops.first + batch["given_crop"].cpu().long() if self.crops is not None else None
        view, theta = select_views(rec["theta"], theta_s.cpu(), source)
        rows = torch.arange(len(view))
        gh, gw = self.store.grid
        dense = dense_logits(
            rec["values"][rows, view].to(device), rec["indices"][rows, view].to(device),
            rec["rest"][rows, view].to(device), self.store.num_classes,
        )  # fmt: skip
        maps = dense.transpose(1, 2).reshape(len(view), -1, gh, gw)  # (B, G, K) -> (B, K, h, w)
        return crop_token_map(maps, theta.to(device), grid)

    def token_weight(self, epoch: int) -> float:
        """The token-loss weight at ``epoch``: lambda, or ``lambda * sqrt(min(epoch, R) / R)`` with a ramp R."""
        r = self.dense_weight_ramp_epochs
        if r <= 0:
            return self.token_loss_weight
        return self.token_loss_weight * math.sqrt(min(epoch, r) / r)

    def training_step(self, batch: dict[str, Any], ctx: StepContext) -> dict[str, torch.Tensor]:
        """STL losses of one micro-batch (see the class docstring)."""
        if self.store is None:
            t_logits, t_grid = self.teacher_logits(self._teacher_input(batch), ctx.amp_dtype)
        images, targets = self.targets(batch["image"], batch["label"])
        out = as_backbone(self.model).forward_tokens(images)
        if self.store is not None:
            t_logits, t_grid = self.cached_logits(batch, out.grid), out.grid
        cls_loss = soft_cross_entropy(out.cls_logits, targets)
        token_loss = self.token_loss(out.token_logits, t_logits, out.grid, t_grid)
        weight = self.token_weight(ctx.epoch)
        loss = cls_loss + weight * token_loss
        return {
            "loss": loss,
            "cls": cls_loss.detach(),
            "token": token_loss.detach(),
            "token_weight": torch.tensor(weight, device=loss.device),
        }
