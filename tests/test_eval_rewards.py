"""eval.rewards: reward workers scored on the held-out samples only, logged beside the training
rewards and never trained on."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, run_cli
from rewards.jpeg import jpeg_kilobytes
from rl.config import ConfigError, load_config


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


EVAL_ONLY = [
    "eval.rewards.jpeg_q30.worker=jpeg_compressibility",
    "eval.rewards.jpeg_q30.params.quality=30",
    "eval.rewards.jpeg_q30.params.name=jpeg_q30",
    "eval.rewards.jpeg_q30.params.scale=0.25",
]


def test_eval_rewards_are_checked_with_the_config():
    with pytest.raises(ConfigError, match="eval.rewards.jpeg_compressibility` is also a `rewards` entry"):
        load_config(ROOT / "configs/tiny_cpu.yaml", ["eval.rewards.jpeg_compressibility.worker=jpeg_compressibility"])
    config = load_config(ROOT / "configs/tiny_cpu.yaml", [*EVAL_ONLY, "eval.pass_fail=jpeg_q30"])
    assert config.eval.rewards["jpeg_q30"].params["quality"] == 30
    with pytest.raises(ConfigError, match="names no reward component"):
        load_config(ROOT / "configs/tiny_cpu.yaml", [*EVAL_ONLY, "eval.pass_fail=absent"])


@pytest.mark.slow
def test_eval_only_reward_scores_the_held_out_samples_and_is_never_trained_on(tiny_sd3, tmp_path):
    """The eval-only component is logged at each evaluation (with its paired change), equals the
    worker's formula on the evaluation images the run keeps, and appears in no training row:
    adding it leaves the trained weights exactly as they were."""
    run_dir = tmp_path / "run"
    common = [
        f"model.pretrained={tiny_sd3}", "model.max_sequence_length=32", "num_epochs=2", "eval.every=2", "eval.num_prompts=8",
        "sample.num_groups=2", "train.num_minibatches=2", "log.save_every=0", "log.image_every=0", "log.progress=false",
    ]
    run_cli(["configs/tiny_cpu.yaml", f"run_dir={run_dir}", *common, *EVAL_ONLY])
    rows = read_metrics(run_dir)
    evaluations = [row for row in rows if "eval/reward" in row]
    assert [row["epoch"] for row in evaluations] == [0, 2]
    assert all("eval/jpeg_q30" in row and "eval/jpeg_compressibility" in row for row in evaluations)
    assert "eval/jpeg_q30/change" in evaluations[-1]
    assert not any(key.startswith("reward/jpeg_q30") for row in rows for key in row)
    # All 8 evaluation images are the shown ones the run keeps: recompute the score from them.
    kept = np.load(run_dir / "images" / "eval_epoch_00002.npz")["images"]
    assert len(kept) == 8
    expected = -0.25 * np.mean([jpeg_kilobytes(image, 30) for image in kept])
    assert evaluations[-1]["eval/jpeg_q30"] == pytest.approx(expected, rel=1e-9)
    # The training reward (quality 95) is another number: the eval-only worker is its own.
    assert evaluations[-1]["eval/jpeg_q30"] != pytest.approx(evaluations[-1]["eval/jpeg_compressibility"] * 0.25 * 500, rel=1e-3)
    assert not (run_dir / "reasoning").exists()  # no judge, no reasoning to read
    roles = json.loads((run_dir / "images" / "eval_shown.json").read_text())["roles"]
    assert roles["jpeg_q30"] == "monitor"

    plain = tmp_path / "plain"
    run_cli(["configs/tiny_cpu.yaml", f"run_dir={plain}", *common])
    train_keys = [key for key in rows[-1] if key.startswith(("train/", "reward/")) and not key.startswith("train/time")]
    plain_last = read_metrics(plain)[-1]
    for key in train_keys:
        if isinstance(plain_last.get(key), float) and "time" not in key and "_s" not in key:
            assert rows[-1][key] == pytest.approx(plain_last[key], rel=1e-9, abs=1e-12), key
