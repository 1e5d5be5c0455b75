"""The reward server and client over real HTTP on 127.0.0.1 (DESIGN.md contract 4).

The jpeg servers are real `python -m rewards.serve` processes, as a user starts them. A scripted
worker (missing scores, a crash, a slow call) is served in-process with uvicorn in a thread, which is
still a real socket, because no registered worker misbehaves on demand.
"""

from __future__ import annotations

import base64
import io
import math
import os
import pickle
import secrets
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
from PIL import Image

from conftest import ROOT, free_port
from rewards.base import RewardBatch, RewardOutput
from rewards.client import RemoteReward
from rewards.codec import TOKEN_ENV, ImageTooLarge, decode_image, encode_image
from rewards.jpeg import JpegCompressibility
from rewards.serve import create_app

TOKEN = "test-" + secrets.token_hex(16)
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_BODY_BYTES = 256 * 1024  # small, so that an oversize body stays cheap to send
MAX_IMAGES = 8
STARTUP_TIMEOUT_S = 30.0


def sample_images(count: int = 3, size: int = 24) -> np.ndarray:
    """Images of very different JPEG sizes (flat, gradient, noise), so equal scores mean something."""
    rng = np.random.default_rng(0)
    images = np.zeros((count, size, size, 3), dtype=np.uint8)
    for index in range(count):
        if index % 3 == 0:
            images[index] = 128
        elif index % 3 == 1:
            images[index] = np.linspace(0, 255, size, dtype=np.uint8)[None, :, None]
        else:
            images[index] = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    return images


def score_body(images: np.ndarray, **fields: object) -> dict:
    return {"prompts": [f"prompt {i}" for i in range(len(images))], "images": [encode_image(im) for im in images], **fields}


def png_declaring_size(width: int, height: int) -> bytes:
    """A tiny, well-formed PNG whose IHDR claims width x height RGB pixels (valid CRCs)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# ---------------------------------------------------------------- real server processes


@dataclass
class ServerProcess:
    url: str
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


def launch_server(log_dir: Path, *args: str, token: str | None = TOKEN) -> ServerProcess:
    port = free_port()
    env = {key: value for key, value in os.environ.items() if key != TOKEN_ENV}
    env.update({"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    if token is not None:
        env[TOKEN_ENV] = token
    log_path = log_dir / f"server-{port}.log"
    with log_path.open("w") as log:  # a file, not a pipe: an unread pipe would block the server
        process = subprocess.Popen(
            [sys.executable, "-m", "rewards.serve", "--reward", "jpeg_compressibility", "--port", str(port),
             "--max-body-bytes", str(MAX_BODY_BYTES), "--max-images", str(MAX_IMAGES), *args],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
    return ServerProcess(f"http://127.0.0.1:{port}", process, log_path)


def wait_until_healthy(server: ServerProcess) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise AssertionError(f"reward server exited with {server.process.returncode}:\n{server.log()}")
        try:
            if httpx.get(server.url + "/health", headers=AUTH, timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"reward server {server.url} not healthy after {STARTUP_TIMEOUT_S} s:\n{server.log()}")


def stop_server(server: ServerProcess) -> None:
    if server.process.poll() is None:
        server.process.terminate()
        try:
            server.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait(timeout=10)


@dataclass
class Servers:
    plain: ServerProcess  # jpeg_compressibility with the default scale 1/500
    doubled: ServerProcess  # the same reward with scale 1/250 from --config: tells which server answered


@pytest.fixture(scope="module")
def servers(tmp_path_factory) -> Iterator[Servers]:
    log_dir = tmp_path_factory.mktemp("reward-server")
    config = log_dir / "doubled.yaml"
    config.write_text("scale: 0.004\n")
    started = [launch_server(log_dir), launch_server(log_dir, "--config", str(config))]  # start both, then wait
    try:
        for server in started:
            wait_until_healthy(server)
        yield Servers(*started)
    finally:
        for server in started:
            stop_server(server)


def post_score(url: str, body: object, *, headers: dict | None = None) -> httpx.Response:
    return httpx.post(url + "/score", json=body, headers=AUTH if headers is None else headers, timeout=30)


def assert_still_serving(server: ServerProcess) -> None:
    """After a hostile request: the process lives, /health answers and scoring is still right."""
    assert server.process.poll() is None, server.log()
    assert httpx.get(server.url + "/health", headers=AUTH, timeout=5).status_code == 200
    images = sample_images()
    response = post_score(server.url, score_body(images))
    assert response.status_code == 200, response.text
    expected = JpegCompressibility()(RewardBatch(images=images, prompts=["p"] * len(images)))
    np.testing.assert_array_equal(response.json()["scores"]["jpeg_compressibility"], expected.scores["jpeg_compressibility"])


def detail(response: httpx.Response) -> str:
    return response.json()["detail"]


# ---------------------------------------------------------------- scoring and the wire format


def test_codec_round_trip_is_exact_and_converts_to_rgb() -> None:
    image = sample_images()[2]
    np.testing.assert_array_equal(decode_image(encode_image(image), max_pixels=10_000), image)
    buffer = io.BytesIO()
    Image.new("RGBA", (5, 4), (10, 20, 30, 40)).save(buffer, format="PNG")
    decoded = decode_image(b64(buffer.getvalue()), max_pixels=10_000)
    assert decoded.shape == (4, 5, 3) and decoded.dtype == np.uint8 and tuple(decoded[0, 0]) == (10, 20, 30)
    with pytest.raises(ImageTooLarge, match="5x4 = 20 pixels exceeds the limit of 19"):
        decode_image(b64(buffer.getvalue()), max_pixels=19)


def test_scores_equal_the_in_process_worker(servers: Servers) -> None:
    images = sample_images()
    batch = RewardBatch(images=images, prompts=["a", "b", "c"])
    expected = JpegCompressibility()(batch)
    assert len(set(expected.scores["jpeg_compressibility"].tolist())) == 3  # the images really differ

    health = httpx.get(servers.plain.url + "/health", headers=AUTH, timeout=5).json()
    assert health == {"status": "ok", "reward": "jpeg_compressibility", "components": ["jpeg_compressibility"]}
    response = post_score(servers.plain.url, score_body(images))
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["scores"]["jpeg_compressibility"] == expected.scores["jpeg_compressibility"].tolist()
    assert answer["extras"] == expected.extras

    with _client(servers.plain.url) as remote:
        assert remote.components == ("jpeg_compressibility",) and remote.name == "jpeg_compressibility"
        output = remote(batch)
    np.testing.assert_array_equal(output.scores["jpeg_compressibility"], expected.scores["jpeg_compressibility"])
    assert output.scores["jpeg_compressibility"].dtype == np.float64


# ---------------------------------------------------------------- hostile and broken requests


def test_missing_or_wrong_token_is_refused(servers: Servers) -> None:
    url = servers.plain.url
    body = score_body(sample_images(1))
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}, {"Authorization": TOKEN}):
        response = post_score(url, body, headers=headers)
        assert response.status_code == 401, (headers, response.text)
        assert TOKEN_ENV in detail(response)
        assert httpx.get(url + "/health", headers=headers, timeout=5).status_code == 401
    assert_still_serving(servers.plain)


class _Canary:
    """Unpickling this creates a file: proof that a server executed the pickle."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_bodies_are_refused_and_never_unpickled(servers: Servers, tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    payloads = [pickle.dumps(score_body(sample_images(1))), pickle.dumps({"prompts": ["a"], "x": _Canary(str(marker))})]
    for payload in payloads:
        for content_type, status in (
            ("application/octet-stream", 415), ("application/python-pickle", 415), ("application/json", 400),
        ):
            headers = {**AUTH, "Content-Type": content_type}
            response = httpx.post(servers.plain.url + "/score", content=payload, headers=headers, timeout=10)
            assert response.status_code == status, (content_type, response.text)
            assert ("application/json" in detail(response)) if status == 415 else ("not valid JSON" in detail(response))
    assert not marker.exists()
    assert_still_serving(servers.plain)


def test_oversize_body_is_refused_with_413(servers: Servers) -> None:
    oversize = b'{"prompts": ["' + b"x" * MAX_BODY_BYTES + b'"]}'
    json_headers = {**AUTH, "Content-Type": "application/json"}
    declared = httpx.post(servers.plain.url + "/score", content=oversize, headers=json_headers, timeout=10)
    assert declared.status_code == 413 and str(MAX_BODY_BYTES) in detail(declared)

    # A chunked body declares no length: the server must count what it actually receives.
    def chunks() -> Iterator[bytes]:
        for start in range(0, len(oversize), 16 * 1024):
            yield oversize[start : start + 16 * 1024]

    streamed = httpx.post(servers.plain.url + "/score", content=chunks(), headers=json_headers, timeout=10)
    assert "content-length" not in streamed.request.headers
    assert streamed.status_code == 413 and str(MAX_BODY_BYTES) in detail(streamed)

    # A declared 10 GB body is refused before any of it is awaited: the answer comes at once.
    host, port = servers.plain.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as connection:
        connection.sendall(
            f"POST /score HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {10**10}\r\n\r\n".encode()
        )
        assert connection.recv(4096).startswith(b"HTTP/1.1 413")
    assert_still_serving(servers.plain)


def test_broken_and_foreign_images_are_refused_with_a_message(servers: Servers) -> None:
    gif = io.BytesIO()
    Image.new("RGB", (4, 4)).save(gif, format="GIF")
    valid = encode_image(sample_images(1)[0])
    cases = [
        ("!!! not base64 !!!", "not valid base64"),
        (valid[:12] + "*" + valid[12:], "not valid base64"),  # a stray character is refused, not skipped
        (b64(b"hello, not an image"), "not a PNG or JPEG"),
        (b64(gif.getvalue()), "not a PNG or JPEG"),
    ]
    for encoded, message in cases:
        response = post_score(servers.plain.url, {"prompts": ["a"], "images": [encoded]})
        assert response.status_code == 422, response.text
        assert message in detail(response) and "images[0]" in detail(response)
    assert_still_serving(servers.plain)


def peak_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc status")


def test_decompression_bombs_are_refused_from_the_header(servers: Servers) -> None:
    # 30000 x 30000 (2.7 GB as RGB) claimed by a 100-byte file, and a real 5000 x 5000 one-bit
    # image (75 MB as RGB, 3 kB as PNG): one trips PIL's own guard, the other the server's limit.
    one_bit = io.BytesIO()
    Image.new("1", (5000, 5000)).save(one_bit, format="PNG")
    assert len(one_bit.getvalue()) < 100_000
    pid = servers.plain.process.pid
    if not Path(f"/proc/{pid}/status").exists():
        pytest.skip("needs /proc to read the server's peak memory")
    peak_before = peak_rss_bytes(pid)
    for png, size_text in ((png_declaring_size(30000, 30000), "900000000 pixels"), (one_bit.getvalue(), "5000x5000")):
        response = post_score(servers.plain.url, {"prompts": ["a"], "images": [b64(png)]})
        assert response.status_code == 413, response.text
        assert size_text in detail(response) and str(4096 * 4096) in detail(response)
    # Decoding the 5000 x 5000 image alone would add 25 MB (mode "1") plus 75 MB (RGB).
    assert peak_rss_bytes(pid) - peak_before < 20 * 1024 * 1024
    assert_still_serving(servers.plain)


def test_malformed_json_wrong_types_and_length_mismatches(servers: Servers) -> None:
    url = servers.plain.url
    json_headers = {**AUTH, "Content-Type": "application/json"}
    response = httpx.post(url + "/score", content=b'{"prompts": [', headers=json_headers, timeout=10)
    assert response.status_code == 400 and "not valid JSON" in detail(response)

    images = sample_images(2)
    other_size = sample_images(1, size=16)
    cases = [
        ({"prompts": "one prompt", "images": score_body(images)["images"]}, 422, "prompts"),
        ({"prompts": ["a", "b"], "images": [1, 2]}, 422, "images"),
        ({**score_body(images), "image": []}, 422, "image"),  # an unknown (misspelt) field
        ({**score_body(images), "prompts": ["a", "b", "c"]}, 422, "length mismatch: 2 images for 3 prompts"),
        (score_body(images, instructions=["only one"]), 422, "length mismatch: 1 instructions for 2 prompts"),
        (score_body(images, metadata=[{}, {}, {}]), 422, "length mismatch: 3 metadata for 2 prompts"),
        (score_body(images, source_images=[encode_image(images[0])]), 422, "length mismatch: 1 source_images"),
        ({"prompts": [], "images": []}, 422, "empty batch"),
        ({"prompts": ["a", "b"], "images": [encode_image(images[0]), encode_image(other_size[0])]}, 422, "same size"),
        (score_body(sample_images(MAX_IMAGES + 1, size=8)), 413, f"limit of {MAX_IMAGES} per request"),
    ]
    for body, status, message in cases:
        response = post_score(url, body)
        assert response.status_code == status, (message, response.text)
        assert message in detail(response), (message, detail(response))
    assert_still_serving(servers.plain)


def test_non_loopback_host_without_token_refuses_to_start() -> None:
    env = {key: value for key, value in os.environ.items() if key != TOKEN_ENV}
    env["PYTHONPATH"] = str(ROOT)
    result = subprocess.run(
        [sys.executable, "-m", "rewards.serve", "--reward", "jpeg_compressibility",
         "--host", "0.0.0.0", "--port", str(free_port())],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=30,
    )
    assert result.returncode != 0
    assert "non-loopback" in result.stderr and TOKEN_ENV in result.stderr
    assert "Uvicorn running" not in result.stdout + result.stderr


def test_unknown_reward_name_lists_the_known_ones() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "rewards.serve", "--reward", "no_such_reward", "--port", str(free_port())],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=30,
    )
    assert result.returncode != 0
    assert "no_such_reward" in result.stderr and "jpeg_compressibility" in result.stderr


# ---------------------------------------------------------------- the client


# Variables of the tests' own, so that a TRUSTGRPO_REWARD_TOKEN in the user's shell plays no part.
CLIENT_TOKEN_ENV = "TRUSTGRPO_TEST_REWARD_TOKEN"
WRONG_TOKEN_ENV = "TRUSTGRPO_TEST_WRONG_TOKEN"


@pytest.fixture(autouse=True)
def _client_token_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CLIENT_TOKEN_ENV, TOKEN)
    monkeypatch.setenv(WRONG_TOKEN_ENV, "wrong")


def _client(urls: list[str] | str, **kwargs: object) -> RemoteReward:
    return RemoteReward(urls, token_env=CLIENT_TOKEN_ENV, **kwargs)


def test_client_goes_round_robin_over_servers(servers: Servers) -> None:
    batch = RewardBatch(images=sample_images(), prompts=["a", "b", "c"])
    single = JpegCompressibility()(batch).scores["jpeg_compressibility"]
    with _client([servers.plain.url, servers.doubled.url]) as remote:
        answers = [remote(batch).scores["jpeg_compressibility"] for _ in range(4)]
    for answer, factor in zip(answers, (1.0, 2.0, 1.0, 2.0)):
        np.testing.assert_allclose(answer, factor * single, rtol=1e-12)


def test_client_fails_over_then_raises_naming_a_dead_server(servers: Servers, tmp_path: Path) -> None:
    doomed = launch_server(tmp_path)
    try:
        wait_until_healthy(doomed)
        both = _client([doomed.url, servers.plain.url], retries=3, backoff_s=0.1, timeout_s=5)
        alone = _client(doomed.url, retries=3, backoff_s=0.1, timeout_s=5)
    finally:
        stop_server(doomed)
    batch = RewardBatch(images=sample_images(), prompts=["a", "b", "c"])
    expected = JpegCompressibility()(batch).scores["jpeg_compressibility"]
    with both:
        np.testing.assert_array_equal(both(batch).scores["jpeg_compressibility"], expected)  # first tries the dead one

    with alone:
        start = time.monotonic()
        with pytest.raises(RuntimeError, match="unreachable after 3 attempts") as raised:
            alone(batch)
        elapsed = time.monotonic() - start
    assert doomed.url in str(raised.value)
    assert 0.3 <= elapsed < 5.0  # backoff 0.1 s then 0.2 s: bounded, not hammering

    with pytest.raises(RuntimeError) as unreachable:
        _client([doomed.url, "http://127.0.0.1:1"], retries=2, backoff_s=0.01, timeout_s=2)
    assert doomed.url in str(unreachable.value) and "http://127.0.0.1:1" in str(unreachable.value)
    assert "after 4 attempts" in str(unreachable.value)


def test_client_raises_4xx_at_once_with_the_server_message(servers: Servers) -> None:
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="HTTP 401") as raised:
        RemoteReward(servers.plain.url, token_env=WRONG_TOKEN_ENV, retries=5, backoff_s=2.0)
    assert time.monotonic() - start < 1.5  # a retry would have slept 2 s first
    assert servers.plain.url in str(raised.value) and "Bearer" in str(raised.value)

    with _client(servers.plain.url, retries=5, backoff_s=2.0) as remote:
        too_many = RewardBatch(images=sample_images(MAX_IMAGES + 1, size=8), prompts=["p"] * (MAX_IMAGES + 1))
        start = time.monotonic()
        with pytest.raises(RuntimeError, match="HTTP 413.*--max-images"):
            remote(too_many)
        assert time.monotonic() - start < 1.5


# ---------------------------------------------------------------- a scripted worker served in-process


@dataclass
class ScriptedWorker:
    """Prompt "explode" raises; prompt "unparseable" gives a missing (NaN) quality score;
    prompt "slow" takes 0.4 s. Records the batches it saw and how many calls overlapped."""

    components: tuple[str, ...] = ("quality", "alignment")
    batches: list[RewardBatch] = field(default_factory=list)
    active: int = 0
    most_active: int = 0

    def __call__(self, batch: RewardBatch) -> RewardOutput:
        self.active += 1
        self.most_active = max(self.most_active, self.active)
        try:
            self.batches.append(batch)
            if "explode" in batch.prompts:
                raise RuntimeError("judge crashed on purpose")
            time.sleep(0.4 if "slow" in batch.prompts else 0.02)
            quality = np.array([math.nan if p == "unparseable" else len(p) for p in batch.prompts], dtype=np.float64)
            return RewardOutput(
                scores={"quality": quality, "alignment": np.ones(len(batch))},
                uncertainty={"quality": np.full(len(batch), 0.5)},
                extras={"parsed_fraction": float(np.isfinite(quality).mean()), "undefined": math.nan},
                texts={"quality": [f"judged {p!r}" for p in batch.prompts]},
            )
        finally:
            self.active -= 1


@pytest.fixture(scope="module")
def scripted() -> Iterator[tuple[str, ScriptedWorker]]:
    worker = ScriptedWorker()
    app = create_app(
        worker, "scripted", max_body_bytes=MAX_BODY_BYTES, max_images=MAX_IMAGES, max_pixels=64 * 64, token=TOKEN,
    )
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "in-process reward server did not start"
    try:
        yield f"http://127.0.0.1:{port}", worker
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_null_scores_come_back_as_nan_and_editing_fields_arrive(scripted: tuple[str, ScriptedWorker]) -> None:
    url, worker = scripted
    images = sample_images(2)
    sources = [sample_images(1, size=16)[0], sample_images(3, size=8)[2]]  # editing sources may differ in size
    batch = RewardBatch(
        images=images, prompts=["unparseable", "fine"], source_images=sources,
        instructions=["make it red", "make it blue"], metadata=[{"group": 0}, {"group": 1, "tags": ["x"]}],
    )
    raw = post_score(url, score_body(images, prompts=["unparseable", "fine"]))
    assert raw.json()["scores"]["quality"] == [None, 4.0]

    with _client(url) as remote:
        assert remote.components == ("quality", "alignment") and remote.name == "scripted"
        output = remote(batch)
    assert math.isnan(output.scores["quality"][0]) and output.scores["quality"][1] == 4.0
    np.testing.assert_array_equal(output.scores["alignment"], [1.0, 1.0])
    np.testing.assert_array_equal(output.uncertainty["quality"], [0.5, 0.5])
    assert output.extras["parsed_fraction"] == 0.5 and math.isnan(output.extras["undefined"])
    assert output.texts == {"quality": ["judged 'unparseable'", "judged 'fine'"]}  # the judge's reasoning travels too

    seen = worker.batches[-1]
    np.testing.assert_array_equal(seen.images, images)
    assert [s.shape for s in seen.source_images] == [(16, 16, 3), (8, 8, 3)]
    for got, sent in zip(seen.source_images, sources):
        np.testing.assert_array_equal(got, sent)
    assert seen.instructions == batch.instructions and seen.metadata == batch.metadata


def test_worker_exception_is_a_500_and_the_server_keeps_serving(scripted: tuple[str, ScriptedWorker]) -> None:
    url, _ = scripted
    images = sample_images(1)
    response = post_score(url, score_body(images, prompts=["explode"]))
    assert response.status_code == 500
    assert "judge crashed on purpose" in detail(response) and "RuntimeError" in detail(response)
    assert post_score(url, score_body(images, prompts=["fine"])).json()["scores"]["quality"] == [4.0]

    with _client(url, retries=2, backoff_s=0.01) as remote:
        with pytest.raises(RuntimeError, match="after 2 attempts.*HTTP 500.*judge crashed on purpose"):
            remote(RewardBatch(images=images, prompts=["explode"]))


def test_worker_runs_off_the_event_loop_one_call_at_a_time(scripted: tuple[str, ScriptedWorker]) -> None:
    url, worker = scripted
    body = score_body(sample_images(1), prompts=["slow"])
    worker.most_active = 0
    responses: list[httpx.Response] = []
    callers = [threading.Thread(target=lambda: responses.append(post_score(url, body))) for _ in range(3)]
    for caller in callers:
        caller.start()
    time.sleep(0.1)  # the first slow call is now inside the worker
    start = time.monotonic()
    assert httpx.get(url + "/health", headers=AUTH, timeout=5).status_code == 200
    assert time.monotonic() - start < 0.3  # /health did not wait for the 0.4 s worker call
    for caller in callers:
        caller.join(timeout=10)
    assert [r.status_code for r in responses] == [200, 200, 200]
    assert worker.most_active == 1  # the lock kept the calls apart
