"""Classification, calibration and corruption-robustness metrics (pure functions on tensors and error tables).

Implements REFERENCE §3 and the standard definitions they build on:

- top-k accuracy: ``acc@k = (1/n) sum_i [y_i in topk(z_i)]``;
- negative log-likelihood: ``NLL = -(1/n) sum_i log softmax(z_i)_{y_i}``;
- expected calibration error (Guo et al., ICML 2017, https://arxiv.org/abs/1706.04599) with equal-width confidence
  bins ``B_b``: ``ECE = sum_b (|B_b| / n) * |acc(B_b) - conf(B_b)|``;
- corruption error (Hendrycks & Dietterich, ICLR 2019, https://arxiv.org/abs/1903.12261):
  ``CE_c = sum_s E_{s,c} / sum_s E^ref_{s,c}``, ``mCE = mean_c CE_c``;
  relative ``rCE_c = sum_s (E_{s,c} - E_clean) / sum_s (E^ref_{s,c} - E^ref_clean)``, ``relative mCE = mean_c rCE_c``;
- retention ``= robust accuracy / clean accuracy`` with robust accuracy the mean accuracy over every
  (corruption, severity) cell;
- class balance of the predictions (a collapse onto one class must not hide behind top-1):
  per-class accuracy ``acc_c = |{i: y_i = c, y^_i = c}| / |{i: y_i = c}|``, balanced accuracy ``mean_c acc_c`` over
  the classes present, majority rate ``max_c |{i: y^_i = c}| / n``, and the normalised prediction entropy
  ``H(q) / log K`` of the predicted-class histogram ``q`` (1 = uniform over the K competing classes, 0 = one class).

Error tables are ``{corruption: {severity: error}}`` with errors in [0, 1].
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

__all__ = [
    "ALEXNET_CLEAN_ERROR",
    "ALEXNET_ERRORS",
    "COLLAPSE_SHARE",
    "COMMON_CORRUPTIONS",
    "ClassBalance",
    "EXTRA_CORRUPTIONS",
    "CorruptionScores",
    "Reliability",
    "corruption_scores",
    "class_balance",
    "expected_calibration_error",
    "mce",
    "nll",
    "relative_mce",
    "retention",
    "topk_accuracy",
]

COMMON_CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "impulse_noise",
    "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness",
    "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)  # fmt: skip
EXTRA_CORRUPTIONS: tuple[str, ...] = ("speckle_noise", "gaussian_blur", "spatter", "saturate")

# AlexNet mean top-1 error per ImageNet-C corruption, averaged over the 5 severities (REFERENCE §3).
ALEXNET_ERRORS: dict[str, float] = {
    "gaussian_noise": 0.886428, "shot_noise": 0.894468, "impulse_noise": 0.922640,
    "defocus_blur": 0.819880, "glass_blur": 0.826268, "motion_blur": 0.785948, "zoom_blur": 0.798360,
    "snow": 0.866816, "frost": 0.826572, "fog": 0.819324, "brightness": 0.564592,
    "contrast": 0.853204, "elastic_transform": 0.646056, "pixelate": 0.717840, "jpeg_compression": 0.606500,
}  # fmt: skip
# AlexNet clean ImageNet top-1 error (Hendrycks & Dietterich 2019, Table 1: 43.5 %), used for relative mCE.
ALEXNET_CLEAN_ERROR = 0.4348

ErrorTable = Mapping[str, Mapping[int, float]]
# A reference is either a full table or, like the AlexNet numbers, one mean error per corruption.
Reference = Mapping[str, Mapping[int, float] | float]


def _check_logits(logits: torch.Tensor, targets: torch.Tensor) -> None:
    if logits.ndim != 2 or targets.ndim != 1 or logits.shape[0] != targets.shape[0]:
        shapes = f"{tuple(logits.shape)} and {tuple(targets.shape)}"
        raise ValueError(f"expected logits (n, K) and targets (n,), got {shapes}")
    if logits.shape[0] == 0:
        raise ValueError("no samples: metrics need at least one prediction")


def topk_accuracy(logits: torch.Tensor, targets: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, float]:
    """``acc@k = (1/n) sum_i [y_i in topk(z_i)]`` for each k (k larger than K counts as K).

    Args:
        logits: (n, K) scores.
        targets: (n,) class indices.
        ks: The k values.

    Returns:
        ``{k: accuracy}`` with accuracies in [0, 1].
    """
    _check_logits(logits, targets)
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices  # (n, kmax)
    hit = top == targets[:, None]  # (n, kmax)
    return {k: hit[:, : min(k, kmax)].any(dim=1).float().mean().item() for k in ks}


def nll(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean negative log-likelihood ``-(1/n) sum_i log softmax(z_i)_{y_i}`` (natural log)."""
    _check_logits(logits, targets)
    return F.cross_entropy(logits.float(), targets, reduction="mean").item()


@dataclass
class Reliability:
    """A reliability diagram: per confidence bin, the number of samples, mean confidence and accuracy.

    Attributes:
        edges: (n_bins + 1) bin edges over [0, 1].
        counts: Samples per bin.
        confidence: Mean max-probability per bin (nan for an empty bin).
        accuracy: Accuracy per bin (nan for an empty bin).
        ece: ``sum_b (|B_b| / n) |acc(B_b) - conf(B_b)|``.
    """

    edges: list[float]
    counts: list[int]
    confidence: list[float]
    accuracy: list[float]
    ece: float

    def to_dict(self) -> dict[str, object]:
        """This result as plain JSON-ready data."""
        return {
            "edges": self.edges,
            "counts": self.counts,
            "confidence": [None if math.isnan(v) else v for v in self.confidence],
            "accuracy": [None if math.isnan(v) else v for v in self.accuracy],
            "ece": self.ece,
        }


def expected_calibration_error(logits: torch.Tensor, targets: torch.Tensor, n_bins: int = 15) -> Reliability:
    """Expected calibration error with ``n_bins`` equal-width bins over the max softmax probability.

    ``ECE = sum_b (|B_b| / n) * |acc(B_b) - conf(B_b)|``; a sample with confidence ``p`` falls in bin
    ``b`` when ``edges[b] < p <= edges[b + 1]`` (the first bin also takes ``p = 0``).

    Args:
        logits: (n, K) scores.
        targets: (n,) class indices.
        n_bins: Number of bins, at least 1.

    Returns:
        The reliability diagram with its ECE.
    """
    _check_logits(logits, targets)
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    probs = logits.float().softmax(dim=1)
    conf, pred = probs.max(dim=1)
    correct = (pred == targets).float()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    # bucketize with right=False gives i such that edges[i-1] < p <= edges[i]
    idx = (torch.bucketize(conf.double(), edges, right=False) - 1).clamp(0, n_bins - 1)
    n = conf.numel()
    counts, confs, accs, ece = [], [], [], 0.0
    for b in range(n_bins):
        sel = idx == b
        c = int(sel.sum())
        counts.append(c)
        if c == 0:
            confs.append(math.nan)
            accs.append(math.nan)
            continue
        mc, ma = conf[sel].double().mean().item(), correct[sel].double().mean().item()
        confs.append(mc)
        accs.append(ma)
        ece += c / n * abs(ma - mc)
    return Reliability(edges.tolist(), counts, confs, accs, ece)


# A set counts as collapsed when one class takes more than this share of its predictions while it holds at most this
# share of the set's true labels.
COLLAPSE_SHARE = 0.5


@dataclass
class ClassBalance:
    """How the predictions of one set spread over the classes.

    Attributes:
        per_class_accuracy: Accuracy per competing class, in class order (None for a class absent from the targets).
        balanced_accuracy: Mean of ``per_class_accuracy`` over the classes present.
        prediction_counts: Predictions per competing class.
        majority_class: Index (among the competing classes) of the most-predicted class.
        majority_rate: Its share of the predictions.
        majority_true_rate: Its share of the true labels.
        prediction_entropy: ``H(q) / log K`` of the predicted-class histogram ``q`` (0 when K = 1).
        collapsed: ``majority_rate > COLLAPSE_SHARE`` while ``majority_true_rate <= COLLAPSE_SHARE``.
        confusion: (K, K) counts, row = true class, column = predicted class.
    """

    per_class_accuracy: list[float | None]
    balanced_accuracy: float
    prediction_counts: list[int]
    majority_class: int
    majority_rate: float
    majority_true_rate: float
    prediction_entropy: float
    collapsed: bool
    confusion: list[list[int]]


def class_balance(predictions: torch.Tensor, targets: torch.Tensor, num_classes: int) -> ClassBalance:
    """Per-class accuracy, balanced accuracy, majority-class rate, prediction entropy and the collapse flag.

    Args:
        predictions: (n,) predicted class indices in ``[0, num_classes)``.
        targets: (n,) true class indices in ``[0, num_classes)``.
        num_classes: K, the classes competing in the argmax.
    """
    if predictions.ndim != 1 or predictions.shape != targets.shape:
        raise ValueError(f"expected predictions and targets of one shape (n,), got {tuple(predictions.shape)} and "
                         f"{tuple(targets.shape)}")  # fmt: skip
    if predictions.numel() == 0:
        raise ValueError("no samples: metrics need at least one prediction")
    n = predictions.numel()
    pred, true = predictions.long().cpu(), targets.long().cpu()
    if min(int(pred.min()), int(true.min())) < 0 or max(int(pred.max()), int(true.max())) >= num_classes:
        raise ValueError(f"class indices outside [0, {num_classes})")
    confusion = torch.bincount(true * num_classes + pred, minlength=num_classes**2).view(num_classes, num_classes)
    pred_counts, true_counts, hits = confusion.sum(dim=0), confusion.sum(dim=1), confusion.diagonal()
    per_class: list[float | None] = [
        int(h) / int(t) if t > 0 else None for h, t in zip(hits.tolist(), true_counts.tolist(), strict=True)
    ]
    present = [a for a in per_class if a is not None]
    major = int(pred_counts.argmax())
    q = pred_counts.double() / n
    q = q[q > 0]
    entropy = float(-(q * q.log()).sum() / math.log(num_classes)) if num_classes > 1 else 0.0
    rate, true_rate = int(pred_counts[major]) / n, int(true_counts[major]) / n
    return ClassBalance(
        per_class_accuracy=per_class,
        balanced_accuracy=sum(present) / len(present),
        prediction_counts=pred_counts.tolist(),
        majority_class=major,
        majority_rate=rate,
        majority_true_rate=true_rate,
        prediction_entropy=max(0.0, entropy),
        collapsed=rate > COLLAPSE_SHARE and true_rate <= COLLAPSE_SHARE,
        confusion=confusion.tolist(),
    )


def _ref_sum(ref: Mapping[int, float] | float, severities: list[int]) -> float:
    """``sum_s E^ref_{s,c}`` over ``severities``; a scalar reference is a mean over severities."""
    if isinstance(ref, Mapping):
        missing = [s for s in severities if s not in ref]
        if missing:
            raise KeyError(f"reference lacks severities {missing} (it has {sorted(ref)})")
        return float(sum(ref[s] for s in severities))
    return float(ref) * len(severities)


def _common(errors: ErrorTable, reference: Reference) -> list[str]:
    names = [c for c in errors if c in reference]
    if not names:
        raise ValueError(
            f"no corruption in common between the errors ({sorted(errors)}) and the reference ({sorted(reference)})"
        )
    skipped = sorted(set(errors) - set(reference))
    if skipped:
        logger.info("corruptions without a reference are left out of mCE: %s", ", ".join(skipped))
    return names


def mce(errors: ErrorTable, reference: Reference = ALEXNET_ERRORS) -> tuple[float, dict[str, float]]:
    """Mean corruption error: ``CE_c = sum_s E_{s,c} / sum_s E^ref_{s,c}``, ``mCE = mean_c CE_c``.

    Args:
        errors: ``{corruption: {severity: top-1 error}}`` of the model.
        reference: The same table for the reference model, or one mean error per corruption (AlexNet on
            ImageNet-C, the default), which counts as that error at every severity. Corruptions missing from the
            reference are left out (logged).

    Returns:
        ``(mCE, {corruption: CE_c})``, as fractions (multiply by 100 for the usual percent).
    """
    ce, error_free = {}, []
    for c in _common(errors, reference):
        sev = sorted(errors[c])
        denom = _ref_sum(reference[c], sev)
        if denom <= 0:
            error_free.append(c)
            continue
        ce[c] = sum(errors[c][s] for s in sev) / denom
    if error_free:
        # A reference without a single error under a corruption (an easy validation set) leaves its CE undefined;
        # leaving that corruption out keeps the rest of the evaluation, and the log says which ones.
        logger.warning("left out of mCE (the reference makes no error under them): %s", ", ".join(error_free))
    if not ce:
        raise ValueError(f"the reference makes no error under any corruption ({', '.join(error_free)}): mCE undefined")
    return sum(ce.values()) / len(ce), ce


def relative_mce(
    errors: ErrorTable,
    clean_error: float,
    reference: Reference = ALEXNET_ERRORS,
    reference_clean_error: float = ALEXNET_CLEAN_ERROR,
) -> tuple[float, dict[str, float]]:
    """Relative mCE: ``rCE_c = sum_s (E_{s,c} - E_clean) / sum_s (E^ref_{s,c} - E^ref_clean)``, mean over c.

    Args:
        errors: ``{corruption: {severity: error}}`` of the model.
        clean_error: The model's clean top-1 error.
        reference: Reference table or per-corruption mean errors (default AlexNet).
        reference_clean_error: The reference model's clean error (default AlexNet's 0.4348).

    Returns:
        ``(relative mCE, {corruption: rCE_c})``.
    """
    rce = {}
    for c in _common(errors, reference):
        sev = sorted(errors[c])
        denom = _ref_sum(reference[c], sev) - reference_clean_error * len(sev)
        if denom <= 0:
            raise ValueError(
                f"reference degradation for {c!r} is {denom:.4f} (not above its clean error); relative CE is undefined"
            )
        rce[c] = sum(errors[c][s] - clean_error for s in sev) / denom
    return sum(rce.values()) / len(rce), rce


def retention(robust_accuracy: float, clean_accuracy: float) -> float:
    """``retention = robust accuracy / clean accuracy`` (nan when the clean accuracy is 0)."""
    return robust_accuracy / clean_accuracy if clean_accuracy > 0 else math.nan


@dataclass
class CorruptionScores:
    """Summary of a corruption evaluation.

    Attributes:
        accuracy: ``{corruption: {severity: accuracy}}``.
        per_corruption: Mean accuracy over severities per corruption.
        per_severity: Mean accuracy over corruptions per severity.
        robust_accuracy: Mean accuracy over every (corruption, severity) cell.
        retention: ``robust_accuracy / clean_accuracy``.
        mce, ce: mCE and per-corruption CE against the reference (None without a usable reference).
        relative_mce, relative_ce: The same for relative mCE (None without a reference clean error).
        reference: Name of the reference.
    """

    accuracy: dict[str, dict[int, float]]
    per_corruption: dict[str, float]
    per_severity: dict[int, float]
    robust_accuracy: float
    retention: float
    mce: float | None = None
    ce: dict[str, float] = field(default_factory=dict)
    relative_mce: float | None = None
    relative_ce: dict[str, float] = field(default_factory=dict)
    reference: str | None = None


def corruption_scores(
    accuracy: Mapping[str, Mapping[int, float]],
    clean_accuracy: float,
    reference: Reference | None = ALEXNET_ERRORS,
    reference_clean_error: float | None = ALEXNET_CLEAN_ERROR,
    reference_name: str | None = "alexnet",
) -> CorruptionScores:
    """Per-corruption / per-severity accuracy, robust accuracy, retention, mCE and relative mCE in one go.

    mCE and relative mCE are computed only over corruptions present in ``reference``; with no common corruption
    (e.g. only the 4 extra types against AlexNet) they stay None.
    """
    if not accuracy or not any(accuracy.values()):
        raise ValueError("empty accuracy table: no corruption was evaluated")
    acc = {c: {int(s): float(a) for s, a in sev.items()} for c, sev in accuracy.items()}
    cells = [a for sev in acc.values() for a in sev.values()]
    severities = sorted({s for sev in acc.values() for s in sev})
    per_sev = {s: sum(sev[s] for sev in acc.values() if s in sev) / sum(s in sev for sev in acc.values())
               for s in severities}  # fmt: skip
    robust = sum(cells) / len(cells)
    out = CorruptionScores(
        accuracy=acc,
        per_corruption={c: sum(sev.values()) / len(sev) for c, sev in acc.items()},
        per_severity=per_sev,
        robust_accuracy=robust,
        retention=retention(robust, clean_accuracy),
        reference=reference_name,
    )
    if reference is not None and any(c in reference for c in acc):
        errors = {c: {s: 1 - a for s, a in sev.items()} for c, sev in acc.items()}
        try:
            out.mce, out.ce = mce(errors, reference)
        except ValueError as err:
            logger.warning("mCE not computed: %s", err)
        if reference_clean_error is not None and out.mce is not None:
            try:
                out.relative_mce, out.relative_ce = relative_mce(
                    errors, 1 - clean_accuracy, reference, reference_clean_error
                )
            except ValueError as err:
                logger.warning("relative mCE not computed: %s", err)
    return out
