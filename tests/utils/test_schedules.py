"""Per-step schedules of the bottom layer: warm-up + cosine, poly, constant, selected by kind."""

import numpy as np
import pytest

from tokenlab.utils.schedules import build_schedule, cosine_schedule, poly_schedule


def test_schedule_warmup_then_cosine():
    s = cosine_schedule(1.0, 0.1, total_steps=10, warmup_steps=4, warmup_start=0.0, cooldown_steps=2)
    assert len(s) == 12
    np.testing.assert_allclose(s[:4], [0.0, 0.25, 0.5, 0.75])
    assert s[4] == 1.0 and s[-1] == 0.1 and s[-3] > 0.1 and all(np.diff(s[4:]) <= 0)


def test_poly_schedule() -> None:
    s = poly_schedule(1.0, 0.0, 10, power=1.0, warmup_steps=2, warmup_start=0.0)
    assert s.shape == (10,)
    np.testing.assert_allclose(s[:2], [0.0, 0.5])
    np.testing.assert_allclose(s[2:], 1.0 - np.arange(8) / 8)
    s2 = poly_schedule(1.0, 0.1, 4, power=2.0)
    np.testing.assert_allclose(s2, 0.9 * (1 - np.arange(4) / 4) ** 2 + 0.1)


def test_build_schedule_by_kind_and_cooldown() -> None:
    np.testing.assert_array_equal(
        build_schedule("cosine", 1.0, 0.1, 10, 4, 0.0, 2), cosine_schedule(1.0, 0.1, 10, 4, 0.0, 2)
    )
    p = build_schedule("poly", 1.0, 0.0, 10, 2, 0.0, cooldown_steps=3, power=1.0)
    assert len(p) == 13 and p[-1] == 0.0
    np.testing.assert_allclose(p[:10], poly_schedule(1.0, 0.0, 10, 1.0, 2, 0.0))
    c = build_schedule("constant", 0.5, 0.0, 6, 2, 0.0, 1)
    np.testing.assert_allclose(c, [0.0, 0.25, 0.5, 0.5, 0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="unknown schedule kind 'step'; valid: cosine, poly, constant"):
        build_schedule("step", 1.0, 0.0, 10)
    with pytest.raises(ValueError, match="must be shorter"):
        cosine_schedule(1.0, 0.0, 10, warmup_steps=10)
