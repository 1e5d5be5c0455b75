"""Statistics for comparing two evaluations of the same held-out samples.

An evaluation samples every held-out prompt several times with fixed noise, so the score of sample
i before training and after it form a pair. The change in the mean is the mean of the paired
differences; its standard error treats the prompts as the independent units (the samples of one
prompt share the prompt and so are correlated), which is the uncertainty that matters for the
claim "training improved held-out accuracy": another draw of prompts from the same distribution,
or another noise seed, moves the change by about this much.
"""

from __future__ import annotations

import numpy as np


def paired_change(before: np.ndarray, after: np.ndarray, clusters: np.ndarray) -> tuple[float, float]:
    """Mean of `after - before` and its cluster standard error.

    before, after: [N] per-sample scores of the same samples (NaN = missing; a pair with either
    side missing is left out). clusters: [N] the prompt index of each sample.
    Returns (change, standard_error); the error is NaN with fewer than two clusters.
    """
    before, after, clusters = (np.asarray(a) for a in (before, after, clusters))
    if not before.shape == after.shape == clusters.shape or before.ndim != 1:
        raise ValueError(f"paired_change needs three [N] arrays of one length, got {before.shape}, {after.shape}, {clusters.shape}")
    keep = np.isfinite(before) & np.isfinite(after)
    if not keep.any():
        return float("nan"), float("nan")
    diff, clusters = (after - before)[keep].astype(np.float64), clusters[keep]
    _, inverse = np.unique(clusters, return_inverse=True)
    change = float(diff.mean())
    g = int(inverse.max()) + 1
    if g < 2:
        return change, float("nan")
    # Cluster-robust (sandwich) variance of a mean: sum over clusters of the squared residual sums.
    residual_sums = np.bincount(inverse, weights=diff - change, minlength=g)
    variance = g / (g - 1) * np.sum(residual_sums**2) / len(diff) ** 2
    return change, float(np.sqrt(variance))


def nanmean(values) -> float:
    """Mean of the finite entries (NaN = missing); NaN when there is none."""
    values = np.asarray(values, dtype=np.float64)
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


def nanstd(values) -> float:
    """Standard deviation of the non-NaN entries; NaN when there is none."""
    values = np.asarray(values, dtype=np.float64)
    return float(np.nanstd(values)) if np.isfinite(values).any() else float("nan")
