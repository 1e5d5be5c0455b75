"""Every model family's tiny config through the whole trainer on 1 and 2 ranks: the epoch-1
rewards and advantages of each sample, and the weights after the update, do not depend on how
many processes share the work (the layout is fixed per forward; the adapter adds nothing
rank-dependent)."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from conftest import accelerate_launcher, run_cli

# One tiny config per family besides SD3 and Qwen-Image-Edit (tests/test_train_ranks.py and
# tests/test_edit_train.py run those on 2 ranks).
FAMILY_CONFIGS = {
    "flux": "configs/tiny_flux_cpu.yaml",
    "flux_kontext": "configs/tiny_kontext_cpu.yaml",
    "qwen_image": "configs/tiny_qwen_image_cpu.yaml",
    "z_image": "configs/tiny_z_image_cpu.yaml",
    "flux2_klein": "configs/tiny_flux2_klein_cpu.yaml",
}


def samples(run_dir) -> dict[int, dict]:
    rows = (run_dir / "samples" / "epoch_00001.jsonl").read_text().splitlines()
    return {row["sample_id"]: row for row in map(json.loads, rows)}


def lora(run_dir) -> dict:
    name = (run_dir / "checkpoints" / "latest").read_text().strip()
    return load_file(run_dir / "checkpoints" / name / "trainable" / "pytorch_lora_weights.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("adapter", sorted(FAMILY_CONFIGS))
def test_two_ranks_give_the_same_epoch_one_rewards_as_one(adapter, tmp_path):
    model = tmp_path / "tiny"  # built by the first run, read by the second
    common = [
        FAMILY_CONFIGS[adapter], "num_epochs=1", "eval.before_training=false", "log.save_samples=true", "log.progress=false",
        "log.save_every=1", f"model.pretrained={model}",
    ]
    run_cli(common + [f"run_dir={tmp_path / 'one'}"])
    run_cli(common + [f"run_dir={tmp_path / 'two'}"], launcher=accelerate_launcher("launch/accelerate/cpu_2proc.yaml"))
    one, two = samples(tmp_path / "one"), samples(tmp_path / "two")
    assert sorted(one) == sorted(two) and len(one) == 16
    for i, row in one.items():
        assert two[i]["reward"] == pytest.approx(row["reward"], abs=1e-9), i
        assert two[i]["advantage"] == pytest.approx(row["advantage"], abs=1e-6), i
    assert len({round(row["reward"], 9) for row in one.values()}) > 1  # distinct samples: the match is not vacuous
    lora_one, lora_two = lora(tmp_path / "one"), lora(tmp_path / "two")
    assert lora_one.keys() == lora_two.keys()
    assert max((lora_one[k] - lora_two[k]).abs().max().item() for k in lora_one) < 1e-5
