"""The statistics of a verdict, written once: is a difference between two models a win, a loss or within noise?

Used by ``tokenlab report`` (any runs) and by the STL study / ``tokenlab demo``. Two situations:

- **One evaluation per model.** An accuracy ``p`` measured on ``n`` images is a binomial proportion; its 95 %
  interval is the Wilson score interval (:func:`wilson_interval`). A difference between two models whose intervals
  overlap is called *within noise* (:func:`compare_accuracies`). The intervals cover the finite evaluation set only:
  a second training seed varies on top of them.
- **Several seeds per model, paired.** With the same seeds for both models, the per-seed differences
  ``d_i = b_i - a_i`` give ``mean ± t_{0.975, n-1} · sd / sqrt(n)`` (:func:`paired_difference`); an interval that
  holds 0 is within noise.

:func:`seed_groups` is the naming rule by which ``tokenlab report`` finds seeds: a run directory named
``<model>_s<seed>`` (or ``<model>_seed<seed>``) is seed ``seed`` of ``model``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Comparison",
    "compare_accuracies",
    "comparison_sentence",
    "mean_sd",
    "paired_difference",
    "paired_sentence",
    "seed_groups",
    "seed_statistics",
    "single_run_noise_note",
    "t_quantile_975",
    "wilson_interval",
]

Z975 = 1.959964  # the two-sided 95 % quantile of the standard normal

# two-sided 95 % quantiles of Student's t for 1..30 degrees of freedom
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045,
         2.042)  # fmt: skip


def t_quantile_975(df: int) -> float:
    """The 97.5 % quantile of Student's t with ``df`` degrees of freedom (a table to 30, then a series in 1/df).

    Raises:
        ValueError: ``df`` below 1.
    """
    if df < 1:
        raise ValueError(f"a t interval needs at least 1 degree of freedom (2 seeds), got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = Z975  # Cornish-Fisher expansion of t around the normal quantile; error below 1e-4 for df > 30
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def wilson_interval(p: float, n: int, z: float = Z975) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion ``p`` observed on ``n`` trials (``(nan, nan)`` for ``n = 0``).

    ``(p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)``; unlike ``p ± z·sqrt(p(1-p)/n)`` it stays inside
    [0, 1] and does not collapse to a point at ``p = 0`` or ``1``.
    """
    if n <= 0:
        return math.nan, math.nan
    p = min(1.0, max(0.0, float(p)))
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class Comparison:
    """Accuracy ``b`` against ``a`` (each with its 95 % Wilson interval) and the call: ahead, behind or noise."""

    a: float
    b: float
    a_interval: tuple[float, float]
    b_interval: tuple[float, float]
    n_a: int
    n_b: int

    @property
    def difference(self) -> float:
        """``b - a``."""
        return self.b - self.a

    @property
    def has_intervals(self) -> bool:
        """Both sets sizes known (otherwise no noise statement can be made)."""
        return self.n_a > 0 and self.n_b > 0

    @property
    def within_noise(self) -> bool:
        """The two intervals overlap (False without intervals)."""
        if not self.has_intervals:
            return False
        return self.a_interval[0] <= self.b_interval[1] and self.b_interval[0] <= self.a_interval[1]


def compare_accuracies(a: float, n_a: int, b: float, n_b: int | None = None) -> Comparison:
    """Compare accuracy ``b`` (on ``n_b`` images, default ``n_a``) with ``a`` (on ``n_a``); 0 images: no interval."""
    n_b = n_a if n_b is None else n_b
    return Comparison(float(a), float(b), wilson_interval(a, n_a), wilson_interval(b, n_b), int(n_a), int(n_b))


def _pct_interval(iv: tuple[float, float]) -> str:
    return f"[{100 * iv[0]:.1f}, {100 * iv[1]:.1f}]"


def comparison_sentence(what: str, name_a: str, name_b: str, c: Comparison) -> str:
    """One verdict line: the two accuracies with their intervals, the difference, and ahead / behind / noise.

    E.g. ``- On clean top-1, student vs baseline: 82.0 % [..] vs 80.0 % [..] (+2.0 points): within noise (the 95 %
    intervals overlap).``
    """
    if c.has_intervals:
        shown = (f"{100 * c.b:.1f} % {_pct_interval(c.b_interval)} vs {100 * c.a:.1f} % "
                 f"{_pct_interval(c.a_interval)}")  # fmt: skip
    else:
        shown = f"{100 * c.b:.1f} % vs {100 * c.a:.1f} %"
    head = f"- On {what}, {name_b} vs {name_a}: {shown} ({100 * c.difference:+.1f} points)"
    if not c.has_intervals:
        return f"{head}: no image count, so no interval."
    if c.within_noise:
        return f"{head}: within noise (the 95 % intervals overlap)."
    word = "ahead" if c.difference > 0 else "behind"
    return f"{head}: {name_b} is {word} (the 95 % intervals do not overlap)."


def single_run_noise_note(n: int) -> str:
    """The noise statement of one evaluation per model on ``n`` images: the size of a difference within noise."""
    if n <= 0:
        return "The evaluation set size is unknown: no noise statement can be made."
    lo, hi = wilson_interval(0.5, n)
    return (
        f"Intervals are 95 % Wilson intervals of each accuracy on its evaluation set (±{50 * (hi - lo):.1f} points "
        f"near 50 % on {n} images): two models whose intervals overlap — near 50 %, a difference below about "
        f"{100 * (hi - lo):.0f} points — are within noise from the finite evaluation set alone, and seed-to-seed "
        "variation comes on top."
    )


def mean_sd(values: Sequence[float]) -> dict[str, Any]:
    """``{"mean", "sd", "n"}`` of ``values`` (sample sd, ``n - 1``; NaN for one value)."""
    n = len(values)
    if n == 0:
        raise ValueError("mean and sd need at least one value")
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else math.nan
    return {"mean": mean, "sd": sd, "n": n}


def paired_difference(diffs: Sequence[float]) -> dict[str, Any]:
    """``{"mean", "sd", "n", "ci95": [lo, hi]}`` of per-seed differences: ``mean ± t_{0.975,n-1} · sd / sqrt(n)``."""
    d = mean_sd([float(v) for v in diffs])
    half = t_quantile_975(d["n"] - 1) * d["sd"] / math.sqrt(d["n"]) if d["n"] > 1 else math.nan
    d["ci95"] = [d["mean"] - half, d["mean"] + half]
    return d


def seed_statistics(
    per_seed: Mapping[Any, Mapping[str, Mapping[str, float | None]]],
    keys: Sequence[str],
    baseline: str = "baseline",
    student: str = "student",
) -> dict[str, Any]:
    """Mean and sd over seeds per model and metric, and the paired ``student - baseline`` difference.

    Args:
        per_seed: Seed -> model name -> metric -> value (None: not measured for that seed; left out).
        keys: Metrics to summarise.
        baseline: Name of the model subtracted.
        student: Name of the model compared with it.

    Returns:
        ``{"models": {name: {key: {mean, sd, n}}}, "difference": {key: {mean, sd, n, ci95: [lo, hi]}}}``; the
        interval is :func:`paired_difference` over the seeds where both models have the metric (NaN for one seed).
    """
    models: dict[str, dict[str, Any]] = {}
    names = list(dict.fromkeys(n for m in per_seed.values() for n in m))
    for name in names:
        for key in keys:
            vals = [float(v) for m in per_seed.values() if (v := (m.get(name) or {}).get(key)) is not None]
            if vals:
                models.setdefault(name, {})[key] = mean_sd(vals)
    difference: dict[str, Any] = {}
    for key in keys:
        diffs = []
        for m in per_seed.values():
            b, s = (m.get(baseline) or {}).get(key), (m.get(student) or {}).get(key)
            if b is not None and s is not None:
                diffs.append(float(s) - float(b))
        if diffs:
            difference[key] = paired_difference(diffs)
    return {"models": models, "difference": difference}


def paired_sentence(what: str, name_a: str, name_b: str, d: Mapping[str, Any]) -> str:
    """One verdict line from :func:`paired_difference` of ``name_b - name_a`` over seeds."""
    if d["n"] < 2:
        return f"- On {what}: {name_b} - {name_a} = {100 * d['mean']:+.1f} points (one seed: no interval)."
    lo, hi = (100 * v for v in d["ci95"])
    if lo <= 0 <= hi:
        outcome = "within noise: the interval holds 0"
    else:
        outcome = f"{name_b} is ahead" if lo > 0 else f"{name_b} is behind"
    return (f"- On {what}: {name_b} - {name_a} = {100 * d['mean']:+.1f} points, 95 % interval [{lo:+.1f}, {hi:+.1f}] "
            f"over {d['n']} seeds (sd {100 * d['sd']:.1f}): {outcome}.")  # fmt: skip


_SEED_NAME = re.compile(r"^(?P<model>.+?)[_-]s(?:eed)?(?P<seed>\d+)$")


def seed_groups(names: Sequence[str]) -> dict[str, dict[int, str]] | None:
    """``{model: {seed: run name}}`` when the runs form seed lists that can be paired, else None.

    The rule: every name is ``<model>_s<seed>`` (also ``-s``, ``_seed``), there are at least two models, and every
    model has the same seeds, at least two of them. Anything else is compared run by run.
    """
    groups: dict[str, dict[int, str]] = {}
    for name in names:
        m = _SEED_NAME.match(name)
        if m is None:
            return None
        seeds = groups.setdefault(m["model"], {})
        if int(m["seed"]) in seeds:
            return None
        seeds[int(m["seed"])] = name
    seed_sets = {frozenset(v) for v in groups.values()}
    if len(groups) < 2 or len(seed_sets) != 1 or len(next(iter(seed_sets))) < 2:
        return None
    return groups
