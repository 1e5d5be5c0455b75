"""Runs the configured reward components over a batch, and mixes the trained ones.

Each config entry (a name with worker, weight, role, params) becomes one worker, in process or
behind a reward server (`urls`); a worker with one component reports it under the entry's name,
one with several as `<entry>/<component>`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from rewards import build_worker
from rewards.base import RewardBatch
from rewards.mix import mix_rewards, uncertainty_weights

logger = logging.getLogger(__name__)


@dataclass
class Scored:
    scores: dict[str, np.ndarray]  # component -> [B] float64, NaN = missing
    uncertainty: dict[str, np.ndarray] = field(default_factory=dict)  # component -> [B]
    seconds: dict[str, float] = field(default_factory=dict)  # entry -> wall time spent scoring
    extras: dict[str, float] = field(default_factory=dict)  # logged, never optimised


def _subset(batch: RewardBatch, rows: slice) -> RewardBatch:
    return RewardBatch(
        images=batch.images[rows],
        prompts=batch.prompts[rows],
        source_images=batch.source_images[rows] if batch.source_images is not None else None,
        instructions=batch.instructions[rows] if batch.instructions is not None else None,
        metadata=batch.metadata[rows] if batch.metadata else [],
    )


def is_count(key: str) -> bool:
    return key.endswith(("failures", "_count", "/missing"))


class RewardRunner:
    def __init__(self, specs: dict, mix=None):
        from rewards.config import MixConfig

        self.mix = mix if mix is not None else MixConfig()
        self.entries = []  # (name, spec, worker, component names)
        for name, spec in specs.items():
            if spec.urls:
                from rewards.client import RemoteReward

                worker = RemoteReward(spec.urls, timeout_s=spec.timeout_s, retries=spec.retries, name=spec.worker or name)
            else:
                worker = build_worker(spec.worker or name, spec.params)
            names = [name] if len(worker.components) == 1 else [f"{name}/{c}" for c in worker.components]
            unknown = sorted(set(spec.monitor_components) - set(worker.components))
            if unknown:
                raise ValueError(f"rewards.{name}.monitor_components: {unknown} are not components of this worker; it has {list(worker.components)}")
            self.entries.append((name, spec, worker, names))
        self.roles = {
            key: "monitor" if spec.role == "monitor" or component in spec.monitor_components else "train"
            for _, spec, worker, names in self.entries
            for component, key in zip(worker.components, names)
        }
        self.weights = {
            key: spec.weight
            for _, spec, _, names in self.entries
            for key in names
            if self.roles[key] == "train"
        }
        if not self.weights:
            raise ValueError("no reward component is trained on: every one has role monitor or is in monitor_components")
        if self.mix.kind != "weighted_sum":
            # Fails here, before any model loads, when the named components do not exist.
            mix_rewards({c: np.zeros(1) for c in self.weights}, self.weights, kind=self.mix.kind, base=self.mix.base, bonus=self.mix.bonus)

    @property
    def components(self) -> list[str]:
        return [c for *_, names in self.entries for c in names]

    def score(self, batch: RewardBatch) -> Scored:
        result = Scored(scores={})
        for name, spec, worker, names in self.entries:
            step = spec.batch_size or max(len(batch), 1)
            start = time.perf_counter()
            outputs = [worker(_subset(batch, slice(i, i + step))) for i in range(0, len(batch), step)]
            result.seconds[name] = time.perf_counter() - start
            for component, key in zip(worker.components, names):
                values = np.concatenate([np.asarray(o.scores[component], dtype=np.float64) for o in outputs])
                if values.shape != (len(batch),):
                    raise ValueError(f"reward {name!r} returned {values.shape} scores for a batch of {len(batch)}")
                result.scores[key] = values
                if all(component in o.uncertainty for o in outputs):
                    result.uncertainty[key] = np.concatenate([np.asarray(o.uncertainty[component], dtype=np.float64) for o in outputs])
                missing = int(np.isnan(values).sum())
                if missing:
                    logger.warning("reward %s: %d of %d scores missing (NaN); they are not trained on", key, missing, len(values))
            for output in outputs:
                for key, value in output.extras.items():
                    # Counts (parse failures, ...) add up over chunks; other extras are means.
                    share = 1.0 if is_count(key) else 1.0 / len(outputs)
                    result.extras[f"{name}/{key}"] = result.extras.get(f"{name}/{key}", 0.0) + float(value) * share
        return result

    def trained_reward(self, scores: dict[str, np.ndarray], group_ids=None, *, group_normalize: bool | None = None) -> np.ndarray:
        """The reward the policy is trained on; NaN where any trained component is missing."""
        normalise = self.mix.group_normalize if group_normalize is None else group_normalize
        return mix_rewards(
            scores, self.weights, kind=self.mix.kind, group_ids=group_ids,
            group_normalize=normalise, base=self.mix.base, bonus=self.mix.bonus,
        )

    def advantage_weights(self, uncertainty: dict[str, np.ndarray]) -> np.ndarray | None:
        """Per-sample advantage multipliers from the judges' uncertainty, or None when off."""
        if self.mix.uncertainty_strength <= 0:
            return None
        return uncertainty_weights(uncertainty, list(self.weights), self.mix.uncertainty_strength)
