"""Reward workers by name. Add a worker: write rewards/<name>.py with a class (or a function)
that takes the worker's params as keyword arguments and returns a RewardWorker, and register
"module:attribute" here. Modules are imported only when a worker is built, so reading a config
(and listing the known names) never imports transformers or loads a model."""

from __future__ import annotations

import importlib
from operator import attrgetter
from typing import Any, Callable

from rewards.base import RewardBatch, RewardOutput, RewardWorker

WORKERS: dict[str, str] = {
    "jpeg_compressibility": "rewards.jpeg:JpegCompressibility",
    "jpeg_incompressibility": "rewards.jpeg:jpeg_incompressibility",
    "pickscore": "rewards.pickscore:PickScore",
    "clipscore": "rewards.clip_scores:CLIPScore",
    "aesthetic": "rewards.clip_scores:LaionAesthetic",
    "ict": "rewards.clip_scores:ict_score",
    "hp": "rewards.clip_scores:HPScore",
    "image_reward": "rewards.image_reward:ImageReward",
    "artifact": "rewards.artifact:ArtifactDetector",
    "clip_probe": "rewards.artifact:ClipProbeDetector",
    "dino_probe": "rewards.dino_probe:DinoArtifactProbe",
    # The FIRM workers take a JudgeSettings; from_params builds it from the flat YAML params.
    "firm_gen": "rewards.firm:FirmGen.from_params",
    "firm_edit": "rewards.firm:FirmEdit.from_params",
    # Rubric judges on the same backends: presets, or vlm_judge with a rubric file of your own.
    "unified_reward": "rewards.vlm_judge:unified_reward",
    "viescore": "rewards.vlm_judge:viescore",
    "viescore_edit": "rewards.vlm_judge:viescore_edit",
    "editscore": "rewards.vlm_judge:editscore",
    "vlm_judge": "rewards.vlm_judge:vlm_judge",
    "edit_color": "rewards.edit_verify:EditColor",
    "shapes_geneval": "rewards.shapes_geneval:ShapesGenEval",
}


def worker_factory(name: str) -> Callable[..., RewardWorker]:
    """The registered class or function for `name`, its module imported; an unknown name lists the known ones."""
    if name not in WORKERS:
        raise KeyError(f"unknown reward worker {name!r}; known workers: {', '.join(sorted(WORKERS))}")
    module, attribute = WORKERS[name].split(":")
    return attrgetter(attribute)(importlib.import_module(module))


def build_worker(name: str, params: dict[str, Any] | None = None) -> RewardWorker:
    """Instantiate a registered worker; an unknown name lists the known ones."""
    factory = worker_factory(name)
    try:
        return factory(**(params or {}))
    except TypeError as err:
        raise ValueError(f"reward worker {name!r}: bad params {params}: {err}") from err


__all__ = ["WORKERS", "build_worker", "worker_factory", "RewardBatch", "RewardOutput", "RewardWorker"]
