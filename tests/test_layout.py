"""The epoch's prompt draw (rl.data.draw_prompt_indices) and its layout over ranks and minibatches
(rl.layout.EpochLayout): what makes a run's samples the same whatever the world size."""

from __future__ import annotations

from collections import Counter

import pytest

from conftest import ROOT
from rl.config import ConfigError, load_config
from rl.data import draw_prompt_indices
from rl.layout import EpochLayout


@pytest.mark.parametrize("num_prompts, num_groups", [(10, 4), (10, 10), (4, 11), (3, 9)])
def test_draw_uses_every_prompt_once_before_any_twice(num_prompts, num_groups):
    drawn = draw_prompt_indices(num_prompts, num_groups, seed=0, epoch=1)
    assert len(drawn) == num_groups and all(0 <= i < num_prompts for i in drawn)
    for first in range(0, num_groups, num_prompts):  # each pass over the list is a permutation
        block = drawn[first : first + num_prompts]
        assert len(set(block)) == len(block), drawn
    counts = Counter(drawn)
    assert max(counts.values()) - min(counts.get(i, 0) for i in range(num_prompts)) <= 1, drawn


def test_draw_is_fixed_by_seed_and_epoch():
    draws = {(seed, epoch): draw_prompt_indices(50, 20, seed=seed, epoch=epoch) for seed in (0, 1) for epoch in (1, 2, 3)}
    assert all(draw_prompt_indices(50, 20, seed=s, epoch=e) == drawn for (s, e), drawn in draws.items())
    assert len({tuple(drawn) for drawn in draws.values()}) == len(draws), "two (seed, epoch) pairs drew the same prompts"


def layout(world_size: int, *overrides: str) -> EpochLayout:
    return EpochLayout.build(load_config(ROOT / "configs/tiny_cpu.yaml", list(overrides)), world_size)


@pytest.mark.parametrize("world_size, overrides, names", [
    (4, ["sample.num_groups=3", "sample.group_size=2"], "split over 4 ranks"),
    (1, ["sample.num_groups=2", "sample.group_size=4", "train.num_minibatches=3"], "train.num_minibatches"),
    (4, ["sample.num_groups=2", "sample.group_size=4", "sample.batch_size=2", "train.num_minibatches=4"], "train.num_minibatches"),
    (2, ["sample.num_groups=2", "sample.group_size=4", "sample.batch_size=3", "train.num_minibatches=1", "train.batch_size=4"], "sample.batch_size"),
    (2, ["sample.num_groups=2", "sample.group_size=4", "sample.batch_size=2", "train.num_minibatches=1", "train.batch_size=3"], "train.batch_size"),
], ids=["samples_over_ranks", "minibatches", "minibatch_over_ranks", "sample_batch", "train_batch"])
def test_layout_refuses_what_does_not_divide(world_size, overrides, names):
    """Each case breaks one divisibility rule; the error names the setting to change."""
    with pytest.raises(ConfigError, match=names):
        layout(world_size, *overrides)


@pytest.mark.parametrize("world_size, groups, group_size, minibatches", [(1, 2, 4, 2), (2, 2, 4, 2), (4, 4, 6, 3), (3, 3, 4, 2)])
def test_rank_positions_split_every_minibatch_in_contiguous_shares(world_size, groups, group_size, minibatches):
    """Over all ranks the positions are range(N), each exactly once; each rank holds a contiguous
    1/world_size of every minibatch, minibatch by minibatch (the update reads them in that order)."""
    total = groups * group_size
    minibatch, share = total // minibatches, total // minibatches // world_size
    built = layout(world_size, f"sample.num_groups={groups}", f"sample.group_size={group_size}", "sample.batch_size=1",
                   f"train.num_minibatches={minibatches}", "train.batch_size=1")
    per_rank = [built.rank_positions(rank) for rank in range(world_size)]
    assert sorted(p for positions in per_rank for p in positions) == list(range(total))
    for positions in per_rank:
        assert len(positions) == total // world_size
        for k in range(minibatches):
            chunk = positions[k * share : (k + 1) * share]
            assert {p // minibatch for p in chunk} == {k}, positions
            assert chunk == list(range(chunk[0], chunk[0] + share)), positions
