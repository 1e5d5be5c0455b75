"""The verifiable editing reward: execution measures the requested change, consistency the kept
structure; both 1..5 so FIRM's CME mix applies."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rewards.base import RewardBatch
from rewards.edit_verify import EditColor


def scene(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(60, 160, size=(8, 8, 3)).astype(np.uint8)
    return np.kron(base, np.ones((4, 4, 1), dtype=np.uint8))  # blocky 32x32 structure


def score(edited, source, instruction):
    out = EditColor()(RewardBatch(images=np.stack([edited]), prompts=[instruction], source_images=[source], instructions=[instruction]))
    return out.scores["execution"][0], out.scores["consistency"][0]


def test_requested_brightening_scores_high_on_both():
    source = scene()
    brighter = np.clip(source.astype(int) + 40, 0, 255).astype(np.uint8)  # +40 levels, structure kept
    execution, consistency = score(brighter, source, "Make the picture brighter")
    assert execution == pytest.approx(5.0)
    assert consistency == pytest.approx(5.0)


def test_wrong_direction_and_no_change_score_minimum_execution():
    source = scene()
    darker = np.clip(source.astype(int) - 40, 0, 255).astype(np.uint8)
    assert score(darker, source, "make it brighter")[0] == pytest.approx(1.0)
    assert score(source, source, "make it brighter") == (pytest.approx(1.0), pytest.approx(5.0))


def test_colour_request_uses_the_channel_against_the_others():
    source = scene()
    redder = source.astype(int)
    redder[..., 0] += 20  # red minus mean(green, blue) rises by 20 of the 40 target
    execution, _ = score(np.clip(redder, 0, 255).astype(np.uint8), source, "add more red")
    assert execution == pytest.approx(1.0 + 4.0 * 0.5)


def test_replacing_the_image_loses_consistency():
    source, other = scene(0), scene(1)
    _, consistency = score(other, source, "make it darker")
    assert consistency < 3.0


def test_unrecognised_instruction_is_missing_not_zero():
    source = scene()
    execution, consistency = score(source, source, "turn the cat into a dog")
    assert math.isnan(execution) and consistency == pytest.approx(5.0)


def test_needs_source_images():
    with pytest.raises(ValueError, match="source_images"):
        EditColor()(RewardBatch(images=np.stack([scene()]), prompts=["brighter"]))
