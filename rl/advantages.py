"""Group-normalised advantages (GRPO). Pure tensor code: the caller gathers the rewards of every
rank first and slices the result back; nothing here knows about ranks."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Advantages:
    advantages: torch.Tensor  # [N] float32; 0 where not trained
    trained: torch.Tensor  # [N] bool; False for missing rewards and dropped zero-std groups
    metrics: dict[str, float]


def group_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    global_std: bool = True,
    eps: float = 1e-4,
    clip: float = 5.0,
    drop_zero_std: bool = True,
) -> Advantages:
    """A_i = (r_i - mean(group of i)) / (std + eps), clipped to [-clip, clip].

    rewards: [N] float, NaN marks a missing reward; such a sample is left out of its group's mean
        and of the std, and is not trained on.
    group_ids: [N] integer group of each sample (samples of one prompt share an id).
    global_std: divide by the std of ALL valid rewards of the batch (Flow-GRPO's default) instead
        of each group's own std. Both are population stds (divide by n, numpy's default).
    drop_zero_std: samples of groups whose valid rewards are all equal carry no signal
        (their advantage is 0); drop them from the update (Flow-GRPO) or keep them.
    """
    if rewards.ndim != 1 or rewards.shape != group_ids.shape:
        raise ValueError(f"rewards and group_ids must both be [N], got {tuple(rewards.shape)} and {tuple(group_ids.shape)}")
    rewards = rewards.double()
    valid = ~torch.isnan(rewards)
    _, group_index = torch.unique(group_ids, return_inverse=True)
    num_groups = int(group_index.max()) + 1 if group_index.numel() else 0

    filled = torch.where(valid, rewards, torch.zeros_like(rewards))
    count = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, group_index, valid.double())
    total = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, group_index, filled)
    group_mean = total / count.clamp(min=1)
    centred = torch.where(valid, rewards - group_mean[group_index], torch.zeros_like(rewards))
    group_var = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, group_index, centred**2) / count.clamp(min=1)
    group_std = group_var.sqrt()

    if global_std:
        valid_rewards = rewards[valid]
        std_all = valid_rewards.std(unbiased=False) if valid_rewards.numel() > 1 else torch.tensor(0.0, dtype=torch.float64)
        denominator = std_all.expand_as(rewards)
    else:
        denominator = group_std[group_index]
    advantages = (centred / (denominator + eps)).clamp(-clip, clip)

    # A group with fewer than two valid rewards, or all of them equal, has no signal. Equality is
    # decided on max == min: a rounded mean can leave a std of 1e-17 for equal rewards like 0.1.
    group_max = torch.full((num_groups,), -torch.inf, dtype=torch.float64).scatter_reduce(
        0, group_index[valid], rewards[valid], reduce="amax")
    group_min = torch.full((num_groups,), torch.inf, dtype=torch.float64).scatter_reduce(
        0, group_index[valid], rewards[valid], reduce="amin")
    zero_std_group = (group_max == group_min) | (count < 2)
    zero_std_sample = zero_std_group[group_index]
    trained = valid & ~(zero_std_sample & drop_zero_std)
    advantages = torch.where(trained, advantages, torch.zeros_like(advantages))

    metrics = {
        "zero_std_ratio": float(zero_std_group.double().mean()) if num_groups else 0.0,
        "missing_count": int((~valid).sum()),
        "trained_fraction": float(trained.double().mean()) if trained.numel() else 0.0,
        "abs_mean": float(advantages[trained].abs().mean()) if trained.any() else 0.0,
    }
    return Advantages(advantages.float(), trained, metrics)
