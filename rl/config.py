"""The run configuration: a typed schema (dataclasses, one docstring per field), YAML experiment
files validated against it, and dotted command-line overrides.

    python -m rl.config                   prints the reference of every field
    python -m rl.config --write-readme    writes it into README.md's "Configuration reference"

Validation raises ConfigError naming the key and its source before any model is loaded; it never
silently fixes a value.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import os
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from models.config import LoraSettings, ModelConfig
from rewards.config import MixConfig, RewardSpec, reward_problems


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads 1e-4 (no dot) as a float; YAML 1.1 would make it a string."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml(text):
    return yaml.load(text, Loader=_Loader)


class ConfigError(ValueError):
    """A config file or override names an unknown key or holds a value of the wrong type."""


@dataclass
class DataConfig:
    train_prompts: Optional[str] = None
    """Text-to-image: text file with one training prompt per line (relative paths: against the config file's folder, then the working directory)."""
    eval_prompts: Optional[str] = None
    """Text file of held-out prompts for evaluation; none = no evaluation."""
    train_edits: Optional[str] = None
    """Instruction editing: JSONL file of {"image": path relative to the file, "instruction": str, ...} rows; each group edits one source image."""
    eval_edits: Optional[str] = None
    """JSONL file of held-out edits for evaluation."""


@dataclass
class SampleConfig:
    num_groups: int = 48
    """Prompts drawn per epoch over ALL ranks; each becomes one group."""
    group_size: int = 24
    """Images per prompt (K), over all ranks."""
    batch_size: int = 12
    """Images per forward pass on each rank during rollouts. Fixed per forward, so results do not depend on the number of ranks."""
    num_steps: int = 10
    """Sampling steps of a training rollout."""
    guidance_scale: float = 4.5
    """Classifier-free guidance scale; 1.0 disables CFG (one forward instead of two). Training uses the same guidance."""
    resolution: int = 512
    """Image height and width in pixels."""


@dataclass
class SDEConfig:
    dynamics: Literal["flow_sde", "dance_sde", "cps"] = "flow_sde"
    """Stochastic step: flow_sde (Flow-GRPO), dance_sde (DanceGRPO), cps (coefficients-preserving)."""
    noise_level: float = 0.7
    """Noise level a (flow_sde, cps) or eta (dance_sde)."""
    window: Literal["all", "fixed", "random"] = "all"
    """Which steps are stochastic and trained: all (every step but the last), fixed (`steps`), random (a window of `window_size` steps starting in `window_range`, redrawn each epoch). Other steps are ODE steps."""
    steps: list[int] = field(default_factory=list)
    """Step indices for window=fixed."""
    window_size: int = 2
    """Number of consecutive stochastic steps for window=random."""
    window_range: list[int] = field(default_factory=lambda: [0, 4])
    """Inclusive [low, high] range of the window's first step for window=random."""


@dataclass
class TrainConfig:
    batch_size: int = 12
    """Images per forward pass on each rank during the update (keep equal to sample.batch_size for an exactly on-policy first step)."""
    num_minibatches: int = 2
    """Optimizer steps per inner epoch; the epoch's samples are split into this many global minibatches."""
    inner_epochs: int = 1
    """Passes over the epoch's samples."""
    learning_rate: float = 3e-4
    """AdamW learning rate."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    lr_scheduler: str = "constant"
    """Learning-rate schedule name (diffusers.optimization.get_scheduler): constant, constant_with_warmup, linear, cosine."""
    lr_warmup_steps: int = 0
    """Warm-up optimizer steps of the schedule."""
    clip_range: float = 1e-4
    """PPO clip range eps on the probability ratio."""
    beta: float = 0.04
    """Weight of the KL to the reference policy (0 disables it and the reference forward)."""
    max_grad_norm: float = 1.0
    """Gradient-norm clip (set once; under DeepSpeed it becomes the engine's gradient_clipping)."""
    adv_clip: float = 5.0
    """Advantages are clipped to [-adv_clip, adv_clip]."""
    global_std: bool = True
    """Normalise advantages by the std of all rewards of the epoch (true) or by each group's std (false)."""
    drop_zero_std: bool = True
    """Leave out of the update the samples of groups whose rewards are all equal."""
    ema: bool = True
    """Keep an EMA of the trainable weights and evaluate with it."""
    ema_decay: float = 0.9
    """EMA decay per EMA update."""
    ema_every: int = 8
    """Optimizer steps between EMA updates."""
    max_nonfinite_steps: int = 3
    """Optimizer steps in a row skipped for a non-finite loss or gradient norm before the run stops with an error."""


@dataclass
class EvalConfig:
    every: int = 10
    """Evaluate every this many epochs (and at the end); 0 = only at the end."""
    before_training: bool = True
    """Also evaluate before the first update (logged as epoch 0)."""
    num_prompts: int = 64
    """Held-out prompts per evaluation (the first ones of data.eval_prompts)."""
    samples_per_prompt: int = 1
    """Samples per held-out prompt, each with its own noise (more samples, less noisy metrics)."""
    num_steps: int = 40
    """ODE steps of an evaluation sample."""
    guidance_scale: float = 4.5
    """CFG scale for evaluation samples."""
    batch_size: int = 8
    """Images per forward pass on each rank during evaluation."""


@dataclass
class LogConfig:
    wandb_mode: Literal["online", "offline", "disabled"] = "online"
    """W&B mode; offline writes the run under run_dir/wandb for a later `wandb sync`."""
    project: str = "trustgrpo"
    """W&B project."""
    run_name: Optional[str] = None
    """W&B run name; defaults to the run directory's name."""
    image_every: int = 10
    """Log a grid of rollout images every this many epochs (0 = never)."""
    save_every: int = 10
    """Checkpoint every this many epochs (the end of a run always saves)."""
    keep_checkpoints: int = 2
    """How many of this run's newest checkpoints to keep on disk (at least 1; the one just written is never deleted)."""
    progress: bool = True
    """Show progress bars on the main process."""
    save_samples: bool = False
    """Write every sample's prompt, group, reward components and advantage to run_dir/samples/epoch_NNNNN.jsonl."""


@dataclass
class RunConfig:
    run_dir: str = "runs/default"
    """Directory for metrics.jsonl, checkpoints, images and W&B files; one run at a time. `{wandb_run_id}` in it becomes the W&B run id (sweeps)."""
    num_epochs: int = 100
    """Epochs (rollout + update) to train in total; raise it when resuming to train longer."""
    seed: int = 0
    """Seed of prompt draws, noise and SDE windows (results do not depend on the number of ranks)."""
    resume: Optional[str] = None
    """Run directory to continue from its newest intact checkpoint (only keys listed in rl.rundir.SAFE_TO_CHANGE may differ from the run's config)."""
    overwrite: bool = False
    """Start a new run in a run_dir that holds another run's checkpoints; the earlier run's files move to run_dir/previous/<time>/, nothing is deleted."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy."""
    data: DataConfig = field(default_factory=DataConfig)
    """Prompt files."""
    sample: SampleConfig = field(default_factory=SampleConfig)
    """Rollouts."""
    sde: SDEConfig = field(default_factory=SDEConfig)
    """Stochastic sampling and the trained steps."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The policy update."""
    rewards: dict[str, RewardSpec] = field(default_factory=dict)
    """Reward components by name."""
    reward_mix: MixConfig = field(default_factory=MixConfig)
    """How the `train` components combine into the trained reward."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Held-out evaluation with ODE sampling and EMA weights."""
    log: LogConfig = field(default_factory=LogConfig)
    """Tracking, images and checkpoints."""


# --------------------------------------------------------------------------- loading


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in typing.get_args(tp))}]"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check `value` against the annotation `tp` and build nested dataclasses."""
    origin = typing.get_origin(tp)
    wrong = ConfigError(f"{source}: `{key}` must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise wrong
        return _build(tp, value, key, source)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key, source)
            except ConfigError:
                continue
        raise wrong
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise wrong
        return value
    if origin is list:
        if not isinstance(value, list):
            raise wrong
        (item_tp,) = typing.get_args(tp)
        return [_convert(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise wrong
        _, value_tp = typing.get_args(tp)
        return {str(k): _convert(v if v is not None else {}, value_tp, f"{key}.{k}", source) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise wrong
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise wrong
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise wrong
        return value
    raise TypeError(f"unsupported annotation {tp!r} for {key}")


def _build(cls: type, data: dict, prefix: str, source: str):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        full = ", ".join(f"`{prefix + '.' if prefix else ''}{k}`" for k in unknown)
        raise ConfigError(f"{source}: unknown key {full}; known keys here: {', '.join(names)}")
    kwargs = {k: _convert(v, hints[k], f"{prefix + '.' if prefix else ''}{k}", source) for k, v in data.items()}
    return cls(**kwargs)


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    node = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"command line: `{dotted}` descends into `{part}`, which is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """`a.b=VALUE` strings to (key, value) pairs; VALUE is parsed as YAML (8, 0.5, true, [1, 2], null)."""
    pairs = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"command line: override {item!r} must look like key.sub=value")
        pairs.append((key.strip(), _yaml(raw)))
    return pairs


def load_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML file, apply dotted overrides, validate, and resolve prompt-file paths."""
    data: dict = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        source = str(path)
        with open(path) as f:
            try:
                data = _yaml(f) or {}
            except yaml.YAMLError as err:
                raise ConfigError(f"{path}: not valid YAML: {err}") from err
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys to values")
        _build(RunConfig, data, "", source)  # name the file for errors that are the file's own
    for key, value in parse_overrides(list(overrides)):
        _set_dotted(data, key, value)
    config = _build(RunConfig, data, "", f"{source} with command-line overrides" if overrides else source)
    if path is not None:
        base = Path(path).resolve().parent
        for name in ("train_prompts", "eval_prompts", "train_edits", "eval_edits"):
            if getattr(config.data, name):
                setattr(config.data, name, _resolve(getattr(config.data, name), base))
    validate(config)
    return config


def _resolve(file: str, base: Path) -> str:
    """The config file's folder first, then the working directory, then the folder's parents."""
    candidate = Path(file)
    if candidate.is_absolute():
        return file
    if (base / candidate).exists():
        return str(base / candidate)
    if candidate.exists():
        return str(candidate)
    for root in base.parents:
        if (root / candidate).exists():
            return str(root / candidate)
    return file


def validate(config: RunConfig) -> None:
    """Checks across fields that a type alone cannot express (world size not known yet)."""
    s, t = config.sample, config.train
    for name, value in [
        ("sample.num_groups", s.num_groups), ("sample.group_size", s.group_size),
        ("sample.batch_size", s.batch_size), ("sample.num_steps", s.num_steps),
        ("train.batch_size", t.batch_size), ("train.num_minibatches", t.num_minibatches),
        ("train.inner_epochs", t.inner_epochs), ("num_epochs", config.num_epochs),
        ("eval.samples_per_prompt", config.eval.samples_per_prompt), ("log.keep_checkpoints", config.log.keep_checkpoints),
        ("train.ema_every", config.train.ema_every), ("train.max_nonfinite_steps", config.train.max_nonfinite_steps),
    ]:
        if value < 1:
            raise ConfigError(f"`{name}` must be >= 1, got {value}")
    if s.resolution % 16:
        raise ConfigError(f"`sample.resolution` must be a multiple of 16, got {s.resolution}")
    data = config.data
    if bool(data.train_prompts) == bool(data.train_edits):
        raise ConfigError("set exactly one of `data.train_prompts` (text-to-image) and `data.train_edits` (editing)")
    if data.train_edits and data.eval_prompts or data.train_prompts and data.eval_edits:
        raise ConfigError("evaluation data must be of the training kind: eval_prompts with train_prompts, eval_edits with train_edits")
    for name in ("train_prompts", "eval_prompts", "train_edits", "eval_edits"):
        value = getattr(data, name)
        if value and not Path(value).is_file():
            raise ConfigError(f"`data.{name}`: file {value} does not exist")
    problems = reward_problems(config.rewards, config.reward_mix)
    if problems:
        raise ConfigError(problems[0])
    if config.sde.window == "fixed" and not config.sde.steps:
        raise ConfigError("`sde.steps` must list step indices when sde.window is fixed")
    if config.sde.window == "random" and len(config.sde.window_range) != 2:
        raise ConfigError("`sde.window_range` must be [low, high] when sde.window is random")


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


# --------------------------------------------------------------------------- reference


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass (read from the source)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, following in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = following.value.value
    return docs


def reference(cls: type = RunConfig, prefix: str = "") -> list[str]:
    """One markdown line per field: key, type, default, description."""
    lines = []
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            lines.append(f"- `{key}`: {docs.get(f.name, '')}")
            lines += reference(tp, key + ".")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"- `{key}` ({_type_name(tp)}, default `{default!r}`): {docs.get(f.name, '')}")
        if typing.get_origin(tp) is dict and dataclasses.is_dataclass(typing.get_args(tp)[1]):
            lines += reference(typing.get_args(tp)[1], key + ".<name>.")
    return lines


def write_reference(readme: Path) -> None:
    """Replace the reference list under the README's "## Configuration reference" heading."""
    lines = readme.read_text().split("\n")
    start = lines.index("## Configuration reference")
    first = next(i for i in range(start, len(lines)) if lines[i].startswith("- `"))
    last = first
    while last < len(lines) and lines[last].startswith("- `"):
        last += 1
    lines[first:last] = reference()
    readme.write_text("\n".join(lines))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--write-readme"]:
        write_reference(Path(sys.argv[2] if len(sys.argv) > 2 else "README.md"))
    else:
        sys.stdout.write("\n".join(reference()) + "\n")
