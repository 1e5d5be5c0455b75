"""Every shipped experiment file loads the way `python -m rl.train FILE` loads it (validated, data
paths resolved to files that exist) and names registered workers; the W&B sweep varies keys of the
file it runs."""

from __future__ import annotations

import itertools
import re
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from rewards import WORKERS
from rl.config import load_config

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
DATA_KEYS = ("train_prompts", "eval_prompts", "train_edits", "eval_edits")
SWEEP = ROOT / "configs" / "sweeps" / "reward_mix.yaml"


@pytest.fixture(scope="module")
def configs_dir(tmp_path_factory) -> Path:
    """A copy of configs/ as a user has it: the data the repository ships, as shipped; the data a
    user supplies (a path outside configs/, e.g. ../data/pickscore/train.txt, described in the
    file's comments) as a stand-in of 1,000 lines (more than any shipped eval.num_prompts) where
    that path leads."""
    copy = tmp_path_factory.mktemp("user") / "configs"
    shutil.copytree(ROOT / "configs", copy)
    for path in CONFIGS:
        data = (yaml.safe_load(path.read_text()) or {}).get("data") or {}
        for key in DATA_KEYS:
            if data.get(key) and not (copy / data[key]).resolve().is_relative_to(copy):
                standin = (copy / data[key]).resolve()
                standin.parent.mkdir(parents=True, exist_ok=True)
                standin.write_text("a photo of a cat\n" * 1000)
    return copy


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_file_loads_with_its_data(path, configs_dir):
    config = load_config(configs_dir / path.name)
    for key in DATA_KEYS:
        value = getattr(config.data, key)
        if value:
            assert Path(value).is_absolute() and Path(value).is_file(), f"{path.name}: data.{key} = {value}"
            assert Path(value).is_relative_to(configs_dir.parent), f"{path.name}: data.{key} resolved outside the config's tree"
    assert config.data.train_prompts or config.data.train_edits
    for name, spec in {**config.rewards, **config.eval.rewards}.items():
        assert (spec.worker or name) in WORKERS, f"{path.name}: reward {name!r} is not a registered worker"


def _sweep_base(sweep: dict) -> str:
    """The experiment file the sweep's command runs."""
    assert sweep["program"] == "rl.train" and "rl.train" in sweep["command"]
    return next(arg for arg in sweep["command"] if str(arg).startswith("configs/") and str(arg).endswith(".yaml"))


def _value_at(config, dotted: str):
    value = config
    for part in dotted.split("."):
        value = value[part] if isinstance(value, dict) else getattr(value, part)
    return value


def test_sweep_varies_keys_of_the_file_it_runs(configs_dir):
    """Each swept key already exists in the sweep's base file (a misspelt reward name would add a
    new reward instead), every grid point loads as `key=value` overrides (what W&B passes), and
    each override reaches the config and differs from the file's value for some point."""
    sweep = yaml.safe_load(SWEEP.read_text())
    base_file = configs_dir / Path(_sweep_base(sweep)).name
    base = load_config(base_file)
    parameters = sweep["parameters"]
    for key, spec in parameters.items():
        parent, _, leaf = key.rpartition(".")
        holder = _value_at(base, parent)
        assert (leaf in holder) if isinstance(holder, dict) else hasattr(holder, leaf), f"{key} is not a key of {base_file.name}"
        assert any(value != _value_at(base, key) for value in spec["values"]), f"{key}: every swept value is the file's own"
    for values in itertools.product(*(spec["values"] for spec in parameters.values())):
        point = dict(zip(parameters, values))
        config = load_config(base_file, [f"{key}={value}" for key, value in point.items()])
        for key, value in point.items():
            assert _value_at(config, key) == value, (key, point)


def test_sweep_metric_is_a_logged_evaluation_metric():
    """The sweep's metric is one the evaluation logs: eval/reward or eval/<reward component>,
    optionally with /change (rl/evaluate.py)."""
    sweep = yaml.safe_load(SWEEP.read_text())
    rewards = yaml.safe_load((ROOT / _sweep_base(sweep)).read_text())["rewards"]
    components = "|".join(re.escape(name) + "(?:/[a-z_]+)?" for name in rewards)
    assert re.fullmatch(rf"eval/(?:reward|{components})(?:/change)?", sweep["metric"]["name"]), sweep["metric"]["name"]


@pytest.mark.parametrize("name, trained_steps", [
    ("sd35m_nft_firm_qma.yaml", 9), ("qwen_edit_nft_firm_cme.yaml", 5), ("z_image_turbo_firm_qma.yaml", 7), ("flux2_klein_nft_firm_qma.yaml", 9),
])
def test_real_nft_configs_lay_out_on_eight_gpus_with_the_published_trained_steps(name, trained_steps, configs_dir):
    """DiffusionNFT trains 99 % of the rollout's timesteps: 9 of 10 (SD3.5-M, FLUX.2 [klein]), 5 of
    6 (FIRM's editing), 7 of 8 (Z-Image-Turbo); all sample with ODE steps and CFG off, and lay out
    on 8 ranks."""
    from rl.layout import EpochLayout

    config = load_config(configs_dir / name)
    assert config.train.objective == "nft" and config.sde.window == "none" and config.sample.guidance_scale == 1.0
    assert EpochLayout.build(config, 8).trained_steps == trained_steps
