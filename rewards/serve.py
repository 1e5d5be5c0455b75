"""Serve any registered reward worker over HTTP (DESIGN.md contract 4).

    python -m rewards.serve --reward jpeg_compressibility --port 8123
    TRUSTGRPO_REWARD_TOKEN=... python -m rewards.serve --reward NAME --config params.yaml --host 0.0.0.0

Endpoints (both need `Authorization: Bearer <token>` when TRUSTGRPO_REWARD_TOKEN is set):

    GET  /health  -> {"status": "ok", "reward": NAME, "components": [...]}
    POST /score   {"prompts": [...], "images": [base64 PNG, ...], "source_images": [...]?,
                   "instructions": [...]?, "metadata": [{...}, ...]?}
                  -> {"scores": {component: [float | null]}, "uncertainty": {...}, "extras": {...},
                      "texts": {component: [str]} (what a judge wrote, where the worker keeps it)}

The wire format is JSON with base64 PNG (or JPEG) images and nothing else: Flow-GRPO's reward
server unpickled request bodies, which runs arbitrary code for anyone who can reach the port.
Requests are checked in the order that keeps a hostile one cheap: token, content type, body size,
JSON schema and counts, image headers, and only then pixels. NaN scores travel as null.

Memory: the worker runs one request at a time (a lock), so decoded pixels in memory are bounded by
one request: at most max_images * max_pixels * 3 bytes for images, and as much for source images.
"""

from __future__ import annotations

import argparse
import hmac
import ipaddress
import json
import logging
import math
import os
import threading
from http import HTTPStatus
from pathlib import Path
from typing import Any

import numpy as np
import uvicorn
import yaml
from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.concurrency import run_in_threadpool

from rewards import WORKERS, build_worker
from rewards.base import RewardBatch, RewardOutput, RewardWorker
from rewards.codec import TOKEN_ENV, ImageTooLarge, decode_image

DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_IMAGES = 256
DEFAULT_MAX_PIXELS = 4096 * 4096

logger = logging.getLogger("rewards.serve")


class ScoreRequest(BaseModel):
    """The body of POST /score. Strict: a number where a string belongs, or an unknown field
    (a typo such as `image`), is refused rather than coerced or ignored."""

    model_config = ConfigDict(strict=True, extra="forbid")

    prompts: list[str]
    images: list[str]  # base64 PNG or JPEG, one per prompt, all the same size
    source_images: list[str] | None = None  # editing: base64, one per prompt, any sizes
    instructions: list[str] | None = None  # editing: one per prompt
    metadata: list[dict[str, Any]] | None = None  # free-form, one per prompt


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach. A hostname other than `localhost` may
    resolve to anything, so it counts as exposed."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def create_app(
    worker: RewardWorker,
    name: str,
    *,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_images: int = DEFAULT_MAX_IMAGES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    token: str | None = None,
) -> FastAPI:
    """The FastAPI app serving `worker` under `name`; `token=None` disables authentication."""
    components = tuple(worker.components)
    # The worker may hold a GPU model or a non-thread-safe client: one call at a time.
    worker_lock = threading.Lock()
    token_bytes = token.encode("utf-8") if token else None

    # No /docs, /redoc or /openapi.json: nothing but the two endpoints is exposed.
    app = FastAPI(title=f"trustgrpo reward server ({name})", docs_url=None, redoc_url=None, openapi_url=None)

    async def require_token(authorization: str | None = Header(default=None)) -> None:
        if token_bytes is None:
            return
        scheme, _, credentials = (authorization or "").partition(" ")
        # compare_digest: the comparison time does not reveal how many leading characters matched.
        # Starlette decodes header values as latin-1, so encoding back gives the bytes sent.
        if scheme.lower() != "bearer" or not hmac.compare_digest(credentials.strip().encode("latin-1"), token_bytes):
            raise HTTPException(
                HTTPStatus.UNAUTHORIZED,
                detail=f"missing or wrong token: send 'Authorization: Bearer <token>' with the server's {TOKEN_ENV}",
                headers={"WWW-Authenticate": "Bearer"},
            )

    @app.get("/health", dependencies=[Depends(require_token)])
    async def health() -> dict[str, Any]:
        return {"status": "ok", "reward": name, "components": list(components)}

    @app.post("/score", dependencies=[Depends(require_token)])
    async def score(request: Request) -> JSONResponse:
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type != "application/json":
            raise HTTPException(
                HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                detail=f"content type {media_type or '(none)'!r} is not accepted: send application/json "
                "with base64 PNG images (pickle and other encodings are refused)",
            )
        body = await _read_body(request, max_body_bytes)
        # Parsing, decoding and scoring are CPU (or GPU) bound: off the event loop, so /health and
        # the refusal of bad requests stay responsive while a batch is scored.
        answer = await run_in_threadpool(handle, body)
        return JSONResponse(answer)

    def handle(body: bytes) -> dict[str, Any]:
        score_request = _parse_request(body)
        count = _check_counts(score_request, max_images)
        with worker_lock:
            # Decoding under the lock keeps at most one request's pixels in memory.
            batch = _decode_batch(score_request, max_pixels)
            try:
                output = worker(batch)
            except Exception as err:  # noqa: BLE001 - any worker failure becomes a 500 and the server keeps serving
                logger.exception("reward worker %r failed on a batch of %d", name, count)
                raise HTTPException(
                    HTTPStatus.INTERNAL_SERVER_ERROR, detail=f"reward worker {name!r} failed: {type(err).__name__}: {err}"
                ) from err
        return _encode_output(output, components, count, name)

    return app


async def _read_body(request: Request, max_body_bytes: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed the limit: from the
    declared Content-Length before reading, and from the bytes actually received while reading
    (a chunked body declares no length)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise HTTPException(HTTPStatus.BAD_REQUEST, detail=f"invalid Content-Length {declared!r}")
        if int(declared) > max_body_bytes:
            raise HTTPException(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                detail=f"request body of {declared} bytes exceeds the server limit of {max_body_bytes} bytes "
                "(--max-body-bytes); send fewer or smaller images per request",
            )
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > max_body_bytes:
            raise HTTPException(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                detail=f"request body exceeds the server limit of {max_body_bytes} bytes (--max-body-bytes); "
                "send fewer or smaller images per request",
            )
    return bytes(body)


def _parse_request(body: bytes) -> ScoreRequest:
    """JSON syntax errors are 400; JSON of the wrong shape is 422."""
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise HTTPException(HTTPStatus.BAD_REQUEST, detail=f"request body is not valid JSON: {err}") from err
    try:
        return ScoreRequest.model_validate(parsed)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in err.errors()[:5])
        raise HTTPException(HTTPStatus.UNPROCESSABLE_ENTITY, detail=f"invalid score request: {problems}") from err


def _check_counts(request: ScoreRequest, max_images: int) -> int:
    """The batch size; every per-sample list must match it, and it must be within the limit."""
    count = len(request.prompts)
    if count == 0:
        raise HTTPException(HTTPStatus.UNPROCESSABLE_ENTITY, detail="empty batch: send at least one prompt and image")
    if max(count, len(request.images)) > max_images:
        raise HTTPException(
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
            detail=f"{max(count, len(request.images))} images exceed the server limit of {max_images} per request "
            "(--max-images); split the batch",
        )
    for field_name in ("images", "source_images", "instructions", "metadata"):
        values = getattr(request, field_name)
        if values is not None and len(values) != count:
            raise HTTPException(
                HTTPStatus.UNPROCESSABLE_ENTITY,
                detail=f"length mismatch: {len(values)} {field_name} for {count} prompts",
            )
    return count


def _decode_all(encoded: list[str], field_name: str, max_pixels: int) -> list[np.ndarray]:
    decoded = []
    for index, data in enumerate(encoded):
        try:
            decoded.append(decode_image(data, max_pixels=max_pixels))
        except ImageTooLarge as err:
            raise HTTPException(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, detail=f"{field_name}[{index}]: {err} (--max-pixels)") from err
        except ValueError as err:
            raise HTTPException(HTTPStatus.UNPROCESSABLE_ENTITY, detail=f"{field_name}[{index}]: {err}") from err
    return decoded


def _decode_batch(request: ScoreRequest, max_pixels: int) -> RewardBatch:
    images = _decode_all(request.images, "images", max_pixels)
    shapes = sorted({image.shape for image in images})
    if len(shapes) > 1:
        raise HTTPException(
            HTTPStatus.UNPROCESSABLE_ENTITY, detail=f"images must all have the same size, got shapes {shapes}"
        )
    sources = None
    if request.source_images is not None:
        sources = _decode_all(request.source_images, "source_images", max_pixels)
    return RewardBatch(
        images=np.stack(images),
        prompts=list(request.prompts),
        source_images=sources,
        instructions=list(request.instructions) if request.instructions is not None else None,
        metadata=list(request.metadata) if request.metadata is not None else [],
    )


def _encode_output(output: RewardOutput, components: tuple[str, ...], count: int, name: str) -> dict[str, Any]:
    """The worker's output as JSON: NaN (a missing score) becomes null. Anything else that JSON
    cannot carry, or that breaks the protocol, is a worker bug and answers 500."""

    def fail(problem: str) -> HTTPException:
        logger.error("reward worker %r: %s", name, problem)
        return HTTPException(HTTPStatus.INTERNAL_SERVER_ERROR, detail=f"reward worker {name!r} {problem}")

    def per_sample(values: Any, what: str) -> list[float | None]:
        array = np.asarray(values, dtype=np.float64)
        if array.shape != (count,):
            raise fail(f"returned {what} of shape {array.shape} for a batch of {count}")
        if np.isinf(array).any():
            raise fail(f"returned an infinite value in {what}")
        return [None if math.isnan(value) else value for value in array.tolist()]

    def per_sample_text(values: Any, what: str) -> list[str]:
        if len(values) != count:
            raise fail(f"returned {len(values)} {what} for a batch of {count}")
        return [str(value) for value in values]

    if set(output.scores) != set(components):
        raise fail(f"returned components {sorted(output.scores)}, declared {list(components)}")
    extras: dict[str, float | None] = {}
    for key, value in output.extras.items():
        number = float(value)
        if math.isinf(number):
            raise fail(f"returned an infinite extra {key!r}")
        extras[str(key)] = None if math.isnan(number) else number
    return {
        "scores": {component: per_sample(output.scores[component], f"scores[{component!r}]") for component in components},
        "uncertainty": {key: per_sample(values, f"uncertainty[{key!r}]") for key, values in output.uncertainty.items()},
        "extras": extras,
        "texts": {str(key): per_sample_text(texts, f"texts[{key!r}]") for key, texts in output.texts.items()},
    }


def _load_params(config: Path | None) -> dict[str, Any]:
    """Worker constructor params from a YAML mapping (safe_load: no YAML tags run code)."""
    if config is None:
        return {}
    if not config.is_file():
        raise SystemExit(f"rewards.serve: config file {config} does not exist")
    with config.open(encoding="utf-8") as handle:
        params = yaml.safe_load(handle)
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise SystemExit(f"rewards.serve: {config} must hold a mapping of worker params, got {type(params).__name__}")
    return params


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m rewards.serve", description="Serve a reward worker over HTTP.")
    parser.add_argument("--reward", required=True, help=f"registered worker name, one of: {', '.join(sorted(WORKERS))}")
    parser.add_argument("--config", type=Path, default=None, help="YAML file of the worker's constructor params")
    parser.add_argument(
        "--host", default="127.0.0.1",
        help=f"bind address; loopback by default; any other needs {TOKEN_ENV} set",
    )
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES, help="largest request body accepted")
    parser.add_argument("--max-images", type=int, default=DEFAULT_MAX_IMAGES, help="most images per request")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="most pixels (width * height) per image")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    args = parser.parse_args(argv)
    for flag in ("max_body_bytes", "max_images", "max_pixels"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    # An empty variable counts as unset: an empty token would accept "Bearer " from anyone.
    token = os.environ.get(TOKEN_ENV) or None
    if token is None and not is_loopback(args.host):
        raise SystemExit(
            f"rewards.serve: refusing to serve on non-loopback host {args.host!r} without authentication: "
            f"set {TOKEN_ENV} to a secret (clients send it as 'Authorization: Bearer <token>'), or bind 127.0.0.1"
        )
    params = _load_params(args.config)
    try:
        worker = build_worker(args.reward, params)
    except KeyError as err:
        raise SystemExit(f"rewards.serve: {err.args[0]}") from err
    except ValueError as err:
        raise SystemExit(f"rewards.serve: {err}") from err
    app = create_app(
        worker, args.reward,
        max_body_bytes=args.max_body_bytes, max_images=args.max_images, max_pixels=args.max_pixels, token=token,
    )
    logger.info(
        "serving reward %r (components %s) on http://%s:%d, token auth %s",
        args.reward, list(worker.components), args.host, args.port, "on" if token else "off (loopback only)",
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    main()
