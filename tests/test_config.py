"""rl.config: YAML files validated against the schema, dotted overrides, and readable errors."""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest

from rl import config as cfg
from rewards.config import RewardSpec
from rl.config import ConfigError, RunConfig, load_config

REPO = Path(__file__).resolve().parents[1]

BASE = """\
data:
  train_prompts: prompts.txt
rewards:
  jpeg_compressibility: {role: train}
"""


def write_config(folder: Path, text: str, name: str = "run.yaml") -> Path:
    """A config file next to a one-line prompts.txt (load_config requires the prompt file)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "prompts.txt").write_text("a photo of a cat\n")
    path = folder / name
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- loading a file


def test_minimal_file_loads_with_defaults(tmp_path):
    """Unset fields keep the schema defaults; rewards become RewardSpec entries."""
    config = load_config(write_config(tmp_path, BASE))
    assert isinstance(config, RunConfig)
    assert config.sample.group_size == 24 and config.train.clip_range == 1e-4
    spec = config.rewards["jpeg_compressibility"]
    assert isinstance(spec, RewardSpec) and spec.role == "train" and spec.weight == 1.0


def test_file_values_override_defaults_and_exponents_are_floats(tmp_path):
    """Values in the file win; `1e-4` without a dot is a float (YAML 1.1 would make it a string)."""
    path = write_config(tmp_path, BASE + "sample:\n  group_size: 8\ntrain:\n  learning_rate: 1e-4\n  beta: 0\n")
    config = load_config(path)
    assert config.sample.group_size == 8
    assert isinstance(config.train.learning_rate, float) and config.train.learning_rate == 1e-4
    assert isinstance(config.train.beta, float) and config.train.beta == 0.0  # int accepted for float


def test_null_reward_entry_uses_defaults(tmp_path):
    """`name:` with no body is a reward with default settings (how monitors are often written)."""
    path = write_config(tmp_path, BASE + "  jpeg_incompressibility:\n")
    config = load_config(path)
    assert config.rewards["jpeg_incompressibility"].weight == 1.0


def test_prompt_path_resolves_against_config_folder(tmp_path, monkeypatch):
    """data.train_prompts relative to the config file works from any working directory."""
    path = write_config(tmp_path / "exp", BASE)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_config(path)
    assert Path(config.data.train_prompts).resolve() == (tmp_path / "exp" / "prompts.txt").resolve()


def test_config_folder_wins_over_working_directory(tmp_path, monkeypatch):
    """The field doc says: relative paths against the config file's folder, THEN the working directory."""
    path = write_config(tmp_path / "exp", BASE)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "prompts.txt").write_text("a different prompt set\n")
    monkeypatch.chdir(cwd)
    config = load_config(path)
    assert Path(config.data.train_prompts).resolve() == (tmp_path / "exp" / "prompts.txt").resolve()


def test_missing_file_and_bad_yaml_raise_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = write_config(tmp_path, "sample: [unclosed\n", name="bad.yaml")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)


# --------------------------------------------------------------------------- unknown keys, types


@pytest.mark.parametrize(
    "extra,key",
    [
        ("learnin_rate: 1.0\n", "learnin_rate"),
        ("train:\n  learnin_rate: 1.0e-4\n", "train.learnin_rate"),
        ("model:\n  lora:\n    rnak: 4\n", "model.lora.rnak"),
        ("sde:\n  windows: all\n", "sde.windows"),
    ],
)
def test_unknown_keys_name_key_and_file(tmp_path, extra, key):
    """A typo anywhere fails before any model loads, naming the full key and the file."""
    path = write_config(tmp_path, BASE + extra)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert f"`{key}`" in str(err.value)
    assert str(path) in str(err.value)


def test_unknown_key_inside_reward_entry(tmp_path):
    path = write_config(tmp_path, BASE.replace("{role: train}", "{role: train, wieght: 2}"))
    with pytest.raises(ConfigError, match="rewards.jpeg_compressibility.wieght"):
        load_config(path)


@pytest.mark.parametrize(
    "extra,key",
    [
        ("sample:\n  group_size: eight\n", "sample.group_size"),  # string for int
        ("sample:\n  group_size: true\n", "sample.group_size"),  # bool for int
        ("sample:\n  group_size: 8.0\n", "sample.group_size"),  # float for int
        ("train:\n  learning_rate: fast\n", "train.learning_rate"),  # string for float
        ("train:\n  learning_rate: true\n", "train.learning_rate"),  # bool for float
        ("model:\n  use_lora: 1\n", "model.use_lora"),  # int for bool
        ("train:\n  adam_betas: [0.9, fast]\n", "train.adam_betas[1]"),  # list element type
        ("sde:\n  steps: [1, 2.5]\n", "sde.steps[1]"),  # float in list[int]
        ("sde:\n  steps: 3\n", "sde.steps"),  # scalar for list
        ("sde:\n  dynamics: ode\n", "sde.dynamics"),  # not one of the choices
        ("model:\n  dtype: float32\n", "model.dtype"),
        ("sample: 5\n", "sample"),  # scalar for a section
        ("log:\n  run_name: [a]\n", "log.run_name"),  # list for Optional[str]
    ],
)
def test_wrong_types_name_the_key(tmp_path, extra, key):
    """Wrong types are errors (never coerced) and the message names the key and the file."""
    path = write_config(tmp_path, BASE + extra)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert f"`{key}`" in str(err.value)
    assert str(path) in str(err.value)


# --------------------------------------------------------------------------- overrides


def test_dotted_overrides_win_over_the_file(tmp_path):
    """`key.sub=value` overrides parse as YAML and replace what the file says."""
    path = write_config(tmp_path, BASE + "sample:\n  group_size: 16\ntrain:\n  learning_rate: 3.0e-4\n")
    config = load_config(path, [
        "sample.group_size=8",
        "train.learning_rate=1e-4",
        "rewards.foo.weight=0.5",
        "sde.steps=[1, 2]",
        "train.global_std=false",
        "model.revision=null",
        "log.run_name=my-run",
    ])
    assert config.sample.group_size == 8
    assert isinstance(config.train.learning_rate, float) and config.train.learning_rate == 1e-4
    assert config.rewards["foo"].weight == 0.5 and config.rewards["foo"].role == "train"
    assert config.rewards["jpeg_compressibility"].role == "train"  # untouched entries stay
    assert config.sde.steps == [1, 2]
    assert config.train.global_std is False
    assert config.model.revision is None
    assert config.log.run_name == "my-run"


@pytest.mark.parametrize(
    "override,key",
    [
        ("sample.group_size=eight", "sample.group_size"),
        ("sample.group_size=8.5", "sample.group_size"),
        ("train.learning_rate=fast", "train.learning_rate"),
        ("sample.groupsize=8", "sample.groupsize"),
        ("rewards.foo.role=judge", "rewards.foo.role"),
        ("seed.value=1", "seed"),  # treats a scalar as a section
    ],
)
def test_bad_overrides_name_the_key(tmp_path, override, key):
    path = write_config(tmp_path, BASE)
    with pytest.raises(ConfigError) as err:
        load_config(path, [override])
    assert key in str(err.value)


def test_override_without_equals_is_an_error(tmp_path):
    path = write_config(tmp_path, BASE)
    with pytest.raises(ConfigError, match="sample.group_size"):
        load_config(path, ["sample.group_size"])


def test_override_descending_into_a_scalar_set_in_the_file(tmp_path):
    path = write_config(tmp_path, BASE + "seed: 3\n")
    with pytest.raises(ConfigError, match="seed.value"):
        load_config(path, ["seed.value=1"])


# --------------------------------------------------------------------------- validate()


def test_no_train_reward_is_an_error(tmp_path):
    """A run must optimise something: only monitors (or no rewards) is rejected."""
    monitor_only = write_config(tmp_path, BASE.replace("role: train", "role: monitor"))
    with pytest.raises(ConfigError, match="rewards"):
        load_config(monitor_only)
    with pytest.raises(ConfigError, match="rewards"):
        load_config(write_config(tmp_path, BASE), ["rewards.jpeg_compressibility.role=monitor"])
    with pytest.raises(ConfigError, match="rewards"):
        load_config(write_config(tmp_path, "data:\n  train_prompts: prompts.txt\n", name="none.yaml"))


def test_missing_prompt_files_are_errors(tmp_path):
    path = write_config(tmp_path, BASE.replace("prompts.txt", "missing.txt"))
    with pytest.raises(ConfigError, match="data.train_prompts"):
        load_config(path)
    with pytest.raises(ConfigError, match="data.eval_prompts"):
        load_config(write_config(tmp_path, BASE, name="ok.yaml"), ["data.eval_prompts=nothere.txt"])


@pytest.mark.parametrize(
    "override,key",
    [
        ("sample.group_size=0", "sample.group_size"),
        ("train.num_minibatches=0", "train.num_minibatches"),
        ("sample.resolution=500", "sample.resolution"),
        ("sde.window=fixed", "sde.steps"),
        ("sde.window_range=[1]", "sde.window_range"),
    ],
)
def test_cross_field_validation(tmp_path, override, key):
    path = write_config(tmp_path, BASE)
    overrides = [override] + (["sde.window=random"] if key == "sde.window_range" else [])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(path, overrides)


def test_shipped_tiny_config_loads():
    """The example config in the repo is valid against the schema."""
    config = load_config(REPO / "configs" / "tiny_cpu.yaml")
    assert Path(config.data.train_prompts).is_file()
    assert any(spec.role == "train" for spec in config.rewards.values())


# --------------------------------------------------------------------------- CLI and reference


def test_train_cli_reports_config_errors_fast(tmp_path):
    """`python -m rl.train bad.yaml` exits with code 2 in seconds and names the bad key on stderr."""
    path = write_config(tmp_path, BASE + "train:\n  learnin_rate: 1.0e-4\n")
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "rl.train", str(path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - start
    assert proc.returncode == 2, proc.stderr
    assert "train.learnin_rate" in proc.stderr
    assert elapsed < 20, f"config error took {elapsed:.1f} s to report"


SECTION = object()  # the "default" of a section line


def _schema_fields(cls, prefix=""):
    """(key, docstring, default) of every field of the schema, sections and dict[str, Section]
    entries included, in declaration order. The docstring is read from the class's source text
    (the string literal on the line under the field), the default from a default instance."""
    source = inspect.getsource(cls)
    docs = dict(re.findall(r'^    (\w+): [^\n]*\n    """(.*?)"""', source, re.M))
    hints, instance = typing.get_type_hints(cls), cls()
    fields = []
    for f in dataclasses.fields(cls):
        tp, key = hints[f.name], prefix + f.name
        fields.append((key, docs.get(f.name, ""), SECTION if dataclasses.is_dataclass(tp) else getattr(instance, f.name)))
        if dataclasses.is_dataclass(tp):
            fields += _schema_fields(tp, key + ".")
        elif typing.get_origin(tp) is dict and dataclasses.is_dataclass(typing.get_args(tp)[1]):
            fields += _schema_fields(typing.get_args(tp)[1], key + ".<name>.")
    return fields


def test_reference_documents_every_field():
    """`python -m rl.config` prints one line per schema field, in order, with its default and the
    docstring written under it in the source; the README's reference is that output verbatim."""
    out = subprocess.run([sys.executable, "-m", "rl.config"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    printed = out.stdout.splitlines()
    fields = _schema_fields(RunConfig)
    assert len(fields) > 60 and "rewards.<name>.role" in [key for key, _, _ in fields]
    assert [line[3 : line.index("`", 3)] for line in printed] == [key for key, _, _ in fields]
    for line, (key, doc, default) in zip(printed, fields):
        assert doc, f"{key} has no docstring in the schema"
        assert line.endswith(f": {doc}"), line
        if default is not SECTION:
            assert f", default `{default!r}`): " in line, line

    readme = (REPO / "README.md").read_text().splitlines()
    intro = next(i for i, line in enumerate(readme) if line == "reference:" and "python -m rl.config" in readme[i - 1])
    rest = readme[intro + 2 :]
    section = rest[: rest.index("")] if "" in rest else rest
    assert section == printed, "README's config reference is stale: paste the output of `python -m rl.config` into it"
