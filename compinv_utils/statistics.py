"""Intervals from what was drawn independently.

Concepts (or pairs of concepts) and, within each, inversion seeds were drawn independently; the images generated
from them were not. With a handful of concepts a percentile bootstrap over them is too narrow (it covers the truth
less often than it claims; ``tests/test_evaluation.py``), so every claim uses :func:`cluster_t_interval`: a
Student t-interval over the per-concept means, each the mean of its inversion seeds' means.
:func:`cluster_bootstrap` stays for comparison.
"""

from __future__ import annotations

import numpy as np

from .maths import is_whole


def _cells(values, clusters, subclusters) -> tuple[list[np.ndarray], list[np.ndarray], float]:
    """Per cluster, the sums and counts of its subclusters' values (NaN values dropped), and the mean."""
    x = np.asarray(values, dtype=float).ravel()
    cl = np.asarray(clusters, dtype=object).ravel()
    sub = np.zeros(len(x), dtype=object) if subclusters is None else np.asarray(subclusters, dtype=object).ravel()
    if not len(x) == len(cl) == len(sub):
        raise ValueError(f"{len(x)} values but {len(cl)} cluster and {len(sub)} subcluster labels")
    keep = ~np.isnan(x)
    x, cl, sub = x[keep], cl[keep], sub[keep]
    if len(x) == 0:
        raise ValueError("no values to bootstrap")
    cells: dict = {}
    for v, c, s in zip(x, cl, sub):
        cell = cells.setdefault(c, {}).setdefault(s, [0.0, 0])
        cell[0] += v
        cell[1] += 1
    sums = [np.array([cell[0] for cell in cells[c].values()]) for c in cells]
    counts = [np.array([cell[1] for cell in cells[c].values()]) for c in cells]
    return sums, counts, float(x.mean())


def _replicates(sums, counts, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    stats = np.empty(n_boot)
    for b in range(n_boot):
        total = n = 0.0
        for k in rng.integers(0, len(sums), len(sums)):
            pick = rng.integers(0, len(sums[k]), len(sums[k]))
            total += sums[k][pick].sum()
            n += counts[k][pick].sum()
        stats[b] = total / n
    return stats


def cluster_means(values, clusters, subclusters=None) -> np.ndarray:
    """Per cluster (a concept, or a pair of concepts), the mean over its subclusters (inversion seeds) of
    each subcluster's mean value; NaN values are dropped first. Returns ``(K,)`` in order of appearance."""
    sums, counts, _ = _cells(values, clusters, subclusters)
    return np.array([np.mean(s / c) for s, c in zip(sums, counts)])


def _t_bounds(mean: float, se: float, df: float, level: float) -> tuple[float, float, float]:
    from scipy.stats import t

    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), e.g. 0.95, got {level}")
    if df < 1 or not np.isfinite(se):
        return float(mean), float("nan"), float("nan")
    h = float(t.ppf(0.5 + level / 2, df)) * se
    return float(mean), float(mean - h), float(mean + h)


def cluster_t_interval(values, clusters, subclusters=None, level: float = 0.95) -> tuple[float, float, float]:
    """Mean and t-interval ``(mean, low, high)`` over clusters: the mean of :func:`cluster_means` and
    ``mean ± t_{K−1} · s / √K`` over its ``K`` cluster means. The seeds' spread reaches the interval through
    each cluster's mean. Made for few clusters (a handful of concepts), where a percentile bootstrap over them
    is too narrow. With one cluster the bounds are NaN (nothing to estimate a spread from): no claim can rest
    on one concept. Paired differences (method minus baseline, per image) go in as ``values``."""
    m = cluster_means(values, clusters, subclusters)
    k = len(m)
    se = float(m.std(ddof=1) / np.sqrt(k)) if k > 1 else float("nan")
    return _t_bounds(float(m.mean()), se, k - 1, level)


def cluster_t_interval_diff(a, a_clusters, b, b_clusters, a_sub=None, b_sub=None,
                            level: float = 0.95) -> tuple[float, float, float]:
    """``mean(a) − mean(b)`` over the cluster means of two independent samples (e.g. the inverted words,
    clusters = concepts, subclusters = seeds, against the vocabulary's nouns, one cluster each), with a Welch
    t-interval (Welch–Satterthwaite degrees of freedom)."""
    ma, mb = cluster_means(a, a_clusters, a_sub), cluster_means(b, b_clusters, b_sub)
    if len(ma) < 2 or len(mb) < 2:
        return float(ma.mean() - mb.mean()), float("nan"), float("nan")
    va, vb = ma.var(ddof=1) / len(ma), mb.var(ddof=1) / len(mb)
    se = float(np.sqrt(va + vb))
    df = (va + vb) ** 2 / (va ** 2 / (len(ma) - 1) + vb ** 2 / (len(mb) - 1)) if va + vb > 0 else len(ma) + len(mb) - 2
    return _t_bounds(float(ma.mean() - mb.mean()), se, float(df), level)


def excludes_zero(interval: tuple[float, float, float]) -> bool:
    """Whether an interval ``(mean, low, high)`` lies wholly on one side of zero (NaN bounds: never)."""
    _, lo, hi = interval
    return bool(lo > 0 or hi < 0)


def cluster_bootstrap(values, clusters, subclusters=None, n_boot: int = 2000, level: float = 0.95,
                      seed: int = 0) -> tuple[float, float, float]:
    """Mean and percentile interval ``(mean, low, high)`` from a two-level cluster bootstrap.

    ``values`` ``(n,)`` are per-image numbers (NaN ones are dropped); ``clusters`` ``(n,)`` the
    independently drawn unit each belongs to (a concept, or a pair of concepts); ``subclusters`` ``(n,)``
    the unit drawn within it (an inversion seed). Each replicate draws clusters with replacement, then
    within each drawn cluster its subclusters with replacement, and averages all images of the drawn
    cells. With one cell per cluster it is the ordinary bootstrap over clusters; paired differences
    (one value per image, method minus baseline) go in as values."""
    sums, counts, mean = _cells(values, clusters, subclusters)
    stats = _replicates(sums, counts, n_boot, np.random.default_rng(seed))
    a = (1 - level) / 2
    return mean, float(np.quantile(stats, a)), float(np.quantile(stats, 1 - a))


def cluster_bootstrap_diff(a, a_clusters, b, b_clusters, a_sub=None, b_sub=None, n_boot: int = 2000,
                           level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """``mean(a) − mean(b)`` of two independent samples, each resampled by its own clusters (and
    subclusters), with a percentile interval: e.g. the inverted words (clusters: concepts, subclusters:
    inversion seeds) against the vocabulary's nouns (each noun its own cluster)."""
    sa, ca, ma = _cells(a, a_clusters, a_sub)
    sb, cb, mb = _cells(b, b_clusters, b_sub)
    rng = np.random.default_rng(seed)
    d = _replicates(sa, ca, n_boot, rng) - _replicates(sb, cb, n_boot, rng)
    q = (1 - level) / 2
    return ma - mb, float(np.quantile(d, q)), float(np.quantile(d, 1 - q))


def bootstrap_ci(values, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """Mean and percentile-bootstrap interval ``(mean, low, high)`` of a 1-D sample."""
    x = np.asarray(values, dtype=float).ravel()
    if len(x) == 0:
        raise ValueError("no values to bootstrap")
    _check_bootstrap(n_boot, level, x)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), (n_boot, len(x)))].mean(1)
    a = (1 - level) / 2
    return float(x.mean()), float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def bootstrap_diff_ci(a, b, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """Difference of means ``mean(a) − mean(b)`` of two independent samples, with a percentile-bootstrap interval."""
    x, y = np.asarray(a, dtype=float).ravel(), np.asarray(b, dtype=float).ravel()
    if len(x) == 0 or len(y) == 0:
        raise ValueError("both samples need values")
    _check_bootstrap(n_boot, level, x, y)
    rng = np.random.default_rng(seed)
    d = x[rng.integers(0, len(x), (n_boot, len(x)))].mean(1) - y[rng.integers(0, len(y), (n_boot, len(y)))].mean(1)
    q = (1 - level) / 2
    return float(x.mean() - y.mean()), float(np.quantile(d, q)), float(np.quantile(d, 1 - q))


def _check_bootstrap(n_boot: int, level: float, *samples: np.ndarray) -> None:
    if not is_whole(n_boot, 1):
        raise ValueError(f"n_boot must be an integer >= 1, got {n_boot!r}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), e.g. 0.95, got {level}")
    for x in samples:
        if not np.isfinite(x).all():
            raise ValueError(f"{int((~np.isfinite(x)).sum())} value(s) are NaN or infinite; drop or fix them first")
