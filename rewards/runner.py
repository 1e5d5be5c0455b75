"""Runs the configured reward components over a batch, and mixes the trained ones.

Each config entry (a name with worker, weight, role, params) becomes one worker, in process or
behind a reward server (`urls`); a worker with one component reports it under the entry's name,
one with several as `<entry>/<component>`.

What a worker returns is checked here, for every worker alike: an infinite score or uncertainty
is missing (NaN), counted and logged, so that it never reaches the weights and the run's
missing counts include it; a worker that raises stops the call with a RewardError naming it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from rewards import build_worker
from rewards.base import RewardBatch, RewardOutput, RewardWorker
from rewards.config import MixConfig, RewardSpec, base_bonus_settings
from rewards.mix import mix_rewards, uncertainty_weights

logger = logging.getLogger(__name__)


@dataclass
class Scored:
    scores: dict[str, np.ndarray]  # component -> [B] float64, NaN = missing
    uncertainty: dict[str, np.ndarray] = field(default_factory=dict)  # component -> [B]
    seconds: dict[str, float] = field(default_factory=dict)  # entry -> wall time spent scoring
    extras: dict[str, float] = field(default_factory=dict)  # logged, never optimised
    texts: dict[str, list[str]] = field(default_factory=dict)  # component -> [B] judge replies, where the worker keeps them


def _subset(batch: RewardBatch, rows: slice) -> RewardBatch:
    return RewardBatch(
        images=batch.images[rows],
        prompts=batch.prompts[rows],
        source_images=batch.source_images[rows] if batch.source_images is not None else None,
        instructions=batch.instructions[rows] if batch.instructions is not None else None,
        metadata=batch.metadata[rows] if batch.metadata else [],
    )


class RewardError(RuntimeError):
    """A reward worker failed (or the runner was closed); the message names the reward entry and
    its worker, the exception it raised is the __cause__. Training must stop: a reward that
    could not be computed is never replaced by a number."""


def _as_scores(raw: object, key: str, what: str) -> np.ndarray:
    """A worker's per-sample values as float64; strings, booleans and objects are an error,
    not numbers to coerce ("3" and True would become 3.0 and 1.0)."""
    values = np.asarray(raw)
    if values.dtype.kind not in "fiu":
        raise RewardError(f"reward {key!r} returned {what} of dtype {values.dtype}, not numbers: {values.ravel()[:4].tolist()}")
    return values.astype(np.float64)


def _infinite_as_missing(values: np.ndarray) -> tuple[np.ndarray, int]:
    """+-inf becomes NaN: missing, like a value that could not be computed. Returns the values
    and how many were infinite."""
    infinite = np.isinf(values)
    return np.where(infinite, np.nan, values), int(infinite.sum())


def is_count(key: str) -> bool:
    return key.endswith(("failures", "_count", "/missing"))


class RewardRunner:
    def __init__(self, specs: dict, mix=None, *, evaluation_only: bool = False):
        """evaluation_only: every component is a monitor whatever its role (rewards scored on
        held-out samples only, `eval.rewards`), and none needs to be trained on."""
        self.mix = mix if mix is not None else MixConfig()
        self.base_bonus = base_bonus_settings(self.mix)
        self._closed = False
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
            key: "monitor" if evaluation_only or spec.role == "monitor" or component in spec.monitor_components else "train"
            for _, spec, worker, names in self.entries
            for component, key in zip(worker.components, names)
        }
        self.weights = {
            key: spec.weight
            for _, spec, _, names in self.entries
            for key in names
            if self.roles[key] == "train"
        }
        if not self.weights and not evaluation_only:
            raise ValueError("no reward component is trained on: every one has role monitor or is in monitor_components")
        if self.mix.kind != "weighted_sum" and not evaluation_only:
            # Fails here, before any model loads, when the named components do not exist.
            mix_rewards({c: np.zeros(1) for c in self.weights}, self.weights, kind=self.mix.kind, base=self.mix.base, bonus=self.mix.bonus,
                        base_bonus=self.base_bonus)

    @property
    def components(self) -> list[str]:
        return [c for *_, names in self.entries for c in names]

    def score(self, batch: RewardBatch) -> Scored:
        """Every component's scores for the batch. Raises RewardError, naming the reward entry
        and its worker, when a worker raises, returns the wrong shape or non-numbers, or when
        the runner has been closed (before the call or between two of its chunks)."""
        result = Scored(scores={})
        for name, spec, worker, names in self.entries:
            step = spec.batch_size or max(len(batch), 1)
            start = time.perf_counter()
            outputs = [self._call(name, spec, worker, batch, slice(first, first + step)) for first in range(0, len(batch), step)]
            result.seconds[name] = time.perf_counter() - start
            for component, key in zip(worker.components, names):
                if any(component not in o.scores for o in outputs):
                    raise RewardError(f"reward {name!r} returned no {component!r} scores; its worker lists components {list(worker.components)}")
                values = np.concatenate([_as_scores(o.scores[component], key, "scores") for o in outputs])
                if values.shape != (len(batch),):
                    raise RewardError(f"reward {name!r} returned {values.shape} scores for a batch of {len(batch)}")
                values, infinite = _infinite_as_missing(values)
                result.scores[key] = values
                missing = int(np.isnan(values).sum())
                if missing:
                    logger.warning(
                        "reward %s: %d of %d scores missing (NaN%s); they are not trained on",
                        key, missing, len(values), f", {infinite} of them infinite" if infinite else "",
                    )
                if all(component in o.uncertainty for o in outputs):
                    uncertainty = np.concatenate([_as_scores(o.uncertainty[component], key, "uncertainty") for o in outputs])
                    if uncertainty.shape != (len(batch),):
                        raise RewardError(f"reward {name!r} returned {uncertainty.shape} uncertainties for a batch of {len(batch)}")
                    result.uncertainty[key], infinite = _infinite_as_missing(uncertainty)
                    if infinite:
                        logger.warning("reward %s: %d of %d uncertainties infinite; counted as missing (NaN)", key, infinite, len(uncertainty))
                if all(component in o.texts for o in outputs):
                    texts = [str(text) for o in outputs for text in o.texts[component]]
                    if len(texts) != len(batch):
                        raise RewardError(f"reward {name!r} returned {len(texts)} texts for a batch of {len(batch)}")
                    result.texts[key] = texts
            for output in outputs:
                for key, value in output.extras.items():
                    # Counts (parse failures, ...) add up over chunks; other extras are means.
                    share = 1.0 if is_count(key) else 1.0 / len(outputs)
                    result.extras[f"{name}/{key}"] = result.extras.get(f"{name}/{key}", 0.0) + float(value) * share
        return result

    def _call(self, name: str, spec: RewardSpec, worker: RewardWorker, batch: RewardBatch, rows: slice) -> RewardOutput:
        """One worker call on rows of the batch; any exception becomes a RewardError naming it."""
        where = f"worker {spec.worker or name!r}" + (f" at {', '.join(spec.urls)}" if spec.urls else "")
        if self._closed:
            raise RewardError(f"reward {name!r} ({where}): the reward runner was closed; no more scoring")
        part = _subset(batch, rows)
        try:
            return worker(part)
        except Exception as err:
            raise RewardError(
                f"reward {name!r} ({where}) failed on samples {rows.start}..{rows.start + len(part) - 1} "
                f"of a batch of {len(batch)}: {type(err).__name__}: {err}"
            ) from err

    def close(self) -> None:
        """Stop scoring and release the workers: a score() call in progress stops before its
        next worker call (a remote call in flight fails at once), later calls raise RewardError,
        and every worker with a close() (remote clients, judge backends) is closed. Idempotent;
        safe from another thread than the one scoring."""
        self._closed = True
        for _, _, worker, _ in self.entries:
            close = getattr(worker, "close", None)
            if callable(close):
                close()

    def __enter__(self) -> RewardRunner:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def trained_reward(self, scores: dict[str, np.ndarray], group_ids=None, *, group_normalize: bool | None = None) -> np.ndarray:
        """The reward the policy is trained on; NaN where any trained component is missing."""
        normalise = self.mix.group_normalize if group_normalize is None else group_normalize
        return mix_rewards(
            scores, self.weights, kind=self.mix.kind, group_ids=group_ids,
            group_normalize=normalise, base=self.mix.base, bonus=self.mix.bonus, base_bonus=self.base_bonus,
        )

    def advantage_weights(self, uncertainty: dict[str, np.ndarray]) -> np.ndarray | None:
        """Per-sample advantage multipliers from the judges' uncertainty, or None when off."""
        if self.mix.uncertainty_strength <= 0:
            return None
        return uncertainty_weights(uncertainty, list(self.weights), self.mix.uncertainty_strength)
