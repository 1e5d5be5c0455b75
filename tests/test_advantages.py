"""rl.advantages.group_advantages against a plain Python loop written from REFERENCE.md section 2."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rl.advantages import group_advantages


def loop_advantages(rewards, group_ids, *, global_std=True, eps=1e-4, clip=5.0, drop_zero_std=True):
    """Straightforward reference: returns (advantages, trained, zero_std_ratio) as Python lists."""
    rewards = [float(r) for r in rewards]
    group_ids = [int(g) for g in group_ids]
    valid = [not math.isnan(r) for r in rewards]
    all_valid = [r for r, ok in zip(rewards, valid) if ok]
    global_sd = float(np.std(all_valid)) if all_valid else 0.0  # population std
    stats = {}
    for gid in set(group_ids):
        vals = [r for r, g, ok in zip(rewards, group_ids, valid) if g == gid and ok]
        stats[gid] = dict(
            mean=sum(vals) / len(vals) if vals else 0.0,
            std=float(np.std(vals)) if vals else 0.0,
            zero=len(vals) < 2 or max(vals) == min(vals),
        )
    adv, trained = [], []
    for r, g, ok in zip(rewards, group_ids, valid):
        st = stats[g]
        keep = ok and not (st["zero"] and drop_zero_std)
        trained.append(keep)
        if not keep or st["zero"]:
            adv.append(0.0)
            continue
        denom = global_sd if global_std else st["std"]
        adv.append(min(max((r - st["mean"]) / (denom + eps), -clip), clip))
    ratio = sum(s["zero"] for s in stats.values()) / len(stats)
    return adv, trained, ratio


def check_against_loop(rewards, group_ids, **kwargs):
    out = group_advantages(torch.tensor(rewards, dtype=torch.float64), torch.tensor(group_ids), **kwargs)
    adv, trained, ratio = loop_advantages(rewards, group_ids, **kwargs)
    assert out.advantages.dtype == torch.float32 and out.advantages.shape == (len(rewards),)
    np.testing.assert_allclose(out.advantages.double().numpy(), adv, rtol=1e-5, atol=1e-6)
    assert out.trained.tolist() == trained
    assert out.metrics["zero_std_ratio"] == pytest.approx(ratio)
    return out


@pytest.mark.parametrize("global_std", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_groups_match_loop(global_std, seed):
    """Random rewards, shuffled non-contiguous group ids (including negative): same as the loop."""
    rng = np.random.default_rng(seed)
    ids = rng.permutation(np.repeat([42, -3, 7, 1000, 5], 6))
    rewards = rng.normal(size=ids.size) * rng.choice([0.1, 1.0, 10.0])
    check_against_loop(rewards.tolist(), ids.tolist(), global_std=global_std)


def test_hand_computed_global_and_per_group_std():
    """Global std is the population std of ALL rewards; per-group std is each group's own."""
    rewards, ids = [0.0, 2.0, 10.0, 14.0], [0, 0, 1, 1]
    glob = group_advantages(torch.tensor(rewards), torch.tensor(ids), global_std=True)
    sd = math.sqrt(131 / 4)  # population std of [0, 2, 10, 14]
    np.testing.assert_allclose(glob.advantages.numpy(), np.array([-1, 1, -2, 2]) / (sd + 1e-4), rtol=1e-6)
    per = group_advantages(torch.tensor(rewards), torch.tensor(ids), global_std=False)
    np.testing.assert_allclose(per.advantages.numpy(), [-1 / 1.0001, 1 / 1.0001, -2 / 2.0001, 2 / 2.0001], rtol=1e-6)


def test_eps_is_added_to_std():
    """A = (r - mean) / (std + 1e-4): with std 5e-5 that gives +-1/3, not +-1."""
    out = group_advantages(torch.tensor([0.0, 1e-4], dtype=torch.float64), torch.tensor([0, 0]), global_std=False)
    np.testing.assert_allclose(out.advantages.numpy(), [-1 / 3, 1 / 3], rtol=1e-5)
    custom = group_advantages(torch.tensor([0.0, 2.0]), torch.tensor([0, 0]), global_std=False, eps=1.0)
    np.testing.assert_allclose(custom.advantages.numpy(), [-0.5, 0.5], rtol=1e-6)


def test_advantages_are_clipped():
    """Outliers are clipped to [-clip, clip] (5 by default)."""
    rewards = [0.0] * 99 + [1.0]  # the outlier has A = 99*0.01 / ~0.0995 ~ 9.9
    out = group_advantages(torch.tensor(rewards), torch.zeros(100, dtype=torch.long))
    assert out.advantages[-1].item() == pytest.approx(5.0)
    assert out.advantages[:-1].abs().max().item() < 5.0
    narrow = check_against_loop(rewards, [0] * 100, clip=0.05)
    assert narrow.advantages[-1].item() == pytest.approx(0.05)
    assert narrow.advantages[0].item() == pytest.approx(-0.05)


@pytest.mark.parametrize("global_std", [True, False])
def test_nan_rewards_are_excluded_and_not_trained(global_std):
    """A missing (NaN) reward is left out of its group's mean and of the std, and is not trained on."""
    rewards = [1.0, 3.0, float("nan"), 10.0, float("nan"), 20.0, 40.0]
    ids = [0, 0, 0, 1, 1, 1, 1]
    out = check_against_loop(rewards, ids, global_std=global_std)
    assert out.trained.tolist() == [True, True, False, True, False, True, True]
    assert out.advantages[2].item() == 0.0 and out.advantages[4].item() == 0.0
    assert not torch.isnan(out.advantages).any()
    assert out.metrics["missing_count"] == 2
    # group 0's mean is 2 (NaN ignored), so its two valid samples are symmetric
    assert out.advantages[0].item() == pytest.approx(-out.advantages[1].item())


def test_zero_std_groups_dropped_by_default():
    """Groups whose rewards are all equal have A = 0, are dropped, and are counted in zero_std_ratio."""
    rewards = [0.5, 0.5, 0.5, 0.0, 1.0, 0.25, 1.0, 1.0, 2.0, 2.0]
    ids = [3, 3, 3, 9, 9, 9, 11, 11, 4, 4]  # groups 3, 11 and 4 are flat
    out = check_against_loop(rewards, ids, drop_zero_std=True)
    assert out.trained.tolist() == [False] * 3 + [True] * 3 + [False] * 4
    assert out.metrics["zero_std_ratio"] == pytest.approx(3 / 4)
    assert out.metrics["trained_fraction"] == pytest.approx(3 / 10)


def test_zero_std_groups_kept_with_zero_advantage():
    """drop_zero_std=False keeps those samples in the update, with A = 0; the ratio is still logged."""
    rewards = [0.5, 0.5, 0.5, 0.0, 1.0, 0.25]
    ids = [3, 3, 3, 9, 9, 9]
    for global_std in (True, False):
        out = check_against_loop(rewards, ids, drop_zero_std=False, global_std=global_std)
        assert out.trained.all()
        assert torch.equal(out.advantages[:3], torch.zeros(3))
        assert out.metrics["zero_std_ratio"] == pytest.approx(0.5)


def test_group_with_single_valid_reward_has_no_signal():
    """A group left with one valid reward (the others missing) gives A = 0 and is dropped."""
    rewards = [float("nan"), 0.7, float("nan"), 0.0, 1.0]
    ids = [0, 0, 0, 1, 1]
    out = check_against_loop(rewards, ids)
    assert out.trained.tolist() == [False, False, False, True, True]


def test_equal_but_inexact_rewards_count_as_zero_std():
    """24 copies of 0.1 are 'all equal': the group must be dropped and counted like 24 copies of 0.5."""
    rewards = [0.1] * 24 + [0.0, 1.0] * 12
    ids = [0] * 24 + [1] * 24
    out = group_advantages(torch.tensor(rewards, dtype=torch.float64), torch.tensor(ids))
    assert out.metrics["zero_std_ratio"] == pytest.approx(0.5)
    assert not out.trained[:24].any()


def test_permutation_equivariance():
    """Shuffling the samples (as rank layout does) shuffles the advantages the same way."""
    rng = np.random.default_rng(5)
    ids = np.repeat(np.arange(4), 5)
    rewards = rng.normal(size=20)
    base = group_advantages(torch.tensor(rewards), torch.tensor(ids)).advantages
    perm = rng.permutation(20)
    shuffled = group_advantages(torch.tensor(rewards[perm]), torch.tensor(ids[perm])).advantages
    torch.testing.assert_close(shuffled, base[perm])


def test_mismatched_shapes_are_rejected():
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(4), torch.zeros(5, dtype=torch.long))
