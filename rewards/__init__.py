"""Reward workers by name. Add a worker: write rewards/<name>.py and register its factory here.

Factories import their module lazily, so reading a config (and listing the known names) never
imports transformers or loads a model.
"""

from __future__ import annotations

from typing import Any, Callable

from rewards.base import RewardBatch, RewardOutput, RewardWorker
from rewards.edit_verify import EditColor
from rewards.jpeg import JpegCompressibility, jpeg_incompressibility


def _pickscore(**kwargs):
    from rewards.pickscore import PickScore

    return PickScore(**kwargs)


def _artifact(**kwargs):
    from rewards.artifact import ArtifactDetector

    return ArtifactDetector(**kwargs)


def _clip_probe(**kwargs):
    from rewards.artifact import ClipProbeDetector

    return ClipProbeDetector(**kwargs)


def _firm_gen(**kwargs):
    from rewards.firm import FirmGen

    return FirmGen(**kwargs)


def _firm_edit(**kwargs):
    from rewards.firm import FirmEdit

    return FirmEdit(**kwargs)


def _shapes_geneval(**kwargs):
    from rewards.shapes_geneval import ShapesGenEval

    return ShapesGenEval(**kwargs)


WORKERS: dict[str, Callable[..., RewardWorker]] = {
    "jpeg_compressibility": JpegCompressibility,
    "jpeg_incompressibility": jpeg_incompressibility,
    "pickscore": _pickscore,
    "artifact": _artifact,
    "clip_probe": _clip_probe,
    "firm_gen": _firm_gen,
    "firm_edit": _firm_edit,
    "edit_color": EditColor,
    "shapes_geneval": _shapes_geneval,
}


def build_worker(name: str, params: dict[str, Any] | None = None) -> RewardWorker:
    """Instantiate a registered worker; an unknown name lists the known ones."""
    if name not in WORKERS:
        raise KeyError(f"unknown reward worker {name!r}; known workers: {', '.join(sorted(WORKERS))}")
    try:
        return WORKERS[name](**(params or {}))
    except TypeError as err:
        raise ValueError(f"reward worker {name!r}: bad params {params}: {err}") from err


__all__ = ["WORKERS", "build_worker", "RewardBatch", "RewardOutput", "RewardWorker"]
