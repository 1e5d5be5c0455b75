"""Non-finite values never reach the weights: an infinite reward is missing like NaN, a non-finite
loss or gradient skips its optimizer step (counted), too many in a row stop the run, and a step
that makes the weights non-finite stops it before anything is saved."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT
from test_train_schedule import make_trainer, run_metrics

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


class InfiniteOnePerBatch:
    """JPEG compressibility, except that the first sample of every batch scores +inf."""

    def __init__(self):
        from rewards.jpeg import JpegCompressibility

        self.jpeg = JpegCompressibility()
        self.components = self.jpeg.components

    def __call__(self, batch):
        out = self.jpeg(batch)
        out.scores[self.components[0]][0] = math.inf
        return out


def finite_lora(trainer) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in trainer.policy.trainable_state_dict().values())


def test_an_infinite_reward_is_missing_and_the_weights_stay_finite(tiny_sd3, tmp_path, monkeypatch):
    import rewards

    monkeypatch.setitem(rewards.WORKERS, "jpeg_compressibility", "test_nonfinite:InfiniteOnePerBatch")
    trainer = make_trainer(tiny_sd3, tmp_path, "num_epochs=2", "log.save_every=1")
    metrics = run_metrics(trainer)
    for m in metrics:  # 4 samples in batches of 2: two infinite scores per epoch
        assert m["reward/jpeg_compressibility/missing"] == 2
        assert math.isfinite(m["reward/mean"]) and m["train/nonfinite_skipped_steps"] == 0
    assert finite_lora(trainer)
    saved = load_file(tmp_path / "checkpoints" / "epoch-000002" / "trainable" / "pytorch_lora_weights.safetensors")
    assert all(bool(torch.isfinite(v).all()) for v in saved.values())


def test_a_non_finite_loss_skips_its_step_and_the_run_goes_on(tiny_sd3, tmp_path, monkeypatch):
    """The first optimizer step's loss is NaN: that step is skipped (weights and Adam untouched),
    counted, and the later steps train as usual."""
    import rl.train

    calls = []
    real_loss = rl.train.grpo_step_loss

    def nan_first(*args, **kwargs):
        loss, out = real_loss(*args, **kwargs)
        calls.append(1)
        return (loss * math.nan if len(calls) == 1 else loss), out

    monkeypatch.setattr(rl.train, "grpo_step_loss", nan_first)
    trainer = make_trainer(tiny_sd3, tmp_path, "num_epochs=1", "train.num_minibatches=2")
    before = {k: v.clone() for k, v in trainer.policy.trainable_state_dict().items()}
    (m,) = run_metrics(trainer)
    assert m["train/nonfinite_skipped_steps"] == 1
    assert m["train/global_step"] == 1  # two minibatches, one step taken
    after = trainer.policy.trainable_state_dict()
    assert finite_lora(trainer)
    assert any(not torch.equal(after[k], before[k]) for k in before), "the finite step did not train"


def test_non_finite_steps_in_a_row_stop_the_run(tiny_sd3, tmp_path, monkeypatch):
    import rl.train

    real_loss = rl.train.grpo_step_loss
    monkeypatch.setattr(rl.train, "grpo_step_loss", lambda *a, **k: (lambda r: (r[0] * math.nan, r[1]))(real_loss(*a, **k)))
    trainer = make_trainer(tiny_sd3, tmp_path, "num_epochs=2", "train.num_minibatches=2", "train.max_nonfinite_steps=2")
    before = {k: v.clone() for k, v in trainer.policy.trainable_state_dict().items()}
    with pytest.raises(rl.train.NonFiniteError, match="2 optimizer steps in a row"):
        trainer.run()
    after = trainer.policy.trainable_state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert not (tmp_path / "checkpoints").exists()


def test_a_diverging_learning_rate_stops_with_finite_weights_on_disk(tiny_sd3, tmp_path):
    """train.learning_rate=1e8 from the command line: a non-zero exit naming the cause, and every
    checkpoint on disk finite."""
    run_dir = tmp_path / "run"
    command = [
        sys.executable, "-m", "rl.train", "configs/tiny_cpu.yaml", f"model.pretrained={tiny_sd3}", "model.max_sequence_length=32",
        f"run_dir={run_dir}", "train.learning_rate=1e8", "num_epochs=3", "log.save_every=1", "log.progress=false",
        "eval.before_training=false", "data.eval_prompts=null", "log.image_every=0",
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 3, result.stderr[-3000:]
    assert "stopped:" in result.stderr and "train.learning_rate" in result.stderr
    for path in run_dir.glob("checkpoints/epoch-*/trainable/*.safetensors"):
        assert all(bool(torch.isfinite(v).all()) for v in load_file(path).values()), path
    metrics = run_dir / "metrics.jsonl"
    for row in map(json.loads, metrics.read_text().splitlines() if metrics.exists() else []):
        assert np.isfinite(row["train/grad_norm"]), row


class FailsOnFirstCall:
    """A reward whose first call fails, as a reward server that has gone away; counts its calls."""

    calls = 0

    def __init__(self):
        self.components = ("broken",)

    def __call__(self, batch):
        type(self).calls += 1
        raise ConnectionError("reward backend unreachable")


def test_a_fatal_reward_error_stops_the_rollout_and_sends_nothing_more(tiny_sd3, tmp_path, monkeypatch):
    """The first batch's reward call fails: sampling stops at the next batch, queued calls are
    cancelled, and the error names the reward."""
    import rewards
    from rewards.runner import RewardError

    FailsOnFirstCall.calls = 0
    monkeypatch.setitem(rewards.WORKERS, "jpeg_compressibility", "test_nonfinite:FailsOnFirstCall")
    # 16 samples in batches of 2: 8 reward calls would be queued if nothing stopped them.
    trainer = make_trainer(tiny_sd3, tmp_path, "num_epochs=1", "sample.num_groups=4", "sample.group_size=4", "train.num_minibatches=1")
    with pytest.raises(RewardError, match="jpeg_compressibility"):
        trainer.run()
    assert FailsOnFirstCall.calls <= 2, FailsOnFirstCall.calls
