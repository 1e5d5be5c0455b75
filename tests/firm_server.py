"""A small OpenAI-compatible chat server that runs a judge checkpoint, for the FIRM worker's tests.

    python tests/firm_server.py MODEL_DIR --port 8123

POST /v1/chat/completions implements the part of vLLM's API the FIRM worker uses: images as
`image_url` data URLs, `max_tokens`, greedy decoding, `logprobs` with `top_logprobs`, and
`continue_final_message` / `add_generation_prompt` (vLLM's extensions, sent as top-level fields).
Test hooks: POST /control {"mode": "garbage"} makes it answer text without a score (and no score
token among the top logprobs), {"mode": "model"} restores it, {"script": {"needle": "reply", ...}}
makes a free reply (not a continued assistant turn) to a request whose text holds "needle" be
"reply" (the model still answers continued turns, so score probabilities stay real; {"script": {}}
ends it), {"fail_next": N} answers the next N
chat requests with HTTP 503, {"reset_stats": true} zeroes the maxima below; GET /stats counts the chat requests and reports the most requests
ever in flight at once, the longest image side received and the last Authorization header; GET /health says it is up.
"""

from __future__ import annotations

import argparse
import base64
import io
import threading
from pathlib import Path
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from PIL import Image
from transformers import AutoModelForImageTextToText

from rewards.judges.backends import load_judge_processor

GARBAGE_REPLY = "I would rather not say."


def _decode_data_url(url: str) -> Image.Image:
    prefix = "data:image/png;base64,"
    if not url.startswith(prefix):
        raise HTTPException(status_code=400, detail=f"only PNG data URLs are supported, got {url[:40]!r}")
    return Image.open(io.BytesIO(base64.b64decode(url[len(prefix) :]))).convert("RGB")


def _chat_inputs(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[Image.Image]]:
    """Messages for the chat template ({"type": "image"} placeholders) and the images in order."""
    converted, images = [], []
    for message in messages:
        content = message["content"]
        if isinstance(content, str):
            converted.append({"role": message["role"], "content": content})
            continue
        parts = []
        for part in content:
            if part["type"] == "image_url":
                images.append(_decode_data_url(part["image_url"]["url"]))
                parts.append({"type": "image"})
            else:
                parts.append({"type": "text", "text": part["text"]})
        converted.append({"role": message["role"], "content": parts})
    return converted, images


def create_app(model_dir: str) -> FastAPI:
    processor = load_judge_processor(model_dir)
    tokenizer = processor.tokenizer
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    model_lock = threading.Lock()  # one forward at a time: requests arrive on several threads
    # Separate from the model lock, so that a request waiting for the model counts as in flight.
    stats_lock = threading.Lock()
    state = {"mode": "model", "script": {}, "fail_next": 0, "chat_requests": 0, "in_flight": 0, "max_in_flight": 0, "max_image_side": 0, "last_authorization": None}
    app = FastAPI()

    def token_entry(token_id: int, log_probs: torch.Tensor, top: int) -> dict[str, Any]:
        values, indices = log_probs.topk(top)
        return {
            "token": tokenizer.decode([token_id]),
            "logprob": float(log_probs[token_id]),
            "top_logprobs": [{"token": tokenizer.decode([int(i)]), "logprob": float(v)} for v, i in zip(values, indices)],
        }

    def garbage(body: dict[str, Any]) -> dict[str, Any]:
        message = {"role": "assistant", "content": GARBAGE_REPLY}
        choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": "stop"}
        if body.get("logprobs"):
            letters = [{"token": letter, "logprob": -1.0} for letter in "abcdefghij"]
            choice["logprobs"] = {"content": [{"token": "I", "logprob": -0.5, "top_logprobs": letters}]}
        return choice

    def scripted(body: dict[str, Any]) -> dict[str, Any] | None:
        if body.get("continue_final_message"):
            return None
        text = " ".join(part.get("text", "") for message in body["messages"] if isinstance(message["content"], list) for part in message["content"])
        reply = next((reply for needle, reply in state["script"].items() if needle in text), None)
        if reply is None:
            return None
        return {"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}

    def answer(body: dict[str, Any]) -> dict[str, Any]:
        messages, images = _chat_inputs(body["messages"])
        with stats_lock:
            state["max_image_side"] = max([state["max_image_side"], *(max(image.size) for image in images)])
        if body.get("continue_final_message"):
            if body.get("add_generation_prompt", True):
                raise HTTPException(status_code=400, detail="continue_final_message needs add_generation_prompt: false")
            text = processor.apply_chat_template(messages, tokenize=False, continue_final_message=True, add_generation_prompt=False)
        else:
            text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=body.get("add_generation_prompt", True))
        inputs = processor(text=[text], images=images or None, return_tensors="pt")
        with model_lock, torch.inference_mode():
            output = model.generate(
                **inputs, max_new_tokens=int(body.get("max_tokens", 16)), do_sample=False,
                output_logits=True, return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id,
            )
        new_tokens = output.sequences[0, inputs["input_ids"].shape[1] :].tolist()
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": tokenizer.decode(new_tokens, skip_special_tokens=True)},
            "finish_reason": "length",
        }
        if body.get("logprobs"):
            top = min(int(body.get("top_logprobs", 0)), len(tokenizer))
            steps = [torch.log_softmax(logits[0].float(), dim=-1) for logits in output.logits]
            choice["logprobs"] = {"content": [token_entry(token, step, top) for token, step in zip(new_tokens, steps)]}
        return choice

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/stats")
    def stats() -> dict[str, Any]:
        with stats_lock:
            return {key: state[key] for key in ("chat_requests", "max_in_flight", "max_image_side", "last_authorization")}

    @app.post("/control")
    def control(body: dict[str, Any]) -> dict[str, Any]:
        with stats_lock:
            state.update({key: body[key] for key in ("mode", "script", "fail_next") if key in body})
            if body.get("reset_stats"):
                state.update(max_in_flight=0, max_image_side=0)
            return {"mode": state["mode"], "fail_next": state["fail_next"]}

    @app.post("/v1/chat/completions")
    def chat(body: dict[str, Any], request: Request) -> Any:
        with stats_lock:
            state["chat_requests"] += 1
            state["last_authorization"] = request.headers.get("authorization")
            if state["fail_next"] > 0:
                state["fail_next"] -= 1
                return JSONResponse(status_code=503, content={"error": "temporarily overloaded (test hook)"})
            state["in_flight"] += 1
            state["max_in_flight"] = max(state["max_in_flight"], state["in_flight"])
        try:
            choice = garbage(body) if state["mode"] == "garbage" else (scripted(body) or answer(body))
        finally:
            with stats_lock:
                state["in_flight"] -= 1
        return {"id": "chatcmpl-test", "object": "chat.completion", "model": body.get("model"), "choices": [choice]}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(create_app(str(args.model_dir)), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
