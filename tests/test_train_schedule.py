"""What happens per optimizer step in a training run on the tiny SD3: inner epochs, the
learning-rate schedule, the EMA and its use in evaluation. Each run is a few epochs of 4 samples
with 2 denoising steps, in this process."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import ROOT, perturb_lora

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

# 2 groups x 2 samples, 2 denoising steps (the first trained), no CFG, no evaluation unless asked.
QUICK = [
    "sample.num_groups=2", "sample.group_size=2", "sample.batch_size=2", "sample.num_steps=2",
    "train.batch_size=2", "train.num_minibatches=2", "train.inner_epochs=1", "data.eval_prompts=null",
    "eval.before_training=false", "log.image_every=0", "log.progress=false", "log.save_every=0",
]


def make_trainer(tiny_sd3: Path, run_dir: Path, *overrides: str):
    from rl.config import load_config
    from rl.train import Trainer

    base = [f"model.pretrained={tiny_sd3}", "model.max_sequence_length=32", f"run_dir={run_dir}"]
    return Trainer(load_config(ROOT / "configs/tiny_cpu.yaml", QUICK + base + list(overrides)))


def run_metrics(trainer) -> list[dict]:
    trainer.run()
    rows = (Path(trainer.config.run_dir) / "metrics.jsonl").read_text().splitlines()
    return [m for m in map(json.loads, rows) if m["epoch"] >= 1]


def test_inner_epochs_repeat_the_update_off_policy(tiny_sd3, tmp_path):
    """inner_epochs=2 with one minibatch: two optimizer steps per epoch. The first pass is
    on-policy (ratio 1); the second sees the weights the first moved (approx_kl > 0), which with
    a single pass and a single step could not happen."""
    metrics = run_metrics(make_trainer(tiny_sd3, tmp_path, "num_epochs=2", "train.inner_epochs=2", "train.num_minibatches=1"))
    assert [m["train/global_step"] for m in metrics] == [2, 4]  # epoch * inner_epochs * num_minibatches
    for m in metrics:
        assert m["train/onpolicy_ratio_err"] < 1e-5
        assert m["train/approx_kl"] > 1e-10, m["train/approx_kl"]


def test_learning_rate_follows_the_schedule_per_optimizer_step(tiny_sd3, tmp_path):
    """linear with 5 warm-up steps over 3 epochs x 2 inner epochs x 2 minibatches = 12 steps:
    lr(s) = lr * s / 5 while s < 5, then lr * (12 - s) / (12 - 5); logged after 4, 8, 12 steps.
    Two backward passes per step (train.batch_size=1), so stepping per pass would show."""
    lr, warmup, total = 1e-2, 5, 12
    metrics = run_metrics(make_trainer(
        tiny_sd3, tmp_path, "num_epochs=3", "train.inner_epochs=2", "train.batch_size=1", f"train.learning_rate={lr}",
        "train.lr_scheduler=linear", f"train.lr_warmup_steps={warmup}",
    ))
    assert [m["train/global_step"] for m in metrics] == [4, 8, 12]
    expected = [lr * 4 / warmup, lr * (total - 8) / (total - warmup), 0.0]
    assert [m["train/lr"] for m in metrics] == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_evaluation_samples_with_the_ema_weights(tiny_sd3, tmp_path):
    """The evaluation metric is what sampling with the EMA's weights gives, not the current
    weights', and the current weights are back afterwards."""
    from rl.train import reward_batch

    trainer = make_trainer(tiny_sd3, tmp_path, "data.eval_prompts=prompts/simple_eval.txt", "eval.num_prompts=2",
                           "eval.num_steps=2", "eval.batch_size=2")
    params = trainer.policy.trainable_parameters()
    raw = [p.detach().clone() for p in params]
    perturb_lora(trainer.policy.network, seed=1, scale=0.3)  # an EMA far from the current weights
    ema_weights = [p.detach().clone() for p in params]
    for shadow, weight in zip(trainer.ema.shadow_params, ema_weights):
        shadow.copy_(weight)
    with torch.no_grad():
        for p, weight in zip(params, raw):
            p.copy_(weight)

    with_ema = trainer.evaluator(1, reward_batch)["eval/reward"]
    assert all(torch.equal(p, weight) for p, weight in zip(params, raw)), "evaluation left the EMA weights in"
    trainer.evaluator.ema = None  # from here: evaluate whatever weights the policy holds
    with_raw = trainer.evaluator(1, reward_batch)["eval/reward"]
    with torch.no_grad():
        for p, weight in zip(params, ema_weights):
            p.copy_(weight)
    by_hand = trainer.evaluator(1, reward_batch)["eval/reward"]
    assert with_ema == by_hand
    assert with_ema != with_raw


def test_ema_updates_every_ema_every_optimizer_steps(tiny_sd3, tmp_path):
    """ema_every=2 over 4 optimizer steps: the EMA changes at steps 2 and 4 only."""
    trainer = make_trainer(tiny_sd3, tmp_path, "train.ema_every=2", "train.num_minibatches=4", "train.batch_size=1")
    states = []  # the EMA before each optimizer step, then after the last
    snapshot = lambda *_: states.append([s.clone() for s in trainer.ema.shadow_params])  # noqa: E731
    trainer.optimizer.optimizer.register_step_pre_hook(snapshot)
    drawn = trainer.draw(1)
    sampled = trainer.roll_out(1, drawn)
    global_step, _ = trainer.update(1, sampled, trainer.advantages(1, drawn, sampled, trainer.score(sampled)), 0)
    snapshot()
    assert global_step == 4 and len(states) == 5
    changed = [step for step in range(1, 5) if any(not torch.equal(a, b) for a, b in zip(states[step - 1], states[step]))]
    assert changed == [2, 4]


def test_grpo_guard_is_on_policy_first_and_scales_each_step_by_its_dt(tiny_sd3, tmp_path):
    """train.grpo_guard: the rollout keeps each trained step's mean, so the first pass's Guard
    ratio is 1 (on-policy). On-policy, the plain gradient is -A grad mean_d[eps / s grad mean]
    and Guard's is -A mean_d[eps grad mean] / dt: the same direction, s / dt times as long (the
    same rollouts and advantages: Guard does not change sampling). A second inner pass sees the
    moved weights."""
    from rl.sde import flow_sde_step

    one = ["num_epochs=1", "train.num_minibatches=1", "sample.num_steps=2", "sde.window=all", "train.beta=0"]
    plain = make_trainer(tiny_sd3, tmp_path / "plain", *one).policy_gradient(1, 1)
    trainer = make_trainer(tiny_sd3, tmp_path / "guard", *one, "train.grpo_guard=true")
    guard = trainer.policy_gradient(1, 1)
    sigmas = trainer.policy.sigmas(2, 64)
    zeros = torch.zeros(1, 4)
    s = float(flow_sde_step(zeros, zeros, sigmas[0], sigmas[1], noise_level=0.7, sigma_max=sigmas[1], prev_sample=zeros).std.flatten()[0])
    factor = s / float(sigmas[0] - sigmas[1])
    flat_plain = torch.cat([g.flatten() for g in plain.values()]).double()
    flat_guard = torch.cat([g.flatten() for g in guard.values()]).double()
    assert flat_plain.norm() > 0
    torch.testing.assert_close(flat_guard, factor * flat_plain, rtol=1e-3, atol=1e-6 * float(flat_guard.abs().max()))
    metrics = run_metrics(make_trainer(tiny_sd3, tmp_path / "twice", *one, "train.grpo_guard=true", "train.inner_epochs=2"))[0]
    assert metrics["train/onpolicy_ratio_err"] < 1e-5
    assert metrics["train/approx_kl"] > 1e-12 and math.isfinite(metrics["train/policy_loss"])


def test_velocity_kl_trains_grpo_and_latent_kl_is_refused_for_forward_objectives(tiny_sd3, tmp_path):
    """train.kl velocity: the same epoch's KL is measured on the guided velocities instead of the
    step means (it differs from the latent KL, and is 0 until the weights move: the first
    minibatch is at the reference); nft and awm have no step means and refuse train.kl latent."""
    from rl.config import ConfigError

    two = ["num_epochs=1", "train.num_minibatches=2", "sample.num_steps=4", "train.beta=0.5"]
    velocity = run_metrics(make_trainer(tiny_sd3, tmp_path / "velocity", *two, "train.kl=velocity"))[0]
    latent = run_metrics(make_trainer(tiny_sd3, tmp_path / "latent", *two))[0]
    assert velocity["train/kl"] > 0 and math.isfinite(velocity["train/policy_loss"])
    assert velocity["train/kl"] != pytest.approx(latent["train/kl"], rel=1e-3)
    for objective in ("nft", "awm"):
        with pytest.raises(ConfigError, match="train.kl"):
            make_trainer(tiny_sd3, tmp_path / objective, f"train.objective={objective}", "train.kl=latent")


def test_eval_noise_seed_draws_other_evaluation_noise(tiny_sd3, tmp_path):
    """eval.noise_seed unset evaluates with the run's seed; the same value gives the same
    per-sample scores, another value other images (other scores) from the same weights."""
    import numpy as np

    from rl.train import reward_batch

    def per_sample(name: str, *overrides: str) -> np.ndarray:
        trainer = make_trainer(tiny_sd3, tmp_path / name, "seed=3", "data.eval_prompts=prompts/simple_eval.txt", "eval.num_prompts=4",
                               "eval.num_steps=2", "eval.batch_size=2", *overrides)
        trainer.evaluator(0, reward_batch)
        return np.load(tmp_path / name / "eval_before.npz")["eval|reward"]

    default, same, other = per_sample("default"), per_sample("same", "eval.noise_seed=3"), per_sample("other", "eval.noise_seed=4")
    assert np.array_equal(default, same)
    assert not np.allclose(default, other)
