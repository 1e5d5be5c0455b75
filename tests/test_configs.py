"""Every shipped experiment file validates against the schema and names registered workers."""

from __future__ import annotations

import pytest
import yaml

from conftest import ROOT
from rewards import WORKERS
from rl.config import RunConfig, _build

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_file_matches_the_schema(path):
    config = _build(RunConfig, yaml.safe_load(path.read_text()) or {}, "", str(path))
    for name, spec in config.rewards.items():
        assert (spec.worker or name) in WORKERS, f"{path.name}: reward {name!r} is not a registered worker"
    assert any(spec.role == "train" for spec in config.rewards.values())


def test_sweep_parameters_are_config_keys():
    """Each swept key is a dotted override the trainer accepts."""
    from rl.config import _set_dotted

    sweep = yaml.safe_load((ROOT / "configs" / "sweeps" / "reward_mix.yaml").read_text())
    base = yaml.safe_load((ROOT / "configs" / "sd35m_firm_qma.yaml").read_text())
    for key, spec in sweep["parameters"].items():
        for value in spec["values"]:
            data = yaml.safe_load((ROOT / "configs" / "sd35m_firm_qma.yaml").read_text())
            _set_dotted(data, key, value)
            _build(RunConfig, data, "", f"sweep {key}={value}")
    assert base["reward_mix"]["kind"] == "qma"
