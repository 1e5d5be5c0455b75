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

The prompts (rewards/templates/*.txt) are our own rubric text; each can be replaced by a file
(constructor arguments *_template). They are str.format templates: literal braces are doubled.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import re
import string
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx
import numpy as np
import torch
from PIL import Image
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, Qwen3VLConfig, Qwen3VLProcessor

from rewards.base import RewardBatch, RewardOutput
from rewards.codec import encode_image
from rewards.pickscore import check_batch_size, torch_dtype

logger = logging.getLogger(__name__)

__all__ = [
    "FirmEdit",
    "FirmGen",
    "ImageOnlyQwen3VLProcessor",
    "JudgeRequest",
    "OpenAIJudge",
    "QUALITY_KEYS",
    "ScoreDistribution",
    "TransformersJudge",
    "distribution_from_logprobs",
    "fit_image",
    "load_template",
    "min_distribution",
    "parse_score",
    "parse_scores",
    "register_image_only_processor",
    "score_moments",
]

SCORE_VALUES = np.arange(1, 6, dtype=np.float64)  # the judges' scale, 1..5
SCORE_DIGITS = ("1", "2", "3", "4", "5")
QUALITY_KEYS = ("aesthetics", "technical_quality", "structure_texture")
# The assistant text the distribution mode prefills: the judge's next token is the score digit.
# The trailing space matters: in Qwen's vocabulary it is its own token, so the digit comes next.
SCORE_PREFILL = '{"score": '
QUALITY_PREFILLS = tuple(f'{{"{key}": ' for key in QUALITY_KEYS)
TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
# How much of an unparseable reply a warning shows, and how many warnings one call logs per
# component: enough to see what the judge does wrong without flooding the log.
_REPLY_SNIPPET_CHARS = 200
_WARNINGS_PER_CALL = 3


# --------------------------------------------------------------------------------------------
# Reading scores out of replies
# --------------------------------------------------------------------------------------------

_NUMBER = r"[-+]?\d+(?:\.\d+)?"
_SCORE_WORD = r"(?:final[ _]|overall[ _])?(?:score|rating)"
# "Score: 4", "rating = 3.5", "score is 4", "Score: 4/5", '"score": "4"', "**Rating:** 4".
_KEYED_SCORE = re.compile(
    rf"""\b{_SCORE_WORD}\b["']?\s*\**\s*(?:[:=]|\bis\b)\s*\**\s*["']?\s*({_NUMBER})(?:\s*/\s*(\d+))?""",
    re.IGNORECASE,
)
_BOXED_SCORE = re.compile(rf"\\boxed\{{\s*({_NUMBER})\s*(?:/\s*(\d+))?\s*\}}")
# "4/5" or "4 out of 5" standing alone; the look-behind keeps "14/5" from reading as 4/5.
_OUT_OF_FIVE = re.compile(rf"(?<![\w.]){_NUMBER}\s*(?:/|\bout\s+of\b)\s*5\b", re.IGNORECASE)
_BARE_NUMBER = re.compile(rf"^\s*\**\s*({_NUMBER})\s*\**\s*\.?\s*$")
_NUMBER_STRING = re.compile(rf"^\s*({_NUMBER})\s*(?:/\s*(\d+))?\s*$")
# JSON keys that hold the verdict: "score", "rating", "final_score", "execution_score", ... and
# the criterion names FIRM-style replies use as keys.
_SCORE_KEYS_EXACT = ("score", "rating", "final_score", "overall_score", "final_rating", "overall_rating")
_SCORE_KEYS_NAMED = ("execution", "consistency", "instruction_following", "overall")
# Stems that identify the quality sub-scores in keys such as "technical quality" or "Structure/Texture".
_QUALITY_STEMS: dict[str, tuple[str, ...]] = {
    "aesthetics": ("aesthetic",),
    "technical_quality": ("technical",),
    "structure_texture": ("structure", "texture"),
}


@dataclass(frozen=True)
class _Candidate:
    position: int  # where in the reply the score was stated; the last one wins
    value: float  # NaN when stated but unusable (another scale, not a number)


def _in_scale(value: float) -> float:
    return value if 1.0 <= value <= 5.0 else math.nan


def _scaled(number: str, denominator: str | None) -> float:
    """A stated score; "4/5" is 4, a score on another scale ("8/10") is unusable (NaN)."""
    if denominator is not None and int(denominator) != 5:
        return math.nan
    return float(number)


def _json_number(value: Any) -> float | None:
    """A JSON value as a score: numbers and numeric strings ("4", "4/5"); None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        match = _NUMBER_STRING.match(value)
        if match:
            return _scaled(match.group(1), match.group(2))
    return None


def _normalise_key(key: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", key.lower()).strip("_")


def _json_objects(text: str) -> list[tuple[int, int, dict]]:
    """Every top-level JSON object in the text as (start, end, object), fenced or not."""
    decoder = json.JSONDecoder()
    objects, index = [], text.find("{")
    while index != -1:
        try:
            value, end = decoder.raw_decode(text, index)
        except ValueError:
            index = text.find("{", index + 1)
            continue
        if isinstance(value, dict):
            objects.append((index, end, value))
            index = text.find("{", end)
        else:
            index = text.find("{", index + 1)
    return objects


def _walk_dicts(obj: dict) -> list[dict]:
    """The object and every object nested in it, outermost first."""
    found, pending = [], [obj]
    while pending:
        current = pending.pop(0)
        found.append(current)
        pending.extend(value for value in current.values() if isinstance(value, dict))
    return found


def _json_score(obj: dict) -> float | None:
    """The verdict held by a JSON object: an exact "score"/"rating" key first, else the last
    criterion-named key ("execution_score", "consistency", ...); None when it holds none."""
    for level in _walk_dicts(obj):
        named: float | None = None
        for key, value in level.items():
            normalised, number = _normalise_key(str(key)), _json_number(value)
            if number is None:
                continue
            if normalised in _SCORE_KEYS_EXACT:
                return number
            if normalised in _SCORE_KEYS_NAMED or normalised.endswith(("_score", "_rating")):
                named = number
        if named is not None:
            return named
    return None


def _outside(position: int, spans: list[tuple[int, int]]) -> bool:
    return not any(start <= position < end for start, end in spans)


def parse_score(text: str) -> float:
    """The 1..5 score a judge's reply states; NaN when it states none or one outside [1, 5].

    Understood: a JSON object with a "score"/"rating"/criterion key (fenced in ```json or not,
    with reasoning around it), a boxed score (\\boxed{4}), "rating: 4", "Score: 4/5",
    "score = 3.5", "4 out of 5", and a reply that is just the number. When several scores are
    stated, the last one wins: judges reason first and conclude last. Text inside a JSON object
    that holds a score does not count, so a score quoted in its reasoning cannot override it.
    A garbled reply is NaN, never 0.
    """
    if not isinstance(text, str) or not text.strip():
        return math.nan
    bare = _BARE_NUMBER.match(text)
    if bare:
        return _in_scale(float(bare.group(1)))

    candidates: list[_Candidate] = []
    scored_spans: list[tuple[int, int]] = []
    for start, end, obj in _json_objects(text):
        value = _json_score(obj)
        if value is not None:
            candidates.append(_Candidate(start, value))
            scored_spans.append((start, end))
    for pattern in (_KEYED_SCORE, _BOXED_SCORE):
        for match in pattern.finditer(text):
            if _outside(match.start(), scored_spans):
                candidates.append(_Candidate(match.start(), _scaled(match.group(1), match.group(2))))
    for match in _OUT_OF_FIVE.finditer(text):
        if _outside(match.start(), scored_spans):
            candidates.append(_Candidate(match.start(), float(re.match(_NUMBER, match.group(0)).group(0))))
    if not candidates:
        return math.nan
    # Overlapping forms ("Score: 4/5" is also "4/5") state the same number; max by position
    # picks the last statement whichever form it took.
    return _in_scale(max(candidates, key=lambda c: c.position).value)


def _stem_pattern(stem: str) -> re.Pattern[str]:
    # The stem, up to a few more key characters ("technical quality", "structure/texture"), a
    # separator, the number.
    return re.compile(
        rf"""(?<![a-z]){stem}[a-z_ /&-]{{0,24}}?["']?\s*\**\s*[:=]\s*\**\s*["']?\s*({_NUMBER})(?:\s*/\s*(\d+))?""",
        re.IGNORECASE,
    )


def parse_scores(text: str, keys: Sequence[str] = QUALITY_KEYS) -> list[float]:
    """One 1..5 score per key (default: the quality sub-scores), NaN for each one the reply lacks.

    Reads JSON objects ({"aesthetics": 4, "technical_quality": 3, ...}) and "Aesthetics: 4" lines;
    keys match by stem, so "technical quality" or "Structure/Texture" count too. As in
    parse_score, the last statement of each key wins and out-of-range values are NaN.
    """
    if not isinstance(text, str) or not text.strip():
        return [math.nan] * len(keys)
    objects = _json_objects(text)
    results = []
    for key in keys:
        stems = _QUALITY_STEMS.get(key, (_normalise_key(key),))
        candidates: list[_Candidate] = []
        scored_spans: list[tuple[int, int]] = []
        for start, end, obj in objects:
            for level in _walk_dicts(obj):
                for name, value in level.items():
                    number = _json_number(value)
                    if number is not None and any(stem in _normalise_key(str(name)) for stem in stems):
                        candidates.append(_Candidate(start, number))
                        scored_spans.append((start, end))
        for stem in stems:
            for match in _stem_pattern(stem).finditer(text):
                if _outside(match.start(), scored_spans):
                    candidates.append(_Candidate(match.start(), _scaled(match.group(1), match.group(2))))
        results.append(_in_scale(max(candidates, key=lambda c: c.position).value) if candidates else math.nan)
    return results


# --------------------------------------------------------------------------------------------
# Score distributions
# --------------------------------------------------------------------------------------------


@dataclass
class ScoreDistribution:
    """What one distribution-mode request returns."""

    probs: np.ndarray  # [5] over scores 1..5, summing to 1; all NaN when the judge gave no score token
    digit_mass: float  # probability on the five score tokens before renormalising (near 1 for a real judge)
    reply: str  # what the judge produced, for the log


def score_moments(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Expected score and variance of distributions over 1..5: probs [N, 5] -> ([N], [N]).
    NaN rows give NaN."""
    probs = np.asarray(probs, dtype=np.float64)
    mean = probs @ SCORE_VALUES
    variance = (probs * (SCORE_VALUES[None, :] - mean[:, None]) ** 2).sum(axis=1)
    return mean, variance


def min_distribution(distributions: Sequence[np.ndarray]) -> np.ndarray:
    """Distribution of the min of independent 1..5 scores: each [N, 5] -> [N, 5].

    The quality component is the min of three sub-scores (QMA, REFERENCE.md section 3); taking
    the distribution of the min, rather than the min of the expectations, keeps "reward =
    expectation, uncertainty = variance" true of the quantity the reward is actually made of.
    P(min >= k) is the product of the P(X_i >= k).
    """
    survival = np.ones_like(np.asarray(distributions[0], dtype=np.float64))
    for probs in distributions:
        # Column k: P(X >= k + 1), the reversed cumulative sum.
        survival = survival * np.cumsum(np.asarray(probs, dtype=np.float64)[:, ::-1], axis=1)[:, ::-1]
    return survival - np.concatenate([survival[:, 1:], np.zeros_like(survival[:, :1])], axis=1)


def distribution_from_logprobs(content: Sequence[dict[str, Any]]) -> tuple[np.ndarray, float]:
    """The score distribution in an OpenAI-style `choices[0].logprobs.content` list.

    Reads the first position whose chosen token is not whitespace: a server whose chat template
    trims the trailing space of a continued message makes the judge emit the space first. The
    probabilities of the tokens "1".."5" among that position's top_logprobs (a token with
    surrounding whitespace counts for its digit) are renormalised; digits outside the top list
    count 0. Returns ([5] probabilities, their mass before renormalising); all NaN and 0 when no
    score token is among them.
    """
    entry = next((item for item in content if str(item.get("token", "")).strip()), None)
    mass = np.zeros(5, dtype=np.float64)
    if entry is not None:
        logprobs: dict[str, float] = {}
        for top in entry.get("top_logprobs") or []:
            logprobs.setdefault(str(top["token"]), float(top["logprob"]))
        # The chosen token is normally among the top ones; count it once either way.
        logprobs.setdefault(str(entry["token"]), float(entry["logprob"]))
        for token, logprob in logprobs.items():
            digit = token.strip()
            if digit in SCORE_DIGITS:
                mass[SCORE_DIGITS.index(digit)] += math.exp(logprob)
    total = float(mass.sum())
    if total <= 0.0:
        return np.full(5, math.nan), 0.0
    return mass / total, total


# --------------------------------------------------------------------------------------------
# Prompts and images
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
    try:
        used = {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}
    except ValueError as err:
        raise ValueError(
            f"FIRM prompt template {file} is not a valid str.format template ({err}); double literal braces: {{{{ }}}}"
        ) from err
    if used != set(fields):
        expected = ", ".join("{" + field + "}" for field in fields) or "no fields"
        found = ", ".join("{" + field + "}" for field in sorted(used)) or "no fields"
        raise ValueError(
            f"FIRM prompt template {file} must use {expected}, found {found}; double literal braces: {{{{ }}}}"
        )
    return text


def fit_image(image: np.ndarray, max_side: int) -> Image.Image:
    """A uint8 [H, W, 3] array as a PIL image whose longest side is at most max_side, aspect kept.

    Judge cost grows with pixels (a 1024 x 1024 image is about 1024 tokens for Qwen3-VL), and a
    judge grades content, not pixel-level detail, so images are capped before they are sent.
    """
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"judge images must be uint8 [H, W, 3] arrays, got {image.dtype} {image.shape}")
    pil = Image.fromarray(image)
    longest = max(pil.size)
    if longest <= max_side:
        return pil
    scale = max_side / longest
    size = (max(1, round(pil.width * scale)), max(1, round(pil.height * scale)))
    return pil.resize(size, Image.Resampling.BICUBIC)


@dataclass(frozen=True)
class JudgeRequest:
    """One question to the judge: its images (in order), the rubric text after them, and the
    assistant prefill the distribution mode reads the next token after."""

    images: tuple[Image.Image, ...]
    text: str
    prefill: str = SCORE_PREFILL


# --------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------


class ImageOnlyQwen3VLProcessor(Qwen3VLProcessor):
    """Qwen3VLProcessor without a video processor.

    transformers builds Qwen3-VL's video processor on torchvision, so without torchvision the
    stock processor cannot be built or loaded. Judges never see videos; this subclass drops
    that sub-processor (ProcessorMixin derives its sub-processors from the __init__ signature)
    and uses the PIL image processor.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


_registration_lock = threading.Lock()


def _torchvision_available() -> bool:
    return importlib.util.find_spec("torchvision") is not None


def register_image_only_processor() -> None:
    """Map Qwen3VLConfig to ImageOnlyQwen3VLProcessor in AutoProcessor when torchvision is absent.

    The registry is per process, so every process that loads a judge calls this (loading does).
    Without it AutoProcessor returns a bare tokenizer for checkpoints saved with the subclass.
    With torchvision installed the stock processor works and is left in place.
    """
    if _torchvision_available():
        return
    with _registration_lock:
        AutoProcessor.register(Qwen3VLConfig, ImageOnlyQwen3VLProcessor, exist_ok=True)


def load_judge_processor(model: str | os.PathLike[str]) -> Any:
    """The judge's processor, loadable without torchvision for Qwen3-VL checkpoints.

    A real Qwen3-VL checkpoint names "Qwen3VLProcessor" in its config, which AutoProcessor then
    builds as named (video processor included) whatever is registered; so for Qwen3-VL without
    torchvision the subclass is loaded directly.
    """
    register_image_only_processor()
    model_type = AutoConfig.from_pretrained(model).model_type
    if model_type == "qwen3_vl" and not _torchvision_available():
        processor = ImageOnlyQwen3VLProcessor.from_pretrained(model)
    else:
        processor = AutoProcessor.from_pretrained(model)
    if getattr(processor, "image_processor", None) is None or getattr(processor, "tokenizer", None) is None:
        raise ValueError(
            f"judge {model}: AutoProcessor returned {type(processor).__name__}, not a processor with an image "
            "processor and a tokenizer; a vision-language checkpoint with its processor files is needed"
        )
    return processor


def _log_failures(worker: str, component: str, replies: list[str], failed: np.ndarray) -> None:
    indices = np.flatnonzero(failed)
    for index in indices[:_WARNINGS_PER_CALL]:
        reply = replies[index]
        snippet = reply if len(reply) <= _REPLY_SNIPPET_CHARS else reply[:_REPLY_SNIPPET_CHARS] + "..."
        logger.warning("%s/%s: no score in the judge's reply (scored NaN, not trained on): %r", worker, component, snippet)
    if len(indices) > _WARNINGS_PER_CALL:
        logger.warning("%s/%s: %d more replies without a score in this batch", worker, component, len(indices) - _WARNINGS_PER_CALL)


class TransformersJudge:
    """A vision-language judge in this process: batched, left padded, under inference_mode.

    Args:
        model: checkpoint (hub id or local directory) loadable with AutoModelForImageTextToText.
        device: where it runs.
        dtype: weights' dtype ("fp32", "bf16", "fp16"); score probabilities are computed in float32.
        batch_size: requests per forward, to bound memory.
    """

    def __init__(self, model: str | os.PathLike[str], *, device: str = "cpu", dtype: str = "bf16", batch_size: int = 8):
        self.device = torch.device(device)
        self.batch_size = check_batch_size(batch_size)
        self.processor = load_judge_processor(model)
        # Left padding keeps every row's last token at position -1, where the next-token
        # distribution is read, and is what batched generation needs.
        self.processor.tokenizer.padding_side = "left"
        self.model = AutoModelForImageTextToText.from_pretrained(model, dtype=torch_dtype(dtype))
        self.model.to(self.device).eval().requires_grad_(False)
        tokenizer = self.processor.tokenizer
        digit_ids = []
        for digit in SCORE_DIGITS:
            ids = tokenizer.encode(digit, add_special_tokens=False)
            if len(ids) != 1:
                raise ValueError(f"judge {model}: the score {digit!r} is not a single token ({ids}); use scoring='generate'")
            digit_ids.append(ids[0])
        self.digit_ids = torch.tensor(digit_ids, device=self.device)
        self._checked_prefills: set[str] = set()

    def _check_prefill(self, prefill: str) -> None:
        """The distribution mode assumes the digit after the prefill is a token of its own; a
        tokenizer that merged it with the trailing space would make position -1 meaningless."""
        if prefill in self._checked_prefills:
            return
        tokenizer = self.processor.tokenizer
        head = tokenizer.encode(prefill, add_special_tokens=False)
        for digit, digit_id in zip(SCORE_DIGITS, self.digit_ids.tolist()):
            if tokenizer.encode(prefill + digit, add_special_tokens=False) != head + [digit_id]:
                raise ValueError(
                    f"the judge's tokenizer does not split {prefill + digit!r} into {prefill!r} + {digit!r}; "
                    "distribution scoring cannot read the score token; use scoring='generate'"
                )
        self._checked_prefills.add(prefill)

    def _inputs(self, requests: Sequence[JudgeRequest], *, prefill: bool) -> Any:
        texts, images = [], []
        for request in requests:
            messages = [{"role": "user", "content": [{"type": "image"} for _ in request.images] + [{"type": "text", "text": request.text}]}]
            text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            # Appended rather than rendered as an assistant message: some chat templates trim a
            # message's trailing whitespace, and the trailing space is what puts the digit next.
            texts.append(text + request.prefill if prefill else text)
            images.extend(request.images)
        inputs = self.processor(text=texts, images=images or None, padding=True, return_tensors="pt")
        # All processor outputs go in (Qwen3-VL needs mm_token_type_ids); pixels in the model's dtype.
        return {
            key: value.to(self.device, self.model.dtype) if value.is_floating_point() else value.to(self.device)
            for key, value in inputs.items()
        }

    @torch.inference_mode()
    def distributions(self, requests: Sequence[JudgeRequest]) -> list[ScoreDistribution]:
        for prefill in {request.prefill for request in requests}:
            self._check_prefill(prefill)
        results: list[ScoreDistribution] = []
        for start in range(0, len(requests), self.batch_size):
            chunk = requests[start : start + self.batch_size]
            logits = self.model(**self._inputs(chunk, prefill=True), logits_to_keep=1).logits[:, -1, :]
            # float32: in bf16 neighbouring logits differ by steps of ~1%, too coarse for a reward.
            log_probs = torch.log_softmax(logits.float(), dim=-1)[:, self.digit_ids].double()
            masses = log_probs.exp().sum(dim=-1)
            probs = torch.softmax(log_probs, dim=-1)
            top = log_probs.argmax(dim=-1)
            for row in range(len(chunk)):
                reply = f"{SCORE_DIGITS[int(top[row])]} (score-token mass {float(masses[row]):.3g})"
                results.append(ScoreDistribution(probs[row].cpu().numpy(), float(masses[row]), reply))
        return results

    @torch.inference_mode()
    def generate(self, requests: Sequence[JudgeRequest], max_new_tokens: int) -> list[str]:
        replies: list[str] = []
        tokenizer = self.processor.tokenizer
        for start in range(0, len(requests), self.batch_size):
            inputs = self._inputs(requests[start : start + self.batch_size], prefill=False)
            output = self.model.generate(
                **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
            new_tokens = output[:, inputs["input_ids"].shape[1] :]
            replies.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
        return replies

    def close(self) -> None:
        """Nothing to release: the model goes with the object."""


class _Skipped(Exception):
    """A request not sent because another one of the same call had already failed."""


class OpenAIJudge:
    """A judge behind an OpenAI-compatible chat endpoint (vLLM), called with plain HTTP.

    Args:
        base_url: the API root, e.g. "http://127.0.0.1:8000/v1"; requests go to
            {base_url}/chat/completions.
        api_model: the served model name ("model" in the request).
        concurrency: requests in flight at once.
        timeout_s: per-request timeout (connect, and each read of the answer).
        retries: attempts per request; connection errors, timeouts, 429 and 5xx are retried
            with exponential backoff (backoff_s, 2 * backoff_s, ...); other 4xx raise at once.
        backoff_s: the first sleep between attempts.
        top_logprobs: alternatives per position in the distribution mode (vLLM's default cap is
            20); score digits outside them count 0.
    """

    def __init__(
        self,
        base_url: str,
        api_model: str,
        *,
        concurrency: int = 8,
        timeout_s: float = 120.0,
        retries: int = 3,
        backoff_s: float = 1.0,
        top_logprobs: int = 20,
    ):
        if concurrency < 1 or retries < 1 or top_logprobs < 5:
            raise ValueError(
                f"openai judge needs concurrency >= 1, retries >= 1 and top_logprobs >= 5, got {concurrency}, {retries}, {top_logprobs}"
            )
        if timeout_s <= 0 or backoff_s < 0:
            raise ValueError(f"openai judge needs timeout_s > 0 and backoff_s >= 0, got {timeout_s} and {backoff_s}")
        self.endpoint = base_url.rstrip("/") + "/chat/completions"
        self.api_model = api_model
        self.concurrency, self.retries, self.backoff_s, self.top_logprobs = concurrency, retries, backoff_s, top_logprobs
        # One client shared by the worker threads (its connection pool is thread-safe).
        # trust_env=False: a proxy set for downloads must not relay images to a local judge.
        self._http = httpx.Client(
            timeout=timeout_s,
            trust_env=False,
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
        )

    def _messages(self, request: JudgeRequest, urls: dict[int, str]) -> list[dict[str, Any]]:
        content: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": urls[id(image)]}} for image in request.images]
        content.append({"type": "text", "text": request.text})
        return [{"role": "user", "content": content}]

    def _image_urls(self, requests: Sequence[JudgeRequest]) -> dict[int, str]:
        """PNG data URLs, one per distinct image: the same image serves several requests
        (instruction and quality; execution and consistency), so it is encoded once."""
        urls: dict[int, str] = {}
        for request in requests:
            for image in request.images:
                if id(image) not in urls:
                    urls[id(image)] = "data:image/png;base64," + encode_image(np.asarray(image.convert("RGB")))
        return urls

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        last_error = "no attempt made"
        for attempt in range(self.retries):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                response = self._http.post(self.endpoint, json=body)
            except httpx.TransportError as err:  # refused, reset, timed out: may pass
                last_error = f"{type(err).__name__}: {err}"
                continue
            if response.status_code == 429 or response.status_code >= 500:  # overloaded or failing: may pass
                last_error = f"HTTP {response.status_code}: {response.text[:300]}"
                continue
            if response.status_code >= 400:
                raise RuntimeError(
                    f"judge endpoint {self.endpoint} rejected the request with HTTP {response.status_code}: {response.text[:500]}"
                )
            try:
                answer = response.json()
                return answer if isinstance(answer, dict) else {}
            except ValueError as err:
                raise RuntimeError(f"judge endpoint {self.endpoint} answered with invalid JSON: {err}") from err
        raise RuntimeError(
            f"judge endpoint {self.endpoint} failed after {self.retries} attempts; last error: {last_error}. "
            "Is the judge server (e.g. `vllm serve`) running at base_url?"
        )

    def _choice(self, answer: dict[str, Any]) -> dict[str, Any]:
        choices = answer.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise RuntimeError(f"judge endpoint {self.endpoint} answered without choices: {str(answer)[:500]}")
        return choices[0]

    def _map(self, function: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        """function over items, `concurrency` at a time, results in order.

        After a request fails for good, requests not yet started are skipped: the endpoint has
        just failed `retries` times, and each of them would sit through its own retries before
        the error could surface.
        """
        failed = threading.Event()

        def guarded(item: Any) -> Any:
            if failed.is_set():
                raise _Skipped
            try:
                return function(item)
            except BaseException:
                failed.set()
                raise

        with ThreadPoolExecutor(max_workers=min(self.concurrency, max(len(items), 1))) as pool:
            futures = [pool.submit(guarded, item) for item in items]
        errors = [future.exception() for future in futures]
        first_error = next((error for error in errors if error is not None and not isinstance(error, _Skipped)), None)
        if first_error is not None:
            raise first_error
        return [future.result() for future in futures]

    def distributions(self, requests: Sequence[JudgeRequest]) -> list[ScoreDistribution]:
        urls = self._image_urls(requests)

        def ask(request: JudgeRequest) -> ScoreDistribution:
            body = {
                "model": self.api_model,
                "messages": self._messages(request, urls) + [{"role": "assistant", "content": request.prefill}],
                # vLLM's extensions: continue the prefilled assistant turn instead of opening a new one.
                "continue_final_message": True,
                "add_generation_prompt": False,
                "logprobs": True,
                "top_logprobs": self.top_logprobs,
                # Two tokens: if the server trimmed the prefill's trailing space, the digit is second.
                "max_tokens": 2,
                "temperature": 0.0,
            }
            choice = self._choice(self._post(body))
            content = (choice.get("logprobs") or {}).get("content")
            if not isinstance(content, list):
                raise RuntimeError(
                    f"judge endpoint {self.endpoint} returned no logprobs; use a server that supports them "
                    "(vLLM does) or scoring='generate'"
                )
            probs, mass = distribution_from_logprobs(content)
            text = (choice.get("message") or {}).get("content") or ""
            tops = [top.get("token") for top in (content[0].get("top_logprobs") or [])[:8]] if content else []
            return ScoreDistribution(probs, mass, f"{text!r}; top tokens {tops}")

        return self._map(ask, requests)

    def generate(self, requests: Sequence[JudgeRequest], max_new_tokens: int) -> list[str]:
        urls = self._image_urls(requests)

        def ask(request: JudgeRequest) -> str:
            body = {"model": self.api_model, "messages": self._messages(request, urls), "max_tokens": max_new_tokens, "temperature": 0.0}
            message = self._choice(self._post(body)).get("message") or {}
            content = message.get("content")
            return content if isinstance(content, str) else ""

        return self._map(ask, requests)

    def close(self) -> None:
        self._http.close()


# --------------------------------------------------------------------------------------------
# Workers
# --------------------------------------------------------------------------------------------


@dataclass
class _Component:
    """One component's per-sample results."""

    scores: np.ndarray  # [B] raw 1..5, NaN = no score
    variance: np.ndarray | None  # [B], distribution mode only
    replies: list[str]  # [B], for the log


class _FirmJudge:
    """What FirmGen and FirmEdit share: the backend, the scoring mode, images, failure counting."""

    components: tuple[str, ...]

    def __init__(
        self,
        model: str,
        *,
        backend: Literal["transformers", "openai"],
        base_url: str | None,
        api_model: str | None,
        scoring: Literal["distribution", "generate"] | None,
        use_logprobs: bool,
        device: str,
        dtype: str,
        batch_size: int,
        max_new_tokens: int,
        max_image_side: int,
        concurrency: int,
        timeout_s: float,
        retries: int,
        backoff_s: float,
        top_logprobs: int,
        name: str,
    ):
        if scoring is None:
            scoring = "distribution" if use_logprobs else "generate"
        if scoring not in ("distribution", "generate"):
            raise ValueError(f"{name}: scoring must be 'distribution' or 'generate', got {scoring!r}")
        if scoring == "distribution" and not use_logprobs:
            raise ValueError(f"{name}: scoring='distribution' reads token probabilities; it contradicts use_logprobs=False")
        # One merged Qwen3-VL patch covers 32 x 32 pixels; smaller images carry nothing to judge.
        if max_image_side < 32:
            raise ValueError(f"{name}: max_image_side must be at least 32 pixels, got {max_image_side}")
        if max_new_tokens < 1:
            raise ValueError(f"{name}: max_new_tokens must be at least 1, got {max_new_tokens}")
        self.name, self.scoring = name, scoring
        self.max_new_tokens, self.max_image_side = max_new_tokens, max_image_side
        self.backend: TransformersJudge | OpenAIJudge
        if backend == "transformers":
            self.backend = TransformersJudge(model, device=device, dtype=dtype, batch_size=batch_size)
        elif backend == "openai":
            if not base_url:
                raise ValueError(f"{name}: backend 'openai' needs base_url, e.g. http://127.0.0.1:8000/v1 (vllm serve {model})")
            self.backend = OpenAIJudge(
                base_url, api_model or model, concurrency=concurrency, timeout_s=timeout_s,
                retries=retries, backoff_s=backoff_s, top_logprobs=top_logprobs,
            )
        else:
            raise ValueError(f"{name}: backend must be 'transformers' or 'openai', got {backend!r}")

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

    def _output(self, results: dict[str, _Component], extras: dict[str, float]) -> RewardOutput:
        output = RewardOutput(scores={}, extras=dict(extras))
        for component, result in results.items():
            failed = np.isnan(result.scores)
            output.scores[component] = result.scores
            if result.variance is not None:
                output.uncertainty[component] = result.variance
            # Counted, so that mixing over chunks adds them up (RewardRunner sums "*failures").
            output.extras[f"{component}/parse_failures"] = float(failed.sum())
            _log_failures(self.name, component, result.replies, failed)
        return output


def _nanmean(values: np.ndarray) -> float | None:
    """Mean over the defined values; None (not logged) when there are none, so a NaN never
    reaches the averaged extras."""
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if len(finite) else None


def _put(extras: dict[str, float], key: str, value: float | None) -> None:
    if value is not None:
        extras[key] = value


class FirmGen(_FirmJudge):
    """FIRM-Gen judge: components ("instruction", "quality"), raw 1..5, NaN when unreadable.

    "instruction": how well the image follows its prompt. "quality": the min of three image-only
    sub-scores (aesthetics, technical_quality, structure_texture), whose means go to extras
    ("quality/<sub-score>_mean"). In the distribution mode "quality" is the expectation of the
    min of the three sub-score distributions taken as independent, and its variance the
    uncertainty; each sub-score is read from its own prefilled request.

    Args:
        model: judge checkpoint (transformers backend) and default served model name.
        backend: "transformers" (in process) or "openai" (an OpenAI-compatible server, e.g. vLLM).
        base_url: the server's API root for the openai backend, e.g. "http://127.0.0.1:8000/v1".
        api_model: the served model name, if it differs from `model`.
        instruction_template, quality_template: files replacing rewards/templates/firm_gen_*.txt;
            the instruction template must use {prompt}, the quality template no field.
        scoring: "distribution" (expected score and variance from one forward per request) or
            "generate" (free reply, parse_score); default "distribution" unless use_logprobs=False.
        use_logprobs: False is shorthand for scoring="generate".
        device, dtype, batch_size: transformers backend: where, in which dtype, requests per forward.
        max_new_tokens: reply length in the generate mode.
        max_image_side: images are downscaled so that their longest side is at most this.
        concurrency, timeout_s, retries, backoff_s, top_logprobs: openai backend, see OpenAIJudge.
        name: the worker's name in log messages.
    """

    def __init__(
        self,
        model: str = "VisionXLab/FIRM-Gen-8B",
        *,
        backend: Literal["transformers", "openai"] = "transformers",
        base_url: str | None = None,
        api_model: str | None = None,
        instruction_template: str | os.PathLike[str] | None = None,
        quality_template: str | os.PathLike[str] | None = None,
        scoring: Literal["distribution", "generate"] | None = None,
        use_logprobs: bool = True,
        device: str = "cpu",
        dtype: str = "bf16",
        batch_size: int = 8,
        max_new_tokens: int = 256,
        max_image_side: int = 512,
        concurrency: int = 8,
        timeout_s: float = 120.0,
        retries: int = 3,
        backoff_s: float = 1.0,
        top_logprobs: int = 20,
        name: str = "firm_gen",
    ):
        # Templates first: a bad override path fails before a model loads.
        self.instruction_template = load_template(instruction_template, "firm_gen_instruction.txt", ("prompt",))
        # No fields, but still a str.format template (its literal braces are doubled): format once.
        self.quality_prompt = load_template(quality_template, "firm_gen_quality.txt", ()).format()
        super().__init__(
            model, backend=backend, base_url=base_url, api_model=api_model, scoring=scoring, use_logprobs=use_logprobs,
            device=device, dtype=dtype, batch_size=batch_size, max_new_tokens=max_new_tokens,
            max_image_side=max_image_side, concurrency=concurrency, timeout_s=timeout_s, retries=retries,
            backoff_s=backoff_s, top_logprobs=top_logprobs, name=name,
        )
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
            instruction_result = _Component(mean, variance, replies[:count])
            sub_probs = [probs[count * (k + 1) : count * (k + 2)] for k in range(len(QUALITY_KEYS))]
            sub_means = np.stack([score_moments(p)[0] for p in sub_probs], axis=1)  # [B, 3]
            quality_mean, quality_variance = score_moments(min_distribution(sub_probs))
            quality_replies = [" | ".join(replies[count * (k + 1) + i] for k in range(len(QUALITY_KEYS))) for i in range(count)]
            quality_result = _Component(quality_mean, quality_variance, quality_replies)
            _put(extras, "instruction/digit_mass_mean", _nanmean(masses[:count]))
            _put(extras, "quality/digit_mass_mean", _nanmean(masses[count:]))
        else:
            quality = [JudgeRequest((image,), self.quality_prompt) for image in images]
            replies = self.backend.generate(instruction + quality, self.max_new_tokens)
            scores = np.array([parse_score(reply) for reply in replies[:count]], dtype=np.float64)
            instruction_result = _Component(scores, None, replies[:count])
            sub_means = np.array([parse_scores(reply) for reply in replies[count:]], dtype=np.float64).reshape(count, len(QUALITY_KEYS))
            # A missing sub-score leaves the min undefined: NaN, not the min of the others.
            quality_result = _Component(sub_means.min(axis=1), None, replies[count:])
        for k, key in enumerate(QUALITY_KEYS):
            _put(extras, f"quality/{key}_mean", _nanmean(sub_means[:, k]))
        return self._output({"instruction": instruction_result, "quality": quality_result}, extras)


class FirmEdit(_FirmJudge):
    """FIRM-Edit judge: components ("execution", "consistency"), raw 1..5, NaN when unreadable.

    Both questions show the source image first, then the edited image (batch.images), then the
    instruction (batch.instructions). Arguments as FirmGen's, with execution_template and
    consistency_template (each must use {instruction}) in place of the generation templates.
    """

    def __init__(
        self,
        model: str = "VisionXLab/FIRM-Edit-8B",
        *,
        backend: Literal["transformers", "openai"] = "transformers",
        base_url: str | None = None,
        api_model: str | None = None,
        execution_template: str | os.PathLike[str] | None = None,
        consistency_template: str | os.PathLike[str] | None = None,
        scoring: Literal["distribution", "generate"] | None = None,
        use_logprobs: bool = True,
        device: str = "cpu",
        dtype: str = "bf16",
        batch_size: int = 8,
        max_new_tokens: int = 256,
        max_image_side: int = 512,
        concurrency: int = 8,
        timeout_s: float = 120.0,
        retries: int = 3,
        backoff_s: float = 1.0,
        top_logprobs: int = 20,
        name: str = "firm_edit",
    ):
        self.execution_template = load_template(execution_template, "firm_edit_execution.txt", ("instruction",))
        self.consistency_template = load_template(consistency_template, "firm_edit_consistency.txt", ("instruction",))
        super().__init__(
            model, backend=backend, base_url=base_url, api_model=api_model, scoring=scoring, use_logprobs=use_logprobs,
            device=device, dtype=dtype, batch_size=batch_size, max_new_tokens=max_new_tokens,
            max_image_side=max_image_side, concurrency=concurrency, timeout_s=timeout_s, retries=retries,
            backoff_s=backoff_s, top_logprobs=top_logprobs, name=name,
        )
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
        results: dict[str, _Component] = {}
        both = requests["execution"] + requests["consistency"]
        if self.scoring == "distribution":
            probs, masses, replies = self._stacked(self.backend.distributions(both))
            for index, component in enumerate(self.components):
                part = slice(index * count, (index + 1) * count)
                mean, variance = score_moments(probs[part])
                results[component] = _Component(mean, variance, replies[part])
                _put(extras, f"{component}/digit_mass_mean", _nanmean(masses[part]))
        else:
            replies = self.backend.generate(both, self.max_new_tokens)
            for index, component in enumerate(self.components):
                part = replies[index * count : (index + 1) * count]
                results[component] = _Component(np.array([parse_score(reply) for reply in part], dtype=np.float64), None, part)
        return self._output(results, extras)
