"""shapes_geneval: the demo's verifiable reward, the shapes domain's classical checker
(models/shapes/checker.py) as a reward worker. Components strict (the whole caption right) and
partial (the fraction of its clauses that hold), both in [0, 1]; a prompt that is not a shapes
caption is missing (NaN, never 0), counted in extras as unparsed_count."""

from __future__ import annotations

import numpy as np

from models.shapes.checker import ShapesChecker
from rewards.base import RewardBatch, RewardOutput


class ShapesGenEval:
    """Reward worker: components ("strict", "partial"), both in [0, 1], NaN for an unparsed prompt.
    Keyword arguments are ShapesChecker's (background_threshold, min_area, colour_tolerance,
    relation_margin_px)."""

    def __init__(self, name: str = "shapes_geneval", **checker_settings: float):
        self.checker = ShapesChecker(**checker_settings)
        self.name = name
        self.components = ("strict", "partial")

    def __call__(self, batch: RewardBatch) -> RewardOutput:
        strict, partial = self.checker.score(batch.images, list(batch.prompts))
        return RewardOutput(
            scores={"strict": strict, "partial": partial},
            extras={"unparsed_count": float(np.isnan(strict).sum())},
        )
