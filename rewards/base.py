"""The reward-worker protocol: a batch of images and prompts in, named per-sample scores out.

A worker may return several components (a judge scoring instruction following and quality, for
example). NaN marks a score that could not be computed; it is counted and logged, never replaced
by 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np


@dataclass
class RewardBatch:
    images: np.ndarray  # [B, H, W, 3] uint8
    prompts: list[str]  # [B]
    source_images: list[np.ndarray] | None = None  # editing: [B] of [h, w, 3] uint8
    instructions: list[str] | None = None  # editing: [B]
    metadata: list[dict[str, Any]] = field(default_factory=list)  # [B], free-form per sample

    def __len__(self) -> int:
        return len(self.prompts)


@dataclass
class RewardOutput:
    scores: dict[str, np.ndarray]  # component -> [B] float64, NaN = missing
    uncertainty: dict[str, np.ndarray] = field(default_factory=dict)  # component -> [B], optional
    extras: dict[str, float] = field(default_factory=dict)  # logged, never optimised
    texts: dict[str, list[str]] = field(default_factory=dict)  # component -> [B] what a judge wrote (its reasoning), optional


class RewardWorker(Protocol):
    """A callable scorer. `components` names what __call__ returns in RewardOutput.scores."""

    components: tuple[str, ...]

    def __call__(self, batch: RewardBatch) -> RewardOutput: ...
