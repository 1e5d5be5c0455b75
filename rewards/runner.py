"""Runs the configured reward components over a batch and mixes the trained ones.

Each config entry (a name with worker, weight, role and params) becomes one worker; a worker
with one component reports it under the entry's name, one with several as `<entry>/<component>`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from rewards import build_worker
from rewards.base import RewardBatch
from rewards.mix import MIXES, weighted_sum


@dataclass
class Scored:
    scores: dict[str, np.ndarray]  # component -> [B] float64, NaN = missing
    seconds: dict[str, float] = field(default_factory=dict)  # entry -> wall time spent scoring
    extras: dict[str, float] = field(default_factory=dict)


class RewardRunner:
    def __init__(self, specs: dict, mix: str = "weighted_sum"):
        if mix not in MIXES:
            raise ValueError(f"unknown reward_mix {mix!r}; choose one of {MIXES}")
        self.mix = mix
        self.entries = []  # (name, spec, worker, component names)
        for name, spec in specs.items():
            worker = build_worker(spec.worker or name, spec.params)
            names = [name] if len(worker.components) == 1 else [f"{name}/{c}" for c in worker.components]
            self.entries.append((name, spec, worker, names))
        self.weights = {
            component: spec.weight
            for _, spec, _, names in self.entries
            if spec.role == "train"
            for component in names
        }

    @property
    def components(self) -> list[str]:
        return [c for *_, names in self.entries for c in names]

    def score(self, batch: RewardBatch) -> Scored:
        result = Scored(scores={})
        for name, _, worker, names in self.entries:
            start = time.perf_counter()
            output = worker(batch)
            result.seconds[name] = time.perf_counter() - start
            for component, key in zip(worker.components, names):
                values = np.asarray(output.scores[component], dtype=np.float64)
                if values.shape != (len(batch),):
                    raise ValueError(f"reward {name!r} returned {values.shape} scores for a batch of {len(batch)}")
                result.scores[key] = values
            result.extras.update({f"{name}/{k}": v for k, v in output.extras.items()})
        return result

    def trained_reward(self, scores: dict[str, np.ndarray]) -> np.ndarray:
        """The reward the policy is trained on; NaN where any trained component is missing."""
        return weighted_sum(scores, self.weights)
