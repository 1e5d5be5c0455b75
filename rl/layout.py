"""How one epoch's samples are laid out over ranks, minibatches and microbatches.

N = sample.num_groups * sample.group_size samples, numbered by a seeded permutation into N
positions; positions are split into train.num_minibatches global minibatches of
M = N / num_minibatches, and each rank owns a contiguous 1/world_size of every minibatch.
A sample's noise is seeded by its global index, so for the same config every world size draws the
same images, forms the same minibatches and, up to float summation order, takes the same steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from rl.config import ConfigError, RunConfig
from rl.forward import nft_train_steps
from rl.sde import sde_step_indices


def num_trained_steps(config: RunConfig) -> int:
    """Trained steps per sample; fixed for a run so gradient accumulation is fixed too (nft: the
    forward-process timesteps each sample trains on)."""
    if config.train.objective == "nft":
        return nft_train_steps(config.sample.num_steps)
    if config.train.objective == "awm":
        return min(config.train.awm_steps, config.sample.num_steps)
    sde = config.sde
    return len(sde_step_indices(config.sample.num_steps, sde.window, steps=sde.steps, window_size=sde.window_size, window_range=sde.window_range))


@dataclass
class EpochLayout:
    world_size: int
    num_samples: int  # N, all ranks
    group_size: int
    num_minibatches: int
    per_rank: int  # n = N / world_size
    minibatch_size: int  # M, all ranks
    per_rank_minibatch: int  # m = M / world_size
    microbatches_per_minibatch: int  # m / train.batch_size
    trained_steps: int  # T
    grad_accum_steps: int  # backward calls per optimizer step on one rank

    @classmethod
    def build(cls, config: RunConfig, world_size: int) -> "EpochLayout":
        s, t = config.sample, config.train
        total = s.num_groups * s.group_size
        where = f"sample.num_groups * sample.group_size = {s.num_groups} * {s.group_size} = {total} samples"
        if total % world_size:
            raise ConfigError(f"{where} cannot be split over {world_size} ranks; make it a multiple of {world_size}")
        if total % t.num_minibatches or (total // t.num_minibatches) % world_size:
            raise ConfigError(
                f"{where} must split into train.num_minibatches = {t.num_minibatches} minibatches, "
                f"each divisible by {world_size} ranks"
            )
        per_rank, m = total // world_size, total // t.num_minibatches // world_size
        if per_rank % s.batch_size:
            raise ConfigError(f"{per_rank} samples per rank are not a multiple of sample.batch_size = {s.batch_size}")
        if m % t.batch_size:
            raise ConfigError(
                f"each rank's share of a minibatch ({m} samples) is not a multiple of train.batch_size = {t.batch_size}"
            )
        steps = num_trained_steps(config)
        return cls(world_size, total, s.group_size, t.num_minibatches, per_rank, total // t.num_minibatches, m, m // t.batch_size, steps, (m // t.batch_size) * steps)

    def rank_positions(self, rank: int) -> list[int]:
        return [
            k * self.minibatch_size + rank * self.per_rank_minibatch + i
            for k in range(self.num_minibatches)
            for i in range(self.per_rank_minibatch)
        ]

    def describe(self) -> str:
        return (
            f"{self.num_samples} samples per epoch ({self.num_samples // self.group_size} groups x {self.group_size}) "
            f"over {self.world_size} rank(s): {self.per_rank} per rank; {self.num_minibatches} optimizer steps per inner epoch "
            f"of {self.minibatch_size} samples x {self.trained_steps} trained steps "
            f"({self.grad_accum_steps} backward passes per rank per step)"
        )


def seeded_generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded from a tuple of integers (seed, epoch, stream, ...), independent across tuples."""
    seed = int(np.random.SeedSequence(list(keys)).generate_state(1, dtype=np.uint64)[0] & np.uint64(2**63 - 1))
    return torch.Generator().manual_seed(seed)
