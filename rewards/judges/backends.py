"""Vision-language judge backends: one interface (`distributions`, `generate`, `close`) over a
judge in this process (TransformersJudge) or behind an OpenAI-compatible endpoint (OpenAIJudge),
plus the torchvision-free Qwen3-VL processor the in-process judge loads with.

- "distributions": the assistant turn is prefilled (JudgeRequest.prefill) up to the score digit
  and the judge's next-token probabilities over "1".."5" are renormalised (ScoreDistribution).
- "generate": the judge writes its reply freely; rewards.judges.parse reads the score out of it.
"""

from __future__ import annotations

import importlib.util
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import torch
from PIL import Image
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoProcessor,
    Qwen2_5_VLConfig,
    Qwen2_5_VLProcessor,
    Qwen3VLConfig,
    Qwen3VLProcessor,
)

from rewards.codec import encode_image
from rewards.images import check_batch_size, torch_dtype
from rewards.judges.parse import DIGITS, ScoreDistribution, digit_probs_from_logprobs, score_distribution

__all__ = [
    "DigitProbs",
    "ImageOnlyQwen2_5_VLProcessor",
    "ImageOnlyQwen3VLProcessor",
    "JudgeRequest",
    "OpenAIJudge",
    "SCORE_PREFILL",
    "TransformersJudge",
    "load_judge_processor",
    "register_image_only_processor",
]

# The assistant text the distribution mode prefills: the judge's next token is the score digit.
# The trailing space matters: in Qwen's vocabulary it is its own token, so the digit comes next.
SCORE_PREFILL = '{"score": '


@dataclass(frozen=True)
class JudgeRequest:
    """One question to the judge: its images (in order), the rubric text after them, and the
    assistant prefill the distribution mode reads the next token after."""

    images: tuple[Image.Image, ...]
    text: str
    prefill: str = SCORE_PREFILL


@dataclass
class DigitProbs:
    """What the judge would write next after a request's prefill: the probabilities of the
    tokens "0".."9" ([10], not renormalised) and a line for the log."""

    probs: np.ndarray
    reply: str

    def score(self) -> ScoreDistribution:
        """As a 1..5 score: the digits 1..5 renormalised, with their mass."""
        probs, mass = score_distribution(self.probs)
        return ScoreDistribution(probs, mass, self.reply)


class ImageOnlyQwen3VLProcessor(Qwen3VLProcessor):
    """Qwen3VLProcessor without a video processor.

    transformers builds Qwen-VL video processors on torchvision, so without torchvision the
    stock processor cannot be built or loaded. Judges never see videos; this subclass drops
    that sub-processor (ProcessorMixin derives its sub-processors from the __init__ signature)
    and uses the PIL image processor.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
    """Qwen2_5_VLProcessor without a video processor, as ImageOnlyQwen3VLProcessor: the judges
    built on Qwen2.5-VL (UnifiedReward-qwen, EditScore, VIEScore with Qwen2.5-VL) load without
    torchvision."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


# model_type -> (config class, image-only processor) for the judge families handled without torchvision.
_IMAGE_ONLY = {
    "qwen3_vl": (Qwen3VLConfig, ImageOnlyQwen3VLProcessor),
    "qwen2_5_vl": (Qwen2_5_VLConfig, ImageOnlyQwen2_5_VLProcessor),
}


_registration_lock = threading.Lock()


def _torchvision_available() -> bool:
    return importlib.util.find_spec("torchvision") is not None


def register_image_only_processor() -> None:
    """Map the Qwen-VL configs to their image-only processors in AutoProcessor when torchvision is absent.

    The registry is per process, so every process that loads a judge calls this (loading does).
    Without it AutoProcessor returns a bare tokenizer for checkpoints saved with the subclass, and
    builds the stock processor (which needs torchvision) for Qwen3-VL checkpoints that name no
    processor class. With torchvision installed the stock processor works and is left in place.
    """
    if _torchvision_available():
        return
    with _registration_lock:
        for config_class, processor_class in _IMAGE_ONLY.values():
            AutoProcessor.register(config_class, processor_class, exist_ok=True)


def load_judge_processor(model: str | os.PathLike[str]) -> Any:
    """The judge's processor, loadable without torchvision for Qwen3-VL and Qwen2.5-VL checkpoints.

    A real checkpoint names its processor class ("Qwen3VLProcessor") in its config, which
    AutoProcessor then builds as named (video processor included) whatever is registered; so for
    these families without torchvision the image-only subclass is loaded directly.
    """
    register_image_only_processor()
    model_type = AutoConfig.from_pretrained(model).model_type
    if model_type in _IMAGE_ONLY and not _torchvision_available():
        processor = _IMAGE_ONLY[model_type][1].from_pretrained(model)
    else:
        processor = AutoProcessor.from_pretrained(model)
    if getattr(processor, "image_processor", None) is None or getattr(processor, "tokenizer", None) is None:
        raise ValueError(
            f"judge {model}: AutoProcessor returned {type(processor).__name__}, not a processor with an image "
            "processor and a tokenizer; a vision-language checkpoint with its processor files is needed"
        )
    return processor


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
        for digit in DIGITS:
            ids = tokenizer.encode(digit, add_special_tokens=False)
            if len(ids) != 1:
                raise ValueError(f"judge {model}: the digit {digit!r} is not a single token ({ids}); use scoring='generate'")
            digit_ids.append(ids[0])
        self.digit_ids = torch.tensor(digit_ids, device=self.device)
        self._checked_prefills: set[str] = set()

    def _check_prefill(self, prefill: str) -> None:
        """The distribution mode assumes the digit after the prefill is a token of its own; a
        tokenizer that merged it with the trailing space would make position -1 meaningless."""
        if prefill in self._checked_prefills:
            return
        if len(self._checked_prefills) > 4096:  # replies used as prefills are all different
            self._checked_prefills.clear()
        tokenizer = self.processor.tokenizer
        head = tokenizer.encode(prefill, add_special_tokens=False)
        for digit, digit_id in zip(DIGITS, self.digit_ids.tolist()):
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
    def digit_distributions(self, requests: Sequence[JudgeRequest]) -> list[DigitProbs]:
        """The next-token probabilities of "0".."9" after each request's prefill."""
        for prefill in {request.prefill for request in requests}:
            self._check_prefill(prefill)
        results: list[DigitProbs] = []
        for start in range(0, len(requests), self.batch_size):
            chunk = requests[start : start + self.batch_size]
            logits = self.model(**self._inputs(chunk, prefill=True), logits_to_keep=1).logits[:, -1, :]
            # float32: in bf16 neighbouring logits differ by steps of ~1%, too coarse for a reward.
            probs = torch.log_softmax(logits.float(), dim=-1)[:, self.digit_ids].double().exp().cpu().numpy()
            for row in range(len(chunk)):
                top = int(probs[row].argmax())
                results.append(DigitProbs(probs[row], f"{DIGITS[top]} (digit mass {float(probs[row].sum()):.3g})"))
        return results

    def distributions(self, requests: Sequence[JudgeRequest]) -> list[ScoreDistribution]:
        """The 1..5 score distribution after each request's prefill."""
        return [digits.score() for digits in self.digit_distributions(requests)]

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
        api_key: sent as a bearer token when given (a hosted API); a local vLLM needs none.
    """

    def __init__(
        self,
        base_url: str,
        api_model: str,
        *,
        api_key: str | None = None,
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
            headers={"Authorization": f"Bearer {api_key}"} if api_key else None,
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

    def digit_distributions(self, requests: Sequence[JudgeRequest]) -> list[DigitProbs]:
        """The probabilities of "0".."9" after each request's prefill, from the returned
        top_logprobs (digits outside them count 0)."""
        urls = self._image_urls(requests)

        def ask(request: JudgeRequest) -> DigitProbs:
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
            text = (choice.get("message") or {}).get("content") or ""
            tops = [top.get("token") for top in (content[0].get("top_logprobs") or [])[:8]] if content else []
            return DigitProbs(digit_probs_from_logprobs(content), f"{text!r}; top tokens {tops}")

        return self._map(ask, requests)

    def distributions(self, requests: Sequence[JudgeRequest]) -> list[ScoreDistribution]:
        """The 1..5 score distribution after each request's prefill."""
        return [digits.score() for digits in self.digit_distributions(requests)]

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
