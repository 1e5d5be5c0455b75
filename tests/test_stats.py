"""rl.stats.paired_change: the change between two evaluations of the same samples and its error."""

from __future__ import annotations

import numpy as np
import pytest

from rl.stats import paired_change


def test_equal_clusters_give_the_standard_error_of_prompt_means():
    # With the same number of samples per prompt, the cluster error is the plain standard error of
    # the per-prompt mean changes: computed here that way, independently of the implementation.
    rng = np.random.default_rng(0)
    prompts = np.repeat(np.arange(40), 4)
    before = rng.integers(0, 2, 160).astype(float)
    after = np.where(rng.random(160) < 0.2, 1.0 - before, before)
    change, se = paired_change(before, after, prompts)
    per_prompt = (after - before).reshape(40, 4).mean(axis=1)
    assert change == pytest.approx(after.mean() - before.mean())
    assert se == pytest.approx(per_prompt.std(ddof=1) / np.sqrt(40))


def test_correlated_samples_of_a_prompt_widen_the_error():
    # Every sample of a prompt moves together: 8 prompts, not 64 independent samples.
    prompts = np.repeat(np.arange(8), 8)
    before = np.zeros(64)
    after = np.repeat([1.0, 0, 0, 1, 0, 0, 0, 1], 8)
    _, clustered = paired_change(before, after, prompts)
    _, independent = paired_change(before, after, np.arange(64))
    assert clustered > 2.5 * independent


def test_missing_pairs_are_left_out_and_no_change_has_no_error():
    before = np.array([0.0, 1.0, np.nan, 1.0])
    after = np.array([1.0, 1.0, 0.0, np.nan])
    change, _ = paired_change(before, after, np.arange(4))
    assert change == pytest.approx(0.5)  # only the first two samples are pairs
    assert paired_change(before[:2], before[:2], np.arange(2)) == (0.0, 0.0)
    assert all(np.isnan(paired_change(np.full(3, np.nan), np.ones(3), np.arange(3))))
    assert np.isnan(paired_change(np.zeros(3), np.ones(3), np.zeros(3))[1])  # one prompt: no error


def test_mismatched_shapes_are_an_error():
    with pytest.raises(ValueError, match="one length"):
        paired_change(np.zeros(3), np.zeros(4), np.arange(3))
