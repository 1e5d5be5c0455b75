"""A verifiable editing reward for tests and tiny configs: instructions that ask for a global
colour or brightness change, checked with pixel statistics. It scores like FIRM-Edit (execution
and consistency on a 1..5 scale), so the same `cme` mix applies.

- execution: how far the requested statistic moved in the requested direction,
  1 + 4 * clip01(change / target_change), where the statistic is the mean brightness or the
  requested channel's mean minus the mean of the other two (pixel levels, 0..255).
- consistency: how much of the source's structure survived, ignoring global colour shifts:
  1 + 4 * clip01(1 - mean|(edit - its channel means) - (source - its channel means)| / tolerance).
An instruction with no recognised request gives NaN execution (missing, never 0).
"""

from __future__ import annotations

import re

import numpy as np

from rewards.base import RewardBatch, RewardOutput

# (pattern, statistic, sign): the first match in the instruction decides the request.
REQUESTS = (
    (r"\b(brighter|lighter|brighten|lighten)\b", "brightness", 1.0),
    (r"\b(darker|darken|dimmer)\b", "brightness", -1.0),
    (r"\b(more red|redder|red tint|make it red)\b", "red", 1.0),
    (r"\b(more green|greener|green tint|make it green)\b", "green", 1.0),
    (r"\b(more blue|bluer|blue tint|make it blue)\b", "blue", 1.0),
)
CHANNELS = {"red": 0, "green": 1, "blue": 2}


def parse_request(instruction: str) -> tuple[str, float] | None:
    text = instruction.lower()
    for pattern, statistic, sign in REQUESTS:
        if re.search(pattern, text):
            return statistic, sign
    return None


def statistic(image: np.ndarray, name: str) -> float:
    pixels = image.astype(np.float64)
    if name == "brightness":
        return float(pixels.mean())
    channel = CHANNELS[name]
    others = [c for c in range(3) if c != channel]
    return float(pixels[..., channel].mean() - pixels[..., others].mean())


class EditColor:
    def __init__(self, target_change: float = 40.0, tolerance: float = 32.0):
        if target_change <= 0 or tolerance <= 0:
            raise ValueError("target_change and tolerance must be positive")
        self.target_change, self.tolerance = target_change, tolerance
        self.components = ("execution", "consistency")

    def __call__(self, batch: RewardBatch) -> RewardOutput:
        if batch.source_images is None or batch.instructions is None:
            raise ValueError("edit_color scores edits: the batch needs source_images and instructions (an editing config)")
        execution, consistency = [], []
        for edited, source, instruction in zip(batch.images, batch.source_images, batch.instructions):
            if edited.shape != source.shape:
                raise ValueError(f"edit_color: edited image {edited.shape} and source {source.shape} differ in size")
            request = parse_request(instruction)
            if request is None:
                execution.append(np.nan)
            else:
                name, sign = request
                change = sign * (statistic(edited, name) - statistic(source, name))
                execution.append(1.0 + 4.0 * np.clip(change / self.target_change, 0.0, 1.0))
            e = edited.astype(np.float64)
            s = source.astype(np.float64)
            structure = np.abs((e - e.mean(axis=(0, 1))) - (s - s.mean(axis=(0, 1)))).mean()
            consistency.append(1.0 + 4.0 * np.clip(1.0 - structure / self.tolerance, 0.0, 1.0))
        execution_array = np.array(execution, dtype=np.float64)
        return RewardOutput(
            scores={"execution": execution_array, "consistency": np.array(consistency, dtype=np.float64)},
            extras={"unrecognised_count": float(np.isnan(execution_array).sum())},
        )
