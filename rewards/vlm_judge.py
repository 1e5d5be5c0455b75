"""Vision-language judges from rubric files: UnifiedReward, VIEScore and EditScore presets, or
a rubric of your own, on the FIRM workers' backends (transformers in this process, or an
OpenAI-compatible server such as vLLM).

A rubric (rewards/judges/rubric.py; presets in rewards/templates/<name>.yaml) names the
questions, the scores each reply states, their scale and the reported components:

- unified_reward: UnifiedReward's point-wise image-generation assessment (Wang et al. 2025,
  arXiv 2503.05236; CodeGoat24/UnifiedReward-qwen-7b): one question, "Final Score: 1..5".
- viescore / viescore_edit: VIEScore (Ku et al., ACL 2024, arXiv 2312.14867) for generation
  and for editing: SC (semantic consistency: the min of its 0..10 scores, one for generation,
  editing success and over-editing for edits) and PQ (perceptual quality: the min of
  naturalness and artifacts), overall = sqrt(SC x PQ).
- editscore: EditScore (Luo et al. 2025, arXiv 2509.23909; EditScore/EditScore-7B): VIEScore's
  editing questions on a 0..25 scale with the reasoning first, reported on 0..10 as published
  (score / 2.5), overall = sqrt(SC x PQ).

The rubric text is our own wording of each method's questions with the reply format its judge
was trained to write; pass `rubric: path/to/file.yaml` to use the published prompts verbatim.

Scoring (JudgeSettings.scoring):

- "generate" (default): the judge writes its reply; the scores are read out of it, NaN for each
  it does not state (counted in "<component>/parse_failures", never 0).
- "distribution": the judge writes its reply, then at each score it stated the probabilities of
  the numbers it could have written there, given everything before it, are read from its
  next-token probabilities (a digit at a time: "10" is "1" then "0"; one more forward per
  leading digit of a two-digit number). The component is the expectation of its distribution
  (scores taken as independent) and its variance the uncertainty. Decimal scores ("3.62") count
  by their whole part.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from rewards.base import RewardBatch, RewardOutput
from rewards.firm import JudgeComponent, JudgeSettings, JudgeWorker, defined_mean, put_defined
from rewards.judges.backends import JudgeRequest
from rewards.judges.parse import number_distribution
from rewards.judges.rubric import Discrete, Rubric, SlotReading, load_rubric, read_slots, reduce_discrete, reduce_values

logger = logging.getLogger(__name__)

__all__ = ["RubricJudge", "editscore", "unified_reward", "viescore", "viescore_edit", "vlm_judge"]


@dataclass
class _Asked:
    """One question put to every sample of a batch, and what came back."""

    question: str
    requests: list[JudgeRequest]
    replies: list[str]
    readings: list[list[SlotReading]]  # [B][slots]


class RubricJudge(JudgeWorker):
    """A vision-language judge that follows a rubric; its components are the rubric's.

    Args:
        rubric: a preset name (unified_reward, viescore, viescore_edit, editscore) or a rubric file.
        model: the judge checkpoint (transformers backend) and default served model name; None =
            the rubric's.
        settings: how the judge runs (backend, scoring, batching, timeouts); defaults when None.
        name: the worker's name in log messages; None = the rubric's name.
    """

    def __init__(
        self,
        rubric: str | os.PathLike[str],
        model: str | None = None,
        settings: JudgeSettings | None = None,
        *,
        name: str | None = None,
    ):
        # The rubric first: a bad file fails before a model loads.
        self.rubric: Rubric = load_rubric(rubric)
        super().__init__(model or self.rubric.model, settings or JudgeSettings(), name or self.rubric.name, default_scoring="generate")
        self.components = tuple(self.rubric.components)

    # ---------------------------------------------------------------- asking

    def _requests(self, batch: RewardBatch) -> dict[str, list[JudgeRequest]]:
        count = len(batch)
        shown = {"generated": self._images(batch.images, "images (one per prompt)", count)}
        if self.rubric.task == "editing":
            if batch.source_images is None or batch.instructions is None:
                raise ValueError(
                    f"{self.name}: an editing rubric needs the batch's source_images and instructions; "
                    "is this reward configured on a text-to-image run?"
                )
            if len(batch.instructions) != count:
                raise ValueError(f"{self.name}: expected {count} instructions, got {len(batch.instructions)}")
            shown = {"source": self._images(batch.source_images, "source images", count), "edited": shown["generated"]}
            texts = [{"instruction": instruction} for instruction in batch.instructions]
        else:
            texts = [{"prompt": prompt} for prompt in batch.prompts]
        return {
            name: [
                JudgeRequest(tuple(shown[kind][i] for kind in question.images), question.text.format(**texts[i]))
                for i in range(count)
            ]
            for name, question in self.rubric.questions.items()
        }

    def __call__(self, batch: RewardBatch) -> RewardOutput:
        requests = self._requests(batch)
        # One backend call for every question: the transformers backend fills its batches and
        # the openai backend keeps `concurrency` requests in flight across questions.
        flat = [request for question in requests.values() for request in question]
        replies = self.backend.generate(flat, self.max_new_tokens)
        asked, start = [], 0
        for question, question_requests in requests.items():
            part = replies[start : start + len(question_requests)]
            start += len(question_requests)
            asked.append(_Asked(question, question_requests, part, [read_slots(reply, self.rubric, question) for reply in part]))
        return self.score(asked)

    # ---------------------------------------------------------------- scoring

    def score(self, asked: Sequence[_Asked]) -> RewardOutput:
        """Components from the replies to each question (see the module docstring)."""
        count = len(asked[0].replies)
        extras: dict[str, float] = {}
        slot_values: dict[str, np.ndarray] = {}  # report scale: parsed, or the expectation
        slot_dists: dict[str, list[Discrete]] = {}
        if self.scoring == "distribution":
            slot_dists, masses = self._distributions(asked)
            for question, mass in masses.items():
                put_defined(extras, f"{question}/digit_mass_mean", defined_mean(mass))
            slot_values = {slot: np.array([d.moments()[0] for d in dists]) for slot, dists in slot_dists.items()}
        else:
            for entry in asked:
                for index, slot in enumerate(self.rubric.questions[entry.question].scores):
                    raw = np.array([readings[index].value for readings in entry.readings], dtype=np.float64)
                    slot_values[slot.name] = np.asarray(self.rubric.report(raw), dtype=np.float64)
        for slot, values in slot_values.items():
            put_defined(extras, f"{slot}_mean", defined_mean(values))

        questions_of = {slot.name: [entry.question] for entry in asked for slot in self.rubric.questions[entry.question].scores}
        by_question = {entry.question: entry.replies for entry in asked}
        results: dict[str, JudgeComponent] = {}
        values: dict[str, np.ndarray] = dict(slot_values)
        dists: dict[str, list[Discrete]] = dict(slot_dists)
        for name, component in self.rubric.components.items():
            if self.scoring == "distribution":
                dists[name] = [reduce_discrete(component.reduce, [dists[part][i] for part in component.of]) for i in range(count)]
                moments = np.array([d.moments() for d in dists[name]], dtype=np.float64).reshape(count, 2)
                values[name], variance = moments[:, 0], moments[:, 1]
            else:
                stacked = np.stack([values[part] for part in component.of], axis=1)
                values[name], variance = np.array([reduce_values(component.reduce, row) for row in stacked]), None
            questions_of[name] = list(dict.fromkeys(q for part in component.of for q in questions_of[part]))
            texts = [" | ".join(by_question[q][i] for q in questions_of[name]) for i in range(count)]
            results[name] = JudgeComponent(values[name], variance, texts)
        return self._output(results, extras)

    def _distributions(self, asked: Sequence[_Asked]) -> tuple[dict[str, list[Discrete]], dict[str, np.ndarray]]:
        """Each stated score's distribution (report scale) and each question's in-range mass."""
        low, high = self.rubric.scale
        leading = [digit for digit in range(1, 10) if 10 * digit <= high]
        support = np.asarray(self.rubric.report(np.arange(low, high + 1, dtype=np.float64)), dtype=np.float64)
        undefined = Discrete(np.array([0.0]), np.array([np.nan]))
        # Every request first, in one backend call: for each stated score, the reply up to it,
        # and that prefix followed by each digit that can start a two-digit score.
        prefills: list[JudgeRequest] = []
        where: list[tuple[int, int, int, int]] = []  # (asked index, sample, slot, first request)
        for a, entry in enumerate(asked):
            for i, readings in enumerate(entry.readings):
                for s, reading in enumerate(readings):
                    if reading.start < 0 or not np.isfinite(reading.value):
                        continue
                    prefix = entry.replies[i][: reading.start]
                    where.append((a, i, s, len(prefills)))
                    request = entry.requests[i]
                    prefills.extend(JudgeRequest(request.images, request.text, prefix + extra) for extra in ["", *map(str, leading)])
        digits = self.backend.digit_distributions(prefills) if prefills else []
        dists = {slot: [undefined] * len(asked[0].replies) for slot in self.rubric.slots}
        masses = {entry.question: np.full(len(entry.replies), np.nan) for entry in asked}
        for a, i, s, first in where:
            entry = asked[a]
            after = {digit: digits[first + 1 + k].probs for k, digit in enumerate(leading)}
            pmf, mass = number_distribution(digits[first].probs, after, low, high)
            slot = self.rubric.questions[entry.question].scores[s].name
            dists[slot][i] = Discrete(support, pmf)
            previous = masses[entry.question][i]
            masses[entry.question][i] = mass if np.isnan(previous) else min(previous, mass)
        return dists, masses


def vlm_judge(rubric: str, **params: Any) -> RubricJudge:
    """The worker from a flat `rewards.<name>.params` mapping (rubric, model, name and the
    JudgeSettings fields), as the registry builds it."""
    return RubricJudge.from_params(rubric=rubric, **params)


def unified_reward(**params: Any) -> RubricJudge:
    return RubricJudge.from_params(rubric="unified_reward", **params)


def viescore(**params: Any) -> RubricJudge:
    return RubricJudge.from_params(rubric="viescore", **params)


def viescore_edit(**params: Any) -> RubricJudge:
    return RubricJudge.from_params(rubric="viescore_edit", **params)


def editscore(**params: Any) -> RubricJudge:
    return RubricJudge.from_params(rubric="editscore", **params)
