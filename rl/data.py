"""Prompt files and the per-epoch draw of prompts. Deterministic in (seed, epoch), so the data
position of a run is its epoch number and resuming needs nothing else."""

from __future__ import annotations

from pathlib import Path

import torch


def read_prompts(path: str | Path) -> list[str]:
    """Non-empty lines of a text file, stripped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist; set data.train_prompts / data.eval_prompts")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompts (one per line expected)")
    return prompts


def draw_prompt_indices(num_prompts: int, num_groups: int, *, seed: int, epoch: int) -> list[int]:
    """num_groups prompt indices for one epoch: walks shuffled passes over the prompt list, so
    every prompt is used once before any is used twice."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    stream: list[int] = []
    # A pass is shuffled independently; drawn per epoch, never carried across epochs.
    while len(stream) < num_groups:
        stream += torch.randperm(num_prompts, generator=generator).tolist()
    return stream[:num_groups]
