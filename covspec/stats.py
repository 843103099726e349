"""Confidence intervals for per-item scores: bootstrap percentile intervals over items for a mean
(any score in [0, 1]: exact match or object F1) or a ratio of sums (accepted / drafted), paired
bootstrap intervals for the difference of two methods scored on the same items, and Wilson's
interval for a proportion.

A bootstrap draws `resamples` index sets of n items with replacement from one seeded generator, so
the same seed and n give the same resamples; a paired difference reads both methods' scores at the
same indices, so what the items share (hard images, long answers) cancels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

RESAMPLES = 2000
SEED = 0
LEVEL = 0.95


@dataclass(frozen=True)
class Estimate:
    value: float  # the statistic on the items themselves
    low: float  # interval bounds (nan when there are no items)
    high: float
    n: int  # items

    @property
    def excludes_zero(self) -> bool:
        """The interval lies wholly above or below 0 (for a difference: the two are distinguishable)."""
        return self.low > 0 or self.high < 0

    def format(self, spec: str = ".3f") -> str:
        if self.n == 0 or math.isnan(self.value):
            return "-"
        return f"{self.value:{spec}} [{self.low:{spec}}, {self.high:{spec}}]"


@lru_cache(maxsize=8)
def _indices(n: int, resamples: int, seed: int) -> np.ndarray:
    """[resamples, n] item indices drawn with replacement (read-only: shared between calls)."""
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    idx.flags.writeable = False
    return idx


def _percentiles(samples: np.ndarray, level: float) -> tuple[float, float]:
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(samples, [tail, 100 - tail])
    return float(low), float(high)


def bootstrap_mean(values, resamples: int = RESAMPLES, seed: int = SEED, level: float = LEVEL) -> Estimate:
    """The mean of values [n] with its bootstrap percentile interval over items."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return Estimate(math.nan, math.nan, math.nan, 0)
    means = v[_indices(v.size, resamples, seed)].mean(1)
    return Estimate(float(v.mean()), *_percentiles(means, level), int(v.size))


def bootstrap_ratio(numerator, denominator, resamples: int = RESAMPLES, seed: int = SEED,
                    level: float = LEVEL) -> Estimate:
    """sum(numerator) / sum(denominator) over items (e.g. accepted / drafted tokens), with the
    bootstrap interval over items (each item keeps its own pair)."""
    a, b = np.asarray(numerator, dtype=np.float64), np.asarray(denominator, dtype=np.float64)
    if a.size == 0 or b.sum() == 0:
        return Estimate(math.nan, math.nan, math.nan, int(a.size))
    idx = _indices(a.size, resamples, seed)
    ratios = a[idx].sum(1) / np.maximum(b[idx].sum(1), 1e-12)
    return Estimate(float(a.sum() / b.sum()), *_percentiles(ratios, level), int(a.size))


def paired_difference(a, b, resamples: int = RESAMPLES, seed: int = SEED, level: float = LEVEL) -> Estimate:
    """mean(a) - mean(b) for two scores of the same items (a[i], b[i] on item i), with the paired
    bootstrap interval (both read at the same resampled items)."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"paired scores must cover the same items: {x.shape} vs {y.shape}")
    return bootstrap_mean(x - y, resamples, seed, level)


def paired_ratio_difference(num_a, den_a, num_b, den_b, resamples: int = RESAMPLES, seed: int = SEED,
                            level: float = LEVEL) -> Estimate:
    """sum(num_a)/sum(den_a) - sum(num_b)/sum(den_b) on the same items, paired bootstrap interval."""
    arrays = [np.asarray(x, dtype=np.float64) for x in (num_a, den_a, num_b, den_b)]
    if len({x.shape for x in arrays}) != 1:
        raise ValueError("paired ratios must cover the same items")
    na, da, nb, db = arrays
    if na.size == 0 or da.sum() == 0 or db.sum() == 0:
        return Estimate(math.nan, math.nan, math.nan, int(na.size))
    idx = _indices(na.size, resamples, seed)
    diffs = na[idx].sum(1) / np.maximum(da[idx].sum(1), 1e-12) - nb[idx].sum(1) / np.maximum(db[idx].sum(1), 1e-12)
    return Estimate(float(na.sum() / da.sum() - nb.sum() / db.sum()), *_percentiles(diffs, level), int(na.size))


def wilson(successes: int, n: int, level: float = LEVEL) -> Estimate:
    """A proportion successes / n with Wilson's score interval."""
    if n == 0:
        return Estimate(math.nan, math.nan, math.nan, 0)
    from scipy.stats import norm

    z = float(norm.ppf(0.5 + level / 2))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return Estimate(p, centre - half, centre + half, n)
