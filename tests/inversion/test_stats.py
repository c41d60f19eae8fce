"""Tests of inversion/stats.py: coverage, planted shifts, determinism, input errors."""

import math

import numpy as np
import pytest

from inversion import stats


@pytest.mark.parametrize("draw, median", [
    (lambda rng: rng.normal(3.0, 2.0, 16), 3.0),
    (lambda rng: rng.exponential(1.0, 16), math.log(2.0)),  # skewed
])
def test_the_interval_covers_the_population_median_at_about_95_percent(draw, median):
  rng = np.random.default_rng(1)
  reps = 400
  hits = 0
  for r in range(reps):
    iv = stats.bootstrap_median(draw(rng), resamples=2000, seed=r)
    hits += iv.low <= median <= iv.high
  assert 0.90 <= hits / reps <= 0.99, hits / reps


def test_the_interval_brackets_the_sample_median_and_narrows_with_n():
  rng = np.random.default_rng(0)
  small = stats.bootstrap_median(rng.normal(size=16))
  large = stats.bootstrap_median(rng.normal(size=400))
  for iv in (small, large):
    assert iv.low <= iv.estimate <= iv.high and iv.defined
  assert (large.high - large.low) < 0.5 * (small.high - small.low)
  assert small.n == 16 and small.level == 0.95


def test_images_of_one_victim_are_resampled_together():
  """16 victims of 4 images that share their victim's level (one attack run each): an
  image-level bootstrap claims 64 independent values and covers the population median far
  less often than the victim-level (cluster) one, which covers it at about 95 %."""
  rng = np.random.default_rng(2)
  reps, hits, naive = 300, 0, 0
  for r in range(reps):
    values = np.repeat(rng.normal(0.0, 1.0, 16), 4) + rng.normal(0.0, 0.1, 64)
    hits += stats.bootstrap_median(values, group=4, resamples=1000, seed=r).excludes(0.0) is False
    naive += stats.bootstrap_median(values, resamples=1000, seed=r).excludes(0.0) is False
  assert 0.90 <= hits / reps <= 0.99 and naive / reps < 0.85, (hits / reps, naive / reps)
  iv = stats.bootstrap_median(np.arange(8.0), group=4)
  assert iv.n == 2 and iv.defined
  d = stats.paired_difference(np.arange(8.0) + 1, np.arange(8.0), group=4)
  assert d.n == 2 and d.estimate == 1.0
  with pytest.raises(ValueError, match="do not split into victims of 4 images"):
    stats.bootstrap_median(np.arange(6.0), group=4)


def test_a_paired_difference_recovers_a_planted_shift_that_separate_intervals_miss():
  rng = np.random.default_rng(2)
  b = rng.normal(20.0, 5.0, 16)  # victims differ a lot ...
  a = b + 1.0 + rng.normal(0.0, 0.2, 16)  # ... A is better on every one by about 1 dB
  d = stats.paired_difference(a, b)
  assert d.low <= 1.0 <= d.high and d.low > 0.5 and d.high < 1.5
  assert d.fraction_greater == 1.0
  ia, ib = stats.bootstrap_median(a), stats.bootstrap_median(b)
  assert ia.low < ib.high  # unpaired, the intervals overlap
  assert stats.verdict(d, "dps", "ig").startswith("dps beats ig by 1.")
  flipped = stats.paired_difference(b, a)
  assert flipped.fraction_greater == 0.0
  assert stats.verdict(flipped, "ig", "dps").startswith("dps beats ig by 1.")


def test_verdict_says_no_difference_when_the_interval_holds_zero():
  rng = np.random.default_rng(3)
  b = rng.normal(size=16)
  a = b + np.tile([-1.0, 1.0], 8) * rng.uniform(0.5, 1.5, 16)  # half better, half worse
  d = stats.paired_difference(a, b)
  assert d.low < 0 < d.high
  assert stats.verdict(d, "A", "B").startswith("no difference resolved between A and B")


def test_verdict_for_lower_is_better():
  a = np.arange(16) * 0.01
  d = stats.paired_difference(a + 0.1, a)  # A's MSE is larger on every victim
  text = stats.verdict(d, "A", "B", unit="", digits=2, higher_is_better=False)
  assert text.startswith("B beats A by 0.10 [0.10, 0.10]")


def test_deterministic_from_the_seed():
  v = np.random.default_rng(4).normal(size=16)
  assert stats.bootstrap_median(v, seed=7) == stats.bootstrap_median(v, seed=7)
  assert (stats.bootstrap_median(v, resamples=40, seed=7)
          != stats.bootstrap_median(v, resamples=40, seed=8))
  w = v + np.random.default_rng(5).normal(size=16)
  assert stats.paired_difference(v, w, seed=1) == stats.paired_difference(v, w, seed=1)


def test_fewer_than_two_values_give_an_undefined_interval():
  one = stats.bootstrap_median([3.5])
  assert one.estimate == 3.5 and math.isnan(one.low) and math.isnan(one.high)
  assert not one.defined and not one.excludes(0.0) and one.to_dict()["defined"] is False
  none = stats.bootstrap_median([])
  assert math.isnan(none.estimate) and none.n == 0
  single = stats.paired_difference([2.0], [1.0])
  assert "fewer than 2" in stats.verdict(single, "A", "B")


def test_infinite_values_order_as_large_ones():
  iv = stats.bootstrap_median([1.0, 2.0, np.inf, np.inf, np.inf])
  assert iv.estimate == np.inf and iv.high == np.inf and np.isfinite(iv.low)


@pytest.mark.parametrize("call, message", [
    (lambda: stats.bootstrap_median([1.0, np.nan, np.nan]), "2 NaN"),
    (lambda: stats.bootstrap_median(np.ones((2, 2))), "1-D"),
    (lambda: stats.bootstrap_median([1.0, 2.0], level=1.0), "level"),
    (lambda: stats.bootstrap_median([1.0, 2.0], resamples=0), "resamples"),
    (lambda: stats.paired_difference([1.0, 2.0], [1.0]), "same victims"),
    (lambda: stats.paired_difference([np.inf, 1.0], [np.inf, 0.0]), "inf - inf"),
    (lambda: stats.paired_difference([1.0, np.nan], [1.0, 2.0]), "1 NaN"),
])
def test_input_errors_say_what_to_do(call, message):
  with pytest.raises(ValueError, match=message):
    call()
