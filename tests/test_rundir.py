"""Runs that never lose or mix up a run_dir: one run at a time (a lock, stale after kill -9), no
new run over another run's checkpoints unless asked (and then nothing is deleted), resume that
refuses a changed layout, falls back from a broken checkpoint, survives a torn metrics line,
and never executes a pickle found in a checkpoint."""

from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT
from rl import rundir

# 2 groups x 2 samples, 2 steps, no evaluation: a CLI epoch takes a second or two after start-up.
QUICK = [
    "sample.num_groups=2", "sample.group_size=2", "sample.batch_size=2", "sample.num_steps=2", "train.batch_size=2",
    "train.num_minibatches=2", "data.eval_prompts=null", "eval.before_training=false", "log.image_every=0",
    "log.progress=false", "log.save_every=1",
]


def cli(tiny_sd3: Path, run_dir: Path, *overrides: str, timeout: int = 600) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "rl.train", "configs/tiny_cpu.yaml", f"model.pretrained={tiny_sd3}",
               "model.max_sequence_length=32", f"run_dir={run_dir}", *QUICK, *overrides]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def epochs_logged(run_dir: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------- the lock


def test_a_second_run_in_the_same_run_dir_is_refused(tmp_path):
    held = rundir.RunLock(tmp_path)
    with pytest.raises(rundir.RunDirError, match=f"in use by another run \\(pid {os.getpid()}"):
        rundir.RunLock(tmp_path)
    held.release()
    rundir.RunLock(tmp_path).release()  # free again once released


def test_a_lock_left_by_a_dead_process_is_taken_over_and_a_foreign_one_is_not(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / rundir.LOCK).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    rundir.RunLock(tmp_path).release()
    (tmp_path / rundir.LOCK).write_text(json.dumps({"pid": 1, "host": "another-host"}))
    with pytest.raises(rundir.RunDirError, match="another-host"):
        rundir.RunLock(tmp_path)


# ---------------------------------------------------------------- resume checks (no model)


def test_resume_refuses_keys_that_change_the_math_and_lists_them():
    before = {"num_epochs": 10, "sample": {"group_size": 8, "num_groups": 4}, "log": {"save_every": 5},
              "rewards": {"pick": {"urls": ["a"], "weight": 1.0}}, "train": {"beta": 0.0}}
    after = json.loads(json.dumps(before))
    after["num_epochs"], after["log"]["save_every"], after["rewards"]["pick"]["urls"] = 20, 1, ["b"]
    assert rundir.changed_keys(before, after) == []
    after["sample"]["group_size"], after["train"]["beta"], after["rewards"]["pick"]["weight"] = 16, 0.01, 0.5
    assert rundir.changed_keys(before, after) == ["rewards.pick.weight", "sample.group_size", "train.beta"]


def test_sweep_runs_get_their_own_run_dir(monkeypatch):
    monkeypatch.setenv("WANDB_RUN_ID", "abc123")
    assert rundir.resolve_run_dir("runs/mix/{wandb_run_id}") == "runs/mix/abc123"
    monkeypatch.delenv("WANDB_RUN_ID")
    with pytest.raises(rundir.RunDirError, match="WANDB_RUN_ID"):
        rundir.resolve_run_dir("runs/mix/{wandb_run_id}")


# ---------------------------------------------------------------- end to end


@pytest.mark.slow
def test_new_runs_never_clobber_an_earlier_run(tiny_sd3, tmp_path):
    """A second new run into a used run_dir stops naming the fix; with overwrite=true it runs and
    the earlier run's checkpoint and metrics move to run_dir/previous/, byte for byte."""
    run_dir = tmp_path / "run"
    assert cli(tiny_sd3, run_dir, "num_epochs=1").returncode == 0
    lora = run_dir / "checkpoints" / "epoch-000001" / "trainable" / "pytorch_lora_weights.safetensors"
    first = lora.read_bytes()
    again = cli(tiny_sd3, run_dir, "num_epochs=1")
    assert again.returncode == 2 and "holds another run's checkpoints" in again.stderr and "overwrite=true" in again.stderr
    assert lora.read_bytes() == first
    assert cli(tiny_sd3, run_dir, "num_epochs=1", "overwrite=true", "seed=1").returncode == 0
    (previous,) = (run_dir / "previous").iterdir()
    assert (previous / "checkpoints" / "epoch-000001" / "trainable" / "pytorch_lora_weights.safetensors").read_bytes() == first
    assert epochs_logged(previous) == [1] and epochs_logged(run_dir) == [1]
    assert lora.read_bytes() != first


@pytest.mark.slow
def test_resume_refuses_a_changed_group_size_and_continues_on_more_epochs(tiny_sd3, tmp_path):
    run_dir = tmp_path / "run"
    assert cli(tiny_sd3, run_dir, "num_epochs=1").returncode == 0
    refused = cli(tiny_sd3, run_dir, "num_epochs=2", f"resume={run_dir}", "sample.group_size=4")
    assert refused.returncode == 2 and "sample.group_size" in refused.stderr, refused.stderr[-2000:]
    # A line torn by a kill while it was written does not block resume.
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "reward/me')
    resumed = cli(tiny_sd3, run_dir, "num_epochs=2", f"resume={run_dir}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert epochs_logged(run_dir) == [1, 2]


@pytest.mark.slow
def test_resume_passes_over_a_corrupt_newest_checkpoint(tiny_sd3, tmp_path):
    run_dir = tmp_path / "run"
    assert cli(tiny_sd3, run_dir, "num_epochs=2").returncode == 0
    newest = run_dir / "checkpoints" / "epoch-000002" / "trainable" / "pytorch_lora_weights.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])  # truncated, as by a full disk
    resumed = cli(tiny_sd3, run_dir, "num_epochs=3", f"resume={run_dir}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "broken checkpoint" in resumed.stdout and "epoch-000002" in resumed.stdout
    assert "resumed" in resumed.stdout and "after epoch 1" in resumed.stdout
    assert epochs_logged(run_dir) == [1, 2, 3]


class _Marker:
    """Unpickling this creates a file: evidence that code in a checkpoint ran."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


@pytest.mark.slow
def test_a_crafted_pickle_in_a_checkpoint_is_never_run(tiny_sd3, tmp_path):
    run_dir = tmp_path / "run"
    marker = tmp_path / "pwned"
    assert cli(tiny_sd3, run_dir, "num_epochs=1").returncode == 0
    checkpoint = run_dir / "checkpoints" / "epoch-000001"
    # A custom-object file accelerate would unpickle for a registered object, and a file resume
    # does read (an RNG state), each replaced by a crafted pickle: refused, never run.
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl"):
        planted = checkpoint / name
        original = planted.read_bytes() if planted.exists() else None
        planted.write_bytes(pickle.dumps(_Marker(str(marker))))
        refused = cli(tiny_sd3, run_dir, "num_epochs=2", f"resume={run_dir}")
        assert not marker.exists(), name
        assert refused.returncode == 2 and "refused unread" in refused.stderr, refused.stderr[-2000:]
        planted.unlink() if original is None else planted.write_bytes(original)
    assert cli(tiny_sd3, run_dir, "num_epochs=2", f"resume={run_dir}").returncode == 0


@pytest.mark.slow
def test_kill_9_mid_run_then_resume(tiny_sd3, tmp_path):
    """A second run into the run_dir of a running one stops at once; kill -9 of the first after
    its second checkpoint leaves a stale lock, nothing half-written is used, and resume finishes."""
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "rl.train", "configs/tiny_cpu.yaml", f"model.pretrained={tiny_sd3}",
               "model.max_sequence_length=32", f"run_dir={run_dir}", *QUICK, "num_epochs=50"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (run_dir / "checkpoints" / "epoch-000002").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    second = cli(tiny_sd3, run_dir, "num_epochs=1", "overwrite=true")  # while the first still runs
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert second.returncode == 2 and "in use by another run" in second.stderr, second.stderr[-2000:]
    assert (run_dir / rundir.LOCK).exists(), "the killed run should have left its lock"
    last = int((run_dir / "checkpoints" / "latest").read_text().strip().split("-")[1])
    resumed = cli(tiny_sd3, run_dir, f"num_epochs={last + 2}", f"resume={run_dir}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert epochs_logged(run_dir) == list(range(1, last + 3))
    assert not (run_dir / rundir.LOCK).exists()
