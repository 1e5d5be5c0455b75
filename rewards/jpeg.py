"""JPEG (in)compressibility (DDPO, Black et al. 2023): the size of the image saved as JPEG at
quality 95, in kilobytes. Needs no weights, so the trainer can be tested end to end anywhere."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from rewards.base import RewardBatch, RewardOutput


def jpeg_kilobytes(image: np.ndarray, quality: int = 95) -> float:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return buffer.tell() / 1000.0


class JpegCompressibility:
    """Reward = -kilobytes * scale (DDPO's compressibility; scale 1/500 as in Flow-GRPO).

    With sign = +1 it is incompressibility instead: larger files score higher.
    """

    def __init__(self, scale: float = 1.0 / 500.0, quality: int = 95, sign: float = -1.0, name: str = "jpeg_compressibility"):
        if quality < 1 or quality > 100:
            raise ValueError(f"jpeg quality must be in 1..100, got {quality}")
        self.scale, self.quality, self.sign = scale, quality, sign
        self.components = (name,)

    def __call__(self, batch: RewardBatch) -> RewardOutput:
        sizes = np.array([jpeg_kilobytes(img, self.quality) for img in batch.images], dtype=np.float64)
        return RewardOutput(scores={self.components[0]: self.sign * sizes * self.scale}, extras={"kilobytes_mean": float(sizes.mean())})


def jpeg_incompressibility(scale: float = 1.0 / 500.0, quality: int = 95) -> JpegCompressibility:
    return JpegCompressibility(scale=scale, quality=quality, sign=1.0, name="jpeg_incompressibility")
