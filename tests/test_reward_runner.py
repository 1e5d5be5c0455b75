"""RewardRunner: what any worker returns is checked before it can reach the weights.

An infinite score or uncertainty is missing (NaN), counted and logged like a score that could not
be computed; values that are not numbers, and workers that raise, stop the call with a
RewardError naming the reward; close() stops scoring. The workers here are scripted in process
and registered for the test, the way a config names a worker; tests/test_reward_client.py does
the same over HTTP.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import pytest

from rewards import WORKERS
from rewards.base import RewardBatch, RewardOutput
from rewards.config import MixConfig, RewardSpec
from rewards.runner import RewardError, RewardRunner

SCRIPTED = "scripted_for_runner_test"


@dataclass
class ScriptedWorker:
    """Scores by plan: "infinite" puts +inf / -inf among finite scores and uncertainties,
    "strings" returns numeric strings, "raise" raises on the chunk that holds prompt "boom",
    anything else scores len(prompt). Records its calls and whether it was closed."""

    plan: str = "fine"
    components: tuple[str, ...] = ("quality", "alignment")
    calls: list[list[str]] = field(default_factory=list)
    closed: bool = False
    on_call: object = None  # called before scoring, e.g. to close the runner from "another thread"

    def __call__(self, batch: RewardBatch) -> RewardOutput:
        self.calls.append(list(batch.prompts))
        if callable(self.on_call):
            self.on_call()
        if self.plan == "raise" and "boom" in batch.prompts:
            raise ConnectionError("judge endpoint went away")
        quality = np.array([float(len(p)) for p in batch.prompts])
        alignment = np.ones(len(batch))
        uncertainty = np.full(len(batch), 0.25)
        if self.plan == "infinite":
            quality = np.where([p == "inf" for p in batch.prompts], np.inf, quality)
            alignment = np.where([p == "-inf" for p in batch.prompts], -np.inf, alignment)
            uncertainty = np.where([p == "-inf" for p in batch.prompts], np.inf, uncertainty)
        if self.plan == "strings":
            return RewardOutput(scores={"quality": np.array([str(q) for q in quality]), "alignment": alignment})
        texts = {"quality": [f"{p!r} is {len(p)} long" for p in batch.prompts]} if self.plan == "texts" else {}
        if self.plan == "short_texts":
            texts = {"quality": ["only one"]}
        return RewardOutput(scores={"quality": quality, "alignment": alignment}, uncertainty={"quality": uncertainty}, texts=texts)

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def registered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(WORKERS, SCRIPTED, f"{__name__}:ScriptedWorker")


def runner_for(plan: str, **spec: object) -> RewardRunner:
    return RewardRunner({"judge": RewardSpec(worker=SCRIPTED, params={"plan": plan}, **spec)}, MixConfig())


def batch_of(*prompts: str) -> RewardBatch:
    return RewardBatch(images=np.zeros((len(prompts), 4, 4, 3), dtype=np.uint8), prompts=list(prompts))


def test_infinite_scores_and_uncertainties_are_missing_counted_and_logged(registered, caplog) -> None:
    runner = runner_for("infinite", batch_size=2)  # chunks of 2: the count is over the whole batch
    with caplog.at_level(logging.WARNING, logger="rewards.runner"):
        scored = runner.score(batch_of("inf", "abc", "-inf", "inf", "hello"))
    quality, alignment = scored.scores["judge/quality"], scored.scores["judge/alignment"]
    np.testing.assert_array_equal(np.isnan(quality), [True, False, False, True, False])
    np.testing.assert_array_equal(quality[[1, 2, 4]], [3.0, 4.0, 5.0])
    np.testing.assert_array_equal(np.isnan(alignment), [False, False, True, False, False])
    assert not np.isinf(quality).any() and not np.isinf(alignment).any()
    # The trainer's reward/<component>/missing is np.isnan(values).sum(): the infinities count.
    assert int(np.isnan(quality).sum()) == 2 and int(np.isnan(alignment).sum()) == 1
    np.testing.assert_array_equal(np.isnan(scored.uncertainty["judge/quality"]), [False, False, True, False, False])
    # The mix never sees an infinity: the samples are missing, not +-inf rewards.
    reward = runner.trained_reward(scored.scores)
    np.testing.assert_array_equal(np.isnan(reward), [True, False, True, True, False])

    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert [w for w in warnings if "judge/quality" in w and "scores" in w] == [
        "reward judge/quality: 2 of 5 scores missing (NaN, 2 of them infinite); they are not trained on"
    ]
    assert any("judge/alignment" in w and "1 of 5 scores missing" in w and "1 of them infinite" in w for w in warnings)
    assert any("judge/quality" in w and "1 of 5 uncertainties infinite" in w for w in warnings)


def test_a_worker_that_raises_stops_the_call_naming_the_reward(registered) -> None:
    runner = runner_for("raise", batch_size=2)
    with pytest.raises(RewardError, match=r"reward 'judge' \(worker 'scripted_for_runner_test'\) failed on samples 2\.\.3 "
                                          r"of a batch of 5: ConnectionError: judge endpoint went away") as raised:
        runner.score(batch_of("a", "b", "c", "boom", "e"))
    assert isinstance(raised.value.__cause__, ConnectionError)
    worker = runner.entries[0][2]
    assert worker.calls == [["a", "b"], ["c", "boom"]]  # it stopped at the failing chunk


def test_values_that_are_not_numbers_are_an_error_not_coerced(registered) -> None:
    with pytest.raises(RewardError, match=r"judge/quality.*scores of dtype <U.*not numbers"):
        runner_for("strings").score(batch_of("a", "bb"))


def test_close_stops_scoring_between_chunks_and_closes_the_workers(registered) -> None:
    runner = runner_for("fine", batch_size=1)
    worker = runner.entries[0][2]
    worker.on_call = runner.close  # the trainer closes the runner while the first chunk is scored
    with pytest.raises(RewardError, match="reward 'judge'.*closed"):
        runner.score(batch_of("a", "b", "c"))
    assert worker.calls == [["a"]] and worker.closed
    with pytest.raises(RewardError, match="closed"):
        runner.score(batch_of("a"))
    assert worker.calls == [["a"]]

    with runner_for("fine") as scoped:
        assert scoped.score(batch_of("abc")).scores["judge/quality"][0] == 3.0
    assert scoped.entries[0][2].closed


def test_finite_scores_pass_unchanged_and_nothing_is_logged(registered, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="rewards.runner"):
        scored = runner_for("fine").score(batch_of("a", "bb"))
    np.testing.assert_array_equal(scored.scores["judge/quality"], [1.0, 2.0])
    np.testing.assert_array_equal(scored.uncertainty["judge/quality"], [0.25, 0.25])
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert math.isfinite(runner_for("fine").trained_reward(scored.scores).sum())


def test_judge_texts_follow_their_samples_over_chunks(registered) -> None:
    """What a judge wrote stays with its sample when the runner scores in chunks; a worker that
    keeps no text adds none, and one that returns texts for other samples stops the call."""
    prompts = ["a", "bb", "ccc", "dddd", "eeeee"]
    scored = runner_for("texts", batch_size=2).score(batch_of(*prompts))
    assert scored.texts == {"judge/quality": [f"{p!r} is {len(p)} long" for p in prompts]}
    assert runner_for("fine", batch_size=2).score(batch_of(*prompts)).texts == {}
    with pytest.raises(RewardError, match="returned 3 texts for a batch of 5"):
        runner_for("short_texts", batch_size=2).score(batch_of(*prompts))
