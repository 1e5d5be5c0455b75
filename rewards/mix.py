"""Combining reward components into the trained reward. Pure numpy; NaN propagates, so a sample
missing any trained component is missing as a whole (and left out of the update)."""

from __future__ import annotations

import numpy as np

MIXES = ("weighted_sum",)


def weighted_sum(scores: dict[str, np.ndarray], weights: dict[str, float]) -> np.ndarray:
    """sum_c weights[c] * scores[c] over the components named in weights."""
    if not weights:
        raise ValueError("weighted_sum needs at least one weighted component")
    missing = [name for name in weights if name not in scores]
    if missing:
        raise KeyError(f"no scores for reward components {missing}; scored: {sorted(scores)}")
    total = None
    for name, weight in weights.items():
        part = weight * np.asarray(scores[name], dtype=np.float64)
        total = part if total is None else total + part
    return total
