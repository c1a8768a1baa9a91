"""Per-iteration schedules, computed up front as arrays and indexed by the optimizer step.

Poly (SegFormer / mmsegmentation) after the same linear warm-up:

    v(s) = final + (base - final) * (1 - (s - W) / (T - W)) ** power        for W <= s < T

Warm-up + cosine (SGDR without restarts, Loshchilov & Hutter 2017, https://arxiv.org/abs/1608.03983), the
schedule of the STL and iBOT recipes, for the learning rate, weight decay, teacher temperature or EMA momentum:

    v(s) = start + (base - start) * s / W                                   for s < W (linear warm-up)
    v(s) = final + (base - final) * (1 + cos(pi * (s - W) / (T - W))) / 2   for W <= s < T
    v(s) = final                                                            for T <= s < T + cool-down
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["SCHEDULE_KINDS", "build_schedule", "cosine_schedule", "linear_warmup_then_constant", "poly_schedule"]

SCHEDULE_KINDS = ("cosine", "poly", "constant")


def _warmup(start: float, base: float, steps: int) -> np.ndarray:
    """The linear warm-up every schedule starts with: ``steps`` values from ``start`` towards ``base``."""
    return np.linspace(start, base, steps, endpoint=False) if steps else np.zeros(0)


def cosine_schedule(
    base: float,
    final: float,
    total_steps: int,
    warmup_steps: int = 0,
    warmup_start: float = 0.0,
    cooldown_steps: int = 0,
) -> np.ndarray:
    """Values for steps ``0 .. total_steps + cooldown_steps - 1`` (float64).

    Args:
        base: Value at the end of the warm-up (the peak learning rate).
        final: Value at the end of the cosine.
        total_steps: Steps of warm-up + cosine.
        warmup_steps: Linear warm-up steps from ``warmup_start`` to ``base``.
        warmup_start: First value of the warm-up.
        cooldown_steps: Extra steps held at ``final``.

    Raises:
        ValueError: negative lengths or a warm-up as long as the run.
    """
    if total_steps < 1 or warmup_steps < 0 or cooldown_steps < 0:
        raise ValueError(f"bad schedule lengths: total={total_steps}, warmup={warmup_steps}, cooldown={cooldown_steps}")
    if warmup_steps >= total_steps and total_steps > 1:
        raise ValueError(f"warm-up ({warmup_steps} steps) must be shorter than the schedule ({total_steps} steps)")
    warm = _warmup(warmup_start, base, warmup_steps)
    n = total_steps - warmup_steps
    t = np.arange(n, dtype=np.float64) / max(1, n)
    cos = final + 0.5 * (base - final) * (1.0 + np.cos(math.pi * t))
    return np.concatenate([warm, cos, np.full(cooldown_steps, final, dtype=np.float64)])


def linear_warmup_then_constant(
    base: float, total_steps: int, warmup_steps: int, warmup_start: float = 0.0
) -> np.ndarray:
    """Linear warm-up from ``warmup_start`` to ``base`` over ``warmup_steps``, then ``base``."""
    warm = _warmup(warmup_start, base, warmup_steps)
    return np.concatenate([warm, np.full(max(0, total_steps - warmup_steps), base, dtype=np.float64)])


def poly_schedule(
    base: float,
    final: float,
    total_steps: int,
    power: float = 1.0,
    warmup_steps: int = 0,
    warmup_start: float = 0.0,
    cooldown_steps: int = 0,
) -> np.ndarray:
    """``v(s) = (base - final) * (1 - (s - W) / (T - W)) ** power + final`` after a linear warm-up of W steps."""
    if total_steps < 1 or cooldown_steps < 0 or not 0 <= warmup_steps < max(total_steps, 2):
        raise ValueError(
            f"bad poly schedule lengths: total={total_steps}, warmup={warmup_steps}, cooldown={cooldown_steps}"
        )
    warm = _warmup(warmup_start, base, warmup_steps)
    n = total_steps - warmup_steps
    t = np.arange(n, dtype=np.float64) / max(1, n)
    poly = (base - final) * (1.0 - t) ** power + final
    return np.concatenate([warm, poly, np.full(cooldown_steps, final, dtype=np.float64)])


def build_schedule(
    kind: str,
    base: float,
    final: float,
    total_steps: int,
    warmup_steps: int = 0,
    warmup_start: float = 0.0,
    cooldown_steps: int = 0,
    power: float = 1.0,
) -> np.ndarray:
    """A schedule by kind (``cosine``, ``poly`` or ``constant`` after the warm-up), ``total + cooldown`` values.

    Raises:
        ValueError: an unknown kind (listing the valid ones) or bad lengths.
    """
    if kind == "cosine":
        return cosine_schedule(base, final, total_steps, warmup_steps, warmup_start, cooldown_steps)
    if kind == "poly":
        return poly_schedule(base, final, total_steps, power, warmup_steps, warmup_start, cooldown_steps)
    if kind == "constant":
        values = linear_warmup_then_constant(base, total_steps, warmup_steps, warmup_start)
        return np.concatenate([values, np.full(cooldown_steps, base, dtype=np.float64)])
    raise ValueError(f"unknown schedule kind {kind!r}; valid: {', '.join(SCHEDULE_KINDS)}")
