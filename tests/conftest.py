"""Shared fixtures: a tiny SD3 pipeline built once per session and saved locally, so every test
loads it through the same from_pretrained path a user takes with a real checkpoint."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory) -> Path:
    from models.tiny import ensure_tiny_sd3

    return ensure_tiny_sd3(tmp_path_factory.mktemp("models") / "tiny-sd3", text_max_length=32)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(args: list[str], *, env: dict | None = None, launcher: list[str] | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `python -m rl.train ARGS` (or under an accelerate launcher) from the repo root."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    command = (launcher or [sys.executable]) + ["-m", "rl.train", *args]
    result = subprocess.run(command, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}")
    return result


def accelerate_launcher(config_file: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / config_file), "--main_process_port", str(free_port())]
