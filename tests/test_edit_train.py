"""Instruction editing through the same trainer: tiny Qwen-Image-Edit on the synthetic edit set."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import ROOT, accelerate_launcher, run_cli
from test_train import read_metrics

EDITS = ROOT / "configs" / "data" / "tiny_edits"
FAST = [
    "sample.num_groups=2", "sample.group_size=4", "sample.batch_size=2", "train.batch_size=2",
    "eval.num_prompts=2", "eval.batch_size=2", "log.progress=false", "log.image_every=0",
]


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory) -> Path:
    from models.fixtures.qwen_image_edit import ensure_tiny_qwen_image_edit

    return ensure_tiny_qwen_image_edit(tmp_path_factory.mktemp("models") / "tiny-qwen-image-edit")


def overrides(model: Path, run_dir: Path) -> list[str]:
    return [f"model.pretrained={model}", f"run_dir={run_dir}"]


def lora(run_dir: Path) -> dict[str, torch.Tensor]:
    name = (run_dir / "checkpoints" / "latest").read_text().strip()
    return load_file(run_dir / "checkpoints" / name / "trainable" / "pytorch_lora_weights.safetensors")


def samples(run_dir: Path, epoch: int = 1) -> dict[int, dict]:
    rows = (run_dir / "samples" / f"epoch_{epoch:05d}.jsonl").read_text().splitlines()
    return {row["sample_id"]: row for row in map(json.loads, rows)}


@pytest.mark.slow
def test_tiny_edit_config_trains_on_policy(tiny_qwen, tmp_path):
    """configs/tiny_edit_cpu.yaml for 3 epochs: completes, first inner step on-policy, every
    component logged, LoRA weights change."""
    run_dir = tmp_path / "edit"
    run_cli(["configs/tiny_edit_cpu.yaml", "num_epochs=3", "log.progress=false"] + overrides(tiny_qwen, run_dir))
    metrics = [m for m in read_metrics(run_dir) if m["epoch"] >= 1]
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    assert max(m["train/onpolicy_ratio_err"] for m in metrics) < 1e-5
    for key in ("reward/edit_color/execution/mean", "reward/edit_color/consistency/mean", "reward/jpeg_compressibility/mean"):
        assert all(math.isfinite(m[key]) for m in metrics), key
    assert all(0.0 <= m["reward/mean"] <= 1.0 for m in metrics)  # CME is in [0, 1]
    weights = lora(run_dir)
    b_norm = max(v.abs().max().item() for k, v in weights.items() if "lora_B" in k)
    assert b_norm > 0, "LoRA B matrices are still zero: nothing was trained"



def test_tiny_edit_config_trains_with_nft(tiny_qwen, tmp_path):
    """train.objective=nft on the editing config: the clean latents of edits (Qwen-Image-Edit's
    packed latents, conditioned on the source image) train, losses stay finite, LoRA moves."""
    run_dir = tmp_path / "edit_nft"
    run_cli(["configs/tiny_edit_cpu.yaml", "num_epochs=2", "log.progress=false", "train.objective=nft", "train.beta=1e-4"]
            + overrides(tiny_qwen, run_dir))
    metrics = [m for m in read_metrics(run_dir) if m["epoch"] >= 1]
    assert [m["epoch"] for m in metrics] == [1, 2]
    for key in ("train/policy_loss", "train/nft_loss_pos", "train/nft_loss_neg", "train/kl"):
        assert all(math.isfinite(m[key]) for m in metrics), key
    assert (run_dir / "checkpoints" / "epoch-000002" / "old_policy.safetensors").is_file()
    b_norm = max(v.abs().max().item() for k, v in lora(run_dir).items() if "lora_B" in k)
    assert b_norm > 0, "LoRA B matrices are still zero: nothing was trained"

@pytest.mark.slow
def test_rewards_depend_on_the_source_image(tiny_qwen, tmp_path):
    """The same instructions and seeds with inverted source images give other rewards."""
    inverted = tmp_path / "inverted"
    (inverted / "images").mkdir(parents=True)
    for png in (EDITS / "images").glob("*.png"):
        image = np.asarray(Image.open(png).convert("RGB"))
        Image.fromarray(255 - image).save(inverted / "images" / png.name)
    (inverted / "train.jsonl").write_text((EDITS / "train.jsonl").read_text())
    common = ["configs/tiny_edit_cpu.yaml", *FAST, "num_epochs=1", "eval.before_training=false", "log.save_samples=true", "data.eval_edits=null"]
    run_cli(common + overrides(tiny_qwen, tmp_path / "a"))
    run_cli(common + overrides(tiny_qwen, tmp_path / "b") + [f"data.train_edits={inverted / 'train.jsonl'}"])
    a, b = samples(tmp_path / "a"), samples(tmp_path / "b")
    assert sorted(a) == sorted(b)
    assert [a[i]["prompt"] for i in sorted(a)] == [b[i]["prompt"] for i in sorted(b)]
    # The generated images themselves changed (their JPEG size is a function of the image only;
    # sizes move in steps of a few bytes, so two different images may share one by chance)...
    assert sum(a[i]["reward/jpeg_compressibility"] != b[i]["reward/jpeg_compressibility"] for i in a) >= 0.75 * len(a)
    # ...and so did the edit rewards, which compare each edit with its own source.
    assert all(a[i]["reward/edit_color/execution"] != b[i]["reward/edit_color/execution"] for i in a)


@pytest.mark.slow
def test_two_ranks_match_one_rank_for_edits(tiny_qwen, tmp_path):
    """Epoch-1 rewards of an editing run are the same on 1 and 2 gloo ranks."""
    common = ["configs/tiny_edit_cpu.yaml", *FAST, "num_epochs=1", "eval.before_training=false", "log.save_samples=true"]
    run_cli(common + overrides(tiny_qwen, tmp_path / "one"))
    run_cli(common + overrides(tiny_qwen, tmp_path / "two"), launcher=accelerate_launcher("launch/accelerate/cpu_2proc.yaml"))
    one, two = samples(tmp_path / "one"), samples(tmp_path / "two")
    assert sorted(one) == sorted(two)
    for i, row in one.items():
        assert two[i]["reward"] == pytest.approx(row["reward"], abs=1e-9)
        assert two[i]["advantage"] == pytest.approx(row["advantage"], abs=1e-6)
    lora_one, lora_two = lora(tmp_path / "one"), lora(tmp_path / "two")
    assert max((lora_one[k] - lora_two[k]).abs().max().item() for k in lora_one) < 1e-5


@pytest.mark.slow
def test_firm_edit_with_cme_end_to_end(tiny_qwen, tmp_path):
    """An editing run rewarded by the FIRM-Edit judge (a tiny Qwen3-VL, in process) mixed with
    CME: source images reach the judge, scores come back as 1..5 with an uncertainty, and the
    trained reward is CME in [0, 1] (or missing, never 0 for a failed parse)."""
    from models.fixtures.vlm_judge import build_tiny_qwen3_vl

    judge = build_tiny_qwen3_vl(tmp_path / "judge")
    run_dir = tmp_path / "firm"
    run_cli(
        ["configs/tiny_edit_cpu.yaml", *FAST, "num_epochs=1", "eval.before_training=false", "log.save_samples=true"]
        + overrides(tiny_qwen, run_dir)
        + [
            "rewards={firm_edit: {role: train, params: {model: %s, backend: transformers, dtype: fp32, max_image_side: 32}}, edit_color: {role: monitor}}" % judge,
            "reward_mix.kind=cme", "reward_mix.base=firm_edit/execution", "reward_mix.bonus=firm_edit/consistency",
            "reward_mix.uncertainty_strength=1.0",
        ]
    )
    metrics = read_metrics(run_dir)[-1]
    for component in ("firm_edit/execution", "firm_edit/consistency"):
        mean = metrics[f"reward/{component}/mean"]
        assert 1.0 <= mean <= 5.0, (component, mean)
        assert metrics[f"reward/{component}/uncertainty_mean"] >= 0.0
        assert metrics[f"reward/{component}/missing"] == 0
    assert 0.0 <= metrics["reward/mean"] <= 1.0
    assert 0.0 < metrics["train/uncertainty_weight_mean"] <= 1.0
    rows = samples(run_dir)
    for row in rows.values():
        e, c = row["reward/firm_edit/execution"], row["reward/firm_edit/consistency"]
        expected = min(max((e - 1) / 4 * (0.6 + 0.4 * (c - 1) / 4), 0.0), 1.0)
        assert row["reward"] == pytest.approx(expected, abs=1e-9)
