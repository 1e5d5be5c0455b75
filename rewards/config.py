"""The reward sections of a run config: each component's worker and role, and how the train
components mix. Read by rewards.runner; composed into the run config by rl.config."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Optional

from pydantic import Field

from rewards.mix import PRESETS, BaseBonus


@dataclass
class RewardSpec:
    worker: Optional[str] = None
    """Registered reward worker (rewards.WORKERS); defaults to the entry's name."""
    weight: Annotated[float, Field(allow_inf_nan=False)] = 1.0
    """Weight in the mix."""
    role: Literal["train", "monitor"] = "train"
    """train: part of the optimised reward; monitor: scored and logged, never trained on."""
    monitor_components: list[str] = field(default_factory=list)
    """Components of a train worker that are only scored and logged, not trained on (e.g. [partial] for shapes_geneval)."""
    params: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for the worker's constructor (device, dtype, checkpoint, ... as the worker takes them)."""
    batch_size: Optional[Annotated[int, Field(ge=1)]] = None
    """Images per call to this worker; none = the whole rollout batch at once."""
    urls: list[str] = field(default_factory=list)
    """Reward-server endpoints (python -m rewards.serve) to call instead of running the worker in process; several = round robin."""
    timeout_s: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 120.0
    """Per-request timeout for a remote worker."""
    retries: Annotated[int, Field(ge=1)] = 3
    """Attempts per request for a remote worker before the run stops with an error naming the endpoint."""


@dataclass
class MixConfig:
    kind: Literal["weighted_sum", "base_bonus", "qma", "cme"] = "weighted_sum"
    """weighted_sum of the train components; base_bonus: base x (floor + bonus_weight x bonus) of two components mapped to [0, 1] by their ranges; qma (FIRM generation) and cme (FIRM editing) are base_bonus with FIRM's constants on 1..5 judge scores. Any other train component adds by its weight."""
    group_normalize: bool = False
    """weighted_sum only: normalise each train component within its group before weighting, so components on different scales count by their weights."""
    base: Optional[str] = None
    """base_bonus/qma/cme: the base component (qma: instruction following, default firm_gen/instruction; cme: execution, default firm_edit/execution)."""
    bonus: Optional[str] = None
    """base_bonus/qma/cme: the bonus component (qma: quality, default firm_gen/quality; cme: consistency, default firm_edit/consistency)."""
    base_range: Optional[Annotated[list[Annotated[float, Field(allow_inf_nan=False)]], Field(min_length=2, max_length=2)]] = None
    """base_bonus: [low, high] of the base component's scores, mapped to [0, 1] (clipped outside); qma/cme: [1, 5]."""
    bonus_range: Optional[Annotated[list[Annotated[float, Field(allow_inf_nan=False)]], Field(min_length=2, max_length=2)]] = None
    """base_bonus: [low, high] of the bonus component's scores, mapped to [0, 1] (clipped outside); qma/cme: [1, 5]."""
    floor: Optional[Annotated[float, Field(ge=0, allow_inf_nan=False)]] = None
    """base_bonus: the share of the base paid whatever the bonus (qma 0.4, cme 0.6)."""
    bonus_weight: Optional[Annotated[float, Field(ge=0, allow_inf_nan=False)]] = None
    """base_bonus: the share of the base the bonus adds at its best (qma 0.6, cme 0.4)."""
    uncertainty_strength: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0
    """Down-weight the advantage of sample i by 1 / (1 + k * u_i), u_i = summed judge-score variance of the train components; 0 disables."""


# FIRM's Base-and-Bonus presets name their base and bonus components by default.
MIX_DEFAULTS = {"qma": ("firm_gen/instruction", "firm_gen/quality"), "cme": ("firm_edit/execution", "firm_edit/consistency")}


def reward_problems(rewards: dict[str, RewardSpec], mix: MixConfig) -> list[str]:
    """What is wrong with the reward sections, one line each (the run config raises the first);
    fills in the default base and bonus of the qma / cme presets."""
    problems = []
    if not any(spec.role == "train" for spec in rewards.values()):
        problems.append("`rewards` must list at least one component with role: train")
    if mix.kind == "weighted_sum":
        # base / bonus may stay named (a sweep switching qma <-> weighted_sum); constants may not.
        stray = [name for name in ("base_range", "bonus_range", "floor", "bonus_weight") if getattr(mix, name) is not None]
        if stray:
            problems.append(f"`reward_mix.{stray[0]}` only applies to kind base_bonus, and reward_mix.kind is weighted_sum; "
                            "set the kind or remove it")
    if mix.kind in MIX_DEFAULTS:
        mix.base = mix.base or MIX_DEFAULTS[mix.kind][0]
        mix.bonus = mix.bonus or MIX_DEFAULTS[mix.kind][1]
        preset = PRESETS[mix.kind]
        given = [name for name in ("base_range", "bonus_range", "floor", "bonus_weight") if getattr(mix, name) is not None]
        if given:
            problems.append(f"`reward_mix.{given[0]}`: {mix.kind} uses FIRM's published constants; use kind: base_bonus to set your own")
        mix.base_range, mix.bonus_range = list(preset.base_range), list(preset.bonus_range)
        mix.floor, mix.bonus_weight = preset.floor, preset.bonus_weight
    if mix.kind == "base_bonus":
        unset = [name for name in ("base", "bonus", "base_range", "bonus_range", "floor", "bonus_weight") if getattr(mix, name) is None]
        if unset:
            problems.append(f"`reward_mix.{unset[0]}` must be set for kind base_bonus (it needs {', '.join(unset)})")
        for name in ("base_range", "bonus_range"):
            bounds = getattr(mix, name)
            if bounds is not None and not bounds[0] < bounds[1]:
                problems.append(f"`reward_mix.{name}` = {bounds} must be [low, high] with low < high")
    if mix.kind != "weighted_sum":
        for role in ("base", "bonus"):
            name = getattr(mix, role)
            if name is not None and not any(name == key or name.startswith(f"{key}/") for key in rewards):
                problems.append(f"`reward_mix.{role}` = {name!r} names no reward component; components come from: {', '.join(rewards)}")
    return problems


def base_bonus_settings(mix: MixConfig) -> BaseBonus | None:
    """The Base-and-Bonus constants of a validated mix (None for weighted_sum)."""
    if mix.kind in PRESETS:
        return PRESETS[mix.kind]
    if mix.kind == "base_bonus":
        return BaseBonus(tuple(mix.base_range), tuple(mix.bonus_range), mix.floor, mix.bonus_weight)
    return None
