"""Reward mixing: FIRM's Base-and-Bonus formulas, NaN propagation, per-component group
normalisation, monitors and uncertainty weighting. Expected values are worked by hand from
REFERENCE.md section 3 (normalise s -> (s - 1) / 4)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from rewards.base import RewardBatch
from rewards.mix import BaseBonus, cme, group_normalise, mix_rewards, qma, uncertainty_weights
from rewards.runner import RewardRunner
from rewards.config import MixConfig, RewardSpec


def test_cme_values():
    # E=5, C=5 -> 1 * (0.6 + 0.4) = 1; E=3, C=1 -> 0.5 * 0.6 = 0.3; E=1 -> 0 whatever C;
    # E=4, C=3 -> 0.75 * (0.6 + 0.2) = 0.6
    out = cme([5, 3, 1, 4], [5, 1, 5, 3])
    np.testing.assert_allclose(out, [1.0, 0.3, 0.0, 0.6], atol=1e-12)


def test_qma_values_and_min_of_quality_subscores():
    # I=5, Q=5 -> 1; I=3, Q=1 -> 0.5 * 0.4 = 0.2; I=4, Q=min(5,2,4)=2 -> 0.75 * (0.4 + 0.15) = 0.4125
    np.testing.assert_allclose(qma([5, 3], [5, 1]), [1.0, 0.2], atol=1e-12)
    np.testing.assert_allclose(qma([4], [[5, 2, 4]]), [0.4125], atol=1e-12)


def test_nan_propagates_through_base_and_bonus():
    assert math.isnan(cme([np.nan], [5])[0]) and math.isnan(cme([5], [np.nan])[0])
    assert math.isnan(qma([5], [np.nan])[0]) and math.isnan(qma([np.nan], [5])[0])
    assert math.isnan(qma([5], [[5, np.nan, 5]])[0])
    out = cme([5, np.nan, 3], [5, 5, 1])
    assert out[0] == pytest.approx(1.0) and math.isnan(out[1]) and out[2] == pytest.approx(0.3)


def test_cme_is_not_hacked_by_consistency_alone():
    """An unchanged source (execution 1, consistency 5) earns 0 from the cme mix, while a 0.5/0.5
    weighted sum of the same normalised scores pays it half the top reward (FIRM's editing hack)."""
    # Samples: unchanged source (E=1, C=5), perfect edit (E=5, C=5), half-done edit that broke the
    # rest (E=3, C=1). Normalised: E' = 0, 1, 0.5 and C' = 1, 1, 0.
    raw = {"execution": np.array([1.0, 5.0, 3.0]), "consistency": np.array([5.0, 5.0, 1.0])}
    weights = {"execution": 0.5, "consistency": 0.5}
    gated = mix_rewards(raw, weights, kind="cme", base="execution", bonus="consistency")
    # E' * (0.6 + 0.4 C'): 0 * 1, 1 * 1, 0.5 * 0.6
    np.testing.assert_allclose(gated, [0.0, 1.0, 0.3], atol=1e-12)
    normalised = {name: (scores - 1.0) / 4.0 for name, scores in raw.items()}
    # 0.5 E' + 0.5 C': 0 + 0.5, 0.5 + 0.5, 0.25 + 0
    np.testing.assert_allclose(mix_rewards(normalised, weights, kind="weighted_sum"), [0.5, 1.0, 0.25], atol=1e-12)


def test_group_normalise_by_hand():
    values = np.array([1.0, 3.0, np.nan, 10.0, 10.0, 40.0])
    groups = np.array([0, 0, 0, 1, 1, 1])
    out = group_normalise(values, groups, eps=0.0)
    np.testing.assert_allclose(out[:2], [-1.0, 1.0])
    assert math.isnan(out[2])
    # group 1: mean 20, population std sqrt((100 + 100 + 400) / 3) = sqrt(200)
    np.testing.assert_allclose(out[3:], np.array([-10.0, -10.0, 20.0]) / math.sqrt(200.0))


def test_weighted_sum_with_group_normalisation_balances_scales():
    """A component 1000x larger does not drown the other after per-group normalisation."""
    scores = {"big": np.array([1000.0, 2000.0, 1000.0, 2000.0]), "small": np.array([2.0, 1.0, 2.0, 1.0])}
    groups = np.array([0, 0, 1, 1])
    raw = mix_rewards(scores, {"big": 1.0, "small": 1.0}, kind="weighted_sum")
    normalised = mix_rewards(scores, {"big": 1.0, "small": 1.0}, kind="weighted_sum", group_ids=groups, group_normalize=True)
    assert raw[1] > raw[0]
    np.testing.assert_allclose(normalised, 0.0, atol=1e-3)


def test_mix_rejects_unknown_base_component():
    with pytest.raises(KeyError, match="base component"):
        mix_rewards({"a": np.ones(2)}, {"a": 1.0}, kind="cme", base="firm_edit/execution", bonus="a")


def test_uncertainty_weights_formula():
    weights = uncertainty_weights({"a": np.array([0.0, 1.0, np.nan]), "b": np.array([1.0, 1.0, 1.0])}, ["a", "b"], strength=2.0)
    np.testing.assert_allclose(weights, [1 / 3, 1 / 5, 1 / 3])
    assert uncertainty_weights({}, ["a"], 1.0) is None


def test_monitor_components_are_scored_but_never_trained():
    specs = {
        "jpeg_compressibility": RewardSpec(role="train", weight=2.0),
        "jpeg_incompressibility": RewardSpec(role="monitor", weight=100.0),
    }
    runner = RewardRunner(specs, MixConfig())
    assert runner.components == ["jpeg_compressibility", "jpeg_incompressibility"]
    assert runner.weights == {"jpeg_compressibility": 2.0}
    scores = {"jpeg_compressibility": np.array([-1.0, np.nan]), "jpeg_incompressibility": np.array([np.nan, 5.0])}
    reward = runner.trained_reward(scores)
    assert reward[0] == pytest.approx(-2.0)
    assert math.isnan(reward[1])  # the trained component is missing; the monitor does not fill in


def test_monitor_components_of_a_trained_worker():
    """shapes_geneval trained on strict only: partial is still scored and logged under its own key."""
    from models.shapes.scenes import render, scene_from_caption

    runner = RewardRunner({"shapes_geneval": RewardSpec(monitor_components=["partial"])}, MixConfig())
    assert runner.components == ["shapes_geneval/strict", "shapes_geneval/partial"]
    assert runner.weights == {"shapes_geneval/strict": 1.0}
    assert runner.roles == {"shapes_geneval/strict": "train", "shapes_geneval/partial": "monitor"}
    scene = scene_from_caption("two red squares", np.random.default_rng(0))
    # The right scene, then a red square and a blue circle: two objects but one red square, so
    # strict 0 and partial 1/2 (the count of red squares is wrong, the object count right).
    images = np.stack([render(scene), render(scene_from_caption("a red square and a blue circle", np.random.default_rng(0)))])
    scored = runner.score(RewardBatch(images=images, prompts=["two red squares"] * 2))
    np.testing.assert_allclose(scored.scores["shapes_geneval/strict"], [1.0, 0.0])
    np.testing.assert_allclose(scored.scores["shapes_geneval/partial"], [1.0, 0.5])
    np.testing.assert_allclose(runner.trained_reward(scored.scores), [1.0, 0.0])  # partial not added
    with pytest.raises(ValueError, match=r"monitor_components.*'relaxed'.*has \['strict', 'partial'\]"):
        RewardRunner({"shapes_geneval": RewardSpec(monitor_components=["relaxed"])}, MixConfig())
    with pytest.raises(ValueError, match="no reward component is trained"):
        RewardRunner({"shapes_geneval": RewardSpec(monitor_components=["strict", "partial"])}, MixConfig())


def test_per_component_batch_size_gives_the_same_scores():
    from rewards.base import RewardBatch

    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, size=(5, 16, 16, 3), dtype=np.uint8)
    batch = RewardBatch(images=images, prompts=["p"] * 5)
    whole = RewardRunner({"jpeg_compressibility": RewardSpec()}).score(batch)
    chunked = RewardRunner({"jpeg_compressibility": RewardSpec(batch_size=2)}).score(batch)
    np.testing.assert_array_equal(whole.scores["jpeg_compressibility"], chunked.scores["jpeg_compressibility"])
    assert "jpeg_compressibility" in chunked.seconds


def test_base_bonus_maps_each_component_through_its_range():
    """The demo's mix: strict x (0.4 + 0.6 q), q = JPEG compressibility mapped from
    [-0.004, -0.002] to [0, 1] and clipped outside it. By hand: q(-0.003) = 0.5 -> 1 x 0.7;
    an empty canvas (-0.001, q clipped to 1) with the caption wrong (strict 0) earns 0; a busy
    image (-0.005, q clipped to 0) with the caption right keeps the floor 0.4."""
    mix = BaseBonus(base_range=(0.0, 1.0), bonus_range=(-0.004, -0.002), floor=0.4, bonus_weight=0.6)
    scores = {"strict": np.array([1.0, 0.0, 1.0, np.nan]), "jpeg": np.array([-0.003, -0.001, -0.005, -0.003])}
    out = mix_rewards(scores, {"strict": 1.0, "jpeg": 1.0}, kind="base_bonus", base="strict", bonus="jpeg", base_bonus=mix)
    np.testing.assert_allclose(out[:3], [0.7, 0.0, 0.4], atol=1e-12)
    assert math.isnan(out[3])


def test_base_bonus_config_needs_its_constants_and_presets_fill_firms():
    from rewards.config import base_bonus_settings, reward_problems

    rewards = {"strict": RewardSpec(), "jpeg": RewardSpec()}
    incomplete = MixConfig(kind="base_bonus", base="strict", bonus="jpeg", base_range=[0.0, 1.0])
    assert reward_problems(rewards, incomplete) == ["`reward_mix.bonus_range` must be set for kind base_bonus (it needs bonus_range, floor, bonus_weight)"]
    backwards = MixConfig(kind="base_bonus", base="strict", bonus="jpeg", base_range=[1.0, 0.0], bonus_range=[0.0, 1.0], floor=0.4, bonus_weight=0.6)
    assert reward_problems(rewards, backwards) == ["`reward_mix.base_range` = [1.0, 0.0] must be [low, high] with low < high"]
    typo = MixConfig(kind="base_bonus", base="strikt", bonus="jpeg", base_range=[0.0, 1.0], bonus_range=[0.0, 1.0], floor=0.4, bonus_weight=0.6)
    assert "`reward_mix.base` = 'strikt' names no reward component" in reward_problems(rewards, typo)[0]
    firm = {"firm_edit": RewardSpec()}
    preset = MixConfig(kind="cme")
    assert reward_problems(firm, preset) == []
    assert (preset.base, preset.bonus, preset.base_range, preset.floor, preset.bonus_weight) == ("firm_edit/execution", "firm_edit/consistency", [1.0, 5.0], 0.6, 0.4)
    assert base_bonus_settings(preset) == BaseBonus((1.0, 5.0), (1.0, 5.0), 0.6, 0.4)
    assert "use kind: base_bonus" in reward_problems(firm, MixConfig(kind="cme", floor=0.5))[0]


def test_a_base_bonus_mix_from_the_command_line_is_what_the_runner_trains_on():
    """configs/demo.yaml with the compressibility bonus gated by strict, set by overrides only."""
    from rewards.runner import RewardRunner
    from rl.config import load_config

    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml", [
        "rewards.jpeg_compressibility.role=train", "reward_mix.kind=base_bonus", "reward_mix.base=shapes_geneval/strict",
        "reward_mix.base_range=[0,1]", "reward_mix.bonus=jpeg_compressibility", "reward_mix.bonus_range=[-0.004,-0.002]",
        "reward_mix.floor=0.4", "reward_mix.bonus_weight=0.6",
    ])
    runner = RewardRunner(config.rewards, config.reward_mix)
    scores = {"shapes_geneval/strict": np.array([1.0, 0.0]), "shapes_geneval/partial": np.array([0.5, 0.5]),
              "jpeg_compressibility": np.array([-0.0025, -0.001])}
    np.testing.assert_allclose(runner.trained_reward(scores), [1.0 * (0.4 + 0.6 * 0.75), 0.0], atol=1e-12)
