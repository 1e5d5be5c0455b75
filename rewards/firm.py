"""FIRM judges as reward workers (Zhao et al., "Trust Your Critic", 2026; REFERENCE.md section 3).

FIRM-Gen-8B and FIRM-Edit-8B are Qwen3-VL-8B fine-tunes that grade images on a 1..5 scale:

- FirmGen: "instruction" (does the image follow the prompt) and "quality" (image only: the min of
  three sub-scores, aesthetics, technical quality and structure/texture).
- FirmEdit: "execution" (was the edit instruction carried out) and "consistency" (was nothing
  else changed); both see the source image first, then the edited image, then the instruction.

Scores are RAW 1..5; the reward mix maps them to [0, 1]. A reply that carries no score is NaN,
counted in extras ("<component>/parse_failures") and logged, never turned into a 0: the public
FIRM code scores such replies 0, silently, which punishes the policy for the judge's formatting.

Two ways to get a score (`scoring`):

- "distribution" (default): the assistant turn is prefilled up to the score digit
  (`{"score": `, trailing space included) and the judge's next-token probabilities over "1".."5"
  are renormalised. One forward per request gives the expected score (the reward) and its
  variance (the per-sample uncertainty, RewardOutput.uncertainty).
- "generate": the judge writes its reasoning and JSON freely; parse_score reads the reply.

Two backends (`backend`):

- "transformers": the judge runs in this process (AutoModelForImageTextToText, batched, left
  padded, images capped at max_image_side).
- "openai": an OpenAI-compatible chat endpoint such as `vllm serve VisionXLab/FIRM-Gen-8B`,
  called with bounded concurrency, per-request timeouts and bounded retries. The distribution
  mode uses `logprobs`/`top_logprobs` with a prefilled assistant message (`continue_final_message`).

Both workers take a JudgeSettings (backend, scoring, batching, timeouts); a run config's
`rewards.<name>.params` sets its fields and the worker's own arguments (model, templates, name)
side by side. The backends are in rewards/judges/backends.py, the score reading in
rewards/judges/parse.py.

The prompts (rewards/templates/*.txt) are our own rubric text; each can be replaced by a file
(constructor arguments *_template). They are str.format templates: literal braces are doubled.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from rewards.base import RewardBatch, RewardOutput
from rewards.images import fit_image
from rewards.judges.backends import JudgeRequest, OpenAIJudge, TransformersJudge
from rewards.judges.rubric import check_template
from rewards.judges.parse import (
    QUALITY_KEYS,
    ScoreDistribution,
    min_distribution,
    parse_score,
    parse_scores,
    score_moments,
)

logger = logging.getLogger(__name__)

__all__ = ["FirmEdit", "FirmGen", "JudgeComponent", "JudgeSettings", "JudgeWorker", "defined_mean", "load_template", "put_defined"]

# One prefill per quality sub-score, in the form of the backends' SCORE_PREFILL: the judge's next
# token is that sub-score's digit.
QUALITY_PREFILLS = tuple(f'{{"{key}": ' for key in QUALITY_KEYS)
TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
# How much of an unparseable reply a warning shows, and how many warnings one call logs per
# component: enough to see what the judge does wrong without flooding the log.
_REPLY_SNIPPET_CHARS = 200
_WARNINGS_PER_CALL = 3


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------


def load_template(path: str | os.PathLike[str] | None, default_name: str, fields: Sequence[str]) -> str:
    """A rubric template: the file at `path`, or rewards/templates/<default_name> when None.

    It must use exactly the str.format fields given (e.g. {prompt}); a template that omitted the
    prompt would grade every image against nothing, so that is an error, not a warning.
    """
    file = Path(path) if path is not None else TEMPLATE_DIR / default_name
    if not file.is_file():
        raise FileNotFoundError(f"FIRM prompt template {file} does not exist")
    text = file.read_text(encoding="utf-8")
    check_template(text, fields, f"FIRM prompt template {file}")
    return text


def _log_failures(worker: str, component: str, replies: list[str], failed: np.ndarray) -> None:
    indices = np.flatnonzero(failed)
    for index in indices[:_WARNINGS_PER_CALL]:
        reply = replies[index]
        snippet = reply if len(reply) <= _REPLY_SNIPPET_CHARS else reply[:_REPLY_SNIPPET_CHARS] + "..."
        logger.warning("%s/%s: no score in the judge's reply (scored NaN, not trained on): %r", worker, component, snippet)
    if len(indices) > _WARNINGS_PER_CALL:
        logger.warning("%s/%s: %d more replies without a score in this batch", worker, component, len(indices) - _WARNINGS_PER_CALL)


# --------------------------------------------------------------------------------------------
# Workers
# --------------------------------------------------------------------------------------------


@dataclass
class JudgeComponent:
    """One component's per-sample results."""

    scores: np.ndarray  # [B] raw 1..5, NaN = no score
    variance: np.ndarray | None  # [B], distribution mode only
    replies: list[str]  # [B], for the log


@dataclass(frozen=True)
class JudgeSettings:
    """How a FIRM worker runs its judge; the fields of `rewards.<name>.params` besides the worker's own."""

    backend: Literal["transformers", "openai"] = "transformers"
    """"transformers" (the judge runs in this process) or "openai" (an OpenAI-compatible server, e.g. vLLM)."""
    base_url: str | None = None
    """openai backend: the server's API root, e.g. "http://127.0.0.1:8000/v1"."""
    api_model: str | None = None
    """openai backend: the served model name, if it differs from the worker's `model`."""
    api_key_env: str | None = None
    """openai backend: the environment variable holding the API key, sent as a bearer token (a hosted API); none sends no key (a local vLLM)."""
    scoring: Literal["distribution", "generate"] | None = None
    """"distribution" (score-token probabilities) or "generate" (a free reply, parsed); none = the worker's default ("distribution" for the FIRM judges, "generate" for rubric judges) unless use_logprobs=False."""
    use_logprobs: bool = True
    """False is shorthand for scoring="generate"."""
    device: str = "cpu"
    """transformers backend: where the judge runs."""
    dtype: str = "bf16"
    """transformers backend: the weights' dtype ("fp32", "bf16", "fp16"); score probabilities are computed in float32."""
    batch_size: int = 8
    """transformers backend: requests per forward, to bound memory."""
    max_new_tokens: int = 256
    """generate mode: the longest reply, in tokens."""
    max_image_side: int = 512
    """Images are downscaled so that their longest side is at most this many pixels."""
    concurrency: int = 8
    """openai backend: requests in flight at once."""
    timeout_s: float = 120.0
    """openai backend: per-request timeout in seconds (connect, and each read of the answer)."""
    retries: int = 3
    """openai backend: attempts per request; connection errors, timeouts, 429 and 5xx are retried, other 4xx raise."""
    backoff_s: float = 1.0
    """openai backend: seconds to sleep before the second attempt, doubled before each later one."""
    top_logprobs: int = 20
    """openai backend, distribution mode: alternatives per position (vLLM caps them at 20 by default); score digits outside them count 0."""


class JudgeWorker:
    """What the judge workers (FirmGen, FirmEdit, rewards.vlm_judge.RubricJudge) share: the
    backend, the scoring mode, images, failure counting. `default_scoring` is the mode when the
    settings name none and allow token probabilities."""

    components: tuple[str, ...]

    def __init__(self, model: str, settings: JudgeSettings, name: str, default_scoring: str = "distribution"):
        scoring = settings.scoring
        if scoring is None:
            scoring = default_scoring if settings.use_logprobs else "generate"
        if scoring not in ("distribution", "generate"):
            raise ValueError(f"{name}: scoring must be 'distribution' or 'generate', got {scoring!r}")
        if scoring == "distribution" and not settings.use_logprobs:
            raise ValueError(f"{name}: scoring='distribution' reads token probabilities; it contradicts use_logprobs=False")
        # One merged Qwen3-VL patch covers 32 x 32 pixels; smaller images carry nothing to judge.
        if settings.max_image_side < 32:
            raise ValueError(f"{name}: max_image_side must be at least 32 pixels, got {settings.max_image_side}")
        if settings.max_new_tokens < 1:
            raise ValueError(f"{name}: max_new_tokens must be at least 1, got {settings.max_new_tokens}")
        self.name, self.scoring = name, scoring
        self.max_new_tokens, self.max_image_side = settings.max_new_tokens, settings.max_image_side
        self.backend: TransformersJudge | OpenAIJudge
        if settings.backend == "transformers":
            self.backend = TransformersJudge(model, device=settings.device, dtype=settings.dtype, batch_size=settings.batch_size)
        elif settings.backend == "openai":
            if not settings.base_url:
                raise ValueError(f"{name}: backend 'openai' needs base_url, e.g. http://127.0.0.1:8000/v1 (vllm serve {model})")
            api_key = None
            if settings.api_key_env:
                api_key = os.environ.get(settings.api_key_env)
                if not api_key:
                    raise ValueError(f"{name}: api_key_env names {settings.api_key_env}, which is not set in the environment")
            self.backend = OpenAIJudge(
                settings.base_url, settings.api_model or model, api_key=api_key, concurrency=settings.concurrency,
                timeout_s=settings.timeout_s, retries=settings.retries, backoff_s=settings.backoff_s,
                top_logprobs=settings.top_logprobs,
            )
        else:
            raise ValueError(f"{name}: backend must be 'transformers' or 'openai', got {settings.backend!r}")

    @classmethod
    def from_params(cls, **params: Any) -> JudgeWorker:
        """The worker from a flat `rewards.<name>.params` mapping, as the registry builds it: the
        JudgeSettings fields go to the settings, the rest (model, templates, name) to the
        constructor, which rejects an unknown key by name."""
        setting_names = {field.name for field in dataclass_fields(JudgeSettings)}
        settings = JudgeSettings(**{key: value for key, value in params.items() if key in setting_names})
        return cls(settings=settings, **{key: value for key, value in params.items() if key not in setting_names})

    def close(self) -> None:
        self.backend.close()

    def _images(self, images: Sequence[np.ndarray] | np.ndarray, what: str, count: int) -> list[Image.Image]:
        if images is None or len(images) != count:
            raise ValueError(f"{self.name}: expected {count} {what}, got {0 if images is None else len(images)}")
        return [fit_image(image, self.max_image_side) for image in images]

    @staticmethod
    def _stacked(distributions: list[ScoreDistribution]) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """Probabilities [N, 5], score-token masses [N] and replies [N] of N distributions."""
        probs = np.stack([d.probs for d in distributions]) if distributions else np.zeros((0, 5))
        masses = np.array([d.digit_mass for d in distributions], dtype=np.float64)
        return probs, masses, [d.reply for d in distributions]

    def _output(self, results: dict[str, JudgeComponent], extras: dict[str, float]) -> RewardOutput:
        output = RewardOutput(scores={}, extras=dict(extras))
        for component, result in results.items():
            failed = np.isnan(result.scores)
            output.scores[component] = result.scores
            output.texts[component] = list(result.replies)  # what the judge wrote: audited, never scored
            if result.variance is not None:
                output.uncertainty[component] = result.variance
            # Counted, so that mixing over chunks adds them up (RewardRunner sums "*failures").
            output.extras[f"{component}/parse_failures"] = float(failed.sum())
            _log_failures(self.name, component, result.replies, failed)
        return output


def defined_mean(values: np.ndarray) -> float | None:
    """Mean over the defined values; None (not logged) when there are none, so a NaN never
    reaches the averaged extras."""
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if len(finite) else None


def put_defined(extras: dict[str, float], key: str, value: float | None) -> None:
    if value is not None:
        extras[key] = value


class FirmGen(JudgeWorker):
    """FIRM-Gen judge: components ("instruction", "quality"), raw 1..5, NaN when unreadable.

    "instruction": how well the image follows its prompt. "quality": the min of three image-only
    sub-scores (aesthetics, technical_quality, structure_texture), whose means go to extras
    ("quality/<sub-score>_mean"). In the distribution mode "quality" is the expectation of the
    min of the three sub-score distributions taken as independent, and its variance the
    uncertainty; each sub-score is read from its own prefilled request.

    Args:
        model: judge checkpoint (transformers backend) and default served model name.
        settings: how the judge runs (backend, scoring, batching, timeouts); defaults when None.
        instruction_template, quality_template: files replacing rewards/templates/firm_gen_*.txt;
            the instruction template must use {prompt}, the quality template no field.
        name: the worker's name in log messages.
    """

    def __init__(
        self,
        model: str = "VisionXLab/FIRM-Gen-8B",
        settings: JudgeSettings | None = None,
        *,
        instruction_template: str | os.PathLike[str] | None = None,
        quality_template: str | os.PathLike[str] | None = None,
        name: str = "firm_gen",
    ):
        # Templates first: a bad override path fails before a model loads.
        self.instruction_template = load_template(instruction_template, "firm_gen_instruction.txt", ("prompt",))
        # No fields, but still a str.format template (its literal braces are doubled): format once.
        self.quality_prompt = load_template(quality_template, "firm_gen_quality.txt", ()).format()
        super().__init__(model, settings or JudgeSettings(), name)
        self.components = ("instruction", "quality")

    def __call__(self, batch: RewardBatch) -> RewardOutput:
        count = len(batch)
        images = self._images(batch.images, "images (one per prompt)", count)
        instruction = [
            JudgeRequest((image,), self.instruction_template.format(prompt=prompt)) for image, prompt in zip(images, batch.prompts)
        ]
        extras: dict[str, float] = {}
        if self.scoring == "distribution":
            quality = [JudgeRequest((image,), self.quality_prompt, prefill) for prefill in QUALITY_PREFILLS for image in images]
            # One backend call for all requests: the transformers backend fills its batches and
            # the openai backend keeps `concurrency` requests in flight across both components.
            probs, masses, replies = self._stacked(self.backend.distributions(instruction + quality))
            mean, variance = score_moments(probs[:count])
            instruction_result = JudgeComponent(mean, variance, replies[:count])
            sub_probs = [probs[count * (k + 1) : count * (k + 2)] for k in range(len(QUALITY_KEYS))]
            sub_means = np.stack([score_moments(p)[0] for p in sub_probs], axis=1)  # [B, 3]
            quality_mean, quality_variance = score_moments(min_distribution(sub_probs))
            quality_replies = [" | ".join(replies[count * (k + 1) + i] for k in range(len(QUALITY_KEYS))) for i in range(count)]
            quality_result = JudgeComponent(quality_mean, quality_variance, quality_replies)
            put_defined(extras, "instruction/digit_mass_mean", defined_mean(masses[:count]))
            put_defined(extras, "quality/digit_mass_mean", defined_mean(masses[count:]))
        else:
            quality = [JudgeRequest((image,), self.quality_prompt) for image in images]
            replies = self.backend.generate(instruction + quality, self.max_new_tokens)
            scores = np.array([parse_score(reply) for reply in replies[:count]], dtype=np.float64)
            instruction_result = JudgeComponent(scores, None, replies[:count])
            sub_means = np.array([parse_scores(reply) for reply in replies[count:]], dtype=np.float64).reshape(count, len(QUALITY_KEYS))
            # A missing sub-score leaves the min undefined: NaN, not the min of the others.
            quality_result = JudgeComponent(sub_means.min(axis=1), None, replies[count:])
        for k, key in enumerate(QUALITY_KEYS):
            put_defined(extras, f"quality/{key}_mean", defined_mean(sub_means[:, k]))
        return self._output({"instruction": instruction_result, "quality": quality_result}, extras)


class FirmEdit(JudgeWorker):
    """FIRM-Edit judge: components ("execution", "consistency"), raw 1..5, NaN when unreadable.

    Both questions show the source image first, then the edited image (batch.images), then the
    instruction (batch.instructions). Arguments as FirmGen's, with execution_template and
    consistency_template (each must use {instruction}) in place of the generation templates.
    """

    def __init__(
        self,
        model: str = "VisionXLab/FIRM-Edit-8B",
        settings: JudgeSettings | None = None,
        *,
        execution_template: str | os.PathLike[str] | None = None,
        consistency_template: str | os.PathLike[str] | None = None,
        name: str = "firm_edit",
    ):
        self.execution_template = load_template(execution_template, "firm_edit_execution.txt", ("instruction",))
        self.consistency_template = load_template(consistency_template, "firm_edit_consistency.txt", ("instruction",))
        super().__init__(model, settings or JudgeSettings(), name)
        self.components = ("execution", "consistency")

    def __call__(self, batch: RewardBatch) -> RewardOutput:
        if batch.source_images is None or batch.instructions is None:
            missing = " and ".join(
                what for what, value in (("source_images", batch.source_images), ("instructions", batch.instructions)) if value is None
            )
            raise ValueError(
                f"{self.name}: an editing judge needs the batch's {missing} (source image first, then the edit); "
                "is this reward configured on a text-to-image run?"
            )
        count = len(batch)
        if len(batch.instructions) != count:
            raise ValueError(f"{self.name}: expected {count} instructions, got {len(batch.instructions)}")
        sources = self._images(batch.source_images, "source images", count)
        edited = self._images(batch.images, "edited images", count)
        requests = {
            component: [
                JudgeRequest((source, image), template.format(instruction=instruction))
                for source, image, instruction in zip(sources, edited, batch.instructions)
            ]
            for component, template in (("execution", self.execution_template), ("consistency", self.consistency_template))
        }
        extras: dict[str, float] = {}
        results: dict[str, JudgeComponent] = {}
        both = requests["execution"] + requests["consistency"]
        if self.scoring == "distribution":
            probs, masses, replies = self._stacked(self.backend.distributions(both))
            for index, component in enumerate(self.components):
                part = slice(index * count, (index + 1) * count)
                mean, variance = score_moments(probs[part])
                results[component] = JudgeComponent(mean, variance, replies[part])
                put_defined(extras, f"{component}/digit_mass_mean", defined_mean(masses[part]))
        else:
            replies = self.backend.generate(both, self.max_new_tokens)
            for index, component in enumerate(self.components):
                part = replies[index * count : (index + 1) * count]
                results[component] = JudgeComponent(np.array([parse_score(reply) for reply in part], dtype=np.float64), None, part)
        return self._output(results, extras)
