"""Combining reward components into the trained reward. Pure numpy, no ranks: the trainer calls
it on the scores gathered from every rank. NaN propagates, so a sample missing any trained
component is missing as a whole (left out of its group's statistics and of the update).

Mixes (config `reward_mix.kind`):
- weighted_sum: sum_c w_c * s_c, optionally after normalising each component within its group.
- base_bonus: R = u(base) * (floor + bonus_weight * u(bonus)), each component mapped to [0, 1]
  by u(s) = clip((s - low) / (high - low), 0, 1) over its declared [low, high] range.
- qma (FIRM, generation): base_bonus with 1..5 judge scores, floor 0.4, bonus_weight 0.6.
- cme (FIRM, editing):    base_bonus with 1..5 judge scores, floor 0.6, bonus_weight 0.4.
Base-and-Bonus: the base score gates the reward, the bonus only adds to it, so the policy cannot
win by maximising the bonus alone (FIRM: a 0.5/0.5 sum for editing was hacked by returning the
source image unchanged).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MIXES = ("weighted_sum", "base_bonus", "qma", "cme")


@dataclass(frozen=True)
class BaseBonus:
    """R = u(base) * (floor + bonus_weight * u(bonus)); u maps a component's [low, high] to [0, 1]."""

    base_range: tuple[float, float]
    bonus_range: tuple[float, float]
    floor: float
    bonus_weight: float


JUDGE_SCALE = (1.0, 5.0)  # FIRM's judges score 1..5
# FIRM's published constants: generation gates on instruction following (QMA), editing on
# execution (CME).
PRESETS = {
    "qma": BaseBonus(JUDGE_SCALE, JUDGE_SCALE, floor=0.4, bonus_weight=0.6),
    "cme": BaseBonus(JUDGE_SCALE, JUDGE_SCALE, floor=0.6, bonus_weight=0.4),
}


def to_unit(score, low: float, high: float) -> np.ndarray:
    """Map [low, high] onto [0, 1], clipped outside it; NaN stays NaN (missing)."""
    value = (np.asarray(score, dtype=np.float64) - low) / (high - low)
    return np.where(np.isnan(value), np.nan, np.clip(value, 0.0, 1.0))


def base_and_bonus(base, bonus, mix: BaseBonus) -> np.ndarray:
    """[B] in [0, floor + bonus_weight], NaN where either input is NaN."""
    return to_unit(base, *mix.base_range) * (mix.floor + mix.bonus_weight * to_unit(bonus, *mix.bonus_range))


def qma(instruction, quality) -> np.ndarray:
    """FIRM's Quality-Modulated Alignment for generation, from raw 1..5 scores.

    instruction: [B]; quality: [B] or [B, 3] (aesthetics, technical quality, structure; the
    minimum is taken). Returns [B] in [0, 1], NaN where any input is NaN.
    """
    quality = np.asarray(quality, dtype=np.float64)
    if quality.ndim == 2:
        # np.min propagates NaN, which is what we want: one missing sub-score is a missing Q.
        quality = quality.min(axis=1)
    return base_and_bonus(instruction, quality, PRESETS["qma"])


def cme(execution, consistency) -> np.ndarray:
    """FIRM's Consistency-Modulated Execution for editing, from raw 1..5 scores: [B] in [0, 1]."""
    return base_and_bonus(execution, consistency, PRESETS["cme"])


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
    base_bonus: BaseBonus | None = None,
) -> np.ndarray:
    """The trained reward per sample.

    weights: the trained components and their weights (monitor components are not in it).
    weighted_sum: with group_normalize, each component is normalised within its group first
        (needs group_ids), so components on different scales count by their weights alone.
    base_bonus / qma / cme: Base-and-Bonus of the `base` and `bonus` components (base_bonus with
        the given ranges and constants, qma and cme with FIRM's), plus the weighted sum of any
        other trained component.
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
    if kind == "qma":
        combined = qma(scores[base], scores[bonus])
    else:
        settings = PRESETS.get(kind, base_bonus)
        if settings is None:
            raise ValueError("reward_mix base_bonus needs its ranges, floor and bonus_weight")
        combined = base_and_bonus(scores[base], scores[bonus], settings)
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
