"""Training with a reward component behind a real reward server on loopback."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import pytest

from conftest import ROOT, run_cli
from test_reward_server import TOKEN, launch_server, stop_server, wait_until_healthy
from test_train import FAST, read_metrics, tiny_overrides



@pytest.mark.slow
def test_remote_component_scores_like_the_in_process_one(tiny_sd3, tmp_path, monkeypatch):
    """Pointing a component at a server (`urls`) gives the same rewards as running it in process."""
    monkeypatch.setenv("TRUSTGRPO_REWARD_TOKEN", TOKEN)
    server = launch_server(tmp_path, token=TOKEN)
    try:
        wait_until_healthy(server)
        local, remote = tmp_path / "local", tmp_path / "remote"
        common = ["configs/tiny_cpu.yaml", *FAST, "num_epochs=1", "eval.before_training=false", "log.save_samples=true"]
        run_cli(common + tiny_overrides(tiny_sd3, local))
        run_cli(common + tiny_overrides(tiny_sd3, remote) + [f"rewards.jpeg_compressibility.urls=[{server.url}]"])
    finally:
        stop_server(server)
    a = [json.loads(line) for line in (local / "samples" / "epoch_00001.jsonl").read_text().splitlines()]
    b = [json.loads(line) for line in (remote / "samples" / "epoch_00001.jsonl").read_text().splitlines()]
    assert [row["reward"] for row in a] == [row["reward"] for row in b]
    assert read_metrics(remote)[-1]["time/reward/jpeg_compressibility_s"] > 0


@pytest.mark.slow
def test_killed_reward_server_stops_the_run_naming_it(tiny_sd3, tmp_path):
    """The server dies after epoch 1: the run fails after bounded retries with the endpoint in
    the message, and no zero reward is ever logged for that component."""
    server = launch_server(tmp_path, token=None)
    run_dir = tmp_path / "run"
    try:
        wait_until_healthy(server)
        args = ["configs/tiny_cpu.yaml", *FAST, "num_epochs=5", "eval.before_training=false"] + tiny_overrides(tiny_sd3, run_dir) + [
            f"rewards.jpeg_compressibility.urls=[{server.url}]", "rewards.jpeg_compressibility.retries=2",
            "rewards.jpeg_compressibility.timeout_s=5",
        ]
        env = {k: v for k, v in os.environ.items() if k != "TRUSTGRPO_REWARD_TOKEN"}
        env.update({"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
        trainer = subprocess.Popen([sys.executable, "-m", "rl.train", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        metrics_file = run_dir / "metrics.jsonl"
        deadline = time.monotonic() + 300
        while not (metrics_file.exists() and metrics_file.read_text().strip()) and time.monotonic() < deadline and trainer.poll() is None:
            time.sleep(0.05)
        stop_server(server)
        output, _ = trainer.communicate(timeout=300)
    finally:
        stop_server(server)
    assert trainer.returncode != 0, output[-3000:]
    assert server.url in output and "unreachable" in output, output[-3000:]
    logged = read_metrics(run_dir)
    assert logged and logged[-1]["epoch"] < 5
    for row in logged:
        value = row["reward/jpeg_compressibility/mean"]
        assert math.isfinite(value) and value != 0.0
