"""Reward workers by name. Add a worker: write rewards/<name>.py and register its factory here."""

from __future__ import annotations

from typing import Any, Callable

from rewards.base import RewardBatch, RewardOutput, RewardWorker
from rewards.jpeg import JpegCompressibility, jpeg_incompressibility

WORKERS: dict[str, Callable[..., RewardWorker]] = {
    "jpeg_compressibility": JpegCompressibility,
    "jpeg_incompressibility": jpeg_incompressibility,
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
