"""A reward worker that scores on one or more reward servers (`python -m rewards.serve`).

    reward = RemoteReward(["http://127.0.0.1:8123", "http://127.0.0.1:8124"], timeout_s=60)
    output = reward(batch)  # a RewardOutput, exactly as the in-process worker would return

It implements the RewardWorker protocol, so the trainer cannot tell it from a local worker. Calls
go round robin over the servers; a failing server (connection error, timeout, 5xx) hands the call
to the next one, with exponential backoff between rounds over all of them. A 4xx answer means the
request itself is wrong (token, limits), so it is raised at once with the server's message. When
every attempt fails, the call raises: a missing reward is never turned into a zero.

`timeout_s` bounds each attempt as a whole (connect, send, and the whole answer), not each read:
httpx's timeouts are per socket operation, so a server that trickles a byte a second would
otherwise hold a call forever. _DeadlineBackend, below, is the hand-written part that adds it.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import socket
import threading
import time
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import httpcore
import httpx
import numpy as np

from rewards.base import RewardBatch, RewardOutput
from rewards.codec import TOKEN_ENV, encode_image


class RemoteReward:
    """RewardWorker over HTTP. Thread-safe: one httpx.Client (its connection pool is shared
    safely across threads) and a locked round-robin counter.

    Args:
        urls: base URL(s) of reward servers serving the same reward, e.g. "http://127.0.0.1:8123".
        timeout_s: limit in seconds on each attempt as a whole: connect, send the batch, and
            receive the whole answer.
        retries: attempts per server per call: each call makes up to `retries` rounds over all
            servers, sleeping backoff_s, 2 * backoff_s, 4 * backoff_s, ... between rounds.
        backoff_s: the first sleep between rounds.
        token_env: environment variable holding the bearer token (unset: no Authorization header).
        name: the reward the servers must serve; checked against /health at construction so that
            a URL pointing at the wrong server fails before training starts.
    """

    def __init__(
        self,
        urls: list[str] | str,
        *,
        timeout_s: float = 60.0,
        retries: int = 3,
        backoff_s: float = 0.5,
        token_env: str = TOKEN_ENV,
        name: str | None = None,
    ):
        url_list = [urls] if isinstance(urls, str) else list(urls)
        if not url_list:
            raise ValueError("RemoteReward needs at least one reward server URL")
        if retries < 1:
            raise ValueError(f"RemoteReward retries must be at least 1, got {retries}")
        if timeout_s <= 0 or backoff_s < 0:
            raise ValueError(f"RemoteReward needs timeout_s > 0 and backoff_s >= 0, got {timeout_s} and {backoff_s}")
        self.urls = [url.rstrip("/") for url in url_list]
        self.retries, self.backoff_s = retries, backoff_s
        token = os.environ.get(token_env) or None
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        # trust_env=False: an HTTP(S)_PROXY set for model downloads must not relay the images and
        # the bearer token, nor break loopback traffic.
        self.timeout_s = timeout_s
        self._backend = _DeadlineBackend()
        self._http = httpx.Client(headers=headers, timeout=timeout_s, trust_env=False, transport=_deadline_transport(self._backend))
        self._round_robin = itertools.count()
        self._round_robin_lock = threading.Lock()

        try:
            self.name, self.components = self._ask_health(name)
        except BaseException:
            self.close()
            raise

    def _ask_health(self, name: str | None) -> tuple[str, tuple[str, ...]]:
        """The served reward's name and components, from the first server that answers."""
        health, url = self._request("GET", "/health", None, start=0, what="health check")
        components = health.get("components") if isinstance(health, dict) else None
        if not isinstance(components, list) or not components or not all(isinstance(c, str) for c in components):
            raise RuntimeError(f"reward server {url} answered /health without a list of components: {health!r}")
        served = health.get("reward")
        if name is not None and served != name:
            raise ValueError(f"reward server {url} serves {served!r}, not the requested {name!r}")
        return (name if name is not None else str(served)), tuple(components)

    def __call__(self, batch: RewardBatch) -> RewardOutput:
        body = _encode_batch(batch)
        with self._round_robin_lock:
            start = next(self._round_robin) % len(self.urls)
        answer, url = self._request("POST", "/score", body, start=start, what=f"score request ({len(batch)} images)")
        return self._decode_output(answer, url, len(batch))

    def close(self) -> None:
        """Release the connections. Safe from another thread while a call is in flight: that
        call fails at once (its sockets are shut down) instead of running out its timeout."""
        self._backend.abort()
        self._http.close()

    def __enter__(self) -> RemoteReward:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _request(self, method: str, path: str, body: bytes | None, *, start: int, what: str) -> tuple[Any, str]:
        """The JSON answer and the URL that gave it, trying servers from `start` on, round after round."""
        headers = {"Content-Type": "application/json"} if body is not None else {}
        attempts, last_error = 0, "no attempt made"
        for round_index in range(self.retries):
            if round_index:  # a wait that close() cuts short
                self._backend.closed.wait(self.backoff_s * 2 ** (round_index - 1))
            for offset in range(len(self.urls)):
                url = self.urls[(start + offset) % len(self.urls)]
                if self._backend.closed.is_set():
                    raise RuntimeError(f"reward client for {url} was closed during the {what}")
                attempts += 1
                try:
                    with self._backend.deadline(self.timeout_s):
                        response = self._http.request(method, url + path, content=body, headers=headers)
                except httpx.TransportError as err:  # refused, reset, timed out: try the next server
                    limit = f" (timeout_s={self.timeout_s:g} s for the whole attempt)" if isinstance(err, httpx.TimeoutException) else ""
                    last_error = f"{url}: {type(err).__name__}: {err}{limit}"
                    continue
                if response.status_code >= 500:  # the server or its worker failed: may pass
                    last_error = f"{url}: HTTP {response.status_code}: {_server_message(response)}"
                    continue
                if response.status_code >= 400:
                    hint = f" (set {TOKEN_ENV}, or token_env, to the server's token)" if response.status_code == 401 else ""
                    raise RuntimeError(
                        f"reward server {url} rejected the {what} with HTTP {response.status_code}: "
                        f"{_server_message(response)}{hint}"
                    )
                try:
                    return response.json(), url
                except ValueError as err:
                    raise RuntimeError(f"reward server {url} answered the {what} with invalid JSON: {err}") from err
        servers = "reward server " + self.urls[0] if len(self.urls) == 1 else "reward servers " + ", ".join(self.urls)
        raise RuntimeError(f"{servers} unreachable after {attempts} attempts ({what}); last error: {last_error}")

    def _decode_output(self, answer: Any, url: str, count: int) -> RewardOutput:
        """null scores become NaN (missing), never 0; anything else that is not a JSON number
        (a string, a boolean, a list) is an error, not a score read by float()."""
        if not isinstance(answer, dict) or not isinstance(answer.get("scores"), dict):
            raise RuntimeError(f"reward server {url} answered without scores: {str(answer)[:500]}")
        if set(answer["scores"]) != set(self.components):
            raise RuntimeError(
                f"reward server {url} returned components {sorted(answer['scores'])}, expected {list(self.components)}: "
                "are all the URLs serving the same reward?"
            )

        def per_sample(values: Any, what: str) -> np.ndarray:
            if not isinstance(values, list) or len(values) != count:
                raise RuntimeError(f"reward server {url} returned {what} that is not a list of {count} values")
            return np.array([_number(value, url, f"{what}[{index}]") for index, value in enumerate(values)], dtype=np.float64)

        def per_sample_text(values: Any, what: str) -> list[str]:
            if not isinstance(values, list) or len(values) != count or not all(isinstance(value, str) for value in values):
                raise RuntimeError(f"reward server {url} returned {what} that is not a list of {count} strings")
            return values

        return RewardOutput(
            scores={key: per_sample(values, f"scores[{key!r}]") for key, values in answer["scores"].items()},
            uncertainty={
                key: per_sample(values, f"uncertainty[{key!r}]") for key, values in (answer.get("uncertainty") or {}).items()
            },
            extras={key: _number(value, url, f"extras[{key!r}]") for key, value in (answer.get("extras") or {}).items()},
            texts={key: per_sample_text(values, f"texts[{key!r}]") for key, values in (answer.get("texts") or {}).items()},
        )


def _number(value: Any, url: str, what: str) -> float:
    """A JSON number as a float, null as NaN (missing). Infinity and NaN, which Python's json
    accepts, stay floats here; the reward runner counts them as missing."""
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RuntimeError(
            f"reward server {url} returned {what} = {value!r} ({type(value).__name__}), not a number: "
            "scores must be JSON numbers, or null when missing"
        )
    return float(value)


def _encode_batch(batch: RewardBatch) -> bytes:
    """The /score body; done once per call, not once per attempt."""
    payload: dict[str, Any] = {
        "prompts": list(batch.prompts),
        "images": [encode_image(np.asarray(image)) for image in batch.images],
    }
    if batch.source_images is not None:
        payload["source_images"] = [encode_image(np.asarray(image)) for image in batch.source_images]
    if batch.instructions is not None:
        payload["instructions"] = list(batch.instructions)
    if batch.metadata:
        payload["metadata"] = list(batch.metadata)
    try:
        # allow_nan=False: NaN is not JSON; a strict server would refuse it anyway.
        return json.dumps(payload, allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as err:
        raise ValueError(f"RewardBatch metadata must be plain JSON (str, numbers, lists, dicts; no NaN): {err}") from err


def _server_message(response: httpx.Response) -> str:
    """The server's `detail` message when it sent one, else the start of the body."""
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    return str(detail) if detail is not None else response.text[:500]


# ------------------------------------------------------------------ the total deadline


class _DeadlineBackend(httpcore.NetworkBackend):
    """httpcore's socket backend with a per-thread deadline on every socket operation.

    Inside `deadline(seconds)`, each connect, read and write waits at most until the deadline,
    so the attempt as a whole is bounded however slowly the server trickles its answer. Other
    threads sharing the client keep their own deadlines. `abort()` (from close()) shuts down
    every socket the backend opened, which wakes a read blocked in another thread.
    """

    def __init__(self) -> None:
        self._sockets_backend = httpcore.SyncBackend()
        self._local = threading.local()
        self._streams: weakref.WeakSet[_DeadlineStream] = weakref.WeakSet()
        self._streams_lock = threading.Lock()
        self.closed = threading.Event()

    @contextmanager
    def deadline(self, seconds: float) -> Iterator[None]:
        self._local.deadline = (time.monotonic() + seconds, seconds)
        try:
            yield
        finally:
            self._local.deadline = None

    def wait_limit(self, timeout: float | None, error: type[Exception]) -> float | None:
        """The per-operation timeout, cut to what is left before this thread's deadline."""
        if self.closed.is_set():
            raise error("the reward client was closed")
        deadline = getattr(self._local, "deadline", None)
        if deadline is None:
            return timeout
        end, seconds = deadline
        left = end - time.monotonic()
        if left <= 0:  # 0 would make the socket non-blocking, not time out
            raise error(f"no complete answer within {seconds:g} s")
        return left if timeout is None else min(timeout, left)

    def track(self, stream: httpcore.NetworkStream) -> _DeadlineStream:
        wrapped = _DeadlineStream(stream, self)
        with self._streams_lock:
            self._streams.add(wrapped)
        return wrapped

    def abort(self) -> None:
        self.closed.set()
        with self._streams_lock:
            streams = list(self._streams)
        for stream in streams:
            sock = stream.get_extra_info("socket")
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:  # already closed or never connected
                    pass

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        limit = self.wait_limit(timeout, httpcore.ConnectTimeout)
        return self.track(self._sockets_backend.connect_tcp(host, port, limit, local_address, socket_options))

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.NetworkStream:
        limit = self.wait_limit(timeout, httpcore.ConnectTimeout)
        return self.track(self._sockets_backend.connect_unix_socket(path, limit, socket_options))

    def sleep(self, seconds: float) -> None:
        self._sockets_backend.sleep(seconds)


class _DeadlineStream(httpcore.NetworkStream):
    def __init__(self, stream: httpcore.NetworkStream, backend: _DeadlineBackend):
        self._stream, self._backend = stream, backend

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, self._backend.wait_limit(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, self._backend.wait_limit(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._stream.close()

    def start_tls(self, ssl_context: Any, server_hostname: str | None = None, timeout: float | None = None) -> httpcore.NetworkStream:
        limit = self._backend.wait_limit(timeout, httpcore.ConnectTimeout)
        return self._backend.track(self._stream.start_tls(ssl_context, server_hostname, limit))

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


def _deadline_transport(backend: _DeadlineBackend) -> httpx.HTTPTransport:
    """httpx's own transport (its exception mapping, response streams) over a connection pool
    that uses `backend`. httpx takes no network backend argument, so the pool is swapped in."""
    transport = httpx.HTTPTransport(trust_env=False)
    if not isinstance(getattr(transport, "_pool", None), httpcore.ConnectionPool):
        raise RuntimeError(f"httpx {httpx.__version__} no longer keeps an httpcore pool in HTTPTransport._pool; update rewards/client.py")
    transport._pool.close()
    transport._pool = httpcore.ConnectionPool(
        ssl_context=httpx.create_ssl_context(trust_env=False),
        max_connections=100, max_keepalive_connections=20, keepalive_expiry=5.0,  # httpx's defaults
        network_backend=backend,
    )
    return transport
