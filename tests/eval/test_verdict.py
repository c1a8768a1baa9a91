"""The verdict statistics: Wilson intervals, the overlap rule, t quantiles, paired seeds and the seed naming rule."""

from __future__ import annotations

import math

import pytest

from tokenlab.eval.verdict import (
    compare_accuracies,
    comparison_sentence,
    paired_difference,
    paired_sentence,
    seed_groups,
    single_run_noise_note,
    t_quantile_975,
    wilson_interval,
)


def test_t_quantiles_match_the_table_values() -> None:
    assert t_quantile_975(1) == pytest.approx(12.706, abs=1e-3)
    assert t_quantile_975(4) == pytest.approx(2.776, abs=1e-3)
    assert t_quantile_975(60) == pytest.approx(2.000, abs=1e-3)  # past the table: the series
    assert t_quantile_975(10_000) == pytest.approx(1.960, abs=1e-3)
    with pytest.raises(ValueError, match="2 seeds"):
        t_quantile_975(0)


def test_wilson_interval_matches_the_closed_form_and_stays_in_0_1() -> None:
    # 80 of 100: the textbook Wilson interval is [0.7112, 0.8666]
    assert wilson_interval(0.8, 100) == pytest.approx((0.7112, 0.8666), abs=1e-4)
    lo, hi = wilson_interval(1.0, 20)  # all correct: not the point [1, 1] of the normal approximation
    assert hi == 1.0 and 0.8 < lo < 0.9
    assert wilson_interval(0.0, 20)[0] == 0.0
    assert all(math.isnan(v) for v in wilson_interval(0.5, 0))
    # more images, narrower interval
    assert wilson_interval(0.5, 1000)[1] - wilson_interval(0.5, 1000)[0] < wilson_interval(0.5, 100)[1] - 0.5


def test_overlapping_intervals_are_within_noise_and_separated_ones_are_not() -> None:
    close = compare_accuracies(0.50, 100, 0.55, 100)
    assert close.within_noise and close.difference == pytest.approx(0.05)
    far = compare_accuracies(0.50, 1000, 0.60, 1000)
    assert not far.within_noise
    line = comparison_sentence("clean top-1", "base", "stl", far)
    assert line.startswith("- On clean top-1, stl vs base: 60.0 % [") and "(+10.0 points)" in line
    assert "stl is ahead (the 95 % intervals do not overlap)" in line
    assert "base" in comparison_sentence("x", "base", "stl", compare_accuracies(0.6, 1000, 0.5, 1000))
    assert "stl is behind" in comparison_sentence("x", "base", "stl", compare_accuracies(0.6, 1000, 0.5, 1000))
    assert "within noise" in comparison_sentence("x", "a", "b", close)
    unknown = compare_accuracies(0.5, 0, 0.9)
    assert not unknown.within_noise and "no image count" in comparison_sentence("x", "a", "b", unknown)
    note = single_run_noise_note(400)
    lo, hi = wilson_interval(0.5, 400)
    assert f"±{50 * (hi - lo):.1f} points" in note and "400 images" in note


def test_paired_difference_over_seeds() -> None:
    d = paired_difference([0.02, 0.04, 0.00])
    assert d["mean"] == pytest.approx(0.02) and d["sd"] == pytest.approx(0.02) and d["n"] == 3
    half = 4.303 * 0.02 / 3**0.5
    assert d["ci95"] == pytest.approx([0.02 - half, 0.02 + half], abs=1e-4)
    assert "within noise: the interval holds 0" in paired_sentence("clean top-1", "base", "stl", d)
    ahead = paired_difference([0.05, 0.06, 0.055])
    assert "stl is ahead" in paired_sentence("clean top-1", "base", "stl", ahead)
    assert "one seed: no interval" in paired_sentence("x", "a", "b", paired_difference([0.1]))


def test_seed_groups_need_every_model_on_the_same_seeds() -> None:
    names = ["baseline_s0", "baseline_s1", "student_s0", "student_s1"]
    assert seed_groups(names) == {"baseline": {0: "baseline_s0", 1: "baseline_s1"},
                                  "student": {0: "student_s0", 1: "student_s1"}}  # fmt: skip
    assert seed_groups(["a-seed3", "a-seed4", "b-seed3", "b-seed4"]) is not None
    assert seed_groups(["baseline", "student"]) is None  # no seed in the names
    assert seed_groups(["baseline_s0", "student_s0"]) is None  # one seed: nothing to pair over
    assert seed_groups(["baseline_s0", "baseline_s1", "student_s0", "student_s2"]) is None  # different seed lists
    assert seed_groups(["baseline_s0", "baseline_s1"]) is None  # one model
    assert seed_groups(["baseline_s0", "baseline_s1", "student_s0", "student_s1", "extra"]) is None
