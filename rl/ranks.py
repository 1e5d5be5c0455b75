"""Values across ranks: gather, and sum / mean / max of one number per rank. Every rank must make
the same calls in the same order (they are collectives); with one process they are plain copies."""

from __future__ import annotations

import numpy as np
import torch


class Ranks:
    def __init__(self, accelerator):
        self.accelerator = accelerator

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    def gather(self, values) -> np.ndarray:
        """Every rank's equally long float array, concatenated in rank order, as float64."""
        acc = self.accelerator
        return acc.gather(torch.as_tensor(values, dtype=torch.float64, device=acc.device)).cpu().numpy()

    def gather_tensor(self, values: torch.Tensor) -> torch.Tensor:
        """Every rank's equally long tensor, concatenated in rank order, on the CPU."""
        return self.accelerator.gather(values.to(self.accelerator.device)).cpu()

    def gather_list(self, values: list) -> list:
        """Every rank's list (any length, any JSON-like items), concatenated in rank order."""
        from accelerate.utils import gather_object

        return gather_object(values) if self.world_size > 1 else list(values)

    def sum(self, value: float) -> float:
        return float(self.gather(np.array([value])).sum())

    def mean(self, value: float) -> float:
        return float(self.gather(np.array([value])).mean())

    def max(self, value: float) -> float:
        return float(self.gather(np.array([value])).max())
