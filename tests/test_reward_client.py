"""RemoteReward against servers that misbehave, over real HTTP on 127.0.0.1.

A reward server here is a plain http.server in a thread whose /score answer is scripted per test:
a JSON body written by hand (Infinity, strings, booleans, where numbers belong), an answer that
trickles a byte at a time forever (in the body, or already in the status line and headers), or
no answer at all. tests/test_reward_server.py covers the well-behaved project server.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from rewards.base import RewardBatch
from rewards.client import RemoteReward
from rewards.config import MixConfig, RewardSpec
from rewards.runner import RewardError, RewardRunner

COMPONENTS = ["quality", "alignment"]
TRICKLE_GAP_S = 0.05  # far below every timeout used here: a per-read timeout never fires
TRICKLE_FOR_S = 8.0  # a trickle ends here, so that a client without a total deadline fails its test, not hangs


class ScriptedServer(ThreadingHTTPServer):
    daemon_threads = True
    plan: tuple[str, bytes] = ("json", b"{}")  # (mode, JSON body for mode "json")
    stop = threading.Event()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: ScriptedServer

    def log_message(self, *args: object) -> None:  # quiet: pytest shows what matters
        pass

    def do_GET(self) -> None:
        self._answer(json.dumps({"reward": "scripted", "components": COMPONENTS}).encode())

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        mode, body = self.server.plan
        try:
            if mode == "json":
                self._answer(body)
            elif mode == "trickle_body":
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(10**6))
                self.end_headers()
                self.wfile.flush()
                self._trickle(b" ")
            elif mode == "trickle_head":
                self._trickle(b"HTTP/1.1 200 OK\r\nX-Padding: ", then=b"a")
            elif mode == "silent":
                self.server.stop.wait(TRICKLE_FOR_S)
        except OSError:  # the client gave up and closed the connection
            self.close_connection = True

    def _answer(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _trickle(self, first: bytes, then: bytes | None = None) -> None:
        """`first` one byte at a time, then `then` (or `first` again) forever, until TRICKLE_FOR_S."""
        end = time.monotonic() + TRICKLE_FOR_S
        pending = list(first)
        while time.monotonic() < end and not self.server.stop.is_set():
            byte = pending.pop(0) if pending else (then or first)[0]
            self.wfile.write(bytes([byte]))
            self.wfile.flush()
            time.sleep(TRICKLE_GAP_S)
        self.close_connection = True


@pytest.fixture(scope="module")
def server() -> Iterator[ScriptedServer]:
    httpd = ScriptedServer(("127.0.0.1", 0), Handler)
    httpd.stop = threading.Event()
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd
    finally:
        httpd.stop.set()
        httpd.shutdown()
        httpd.server_close()


def url_of(server: ScriptedServer) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"


def answer(server: ScriptedServer, text: str) -> None:
    server.plan = ("json", text.encode())


def batch_of(count: int) -> RewardBatch:
    return RewardBatch(images=np.zeros((count, 4, 4, 3), dtype=np.uint8), prompts=[f"p{i}" for i in range(count)])


# ---------------------------------------------------------------- the total deadline


@pytest.mark.parametrize("mode", ["trickle_body", "trickle_head"])
def test_timeout_bounds_the_whole_request_not_each_read(server: ScriptedServer, mode: str) -> None:
    server.plan = (mode, b"")
    with RemoteReward(url_of(server), timeout_s=1.0, retries=1) as remote:
        start = time.monotonic()
        with pytest.raises(RuntimeError, match=r"unreachable after 1 attempts.*ReadTimeout.*timeout_s=1 s") as raised:
            remote(batch_of(2))
        elapsed = time.monotonic() - start
    assert url_of(server) in str(raised.value)
    assert 0.9 <= elapsed < 2.5, f"gave up after {elapsed:.2f} s; timeout_s was 1"


def test_each_attempt_gets_the_whole_timeout_again(server: ScriptedServer) -> None:
    server.plan = ("trickle_body", b"")
    with RemoteReward(url_of(server), timeout_s=0.5, retries=2, backoff_s=0.1) as remote:
        start = time.monotonic()
        with pytest.raises(RuntimeError, match="unreachable after 2 attempts"):
            remote(batch_of(1))
        elapsed = time.monotonic() - start
    assert 1.05 <= elapsed < 2.5  # 0.5 s, backoff 0.1 s, 0.5 s


def test_a_slow_but_steady_answer_within_the_timeout_arrives(server: ScriptedServer) -> None:
    answer(server, json.dumps({"scores": {"quality": [1.5], "alignment": [2.0]}}))
    with RemoteReward(url_of(server), timeout_s=2.0, retries=1) as remote:
        for _ in range(3):  # the pooled connection is reused with a fresh deadline each time
            np.testing.assert_array_equal(remote(batch_of(1)).scores["quality"], [1.5])


# ---------------------------------------------------------------- what counts as a score


@pytest.mark.parametrize(
    ("body", "where", "shown"),
    [
        ('{"scores": {"quality": ["3", 1.0], "alignment": [1, 1]}}', r"scores\['quality'\]\[0\]", "'3' (str)"),
        ('{"scores": {"quality": [1.0, 2.0], "alignment": [true, 1]}}', r"scores\['alignment'\]\[0\]", "True (bool)"),
        ('{"scores": {"quality": [1.0, [2.0]], "alignment": [1, 1]}}', r"scores\['quality'\]\[1\]", "[2.0] (list)"),
        ('{"scores": {"quality": [1, 2], "alignment": [1, 1]}, "uncertainty": {"quality": ["0.5", 0.1]}}',
         r"uncertainty\['quality'\]\[0\]", "'0.5' (str)"),
        ('{"scores": {"quality": [1, 2], "alignment": [1, 1]}, "extras": {"parse_failures": {"n": 1}}}',
         r"extras\['parse_failures'\]", "{'n': 1} (dict)"),
        ('{"scores": {"quality": [1, 2], "alignment": [1, 1]}, "extras": {"agreement": false}}',
         r"extras\['agreement'\]", "False (bool)"),
    ],
)
def test_values_that_are_not_numbers_are_an_error_naming_endpoint_and_component(
    server: ScriptedServer, body: str, where: str, shown: str
) -> None:
    answer(server, body)
    with RemoteReward(url_of(server), retries=1) as remote:
        with pytest.raises(RuntimeError, match=where) as raised:
            remote(batch_of(2))
    message = str(raised.value)
    assert url_of(server) in message and shown in message and "not a number" in message


def test_null_stays_missing(server: ScriptedServer) -> None:
    answer(server, '{"scores": {"quality": [null, 4], "alignment": [1, 2.5]}, "extras": {"agreement": null}}')
    with RemoteReward(url_of(server), retries=1) as remote:
        output = remote(batch_of(2))
    assert math.isnan(output.scores["quality"][0]) and output.scores["quality"][1] == 4.0
    np.testing.assert_array_equal(output.scores["alignment"], [1.0, 2.5])
    assert math.isnan(output.extras["agreement"])


def test_infinity_and_nan_tokens_become_missing_in_the_runner(server: ScriptedServer, caplog) -> None:
    # Python's json reads these non-standard tokens as floats; the runner must not train on them.
    answer(server, '{"scores": {"quality": [Infinity, 4, NaN], "alignment": [1, -Infinity, 2]},'
                   ' "uncertainty": {"quality": [0.5, Infinity, 0.1]}}')
    runner = RewardRunner({"judge": RewardSpec(worker="scripted", urls=[url_of(server)], retries=1)}, MixConfig())
    with runner, caplog.at_level(logging.WARNING, logger="rewards.runner"):
        scored = runner.score(batch_of(3))
    quality, alignment = scored.scores["judge/quality"], scored.scores["judge/alignment"]
    np.testing.assert_array_equal(np.isnan(quality), [True, False, True])
    np.testing.assert_array_equal(np.isnan(alignment), [False, True, False])
    assert quality[1] == 4.0 and not np.isinf(quality).any() and not np.isinf(alignment).any()
    np.testing.assert_array_equal(np.isnan(scored.uncertainty["judge/quality"]), [False, True, False])
    assert np.isnan(runner.trained_reward(scored.scores)).tolist() == [True, True, True]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "reward judge/quality: 2 of 3 scores missing (NaN, 1 of them infinite); they are not trained on" in warnings
    assert "reward judge/alignment: 1 of 3 scores missing (NaN, 1 of them infinite); they are not trained on" in warnings


# ---------------------------------------------------------------- stopping


def test_closing_the_runner_ends_a_remote_call_in_flight(server: ScriptedServer) -> None:
    server.plan = ("silent", b"")
    runner = RewardRunner({"judge": RewardSpec(worker="scripted", urls=[url_of(server)], timeout_s=6.0, retries=3)}, MixConfig())
    raised: list[Exception] = []

    def score() -> None:
        try:
            runner.score(batch_of(1))
        except Exception as err:  # handed to the test thread
            raised.append(err)

    scoring = threading.Thread(target=score, daemon=True)
    scoring.start()
    time.sleep(0.3)  # the request is now waiting for an answer
    start = time.monotonic()
    runner.close()
    scoring.join(timeout=10)
    assert time.monotonic() - start < 1.0, "close() did not end the call in flight"
    assert len(raised) == 1 and isinstance(raised[0], RewardError)
    assert "reward 'judge'" in str(raised[0]) and "closed" in str(raised[0]) and url_of(server) in str(raised[0])
