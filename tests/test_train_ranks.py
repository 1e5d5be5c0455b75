"""Runs launched on two CPU ranks with `accelerate launch`: DeepSpeed settings the trainer
refuses, and reward extras combined over ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, accelerate_launcher, run_cli
from test_train import FAST, read_metrics, tiny_overrides

DEEPSPEED_ENV = {"DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": str(ROOT / ".cache" / "torch_extensions")}


def deepspeed_launch_config(tmp_path: Path, **settings) -> Path:
    """launch/accelerate/cpu_zero2.yaml with some deepspeed_config settings changed."""
    launch = yaml.safe_load((ROOT / "launch/accelerate/cpu_zero2.yaml").read_text())
    launch["deepspeed_config"].update(settings)
    path = tmp_path / "launch.yaml"
    path.write_text(yaml.safe_dump(launch))
    return path


def failed_launch(launch_config: Path, args: list[str]) -> str:
    """Run rl.train under the launch config; it must fail. Returns its stderr."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **DEEPSPEED_ENV}
    command = accelerate_launcher(str(launch_config)) + ["-m", "rl.train", *args]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0, result.stdout[-3000:]
    return result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("launch_settings, run_overrides, refusal", [
    ({"zero_stage": 3}, ["train.ema=true"], "config error: train.ema is not supported with ZeRO-3"),
    ({"gradient_clipping": 0.5}, ["train.max_grad_norm=1.0"],
     "config error: DeepSpeed config sets gradient_clipping=0.5 but train.max_grad_norm=1.0"),
], ids=["zero3_refuses_ema", "gradient_clipping_must_match_max_grad_norm"])
def test_deepspeed_launch_refuses_settings_at_odds_with_the_run(tiny_sd3, tmp_path, launch_settings, run_overrides, refusal):
    stderr = failed_launch(
        deepspeed_launch_config(tmp_path, **launch_settings),
        ["configs/tiny_cpu.yaml", *FAST, "num_epochs=1", *run_overrides] + tiny_overrides(tiny_sd3, tmp_path / "run"),
    )
    assert refusal in stderr, stderr[-3000:]


@pytest.mark.slow
def test_reward_extras_sum_counts_and_average_the_rest_over_ranks(tiny_sd3, tmp_path):
    """Two ranks, two prompts (one a shapes caption, one not) in groups of 4. shapes_geneval's
    unparsed_count over both ranks is the number of samples whose shapes score is missing (4);
    jpeg's kilobytes_mean is the mean JPEG size over all samples, which the compressibility
    score gives independently (score = -kilobytes / 500)."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\na cat sleeping on a sofa\n")
    run_dir = tmp_path / "run"
    run_cli(
        ["configs/tiny_cpu.yaml", *FAST, "num_epochs=1", f"data.train_prompts={prompts}", "data.eval_prompts=null",
         "rewards.shapes_geneval.role=monitor"] + tiny_overrides(tiny_sd3, run_dir),
        launcher=accelerate_launcher("launch/accelerate/cpu_2proc.yaml"),
    )
    [metrics] = [m for m in read_metrics(run_dir) if m["epoch"] == 1]
    assert metrics["reward/shapes_geneval/strict/missing"] == 4
    assert metrics["reward_extras/shapes_geneval/unparsed_count"] == 4
    kilobytes = -500.0 * metrics["reward/jpeg_compressibility/mean"]
    assert metrics["reward_extras/jpeg_compressibility/kilobytes_mean"] == pytest.approx(kilobytes, rel=1e-9)
