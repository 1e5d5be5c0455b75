"""Every value is checked before any model loads: a nonsense value in a config file or on the
command line stops the run with one line naming the key (and exit 2 from the CLI, in seconds)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from conftest import ROOT
from rl.config import ConfigError, load_config

BASE = ROOT / "configs" / "tiny_cpu.yaml"

# (override, the key the error must name). Each value is one a user could type and that the
# trainer would otherwise take silently, misread, or crash on long after the models loaded.
NONSENSE = [
    ("sample.num_groups=0", "sample.num_groups"),
    ("sample.group_size=1", "sample.group_size"),  # one sample per group: no advantage to learn from
    ("sample.batch_size=-2", "sample.batch_size"),
    ("sample.num_steps=1", "sample.num_steps"),
    ("sample.guidance_scale=-3", "sample.guidance_scale"),
    ("sample.guidance_scale=.nan", "sample.guidance_scale"),
    ("sample.resolution=0", "sample.resolution"),
    ("sample.resolution=72", "sample.resolution"),
    ("sde.noise_level=0", "sde.noise_level"),
    ("sde.noise_level=-0.5", "sde.noise_level"),
    ("sde.window=fixed", "sde.steps"),
    ("sde.window=fixed sde.steps=[3,8]", "sde.steps"),  # step 8 of 8 does not exist
    ("sde.steps=[-1]", "sde.steps[0]"),
    ("sde.window=random sde.window_range=[0,7] sde.window_size=2", "sde.window_range"),  # can overrun
    ("sde.window=random sde.window_range=[4,2]", "sde.window_range"),
    ("sde.window_range=[1]", "sde.window_range"),
    ("sde.window_size=0", "sde.window_size"),
    ("train.learning_rate=-1e-4", "train.learning_rate"),
    ("train.learning_rate=.inf", "train.learning_rate"),
    ("train.weight_decay=-0.1", "train.weight_decay"),
    ("train.adam_betas=[0.9]", "train.adam_betas"),
    ("train.adam_betas=[0.9,1.5]", "train.adam_betas[1]"),
    ("train.adam_eps=0", "train.adam_eps"),
    ("train.lr_scheduler=cosine_annealing", "train.lr_scheduler"),
    ("train.lr_warmup_steps=-5", "train.lr_warmup_steps"),
    ("train.clip_range=0", "train.clip_range"),
    ("train.beta=-0.01", "train.beta"),
    ("train.max_grad_norm=0", "train.max_grad_norm"),
    ("train.adv_clip=-1", "train.adv_clip"),
    ("train.ema_decay=1.5", "train.ema_decay"),
    ("train.ema_every=0", "train.ema_every"),
    ("train.inner_epochs=0", "train.inner_epochs"),
    ("train.max_nonfinite_steps=0", "train.max_nonfinite_steps"),
    ("eval.num_prompts=1000", "eval.num_prompts"),  # more than the file holds
    ("eval.num_steps=0", "eval.num_steps"),
    ("eval.every=-1", "eval.every"),
    ("eval.guidance_scale=0.5", "eval.guidance_scale"),
    ("log.keep_checkpoints=0", "log.keep_checkpoints"),
    ("log.save_every=-10", "log.save_every"),
    ("num_epochs=0", "num_epochs"),
    ("seed=-1", "seed"),
    ("model.lora.rank=0", "model.lora.rank"),
    ("model.lora.dropout=1.0", "model.lora.dropout"),
    ("model.max_sequence_length=0", "model.max_sequence_length"),
    ("rewards.jpeg_compressibility.weight=.nan", "rewards.jpeg_compressibility.weight"),
    ("rewards.jpeg_compressibility.timeout_s=0", "rewards.jpeg_compressibility.timeout_s"),
    ("rewards.jpeg_compressibility.retries=0", "rewards.jpeg_compressibility.retries"),
    ("reward_mix.uncertainty_strength=-1", "reward_mix.uncertainty_strength"),
    ("reward_mix.floor=0.4", "reward_mix.floor"),  # a Base-and-Bonus constant on a weighted sum: ignored
    ("eval.pass_fail=shapes_geneval/strict", "eval.pass_fail"),  # no such reward in this config
]


@pytest.mark.parametrize("overrides, key", NONSENSE, ids=[o for o, _ in NONSENSE])
def test_nonsense_values_are_refused_naming_the_key(overrides, key):
    with pytest.raises(ConfigError) as caught:
        load_config(BASE, overrides.split())
    assert f"`{key}`" in str(caught.value), str(caught.value)
    assert "\n" not in str(caught.value)


def test_the_shipped_values_and_the_rules_edges_are_accepted():
    config = load_config(BASE, ["sample.group_size=2", "sample.guidance_scale=1", "train.beta=0", "train.ema_decay=0",
                                "sde.window=random", "sde.window_range=[0,6]", "sde.window_size=2", "eval.num_prompts=8"])
    assert (config.sample.group_size, config.sde.window_range) == (2, [0, 6])


def test_a_key_given_twice_in_one_section_is_refused(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text(BASE.read_text() + "\ntrain:\n  beta: 0.5\n")  # a second train: section
    with pytest.raises(ConfigError, match="`train` appears twice"):
        load_config(path)


def test_a_prompt_file_that_is_not_utf8_is_named(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("a red circle\n".encode() + b"caf\xe9\n")
    with pytest.raises(ConfigError, match=f"{prompts} is not UTF-8"):
        load_config(BASE, [f"data.eval_prompts={prompts}"])


def test_the_cli_exits_2_in_seconds_with_one_line(tmp_path):
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "rl.train", str(BASE), "train.learning_rate=-1", f"run_dir={tmp_path}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("config error:") and "`train.learning_rate` = -1" in result.stderr
    assert time.monotonic() - start < 30
    assert not (tmp_path / "checkpoints").exists()


def test_a_pass_fail_component_the_reward_does_not_have_stops_the_cli_before_any_model_loads(tmp_path):
    result = subprocess.run([sys.executable, "-m", "rl.train", str(BASE), "eval.pass_fail=jpeg_compressibility/strict", f"run_dir={tmp_path}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("config error:") and "`eval.pass_fail` = 'jpeg_compressibility/strict'" in last and "jpeg_incompressibility" in last
