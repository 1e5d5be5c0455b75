"""What the judge tests share: the tiny judge loaded the plain way (the reference the workers are
checked against) and the OpenAI-compatible test server (tests/firm_server.py) in a subprocess."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

from conftest import ROOT, free_port

STARTUP_TIMEOUT_S = 90.0


@dataclass
class Reference:
    """The tiny judge loaded the plain way, scoring one unpadded request at a time."""

    model: torch.nn.Module
    processor: object

    def prompt_inputs(self, images: list[Image.Image], text: str, prefill: str) -> dict:
        messages = [{"role": "user", "content": [{"type": "image"}] * len(images) + [{"type": "text", "text": text}]}]
        prompt = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + prefill
        return self.processor(text=[prompt], images=images, return_tensors="pt")

    def log_probs(self, images: list[Image.Image], text: str, prefill: str) -> torch.Tensor:
        """Next-token log-probabilities over the whole vocabulary: [V] float64."""
        with torch.no_grad():
            logits = self.model(**self.prompt_inputs(images, text, prefill)).logits[0, -1]
        return torch.log_softmax(logits.double(), dim=-1)

    def digit_ids(self, digits: str = "12345") -> list[int]:
        return [self.processor.tokenizer.convert_tokens_to_ids(digit) for digit in digits]

    def digit_probs(self, images: list[Image.Image], text: str, prefill: str) -> np.ndarray:
        """[10] probabilities of the tokens "0".."9" next, not renormalised."""
        log_probs = self.log_probs(images, text, prefill)
        return np.array([math.exp(log_probs[i]) for i in self.digit_ids("0123456789")])

    def score_probs(self, images: list[Image.Image], text: str, prefill: str, top: int | None = None) -> np.ndarray:
        """[5] over scores 1..5, renormalised; with `top`, only digits among the top tokens count."""
        log_probs = self.log_probs(images, text, prefill)
        kept = set(log_probs.topk(top).indices.tolist()) if top else None
        weights = np.array([math.exp(log_probs[i]) if kept is None or i in kept else 0.0 for i in self.digit_ids()])
        return weights / weights.sum() if weights.sum() > 0 else np.full(5, math.nan)

    def reply(self, images: list[Image.Image], text: str, max_new_tokens: int) -> str:
        inputs = self.prompt_inputs(images, text, "")
        with torch.no_grad():
            output = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        return self.processor.tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)




def load_reference(model_dir: Path) -> Reference:
    """The tiny judge loaded the plain way: AutoProcessor (the image-only processor registered)
    and AutoModelForImageTextToText in float32."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from rewards.judges.backends import register_image_only_processor

    register_image_only_processor()
    return Reference(AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval(), AutoProcessor.from_pretrained(model_dir))


@dataclass
class JudgeServer:
    base_url: str  # the API root, ".../v1"
    process: subprocess.Popen
    log_path: Path

    @property
    def root(self) -> str:
        return self.base_url.removesuffix("/v1")

    def control(self, **settings) -> None:
        httpx.post(self.root + "/control", json=settings, timeout=5.0).raise_for_status()

    def stats(self) -> dict:
        return httpx.get(self.root + "/stats", timeout=5.0).json()

    def chat_requests(self) -> int:
        return self.stats()["chat_requests"]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def launch_judge_server(model_dir: Path, log_dir: Path) -> JudgeServer:
    port = free_port()
    log_path = log_dir / f"judge-{port}.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    with log_path.open("w") as log:  # a file, not a pipe: an unread pipe would block the server
        process = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "firm_server.py"), str(model_dir), "--port", str(port)],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
    return JudgeServer(f"http://127.0.0.1:{port}/v1", process, log_path)


def wait_until_up(server: JudgeServer) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise AssertionError(f"judge server exited with {server.process.returncode}:\n{server.log_path.read_text()[-4000:]}")
        try:
            if httpx.get(server.root + "/health", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"judge server {server.root} not up after {STARTUP_TIMEOUT_S} s:\n{server.log_path.read_text()[-4000:]}")


