"""The reward sections of a run config: each component's worker and role, and how the train
components mix. Read by rewards.runner; composed into the run config by rl.config."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Optional

from pydantic import Field


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
    kind: Literal["weighted_sum", "qma", "cme"] = "weighted_sum"
    """weighted_sum of the train components; qma (FIRM generation) or cme (FIRM editing) Base-and-Bonus of two 1..5 judge components (plus the weighted sum of any other train component)."""
    group_normalize: bool = False
    """weighted_sum only: normalise each train component within its group before weighting, so components on different scales count by their weights."""
    base: Optional[str] = None
    """qma/cme: the base component (qma: instruction following, default firm_gen/instruction; cme: execution, default firm_edit/execution)."""
    bonus: Optional[str] = None
    """qma/cme: the bonus component (qma: quality, default firm_gen/quality; cme: consistency, default firm_edit/consistency)."""
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
    if mix.kind in MIX_DEFAULTS:
        mix.base = mix.base or MIX_DEFAULTS[mix.kind][0]
        mix.bonus = mix.bonus or MIX_DEFAULTS[mix.kind][1]
    return problems
