"""End-to-end training runs on a tiny SD3 pipeline: learning, on-policy first step, frozen base,
resume, rank independence and DeepSpeed ZeRO-2 on CPU ranks."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, accelerate_launcher, run_cli

LORA_FILE = "pytorch_lora_weights.safetensors"

# A small layout that still has groups spread over ranks, two minibatches and CFG.
FAST = [
    "sample.num_groups=2", "sample.group_size=4", "sample.batch_size=2", "sample.num_steps=4",
    "train.batch_size=2", "train.num_minibatches=2", "eval.num_steps=4", "eval.num_prompts=4",
    "eval.batch_size=2", "log.image_every=0", "log.progress=false", "sample.guidance_scale=4.5",
]


def tiny_overrides(tiny_sd3: Path, run_dir: Path) -> list[str]:
    return [f"model.pretrained={tiny_sd3}", "model.max_sequence_length=32", f"run_dir={run_dir}"]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def lora_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    checkpoint = (run_dir / "checkpoints" / "latest").read_text().strip()
    return load_file(run_dir / "checkpoints" / checkpoint / "trainable" / LORA_FILE)


@pytest.mark.slow
def test_tiny_cpu_trains_visibly(tmp_path):
    """configs/tiny_cpu.yaml: reward rises over 10 epochs, first inner step on-policy, LoRA moves,
    the base model does not, and the saved LoRA loads into a stock pipeline."""
    from diffusers import StableDiffusion3Pipeline

    from rl.config import load_config
    from rl.train import Trainer

    run_dir = tmp_path / "run"
    warm = ROOT / ".cache" / "models" / "tiny-sd3-warm"
    config = load_config(ROOT / "configs/tiny_cpu.yaml", [f"run_dir={run_dir}", f"model.pretrained={warm}", "log.progress=false"])
    trainer = Trainer(config)  # builds the warm-started tiny model into .cache/ on first use
    tiny_sd3 = Path(config.model.pretrained)
    initial_lora = {k: v.clone() for k, v in trainer.policy.trainable_state_dict().items()}
    trainer.run()

    metrics = [m for m in read_metrics(run_dir) if m["epoch"] >= 1]
    assert [m["epoch"] for m in metrics] == list(range(1, 11))
    rewards = [m["reward/mean"] for m in metrics]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3, rewards
    assert max(m["train/onpolicy_ratio_err"] for m in metrics) < 1e-5
    for key in ("reward/jpeg_compressibility/mean", "time/rollout_s", "time/reward_s", "time/train_s",
                "train/approx_kl", "train/clipfrac", "train/zero_std_ratio"):
        assert all(key in m and math.isfinite(m[key]) for m in metrics), key

    final_lora = trainer.policy.trainable_state_dict()
    assert max((final_lora[k] - initial_lora[k]).abs().max().item() for k in final_lora) > 1e-3

    base = StableDiffusion3Pipeline.from_pretrained(tiny_sd3).transformer.state_dict()
    trained = trainer.policy.network.state_dict()
    for name, weight in base.items():
        peft_name = name.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        current = trained[name] if name in trained else trained[peft_name]
        assert torch.equal(current, weight), f"frozen weight {name} changed"

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3)
    checkpoint = (run_dir / "checkpoints" / "latest").read_text().strip()
    pipe.load_lora_weights(run_dir / "checkpoints" / checkpoint / "trainable")
    assert (run_dir / "checkpoints" / checkpoint / "trainable" / LORA_FILE).exists()
    loaded = {k: v for k, v in pipe.transformer.state_dict().items() if "lora" in k}
    assert len(loaded) == len(final_lora)
    assert any(m["epoch"] == 0 and "eval/reward" in m for m in read_metrics(run_dir))


@pytest.mark.slow
def test_resume_matches_uninterrupted_run(tiny_sd3, tmp_path):
    """Stopping after epoch 2 and resuming to 4 gives the metrics of an uninterrupted 4-epoch run."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    common = ["configs/tiny_cpu.yaml", *FAST, "eval.every=0", "log.save_every=0"]
    run_cli(common + tiny_overrides(tiny_sd3, whole) + ["num_epochs=4"])
    run_cli(common + tiny_overrides(tiny_sd3, split) + ["num_epochs=2"])
    result = run_cli(common + tiny_overrides(tiny_sd3, split) + ["num_epochs=4", f"resume={split}"])

    reference = {m["epoch"]: m for m in read_metrics(whole)}
    resumed = {m["epoch"]: m for m in read_metrics(split)}
    assert sorted(resumed) == sorted(reference) == [0, 1, 2, 3, 4]
    for epoch in (3, 4):
        for key, value in reference[epoch].items():
            if key.startswith("time/"):
                continue
            assert resumed[epoch][key] == pytest.approx(value, rel=1e-6, abs=1e-9), (epoch, key)
    # The change since the evaluation before training survives the resume (its per-sample scores
    # are kept in the run directory), and the printed summary carries its standard error.
    change, se = reference[4]["eval/reward/change"], reference[4]["eval/reward/change_se"]
    assert change == pytest.approx(reference[4]["eval/reward"] - reference[0]["eval/reward"], abs=1e-9)
    assert math.isfinite(se) and se >= 0.0
    assert f"({change:+.4f} +- {se:.4f})" in result.stdout
    final_whole, final_split = lora_weights(whole), lora_weights(split)
    for key, value in final_whole.items():
        assert torch.allclose(final_split[key], value, atol=1e-7), key


def _samples(run_dir: Path, epoch: int) -> dict[int, dict]:
    rows = (run_dir / "samples" / f"epoch_{epoch:05d}.jsonl").read_text().splitlines()
    return {row["sample_id"]: row for row in map(json.loads, rows)}


@pytest.mark.slow
def test_two_ranks_match_one_rank(tiny_sd3, tmp_path):
    """The same config on 1 and on 2 gloo ranks: same epoch-1 rewards and advantages, LoRA
    weights within 1e-5 after the epoch."""
    one, two = tmp_path / "one", tmp_path / "two"
    common = ["configs/tiny_cpu.yaml", *FAST, "num_epochs=1", "eval.samples_per_prompt=3", "log.save_samples=true"]
    run_cli(common + tiny_overrides(tiny_sd3, one))
    result = run_cli(common + tiny_overrides(tiny_sd3, two), launcher=accelerate_launcher("launch/accelerate/cpu_2proc.yaml"))
    assert "over 2 rank(s)" in result.stdout

    a, b = _samples(one, 1), _samples(two, 1)
    assert sorted(a) == sorted(b) == list(range(8))
    for sample_id, row in a.items():
        other = b[sample_id]
        assert other["prompt"] == row["prompt"] and other["group_id"] == row["group_id"]
        assert other["reward"] == pytest.approx(row["reward"], abs=1e-12)
        assert other["advantage"] == pytest.approx(row["advantage"], abs=1e-6)
    assert len({row["reward"] for row in a.values()}) > 1
    # Evaluation samples are split over ranks; the per-sample scores kept for the paired change
    # come back in the same order, so the change and its error do not depend on the rank count.
    kept_one, kept_two = np.load(one / "eval_before.npz"), np.load(two / "eval_before.npz")
    assert sorted(kept_one) == sorted(kept_two) and len(kept_one["eval|reward"]) == 12
    for key in kept_one:
        np.testing.assert_allclose(kept_two[key], kept_one[key], atol=1e-9)
    last_one, last_two = read_metrics(one)[-1], read_metrics(two)[-1]
    assert last_two["eval/reward/change_se"] == pytest.approx(last_one["eval/reward/change_se"], abs=1e-9)
    # A new run in the same run_dir (overwrite=true) without an evaluation before training
    # reports no change: the kept scores belonged to the earlier run.
    run_cli([*common, "eval.before_training=false", "num_epochs=1", "overwrite=true"] + tiny_overrides(tiny_sd3, one))
    assert not (one / "eval_before.npz").exists()
    assert "eval/reward/change" not in read_metrics(one)[-1]
    lora_one, lora_two = lora_weights(one), lora_weights(two)
    assert set(lora_one) == set(lora_two)
    assert max((lora_one[k] - lora_two[k]).abs().max().item() for k in lora_one) < 1e-5


@pytest.mark.slow
def test_deepspeed_zero2_on_two_cpu_ranks(tiny_sd3, tmp_path):
    """cpu_zero2.yaml completes two epochs with a checkpoint; gradient clipping comes from the config."""
    run_dir = tmp_path / "zero2"
    env = {"DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": str(ROOT / ".cache" / "torch_extensions")}
    run_cli(
        ["configs/tiny_cpu.yaml", *FAST, "num_epochs=2", "eval.every=0"] + tiny_overrides(tiny_sd3, run_dir),
        launcher=accelerate_launcher("launch/accelerate/cpu_zero2.yaml"), env=env,
    )
    metrics = [m for m in read_metrics(run_dir) if m["epoch"] >= 1]
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert all(m["train/onpolicy_ratio_err"] < 1e-5 for m in metrics)
    assert all(math.isfinite(m["train/grad_norm"]) for m in metrics)
    assert (run_dir / "checkpoints" / "latest").exists()


@pytest.mark.slow
def test_wandb_offline_run_logs_metrics_and_images(tiny_sd3, tmp_path):
    """Real wandb in offline mode: the run, its metrics and image grids stay under run_dir."""
    run_dir = tmp_path / "wandb_run"
    run_cli(
        ["configs/tiny_cpu.yaml", *FAST, "num_epochs=2", "eval.every=1", "log.wandb_mode=offline", "log.image_every=1"]
        + tiny_overrides(tiny_sd3, run_dir),
        env={"WANDB_MODE": "offline"},
    )
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert runs, "no offline W&B run directly under run_dir/wandb"
    assert not (run_dir / "wandb" / "wandb").exists(), "W&B files nested twice (run_dir/wandb/wandb)"
    assert list(runs[0].glob("run-*.wandb"))
    assert list((runs[0] / "files" / "media" / "images").rglob("*.png")), "image grids were not logged to W&B"
    assert (run_dir / "images" / "rollout_images_epoch00001.png").exists()
    assert (run_dir / "images" / "eval_images_epoch00002.png").exists()
    assert [m["epoch"] for m in read_metrics(run_dir)] == [0, 1, 2]


def test_console_script_is_the_same_program(tmp_path):
    """`trustgrpo-train` is installed and rejects a bad key like `python -m rl.train` does."""
    import shutil
    import subprocess
    import sys

    script = shutil.which("trustgrpo-train") or str(Path(sys.executable).parent / "trustgrpo-train")
    result = subprocess.run([script, str(ROOT / "configs/tiny_cpu.yaml"), "train.learnin_rate=1"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "train.learnin_rate" in result.stderr


def test_policy_gradient_is_the_gradient_the_first_update_follows(tiny_sd3, tmp_path):
    """Trainer.policy_gradient (bench/grad_coherence.py) measures the gradient the trainer steps
    along: with one optimizer step per epoch, Adam's first step moves every LoRA weight against
    the sign of that gradient. It takes no step itself and depends on the noise it is given."""
    from rl.config import load_config
    from rl.train import Trainer

    overrides = FAST + tiny_overrides(tiny_sd3, tmp_path / "run") + [
        "train.num_minibatches=1", "train.batch_size=8", "train.learning_rate=1e-3", "train.weight_decay=0",
        "train.max_grad_norm=1e9", "train.adam_eps=1e-12", "log.wandb_mode=disabled", "eval.before_training=false",
    ]
    trainer = Trainer(load_config(ROOT / "configs/tiny_cpu.yaml", overrides))
    before = {k: v.clone() for k, v in trainer.policy.trainable_state_dict().items()}
    grads = trainer.policy_gradient(1, noise_epoch=1)
    again = trainer.policy_gradient(1, noise_epoch=1)
    other_noise = trainer.policy_gradient(1, noise_epoch=2)
    assert all(torch.equal(trainer.policy.trainable_state_dict()[k], before[k]) for k in before), "policy_gradient stepped"
    assert all(torch.equal(grads[n], again[n]) for n in grads)
    assert any(not torch.equal(grads[n], other_noise[n]) for n in grads)

    # Epoch 1 of the trainer itself, through its own phases: same prompts, same noise, one Adam step.
    drawn = trainer.draw(1)
    sampled = trainer.roll_out(1, drawn)
    trainer.update(1, sampled, trainer.advantages(1, drawn, sampled, trainer.score(sampled)), 0)
    after = trainer.policy.trainable_state_dict()
    checked = 0
    for name, grad in grads.items():
        key = name.replace(".default", "")
        moved = after[key] - before[key]
        significant = grad.abs() > 1e-3 * grad.abs().max()
        if not significant.any():
            continue
        assert torch.equal(torch.sign(moved[significant]), -torch.sign(grad[significant])), name
        checked += int(significant.sum())
    assert checked > 100


def test_update_skips_samples_of_dropped_groups(tiny_sd3, tmp_path, monkeypatch):
    """Samples of dropped groups (zero advantage and weight) are not run through the network in
    the update, and leaving them out does not change the step taken. A forward batch with no
    trained sample still runs one row, so every rank makes the same backward calls."""
    import rl.train
    from rl.config import load_config
    from rl.train import Trainer

    overrides = FAST + tiny_overrides(tiny_sd3, tmp_path / "run") + [
        "train.num_minibatches=1", "train.batch_size=2", "log.wandb_mode=disabled", "eval.before_training=false",
    ]

    def one_update(trainer) -> tuple[dict[str, torch.Tensor], int, int]:
        from rl.train import Advantages

        drawn = trainer.draw(1)
        sampled = trainer.roll_out(1, drawn)
        adv = trainer.advantages(1, drawn, sampled, trainer.score(sampled))
        assert bool(adv.trained.all()), "the continuous reward should leave every group trained"
        # Drop group 1, as the trainer drops a group whose rewards are all equal.
        dropped = sampled.batch.group_ids == 1
        trained = adv.trained & ~dropped
        adv = Advantages(torch.where(dropped, 0.0, adv.advantages), trained, trained.clone())
        rows = []
        hook = trainer.policy.network.register_forward_pre_hook(
            lambda module, args, kwargs: rows.append(int(kwargs["hidden_states"].shape[0])), with_kwargs=True
        )
        trainer.update(1, sampled, adv, 0)
        hook.remove()
        per_batch = trained.view(-1, 2).sum(dim=1)  # trained samples in each forward batch of 2
        assert (per_batch == 0).any() and (per_batch == 1).any(), "the layout should cover both cases"
        expected = int(per_batch.clamp(min=1).sum())  # an empty forward batch runs one row
        return {k: v.clone() for k, v in trainer.policy.trainable_state_dict().items()}, sum(rows), expected

    skipped, rows_skipped, expected = one_update(Trainer(load_config(ROOT / "configs/tiny_cpu.yaml", overrides)))
    monkeypatch.setattr(rl.train, "_trained_rows", lambda trained, first, size: torch.arange(first, min(first + size, len(trained))))
    full, rows_full, _ = one_update(Trainer(load_config(ROOT / "configs/tiny_cpu.yaml", overrides)))
    assert rows_skipped * 8 == rows_full * expected
    for key in full:  # Adam's first step is about +-lr (1e-2) per weight; float order differs
        torch.testing.assert_close(skipped[key], full[key], rtol=1e-4, atol=1e-5)
    assert any(not torch.equal(full[key], torch.zeros_like(full[key])) for key in full if "lora_B" in key)


@pytest.mark.slow
def test_grad_coherence_bench_reports_per_target(tiny_sd3, tmp_path):
    """bench/grad_coherence.py: a cosine per LoRA target kind with a gradient, in [-1, 1]."""
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "bench/grad_coherence.py", "configs/tiny_cpu.yaml", "--batches", "3", *FAST,
         *tiny_overrides(tiny_sd3, tmp_path / "run")[:2], "eval.before_training=false"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["batches"] == 3 and -1.0 <= report["all"] <= 1.0
    kinds = report["per_kind"]
    assert "attn.to_q.lora_B" in kinds and all(-1.0 <= v <= 1.0 for v in kinds.values())
    assert not any("lora_A" in k for k in kinds), "LoRA A matrices have no gradient at initialisation"


def test_trained_rows_are_a_view_when_consecutive_and_an_index_otherwise():
    from rl.train import _trained_rows

    trained = torch.tensor([True, True, False, True, False, False, True, True])
    data = torch.arange(8) * 10
    assert _trained_rows(trained, 0, 2) == slice(0, 2)
    assert _trained_rows(trained, 4, 2) == slice(4, 5)  # none trained: row `first` alone, weight 0
    assert _trained_rows(trained, 6, 4) == slice(6, 8)  # the last batch may be short
    rows = _trained_rows(trained, 0, 4)
    assert isinstance(rows, torch.Tensor) and data[rows].tolist() == [0, 10, 30]
    assert data[_trained_rows(trained, 2, 2)].tolist() == [30]
