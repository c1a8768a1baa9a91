"""Token-label analysis: how good are the per-token labels of an STL labeler or student?

STL (Zhao et al., ICCV 2023, https://arxiv.org/abs/2401.03844; REFERENCE §2) trains a student on per-token labels
``y_hat_i = argmax_k aux_logits_{i,k}`` produced by a labeler whose ``aux_head`` learned from the patch tokens. On any
image folder, per token i of image b with label ``y_b``, predicted label ``p_bi`` and confidence
``c_bi = max_k softmax(z_bi)_k``, over all ``N`` tokens:

- the share of tokens labelled with the image class ``sum_{b,i} [p_bi = y_b] / sum_{b,i} 1``, their mean
  confidence and their class distribution ``P(p = k)``;
- label stability between a teacher view and a student view of the same geometry:
  ``(1 / N) sum_i [p^t_bi = p^s_bi]`` averaged over tokens and images.

Only on a data set with object masks (the synthetic set: 0 background, k + 1 object of class k), with the object
indicator ``M_bi`` (more than ``threshold`` of the token's pixels are object):

- foreground token accuracy ``sum_{b,i} M_bi [p_bi = y_b] / sum_{b,i} M_bi``;
- background tokens: the share labelled with the image class ``sum (1 - M_bi)[p_bi = y_b] / sum (1 - M_bi)``,
  their class distribution ``P(p = k | background)`` and mean confidence;
- IoU between the tokens that agree with the image label ``A_b = {i : p_bi = y_b}`` and the object tokens
  ``M_b``: ``IoU_b = |A_b ∩ M_b| / |A_b ∪ M_b|``, averaged over images (images with an empty union are left out).

Token logits come from ``aux_head`` (``source="aux"``) or from the class head applied to every patch token
(``source="head"``), which is what a labeler trained with the class token only can offer. Comparing a labeler
trained with the patch-token loss against one trained with the class token only shows what the token loss adds.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tokenlab.models.contract import as_backbone
from tokenlab.utils.amp import autocast
from tokenlab.utils.runs import TOKENS_FILE

logger = logging.getLogger(__name__)

__all__ = [
    "SOURCES",
    "TokenExamples",
    "TokenResult",
    "TokenStats",
    "analyze_run",
    "analyze_tokens",
    "label_stability",
    "mask_to_token_grid",
    "photometric_view",
    "token_predictions",
]

SOURCES = ("auto", "aux", "head")


def mask_to_token_grid(mask: torch.Tensor, grid: tuple[int, int], threshold: float = 0.5) -> torch.Tensor:
    """Object tokens: ``(B, Hm, Wm)`` pixel mask (0 = background) -> ``(B, H, W)`` bool.

    A token is object when the fraction of its pixels that are object exceeds ``threshold`` (area pooling, so
    any ``Hm, Wm`` works, including non-multiples of the grid).
    """
    if mask.ndim != 3:
        raise ValueError(f"expected masks of shape (B, H, W), got {tuple(mask.shape)}")
    frac = F.adaptive_avg_pool2d((mask > 0).float()[:, None], grid)[:, 0]  # (B, 1, Hm, Wm) -> (B, H, W)
    return frac > threshold


def label_stability(pred_a: torch.Tensor, pred_b: torch.Tensor) -> float:
    """Fraction of tokens with the same label in two views: ``mean [p^a = p^b]``."""
    if pred_a.shape != pred_b.shape:
        raise ValueError(f"token label grids differ in shape: {tuple(pred_a.shape)} vs {tuple(pred_b.shape)}")
    return (pred_a == pred_b).float().mean().item()


@dataclass
class TokenStats:
    """Running sums for the token metrics (see the module docstring for the formulas).

    Batches come either all with object masks or all without; the mask-based sums stay empty without masks.
    """

    num_classes: int
    tokens: int = 0
    agree: int = 0
    conf: float = 0.0
    hist: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    masked: bool | None = None
    fg: int = 0
    fg_correct: int = 0
    bg: int = 0
    bg_agree: int = 0
    fg_conf: float = 0.0
    bg_conf: float = 0.0
    bg_hist: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    ious: list[float] = field(default_factory=list)
    stable: int = 0
    stable_total: int = 0
    images: int = 0

    def __post_init__(self) -> None:
        if self.bg_hist.numel() == 0:
            self.bg_hist = torch.zeros(self.num_classes, dtype=torch.long)
        if self.hist.numel() == 0:
            self.hist = torch.zeros(self.num_classes, dtype=torch.long)

    def update(
        self,
        pred: torch.Tensor,
        conf: torch.Tensor,
        labels: torch.Tensor,
        fg: torch.Tensor | None,
        pred_other_view: torch.Tensor | None = None,
    ) -> None:
        """Add a batch: ``pred``/``conf``/``fg`` are (B, H, W), ``labels`` (B,); ``fg`` None without masks."""
        fg_shape = pred.shape if fg is None else fg.shape
        if not (pred.shape == conf.shape == fg_shape) or labels.shape != pred.shape[:1]:
            raise ValueError(
                f"shape mismatch: pred {tuple(pred.shape)}, conf {tuple(conf.shape)}, fg {tuple(fg_shape)}, "
                f"labels {tuple(labels.shape)}"
            )
        if self.masked is not None and self.masked != (fg is not None):
            raise ValueError("token statistics mix batches with and without object masks; give masks for all or none")
        self.masked = fg is not None
        agree = pred == labels[:, None, None]  # (B, H, W)
        self.images += pred.shape[0]
        self.tokens += pred.numel()
        self.agree += int(agree.sum())
        self.conf += float(conf.double().sum())
        self.hist += torch.bincount(pred.flatten(), minlength=self.num_classes)[: self.num_classes]
        if pred_other_view is not None:
            self.stable += int((pred == pred_other_view).sum())
            self.stable_total += pred.numel()
        if fg is None:
            return
        bg = ~fg
        self.fg += int(fg.sum())
        self.fg_correct += int((agree & fg).sum())
        self.bg += int(bg.sum())
        self.bg_agree += int((agree & bg).sum())
        self.fg_conf += float(conf[fg].double().sum())
        self.bg_conf += float(conf[bg].double().sum())
        self.bg_hist += torch.bincount(pred[bg].flatten(), minlength=self.num_classes)[: self.num_classes]
        inter = (agree & fg).flatten(1).sum(1)
        union = (agree | fg).flatten(1).sum(1)
        self.ious += [i / u for i, u in zip(inter.tolist(), union.tolist(), strict=True) if u > 0]

    def summary(self) -> dict[str, Any]:
        """The accumulated statistics as ratios (NaN where nothing was counted).

        ``masks`` says whether object masks were given; the mask-based keys (``fg_*``, ``bg_*``, ``iou``) are there
        only when they were.
        """

        def ratio(a: float, b: float) -> float:
            return a / b if b else math.nan

        free = {
            "images": self.images,
            "masks": bool(self.masked),
            "tokens": self.tokens,
            "agree_with_image_label": ratio(self.agree, self.tokens),
            "confidence": ratio(self.conf, self.tokens),
            "distribution": (self.hist.double() / max(self.tokens, 1)).tolist(),
            "stability": ratio(self.stable, self.stable_total),
        }
        if not self.masked:
            return free
        return {
            **free,
            "fg_tokens": self.fg,
            "bg_tokens": self.bg,
            "fg_accuracy": ratio(self.fg_correct, self.fg),
            "fg_confidence": ratio(self.fg_conf, self.fg),
            "bg_agree_with_image_label": ratio(self.bg_agree, self.bg),
            "bg_confidence": ratio(self.bg_conf, self.bg),
            "bg_distribution": (self.bg_hist.double() / max(self.bg, 1)).tolist(),
            "iou": ratio(sum(self.ious), len(self.ious)),
        }


def _token_source(model: nn.Module, source: str) -> str:
    if source not in SOURCES:
        raise ValueError(f"unknown token-label source {source!r}; valid: {', '.join(SOURCES)}")
    has_aux = bool(getattr(model, "has_aux_head", False))
    if source == "auto":
        return "aux" if has_aux else "head"
    if source == "aux" and not has_aux:
        raise ValueError(f"source 'aux' needs a model with an aux_head; {type(model).__name__} has none (use 'head')")
    return source


def token_predictions(model: nn.Module, x: torch.Tensor, source: str = "auto") -> tuple[torch.Tensor, tuple[int, int]]:
    """Per-token logits ``(B, N, K)`` and the grid, from ``aux_head`` or the class head on the patch tokens."""
    source = _token_source(model, source)
    if source == "aux":
        out = as_backbone(model).forward_tokens(x)
        assert out.token_logits is not None  # _token_source checked the aux_head
        return out.token_logits, out.grid
    elif source == "head":
        backbone = as_backbone(model)
        _, patches = backbone.forward_features(x)
        return backbone.get_classifier()(patches), backbone.grid_size(x.shape[-2:])
    else:
        raise ValueError(f"unknown token-label source {source!r}; valid: {', '.join(SOURCES)}")


def photometric_view(
    x: torch.Tensor, mean: Sequence[float], std: Sequence[float], generator: torch.Generator, strength: float = 0.4
) -> torch.Tensor:
    """A student view with the same geometry: per-image brightness/contrast jitter and Gaussian noise.

    As in STL's paired views, only colour changes between teacher and student, so token i sees the same patch in
    both. Brightness and contrast factors are drawn from ``U(1 - strength, 1 + strength)``; noise has std 0.03.
    """
    m = torch.tensor(mean, dtype=x.dtype)[:, None, None]
    s = torch.tensor(std, dtype=x.dtype)[:, None, None]
    img = x.cpu() * s + m  # normalised -> [0, 1]
    b = x.shape[0]
    bright = 1 + strength * (2 * torch.rand(b, 1, 1, 1, generator=generator) - 1)
    contrast = 1 + strength * (2 * torch.rand(b, 1, 1, 1, generator=generator) - 1)
    grey = img.mean(dim=(1, 2, 3), keepdim=True)
    img = ((img * bright - grey) * contrast + grey + 0.03 * torch.randn(img.shape, generator=generator)).clamp(0, 1)
    return ((img - m) / s).to(x.device)


@dataclass
class TokenExamples:
    """The first few analysed images for pictures: images in [0, 1], token labels, confidences, masks (or None)."""

    images: torch.Tensor  # (n, 3, S, S)
    labels: torch.Tensor  # (n,)
    pred: torch.Tensor  # (n, H, W)
    conf: torch.Tensor  # (n, H, W)
    masks: torch.Tensor | None  # (n, S, S); None without masks
    attention: torch.Tensor | None = None  # (n, heads, H, W)


@dataclass
class TokenResult:
    """Token-label analysis of one model.

    ``metrics`` holds :meth:`TokenStats.summary`, ``skipped`` the number of unreadable images left out.
    """

    name: str
    source: str
    classes: list[str]
    metrics: dict[str, Any]
    examples: TokenExamples | None = None
    skipped: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The ``tokens.json`` record (``skipped``: unreadable images left out)."""
        m = dict(self.metrics)
        for key in ("distribution", "bg_distribution"):
            if key in m:
                m[key] = dict(zip(self.classes, m[key], strict=True))
        return {"name": self.name, "source": self.source, "classes": self.classes, **m, "skipped": self.skipped}


def analyze_tokens(
    model: nn.Module,
    loader: Iterable[Mapping[str, Any]],
    classes: Sequence[str],
    mean: Sequence[float],
    std: Sequence[float],
    source: str = "auto",
    threshold: float = 0.5,
    device: str | torch.device = "cpu",
    amp: str | None = None,
    num_examples: int = 8,
    seed: int = 0,
    name: str = "model",
) -> TokenResult:
    """Token-label metrics of ``model`` over ``loader`` (batches with ``image``, ``label`` and, optionally, ``mask``).

    Args:
        model: A FAN (token model or not) or any model with ``forward_features``/``get_classifier``/``grid_size``.
        loader: Batches ``{"image": (B,3,S,S), "label": (B,)}``, with ``"mask": (B,S,S)`` for the mask-based
            metrics (all batches or none); with ``"teacher_image"``, stability
            compares that view with ``image``; without it, with :func:`photometric_view` of ``image``.
        classes: Class names (for the token class distributions).
        mean: The normalisation mean of the images (to build the jittered view and the example pictures).
        std: The normalisation std, likewise.
        source: ``auto`` (aux head when present), ``aux`` or ``head``.
        threshold: Object fraction above which a token counts as object.
        device: Where the model runs.
        amp: Autocast dtype (``tokenlab.utils.amp``).
        num_examples: Images kept for pictures.
        seed: Seed of the photometric student view.
        name: Label of this model in reports.
    """
    src = _token_source(model, source)
    device = torch.device(device)
    model.eval().to(device)
    class_attention_maps = getattr(model, "class_attention_maps", None)
    stats = TokenStats(len(classes))
    gen = torch.Generator().manual_seed(seed)
    ex: dict[str, list[torch.Tensor]] = {"images": [], "labels": [], "pred": [], "conf": [], "masks": [], "attn": []}
    kept = skipped = 0
    with torch.inference_mode(), autocast(device, amp):
        for batch in loader:
            x = batch["image"].to(device)
            labels = batch["label"].cpu()
            masks = batch.get("mask")
            if "valid" in batch:
                keep = batch["valid"].bool()
                skipped += int((~keep).sum())
                x, labels = x[keep.to(device)], labels[keep]
                masks = masks[keep] if masks is not None else None
            if x.shape[0] == 0:
                continue
            logits, grid = token_predictions(model, x, src)
            probs = logits.float().softmax(-1)  # (B, N, K)
            conf, pred = probs.max(-1)
            pred = pred.reshape(-1, *grid).cpu()  # (B, N) -> (B, H, W)
            conf = conf.reshape(-1, *grid).cpu()
            other = batch.get("teacher_image")
            view = other.to(device) if other is not None else photometric_view(x, mean, std, gen)
            pred_view = token_predictions(model, view, src)[0].argmax(-1).reshape(-1, *grid).cpu()
            fg = mask_to_token_grid(masks, grid, threshold) if masks is not None else None
            stats.update(pred, conf, labels, fg, pred_view)
            if kept < num_examples:
                n = min(num_examples - kept, x.shape[0])
                m = torch.tensor(mean)[:, None, None]
                s = torch.tensor(std)[:, None, None]
                ex["images"].append((x[:n].float().cpu() * s + m).clamp(0, 1))
                ex["labels"].append(labels[:n])
                ex["pred"].append(pred[:n])
                ex["conf"].append(conf[:n])
                if masks is not None:
                    ex["masks"].append(masks[:n])
                if class_attention_maps is not None:
                    ex["attn"].append(class_attention_maps(x[:n]).float().cpu())
                kept += n
    if stats.images == 0:
        raise ValueError("no image analysed: the loader was empty")
    examples = None
    if kept:
        examples = TokenExamples(
            images=torch.cat(ex["images"]),
            labels=torch.cat(ex["labels"]),
            pred=torch.cat(ex["pred"]),
            conf=torch.cat(ex["conf"]),
            masks=torch.cat(ex["masks"]) if ex["masks"] else None,
            attention=torch.cat(ex["attn"]) if ex["attn"] else None,
        )
    if skipped:
        logger.warning("token analysis of %s: %d unreadable images skipped", name, skipped)
    return TokenResult(name, src, list(classes), stats.summary(), examples, skipped)


def analyze_run(
    checkpoint: str | Path,
    data: str | Path,
    out: str | Path | None = None,
    source: str = "auto",
    threshold: float = 0.5,
    device: str = "cpu",
    amp: str | None = None,
    batch_size: int = 64,
    workers: int = 0,
    num_examples: int = 8,
    seed: int = 0,
) -> TokenResult:
    """Load an exported model (run dir or stem), analyse its token labels on ``data`` and write ``tokens.json``.

    ``data`` is any data spec (``DIR[:split]`` or a bare ``root/<class>/<image>`` tree). With object masks
    (``DIR/<split>_masks``, e.g. the synthetic set) ``tokens.json`` holds the mask-based metrics and the ``threshold``;
    without, ``"masks": false`` and the mask-free statistics only.
    """
    import json
    import os

    from torch.utils.data import DataLoader

    from tokenlab.data.images import list_class_dirs
    from tokenlab.data.specs import EVAL_SPLITS, parse_data_spec
    from tokenlab.data.transforms import eval_transform_from_meta
    from tokenlab.eval.class_maps import match_model_classes
    from tokenlab.eval.folders import ImageTreeDataset
    from tokenlab.models import load_exported

    ckpt = Path(checkpoint)
    model, meta = load_exported(ckpt, device=device)
    spec = parse_data_spec(data).resolve(EVAL_SPLITS)
    if spec.masks is None:
        logger.info("no object masks for %s: token maps and mask-free statistics only", spec.root)
    classes = match_model_classes(meta, list_class_dirs(spec.root), spec.root)
    tf = eval_transform_from_meta(meta)
    mean, std = tf.mean, tf.std
    ds = ImageTreeDataset(spec.root, {c: i for i, c in enumerate(classes)}, tf, mask_root=spec.masks)
    # a fixed shuffled order: the metrics do not depend on it, but the example pictures then show several classes
    # instead of the first class folder's first images
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed)).tolist()
    loader = DataLoader(ds, batch_size=batch_size, sampler=order, num_workers=workers)
    name = ckpt.name if ckpt.is_dir() else ckpt.parent.name
    res = analyze_tokens(model, loader, classes, mean, std, source, threshold, device, amp, num_examples, seed, name)
    target = Path(out) if out else (ckpt / TOKENS_FILE if ckpt.is_dir() else ckpt.parent / TOKENS_FILE)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    record = {**res.to_dict(), "data": str(spec.root)}
    if spec.masks is not None:
        record["threshold"] = threshold
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, target)
    logger.info("wrote %s", target)
    return res
