"""Combining reward components into the trained reward. Pure numpy, no ranks: the trainer calls
it on the scores gathered from every rank. NaN propagates, so a sample missing any trained
component is missing as a whole (left out of its group's statistics and of the update).

Mixes (config `reward_mix.kind`):
- weighted_sum: sum_c w_c * s_c, optionally after normalising each component within its group.
- qma (FIRM, generation): R = I * (0.4 + 0.6 * Q) on scores mapped from 1..5 to [0, 1].
- cme (FIRM, editing):    R = clip01(E * (0.6 + 0.4 * C)) likewise.
Base-and-Bonus: the base score gates the reward, the bonus only adds to it, so the policy cannot
win by maximising the bonus alone (FIRM: a 0.5/0.5 sum for editing was hacked by returning the
source image unchanged).
"""

from __future__ import annotations

import numpy as np

MIXES = ("weighted_sum", "qma", "cme")


def normalise_1_5(score) -> np.ndarray:
    """Map a 1..5 judge score to [0, 1]: (s - 1) / 4."""
    return (np.asarray(score, dtype=np.float64) - 1.0) / 4.0


def qma(instruction, quality) -> np.ndarray:
    """FIRM's Quality-Modulated Alignment for generation, from raw 1..5 scores.

    instruction: [B]; quality: [B] or [B, 3] (aesthetics, technical quality, structure; the
    minimum is taken). Returns [B] in [0, 1], NaN where any input is NaN.
    """
    quality = np.asarray(quality, dtype=np.float64)
    if quality.ndim == 2:
        # np.min propagates NaN, which is what we want: one missing sub-score is a missing Q.
        quality = quality.min(axis=1)
    return normalise_1_5(instruction) * (0.4 + 0.6 * normalise_1_5(quality))


def cme(execution, consistency) -> np.ndarray:
    """FIRM's Consistency-Modulated Execution for editing, from raw 1..5 scores: [B] in [0, 1]."""
    value = normalise_1_5(execution) * (0.6 + 0.4 * normalise_1_5(consistency))
    return np.where(np.isnan(value), np.nan, np.clip(value, 0.0, 1.0))


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


def group_normalise(values, group_ids, eps: float = 1e-4) -> np.ndarray:
    """(v - group mean) / (group population std + eps), NaN kept and left out of the statistics."""
    values = np.asarray(values, dtype=np.float64)
    group_ids = np.asarray(group_ids)
    out = np.full_like(values, np.nan)
    for group in np.unique(group_ids):
        members = group_ids == group
        valid = members & ~np.isnan(values)
        if valid.any():
            mean, std = values[valid].mean(), values[valid].std()
            out[valid] = (values[valid] - mean) / (std + eps)
    return out


def mix_rewards(
    scores: dict[str, np.ndarray],
    weights: dict[str, float],
    *,
    kind: str = "weighted_sum",
    group_ids=None,
    group_normalize: bool = False,
    base: str | None = None,
    bonus: str | None = None,
) -> np.ndarray:
    """The trained reward per sample.

    weights: the trained components and their weights (monitor components are not in it).
    weighted_sum: with group_normalize, each component is normalised within its group first
        (needs group_ids), so components on different scales count by their weights alone.
    qma / cme: Base-and-Bonus of the `base` and `bonus` components (raw 1..5 scores), plus the
        weighted sum of any other trained component.
    """
    if kind not in MIXES:
        raise ValueError(f"unknown reward mix {kind!r}; choose one of {MIXES}")
    if kind == "weighted_sum":
        if group_normalize:
            if group_ids is None:
                raise ValueError("group_normalize needs group_ids")
            scores = {name: group_normalise(scores[name], group_ids) for name in weights if name in scores}
        return weighted_sum(scores, weights)
    for role, name in (("base", base), ("bonus", bonus)):
        if name is None or name not in weights:
            raise KeyError(f"reward_mix {kind}: {role} component {name!r} must be a trained component; trained: {sorted(weights)}")
    combined = qma(scores[base], scores[bonus]) if kind == "qma" else cme(scores[base], scores[bonus])
    others = {name: w for name, w in weights.items() if name not in (base, bonus)}
    return combined + weighted_sum(scores, others) if others else combined


def uncertainty_weights(uncertainty: dict[str, np.ndarray], components, strength: float) -> np.ndarray:
    """Per-sample advantage multiplier 1 / (1 + strength * u), u = the sum over the given
    components of their uncertainty (a judge's variance over its score distribution, in squared
    score units). Components without an uncertainty count 0; NaN uncertainty counts 0."""
    total = None
    for name in components:
        if name in uncertainty:
            values = np.nan_to_num(np.asarray(uncertainty[name], dtype=np.float64), nan=0.0)
            total = values if total is None else total + values
    if total is None:
        return None
    return 1.0 / (1.0 + strength * total)
