"""train.objective nft and awm in the trainer: nft's rollouts sample with the old policy, which
follows the trained one by DiffusionNFT's decay after each epoch and which resume restores
exactly; awm's first pass is on-policy; 1 and 2 ranks take the same step."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import accelerate_launcher, run_cli
from test_train import FAST, lora_weights, read_metrics, tiny_overrides
from test_train_schedule import make_trainer, run_metrics

NFT = ["train.objective=nft", "train.beta=1e-4"]


def test_nft_trains_and_its_old_policy_follows_by_the_published_decay(tiny_sd3, tmp_path):
    """After one epoch of s optimizer steps the old weights are d * initial + (1 - d) * trained,
    d = min(0.001 s, 0.5), computed here from the weights before and after."""
    trainer = make_trainer(tiny_sd3, tmp_path, "num_epochs=1", "sample.num_steps=4", *NFT)
    params = trainer.policy.trainable_parameters()
    initial = [p.detach().clone() for p in params]
    assert all(torch.equal(o, p) for o, p in zip(trainer.old, initial))  # the old policy starts as the trained one
    (metrics,) = run_metrics(trainer)
    steps = metrics["train/global_step"]
    d = min(0.001 * steps, 0.5)
    assert steps == 2 and metrics["train/nft_old_decay"] == pytest.approx(d)
    moved = max((p.detach() - q).abs().max().item() for p, q in zip(params, initial))
    assert moved > 1e-6
    for old, before, after in zip(trainer.old, initial, params):
        torch.testing.assert_close(old, d * before + (1 - d) * after.detach(), rtol=1e-6, atol=1e-8)
    for key in ("train/policy_loss", "train/kl", "train/nft_loss_pos", "train/nft_loss_neg", "train/optimality"):
        assert math.isfinite(metrics[key]), key
    assert "train/onpolicy_ratio_err" not in metrics  # no probability ratio in NFT
    assert trainer.layout.trained_steps == 3  # 99 % of 4 timesteps


def test_nft_loss_scale_multiplies_the_policy_loss_and_its_gradient(tiny_sd3, tmp_path):
    """train.nft_loss_scale (FIRM's 0.5 against DiffusionNFT's 5.0) reaches the loss: with the KL
    off and one optimizer step from the same weights and samples, the logged policy loss and the
    gradient norm scale by the ratio of the two."""
    common = ("num_epochs=1", "sample.num_steps=4", "train.objective=nft", "train.beta=0", "train.num_minibatches=1", "train.max_grad_norm=1e6")
    published = run_metrics(make_trainer(tiny_sd3, tmp_path / "published", *common))[0]
    firm = run_metrics(make_trainer(tiny_sd3, tmp_path / "firm", *common, "train.nft_loss_scale=0.5"))[0]
    assert firm["train/policy_loss"] == pytest.approx(published["train/policy_loss"] / 10, rel=1e-4)
    assert firm["train/grad_norm"] == pytest.approx(published["train/grad_norm"] / 10, rel=1e-4)
    assert firm["train/nft_loss_pos"] == pytest.approx(published["train/nft_loss_pos"], rel=1e-5)  # the same samples


def test_nft_samples_with_the_old_policy(tiny_sd3, tmp_path):
    """A rollout of an nft trainer whose old weights differ from its trained ones draws the images
    the old weights draw, and leaves the trained weights as they were."""
    nft = make_trainer(tiny_sd3, tmp_path / "nft", "num_epochs=1", *NFT)
    grpo = make_trainer(tiny_sd3, tmp_path / "grpo", "num_epochs=1")
    g = torch.Generator().manual_seed(0)
    for old in nft.old:
        old.add_(0.5 * torch.randn(old.shape, generator=g))
    trained = [p.detach().clone() for p in nft.policy.trainable_parameters()]
    with torch.no_grad():
        for p, old in zip(grpo.policy.trainable_parameters(), nft.old):
            p.copy_(old)
    images = nft.roll_out(1, nft.draw(1)).batch.images
    expected = grpo.roll_out(1, grpo.draw(1)).batch.images
    assert torch.equal(images, expected)
    assert all(torch.equal(p, q) for p, q in zip(nft.policy.trainable_parameters(), trained))
    plain = make_trainer(tiny_sd3, tmp_path / "plain", "num_epochs=1").roll_out(1, grpo.draw(1)).batch.images
    assert not torch.equal(images, plain)  # the perturbation shows: the old weights were used


def test_nft_resume_matches_an_uninterrupted_run_and_needs_the_old_policy(tiny_sd3, tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    common = ["configs/tiny_cpu.yaml", *FAST, *NFT, "eval.every=0", "log.save_every=1", "log.keep_checkpoints=3"]
    run_cli(common + tiny_overrides(tiny_sd3, whole) + ["num_epochs=3"])
    run_cli(common + tiny_overrides(tiny_sd3, split) + ["num_epochs=2"])
    assert (split / "checkpoints" / "epoch-000002" / "old_policy.safetensors").is_file()
    run_cli(common + tiny_overrides(tiny_sd3, split) + ["num_epochs=3", f"resume={split}"])
    reference = {m["epoch"]: m for m in read_metrics(whole)}
    resumed = {m["epoch"]: m for m in read_metrics(split)}
    for key, value in reference[3].items():
        if not key.startswith("time/"):
            assert resumed[3][key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    final_whole, final_split = lora_weights(whole), lora_weights(split)
    for key, value in final_whole.items():
        assert torch.allclose(final_split[key], value, atol=1e-7), key
    # A checkpoint without the old policy is not resumable: resume passes over it to the one before.
    (split / "checkpoints" / "epoch-000003" / "old_policy.safetensors").unlink()
    result = run_cli(common + tiny_overrides(tiny_sd3, split) + ["num_epochs=3", f"resume={split}"])
    assert "epoch-000003: missing old_policy.safetensors" in result.stdout


AWM = ["train.objective=awm", "train.beta=1e-3", "train.awm_steps=3"]


def test_awm_trains_on_policy_first_and_moves_the_weights(tiny_sd3, tmp_path):
    """Two minibatches per epoch: the sampling policy's likelihoods are kept before the first step,
    so the first pass's ratio is 1 and the second sees the moved weights."""
    trainer = make_trainer(tiny_sd3, tmp_path, "num_epochs=1", "sample.num_steps=4", *AWM)
    initial = [p.detach().clone() for p in trainer.policy.trainable_parameters()]
    (metrics,) = run_metrics(trainer)
    assert trainer.layout.trained_steps == 3 and metrics["train/global_step"] == 2
    assert metrics["train/onpolicy_ratio_err"] < 1e-5
    for key in ("train/policy_loss", "train/kl", "train/awm_mse", "train/clipfrac"):
        assert math.isfinite(metrics[key]), key
    params = trainer.policy.trainable_parameters()
    moved = max((p.detach() - q).abs().max().item() for p, q in zip(params, initial))
    assert moved > 1e-6
    # AWM's EMA regulariser (weight 1 by default): its copy follows by d = min(0.001 s, 0.3).
    d = min(0.001 * metrics["train/global_step"], 0.3)
    assert metrics["train/awm_ema_decay"] == pytest.approx(d)
    for ema, before, after in zip(trainer.old, initial, params):
        torch.testing.assert_close(ema, d * before + (1 - d) * after.detach(), rtol=1e-6, atol=1e-8)


def test_awm_samples_with_the_trained_weights_and_its_ema_pulls_back(tiny_sd3, tmp_path):
    """AWM's rollouts use the trained weights, not its EMA copy; the EMA term's weight changes the
    step only when the EMA differs from the trained weights; weight 0 keeps no copy."""
    assert make_trainer(tiny_sd3, tmp_path / "off", "num_epochs=1", *AWM, "train.awm_ema_weight=0").old is None
    awm = make_trainer(tiny_sd3, tmp_path / "awm", "num_epochs=1", "sample.num_steps=4", *AWM)
    grpo = make_trainer(tiny_sd3, tmp_path / "grpo", "num_epochs=1", "sample.num_steps=4")
    g = torch.Generator().manual_seed(0)
    for ema in awm.old:
        ema.add_(0.5 * torch.randn(ema.shape, generator=g))
    assert torch.equal(awm.roll_out(1, awm.draw(1)).batch.images, grpo.roll_out(1, grpo.draw(1)).batch.images)
    # The same epoch with the perturbed EMA and without the EMA term: the regulariser shows in
    # train/kl and in the step it takes.
    plain = make_trainer(tiny_sd3, tmp_path / "plain", "num_epochs=1", "sample.num_steps=4", *AWM, "train.awm_ema_weight=0")
    (with_ema,) = run_metrics(awm)
    (without,) = run_metrics(plain)
    assert with_ema["train/kl"] > 10 * without["train/kl"]
    step = max((p - q).abs().max().item() for p, q in zip(awm.policy.trainable_parameters(), plain.policy.trainable_parameters()))
    assert step > 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("overrides, metric", [(NFT, "train/nft_loss_pos"), (AWM, "train/awm_mse")], ids=["nft", "awm"])
def test_forward_objectives_on_two_ranks_match_one_rank(tiny_sd3, tmp_path, overrides, metric):
    """Forward-process draws are seeded per sample, not per rank: 1 and 2 gloo ranks take the same step."""
    one, two = tmp_path / "one", tmp_path / "two"
    common = ["configs/tiny_cpu.yaml", *FAST, *overrides, "num_epochs=1", "eval.every=0"]
    run_cli(common + tiny_overrides(tiny_sd3, one))
    run_cli(common + tiny_overrides(tiny_sd3, two), launcher=accelerate_launcher("launch/accelerate/cpu_2proc.yaml"))
    a, b = read_metrics(one)[-1], read_metrics(two)[-1]
    assert b[metric] == pytest.approx(a[metric], rel=1e-5)
    lora_one, lora_two = lora_weights(one), lora_weights(two)
    assert max((lora_one[k] - lora_two[k]).abs().max().item() for k in lora_one) < 1e-5


def test_forward_objectives_may_sample_with_ode_and_grpo_may_not(tiny_sd3, tmp_path):
    """sde.window none: the ODE sampler for nft and awm (each group explores through its
    samples' initial noise), refused for grpo, which trains on the SDE steps."""
    from rl.config import ConfigError

    for name, overrides in (("nft", NFT), ("awm", AWM)):
        (metrics,) = run_metrics(make_trainer(tiny_sd3, tmp_path / name, "num_epochs=1", "sample.num_steps=4", *overrides, "sde.window=none"))
        assert metrics["train/global_step"] == 2 and math.isfinite(metrics["train/policy_loss"])
    with pytest.raises(ConfigError, match="sde.window"):
        make_trainer(tiny_sd3, tmp_path / "grpo", "sde.window=none")
