"""Batched classification evaluation: clean accuracy, NLL, calibration, and OOD sets on a class subset.

- Prediction rules for STL token models (REFERENCE §1): ``"official"`` is ``model(x)``, i.e.
  ``cls_logits + 0.5 * max_over_tokens(aux_logits)``; ``"cls"`` (ablation) is ``model.forward_tokens(x).cls_logits``.
- OOD sets whose classes are a subset or a renaming of the training classes: the logits are restricted to the
  covered classes before the argmax, ``y_hat = subset[argmax_j z_{subset[j]}]``; which classes a set covers comes
  from :mod:`tokenlab.eval.class_maps` (ImageNet-A/R tables, mapping files).
- Metrics (see :mod:`tokenlab.eval.metrics`): top-1/top-5, NLL, ECE with a reliability diagram, and the class
  balance of the predictions (per-class and balanced accuracy, majority-class rate, prediction entropy, a
  ``collapsed`` flag), all from the same logits (no second pass).

Inference runs under ``torch.inference_mode`` with optional autocast (``tokenlab.utils.amp``: bf16 / fp16);
unreadable images are skipped and counted, never silently dropped. Loaders come from
:func:`tokenlab.eval.folders.eval_loader`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tokenlab.eval.metrics import (
    ClassBalance,
    Reliability,
    class_balance,
    expected_calibration_error,
    nll,
    topk_accuracy,
)
from tokenlab.models.contract import as_backbone
from tokenlab.utils.amp import autocast

logger = logging.getLogger(__name__)

__all__ = [
    "CONFUSION_MAX_CLASSES",
    "RULES",
    "ClassifyResult",
    "Predictions",
    "evaluate_classifier",
    "predict",
    "restrict_logits",
    "score_predictions",
]

RULES = ("official", "cls")
# eval.json stores the confusion matrix of a set only up to this many competing classes (K x K counts)
CONFUSION_MAX_CLASSES = 50


@dataclass
class ClassifyResult:
    """Result of one classification evaluation.

    Attributes:
        n: Images evaluated.
        skipped: Unreadable images skipped.
        top1, top5: Accuracies in [0, 1].
        nll: Mean negative log-likelihood.
        ece: Expected calibration error.
        reliability: The reliability diagram behind ``ece``.
        rule: Prediction rule (``"official"`` or ``"cls"``).
        num_classes: Classes competing in the argmax (the subset size for OOD sets).
        seconds: Wall time of inference; ``images_per_s = n / seconds``.
        balance: How the predictions spread over the classes (None only for results built by hand).
        class_ids: The model class of each competing class (``subset`` for OOD sets; None: the identity).
    """

    n: int
    skipped: int
    top1: float
    top5: float
    nll: float
    ece: float
    reliability: Reliability
    rule: str
    num_classes: int
    seconds: float = 0.0
    balance: ClassBalance | None = None
    class_ids: list[int] | None = None

    @property
    def images_per_s(self) -> float:
        """Evaluation throughput (NaN when no time was measured)."""
        return self.n / self.seconds if self.seconds > 0 else float("nan")

    def to_dict(self) -> dict[str, Any]:
        """This result as plain JSON-ready data.

        The class-balance keys index the competing classes in order; ``majority_class`` is the model's class index
        (through ``class_ids`` for OOD sets, whose ``subset`` lists the model class of each competing class);
        ``confusion`` (row = true, column = predicted) only up to :data:`CONFUSION_MAX_CLASSES` classes.
        """
        out = {
            "n": self.n, "skipped": self.skipped, "top1": self.top1, "top5": self.top5, "nll": self.nll,
            "ece": self.ece, "rule": self.rule, "num_classes": self.num_classes, "seconds": self.seconds,
            "images_per_s": self.images_per_s, "reliability": self.reliability.to_dict(),
        }  # fmt: skip
        b = self.balance
        if b is not None:
            major = self.class_ids[b.majority_class] if self.class_ids is not None else b.majority_class
            out.update({
                "per_class_accuracy": b.per_class_accuracy, "balanced_accuracy": b.balanced_accuracy,
                "prediction_counts": b.prediction_counts, "majority_class": major, "majority_rate": b.majority_rate,
                "majority_true_rate": b.majority_true_rate, "prediction_entropy": b.prediction_entropy,
                "collapsed": b.collapsed,
            })  # fmt: skip
            if self.num_classes <= CONFUSION_MAX_CLASSES:
                out["confusion"] = b.confusion
        return out


def _rule_logits(model: nn.Module, x: torch.Tensor, rule: str) -> torch.Tensor:
    if rule == "official":
        return model(x)
    elif rule == "cls":
        if not hasattr(model, "forward_tokens"):
            raise ValueError(f"rule 'cls' needs a model with forward_tokens; {type(model).__name__} has none")
        return as_backbone(model).forward_tokens(x).cls_logits
    else:
        raise ValueError(f"unknown prediction rule {rule!r}; valid: {', '.join(RULES)}")


@dataclass
class Predictions:
    """Logits collected by :func:`predict`.

    Attributes:
        logits: ``{rule: (n, K) float32 logits}``.
        targets: (n,) labels.
        groups: (n,) value of the batch key ``"group"`` (e.g. a corruption cell id), or None without it.
        skipped: Unreadable images skipped, in total.
        skipped_groups: The ``"group"`` value of every skipped image.
        seconds: Wall time.
    """

    logits: dict[str, torch.Tensor]
    targets: torch.Tensor
    groups: torch.Tensor | None
    skipped: int
    skipped_groups: list[int]
    seconds: float


def predict(
    model: nn.Module,
    loader: Iterable[Mapping[str, Any]],
    device: str | torch.device = "cpu",
    amp: str | None = None,
    rules: Sequence[str] = ("official",),
) -> Predictions:
    """Run ``model`` over ``loader`` once (``inference_mode`` + optional autocast) and collect logits per rule.

    Batches carrying ``"valid"`` drop their invalid rows (counted in ``skipped``).
    """
    unknown = [r for r in rules if r not in RULES]
    if unknown:
        raise ValueError(f"unknown prediction rule(s) {unknown}; valid: {', '.join(RULES)}")
    device = torch.device(device)
    model.eval().to(device)
    outs: dict[str, list[torch.Tensor]] = {r: [] for r in rules}
    targets, groups, skipped_groups, skipped = [], [], [], 0
    both = set(rules) == {"official", "cls"} and hasattr(model, "forward_tokens")
    t0 = time.perf_counter()
    with torch.inference_mode(), autocast(device, amp):
        for batch in loader:
            x, y, g = batch["image"], batch["label"], batch.get("group")
            if "valid" in batch:
                keep = batch["valid"].bool()
                skipped += int((~keep).sum())
                if g is not None:
                    skipped_groups.extend(g[~keep].tolist())
                x, y, g = x[keep], y[keep], (g[keep] if g is not None else None)
            if x.shape[0] == 0:
                continue
            x = x.to(device, non_blocking=True)
            if both:
                tok = as_backbone(model).forward_tokens(x)  # one forward pass serves both rules
                outs["official"].append(tok.combined().float().cpu())
                outs["cls"].append(tok.cls_logits.float().cpu())
            else:
                for r in rules:
                    outs[r].append(_rule_logits(model, x, r).float().cpu())
            targets.append(y.cpu())
            if g is not None:
                groups.append(g.cpu())
    if not targets:
        raise ValueError(f"no readable image in the data set ({skipped} unreadable)")
    return Predictions(
        logits={r: torch.cat(v) for r, v in outs.items()},
        targets=torch.cat(targets),
        groups=torch.cat(groups) if groups else None,
        skipped=skipped,
        skipped_groups=skipped_groups,
        seconds=time.perf_counter() - t0,
    )


def restrict_logits(logits: torch.Tensor, subset: Sequence[int]) -> torch.Tensor:
    """Keep the columns ``subset`` of ``(n, K)`` logits: ``(n, K) -> (n, len(subset))``.

    A target ``t`` in the full label space becomes ``subset.index(t)``; the argmax ``j`` of the restricted logits
    means the full class ``subset[j]``.
    """
    if len(subset) == 0:
        raise ValueError("empty class subset")
    bad = [i for i in subset if i < 0 or i >= logits.shape[1]]
    if bad:
        raise ValueError(f"subset indices {bad[:10]} out of range for {logits.shape[1]} classes")
    return logits[:, torch.as_tensor(list(subset), dtype=torch.long)]


def _scores(logits: torch.Tensor, targets: torch.Tensor, rule: str, skipped: int, seconds: float,
            n_bins: int, class_ids: list[int] | None) -> ClassifyResult:  # fmt: skip
    acc = topk_accuracy(logits, targets, (1, 5))
    rel = expected_calibration_error(logits, targets, n_bins)
    balance = class_balance(logits.argmax(dim=1), targets, logits.shape[1])
    if balance.collapsed:
        major = class_ids[balance.majority_class] if class_ids is not None else balance.majority_class
        logger.warning("collapsed predictions (rule %s): class %d takes %.0f %% of %d predictions but %.0f %% of the "
                       "labels; balanced accuracy %.1f %%", rule, major, 100 * balance.majority_rate, len(targets),
                       100 * balance.majority_true_rate, 100 * balance.balanced_accuracy)  # fmt: skip
    return ClassifyResult(
        n=len(targets), skipped=skipped, top1=acc[1], top5=acc[5], nll=nll(logits, targets), ece=rel.ece,
        reliability=rel, rule=rule, num_classes=logits.shape[1], seconds=seconds, balance=balance,
        class_ids=class_ids,
    )  # fmt: skip


def evaluate_classifier(
    model: nn.Module,
    loader: Iterable[Mapping[str, Any]],
    device: str | torch.device = "cpu",
    amp: str | None = None,
    rules: Sequence[str] = ("official",),
    subset: Sequence[int] | None = None,
    n_bins: int = 15,
) -> dict[str, ClassifyResult]:
    """Evaluate ``model`` on ``loader`` for each prediction rule.

    Args:
        model: A classifier; token models also support the ``"cls"`` rule.
        loader: Yields ``{"image", "label"[, "valid"]}`` batches; labels index the model's classes.
        device: Where to run.
        amp: Autocast dtype (``tokenlab.utils.amp``: a name or a dtype; None for full precision).
        rules: Subset of :data:`RULES`.
        subset: Restrict the logits to these model classes before every metric (OOD sets).
        n_bins: Bins of the reliability diagram.

    Returns:
        ``{rule: ClassifyResult}``.
    """
    pred = predict(model, loader, device, amp, rules)
    return score_predictions(pred.logits, pred.targets, pred.skipped, pred.seconds, subset, n_bins)


def score_predictions(
    logits: Mapping[str, torch.Tensor],
    targets: torch.Tensor,
    skipped: int = 0,
    seconds: float = 0.0,
    subset: Sequence[int] | None = None,
    n_bins: int = 15,
) -> dict[str, ClassifyResult]:
    """Metrics of collected logits per rule, restricted to ``subset`` first when given."""
    if subset is not None:
        pos = {c: j for j, c in enumerate(subset)}
        missing = sorted({int(t) for t in targets.tolist()} - set(pos))
        if missing:
            raise ValueError(f"targets {missing[:10]} are not in the class subset")
        targets = torch.tensor([pos[int(t)] for t in targets.tolist()], dtype=torch.long)
        logits = {r: restrict_logits(v, subset) for r, v in logits.items()}
    ids = [int(c) for c in subset] if subset is not None else None
    return {r: _scores(v, targets, r, skipped, seconds, n_bins, ids) for r, v in logits.items()}
