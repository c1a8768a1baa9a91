"""Frozen-feature extraction (cached) and weighted k-NN classification, the standard SSL evaluation.

Features of a frozen backbone are extracted once per data split and cached as safetensors, so the k-NN and the
linear probe (``tokenlab.eval.linear``) can reuse them. The k-NN classifier of DINO [0] / iBOT [1]
(k = 20, T = 0.07) compares L2-normalised features by cosine similarity and lets the k nearest training samples
vote with weights ``exp(s / T)``:

    s_j = <f / ||f||, g_j / ||g_j||>,   score_c(f) = sum_{j in topk(s)} exp(s_j / T) * [y_j = c],
    prediction = argmax_c score_c(f)

Feature kinds (``FEATURE_KINDS``): ``cls`` (final [CLS]), ``avgpool`` (mean of final patch tokens),
``cls_avgpool`` ([CLS] and patch average concatenated, iBOT's linear probe for ViT-B/L) and ``last4_cls`` (the
[CLS] of the last four blocks, each through the final norm, concatenated, iBOT's linear probe for ViT-S; needs a ViT
whose blocks carry the class token).

- [0]: DINO: Emerging Properties in Self-Supervised Vision Transformers, 2021, https://arxiv.org/abs/2104.14294
- [1]: iBOT: Image BERT Pre-Training with Online Tokenizer, 2021, https://arxiv.org/abs/2111.07832
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from tokenlab.models.contract import as_backbone
from tokenlab.utils.amp import autocast

__all__ = ["FEATURE_KINDS", "FeatureSet", "KNNResult", "extract_features", "features_of", "knn_classify"]

logger = logging.getLogger(__name__)

FEATURE_KINDS = ("cls", "avgpool", "cls_avgpool", "last4_cls")


@dataclass
class FeatureSet:
    """Cached features of one split.

    Attributes:
        features: (N, D) float32 features.
        labels: (N,) int64 labels.
        kind: Which feature (one of ``FEATURE_KINDS``).
    """

    features: torch.Tensor
    labels: torch.Tensor
    kind: str

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class KNNResult:
    """Weighted k-NN accuracy.

    Attributes:
        top1: Top-1 accuracy in [0, 1].
        top5: Top-5 accuracy in [0, 1] (equals 1 with 5 classes or fewer).
        k: Neighbours used.
        temperature: T of the vote weights.
        num_train: Training samples searched.
        num_test: Test samples classified.
    """

    top1: float
    top5: float
    k: int
    temperature: float
    num_train: int
    num_test: int


def _check_kind(kind: str) -> None:
    if kind not in FEATURE_KINDS:
        raise ValueError(f"unknown feature kind {kind!r}; valid kinds: {', '.join(FEATURE_KINDS)}")


def features_of(model: nn.Module, images: torch.Tensor, kind: str = "cls") -> torch.Tensor:
    """Features (B, D) of a backbone following the tokenlab contract (``forward_features -> (cls, patches)``)."""
    _check_kind(kind)
    if kind == "last4_cls":
        forward_intermediates = getattr(model, "forward_intermediates", None)
        if forward_intermediates is None or not getattr(model, "num_prefix_tokens", 0):
            raise ValueError(
                f"feature kind 'last4_cls' needs a ViT whose blocks carry the class token; {type(model).__name__} "
                f"has none (use 'cls' or 'cls_avgpool')"
            )
        depth = len(getattr(model, "blocks", ()))
        if depth < 4:
            raise ValueError(f"feature kind 'last4_cls' needs at least 4 blocks; {type(model).__name__} has {depth}")
        inter = forward_intermediates(
            images, indices=4, return_prefix_tokens=True, norm=True, output_fmt="NLC", intermediates_only=True
        )
        return torch.cat([prefix[:, 0] for _, prefix in inter], dim=-1)  # 4 x (B, C) -> (B, 4C)
    cls, patches = as_backbone(model).forward_features(images)
    if kind == "cls":
        return cls
    if kind == "avgpool":
        return patches.mean(dim=1)
    if kind == "cls_avgpool":
        return torch.cat([cls, patches.mean(dim=1)], dim=-1)
    raise ValueError(f"unknown feature kind {kind!r}; valid kinds: {', '.join(FEATURE_KINDS)}")


@torch.no_grad()
def extract_features(
    model: nn.Module,
    loader: Iterable[Any],
    kind: str = "cls",
    device: str | torch.device = "cpu",
    amp: str | torch.dtype | None = None,
    cache: str | Path | None = None,
) -> FeatureSet:
    """Run the frozen ``model`` over ``loader`` (dict batches with ``image`` and ``label``) and collect features.

    Args:
        model: The backbone (put in eval mode here).
        loader: Batches ``{"image": (B, 3, H, W), "label": (B,)}`` (or ``(image, label)`` pairs).
        kind: One of ``FEATURE_KINDS``.
        device: Where the model runs.
        amp: Autocast (``tokenlab.utils.amp``: ``bf16``/``fp16`` or a dtype); features are stored as float32.
        cache: A ``.safetensors`` file: read when it exists and holds the same ``kind``, else written.

    Raises:
        ValueError: an unknown kind, or an empty loader.
    """
    _check_kind(kind)
    cache = Path(cache) if cache is not None else None
    if cache is not None and cache.is_file():
        stored = load_file(str(cache))
        if stored.get("kind_" + kind) is not None:
            logger.info("features read from cache %s (%d samples)", cache, stored["labels"].shape[0])
            return FeatureSet(stored["features"], stored["labels"], kind)
        logger.info("cache %s holds another feature kind; extracting again", cache)
    device = torch.device(device)
    model.eval().to(device)
    feats, labels = [], []
    for batch in loader:
        images, target = (batch["image"], batch["label"]) if isinstance(batch, dict) else batch
        with autocast(device, amp):
            out = features_of(model, images.to(device, non_blocking=True), kind)
        feats.append(out.float().cpu())
        labels.append(torch.as_tensor(target).long().cpu())
    if not feats:
        raise ValueError("the loader gave no batches; nothing to extract")
    result = FeatureSet(torch.cat(feats), torch.cat(labels), kind)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"features": result.features, "labels": result.labels, "kind_" + kind: torch.ones(1)}
        save_file(tensors, str(cache))
        logger.info("features cached in %s (%s)", cache, tuple(result.features.shape))
    return result


@torch.no_grad()
def knn_classify(
    train: FeatureSet,
    test: FeatureSet,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
) -> KNNResult:
    """Weighted k-NN on cosine similarity (see the module docstring for the vote).

    Args:
        train: Features and labels searched.
        test: Features and labels classified.
        k: Neighbours (iBOT: 20).
        temperature: T of the weights ``exp(s / T)`` (0.07).
        num_classes: C (defaults to ``max label + 1``).
        chunk_size: Test samples per similarity block (bounds memory at ``chunk_size x N_train``).

    Raises:
        ValueError: ``k`` outside ``[1, N_train]``, a non-positive temperature, or feature sizes that differ.
    """
    n_train = len(train)
    if not 1 <= k <= n_train:
        raise ValueError(f"k must be in [1, {n_train}] (training samples), got {k}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if train.features.shape[1] != test.features.shape[1]:
        raise ValueError(f"feature sizes differ: train {train.features.shape[1]}, test {test.features.shape[1]}")
    classes = int(num_classes or int(max(train.labels.max(), test.labels.max())) + 1)
    bank = F.normalize(train.features.float(), dim=1)  # (N, D)
    top1 = top5 = 0
    for start in range(0, len(test), chunk_size):
        query = F.normalize(test.features[start : start + chunk_size].float(), dim=1)  # (Q, D)
        sim, idx = (query @ bank.T).topk(k, dim=1)  # (Q, N) -> (Q, k)
        votes = torch.zeros(query.shape[0], classes)
        votes.scatter_add_(1, train.labels[idx], (sim / temperature).exp())  # (Q, k) -> (Q, C)
        ranked = votes.topk(min(5, classes), dim=1).indices
        target = test.labels[start : start + chunk_size].unsqueeze(1)
        top1 += int((ranked[:, :1] == target).sum())
        top5 += int((ranked == target).any(dim=1).sum())
    n_test = len(test)
    return KNNResult(top1 / n_test, top5 / n_test, k, temperature, n_train, n_test)
