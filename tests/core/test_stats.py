"""Intervals for per-item scores: bootstrap over items, paired bootstrap, Wilson."""

from __future__ import annotations

import numpy as np
import pytest

from covspec.stats import bootstrap_mean, bootstrap_ratio, paired_difference, paired_ratio_difference, wilson


def test_wilson_matches_known_values():
    e = wilson(5, 10)
    assert e.value == 0.5 and e.low == pytest.approx(0.2366, abs=1e-4) and e.high == pytest.approx(0.7634, abs=1e-4)
    zero = wilson(0, 10)
    assert zero.low == pytest.approx(0.0, abs=1e-12) and zero.high == pytest.approx(0.2775, abs=1e-4)
    assert wilson(0, 0).n == 0


def test_bootstrap_of_a_proportion_agrees_with_wilson_and_is_reproducible():
    values = np.zeros(1000)
    values[:300] = 1
    e = bootstrap_mean(values)
    w = wilson(300, 1000)
    assert e.value == pytest.approx(0.3)
    assert e.low == pytest.approx(w.low, abs=0.006) and e.high == pytest.approx(w.high, abs=0.006)
    assert bootstrap_mean(values) == e  # fixed seed: the same interval every time
    assert bootstrap_mean(values, seed=1) != e
    constant = bootstrap_mean(np.full(50, 0.7))
    assert constant.low == pytest.approx(0.7) and constant.high == pytest.approx(0.7)
    assert bootstrap_mean([]).n == 0 and bootstrap_mean([]).format() == "-"


def test_paired_interval_is_narrower_than_the_unpaired_one_when_items_share_their_difficulty():
    rng = np.random.default_rng(3)
    difficulty = rng.random(500)
    a = (rng.random(500) < difficulty).astype(float)  # b gets 5% of a's hits wrong: a - b ~ 0.05 * mean(a)
    b = a * (rng.random(500) > 0.05)
    d = paired_difference(a, b)
    assert d.value == pytest.approx(a.mean() - b.mean())
    assert d.low > 0 and d.excludes_zero  # every difference is >= 0 and some are > 0
    ea, eb = bootstrap_mean(a), bootstrap_mean(b)
    assert ea.low < eb.high  # unpaired, the two intervals overlap ...
    assert d.high - d.low < (ea.high - ea.low) / 2  # ... paired, the difference is pinned down
    same = paired_difference(a, a)
    assert same.value == 0 and same.low == 0 and same.high == 0 and not same.excludes_zero
    with pytest.raises(ValueError):
        paired_difference(a, b[:-1])


def test_ratio_of_sums_and_its_paired_difference():
    hits, tokens = np.array([3, 5, 0, 8]), np.array([4, 5, 2, 10])
    r = bootstrap_ratio(hits, tokens)
    assert r.value == pytest.approx(16 / 21) and r.low <= r.value <= r.high
    d = paired_ratio_difference(hits, tokens, hits - (hits > 0), tokens)
    assert d.value == pytest.approx(3 / 21) and d.low > 0
    assert paired_ratio_difference(hits, tokens, hits, tokens).high == 0
