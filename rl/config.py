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
import functools
import inspect
import os
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import Field, TypeAdapter, ValidationError

from models.config import LoraSettings, ModelConfig
from rewards.config import MixConfig, RewardSpec, reward_problems


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads 1e-4 (no dot) as a float; YAML 1.1 would make it a string."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _mapping_without_duplicates(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    """YAML would let a repeated key (or section) silently replace the first; here it is an error."""
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ConfigError(f"line {key_node.start_mark.line + 1}: key `{key}` appears twice in one section; keep one")
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def _yaml(text):
    return yaml.load(text, Loader=_Loader)


class ConfigError(ValueError):
    """A config file or override names an unknown key or holds a value of the wrong type."""


# Constraints are declared on the fields (Annotated + pydantic's Field) and checked as each value
# is read, so an error names the key, the value and the rule.
Count = Annotated[int, Field(ge=1)]
Every = Annotated[int, Field(ge=0)]
Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Guidance = Annotated[float, Field(ge=1, allow_inf_nan=False)]
Fraction = Annotated[float, Field(ge=0, lt=1)]
Side = Annotated[int, Field(ge=16, multiple_of=16)]
# One side for square images or [height, width]; models.base.image_size reads either.
Resolution = Union[Side, Annotated[list[Side], Field(min_length=2, max_length=2)]]


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
    num_groups: Count = 48
    """Prompts drawn per epoch over ALL ranks; each becomes one group."""
    group_size: Annotated[int, Field(ge=2)] = 24
    """Images per prompt (K), over all ranks."""
    batch_size: Count = 12
    """Images per forward pass on each rank during rollouts. Fixed per forward, so results do not depend on the number of ranks."""
    num_steps: Annotated[int, Field(ge=2)] = 10
    """Sampling steps of a training rollout."""
    guidance_scale: Guidance = 4.5
    """Classifier-free guidance scale (>= 1); 1.0 disables CFG (one forward instead of two). Training uses the same guidance."""
    resolution: Resolution = 512
    """Image size in pixels: one number for square images, or [height, width]."""
    same_initial_noise: bool = False
    """Start every sample of a group from the same initial noise (flow_grpo's same_latent); the SDE noise stays each sample's own, so a group's images differ only through the stochastic steps."""


@dataclass
class SDEConfig:
    dynamics: Literal["flow_sde", "dance_sde", "cps"] = "flow_sde"
    """Stochastic step: flow_sde (Flow-GRPO), dance_sde (DanceGRPO), cps (coefficients-preserving)."""
    noise_level: Positive = 0.7
    """Noise level a (flow_sde, cps) or eta (dance_sde)."""
    window: Literal["all", "fixed", "random", "none"] = "all"
    """Which sampling steps are stochastic (and, for grpo, trained): all (every step but the last), fixed (`steps`), random (a window of `window_size` steps starting in `window_range`, redrawn each epoch), none (ODE sampling: nft and awm only, which train on the final samples). Other steps are ODE steps."""
    steps: list[Annotated[int, Field(ge=0)]] = field(default_factory=list)
    """Step indices for window=fixed."""
    window_size: Count = 2
    """Number of consecutive stochastic steps for window=random."""
    window_range: Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=2, max_length=2)] = field(default_factory=lambda: [0, 4])
    """Inclusive [low, high] range of the window's first step for window=random."""


@dataclass
class TrainConfig:
    batch_size: Count = 12
    """Images per forward pass on each rank during the update (keep equal to sample.batch_size for an exactly on-policy first step)."""
    num_minibatches: Count = 2
    """Optimizer steps per inner epoch; the epoch's samples are split into this many global minibatches."""
    inner_epochs: Count = 1
    """Passes over the epoch's samples."""
    learning_rate: Positive = 3e-4
    """AdamW learning rate."""
    weight_decay: NonNegative = 1e-4
    """AdamW weight decay."""
    adam_betas: Annotated[list[Fraction], Field(min_length=2, max_length=2)] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    adam_eps: Positive = 1e-8
    """AdamW epsilon."""
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"] = "constant"
    """Learning-rate schedule name (diffusers.optimization.get_scheduler): constant, constant_with_warmup, linear, cosine."""
    lr_warmup_steps: Every = 0
    """Warm-up optimizer steps of the schedule."""
    clip_range: Positive = 1e-4
    """PPO clip range eps on the probability ratio."""
    beta: NonNegative = 0.04
    """Weight of the KL to the reference policy (0 disables it and the reference forward)."""
    objective: Literal["grpo", "nft", "awm"] = "grpo"
    """grpo: Flow-GRPO's clipped surrogate on the trained SDE steps' log-probs; nft: DiffusionNFT and awm: Advantage Weighted Matching, both on forward-process samples of each rollout's clean latent (rl/forward.py), CFG-free, with train.beta weighing a KL on velocities (nft samples with an old policy, awm with the current one)."""
    nft_beta: Positive = 1.0
    """nft: how far the implicit positive and negative policies sit from the old one (DiffusionNFT's beta; 1.0 published, 0.1 for OCR and multi-reward runs)."""
    nft_optimality: Literal["linear", "positive_only", "binary"] = "linear"
    """nft: advantage to optimality probability: linear 0.5 + A / (2 adv_clip); positive_only treats below-average samples as neutral; binary uses the sign of A."""
    nft_loss_scale: Positive = 5.0
    """nft: factor on the policy loss (the KL term is not scaled): DiffusionNFT's 5.0; FIRM trains its few-step distilled generators with 0.5."""
    awm_steps: Count = 6
    """awm: timesteps each sample trains on per epoch, one drawn from each of this many equal strata of the rollout's timesteps (at most sample.num_steps)."""
    awm_weighting: Literal["ghuber", "mse", "t_mse", "t2_mse"] = "ghuber"
    """awm: the surrogate log-likelihood of a sample from its velocity error (ghuber: -t ((mse + 1e-10)^0.25 - 1e-10^0.25) / 0.25, the published default)."""
    awm_clip_range: Positive = 1.0
    """awm: clip range of the likelihood ratio to the sampling policy (1.0 published: rho in [0, 2])."""
    awm_ema_weight: NonNegative = 1.0
    """awm: weight of the regulariser mean_d (v_theta - v_ema)^2 toward an EMA copy of the trained weights that follows them after each epoch with d = min(0.001 optimizer steps, train.awm_ema_max_decay) (AWM's published 1.0 and 0.3); 0 turns it off and keeps no copy."""
    awm_ema_max_decay: Fraction = 0.3
    """awm: the cap of that EMA's decay (0.3 published)."""
    kl: Optional[Literal["latent", "velocity"]] = None
    """What the KL to the reference (weight train.beta) is measured on. latent: Flow-GRPO's mean_d (mu_theta - mu_ref)^2 / (2 s_t^2) between the SDE step's Gaussian means, grpo only; velocity: mean_d (v_theta - v_ref)^2 between the velocities (guided, for grpo), the same scale at every step. Unset: latent for grpo, velocity for nft and awm (their only choice)."""
    grpo_guard: bool = False
    """GRPO-Guard: the clipped surrogate on the normalised log-ratio mean_d[eps (mean_theta - mean_old)], on one scale at every step whatever its noise, and each step's policy loss divided by its dt (published with clip_range 2e-6 to 4e-6 and beta 0)."""
    max_grad_norm: Positive = 1.0
    """Gradient-norm clip (set once; under DeepSpeed it becomes the engine's gradient_clipping)."""
    adv_clip: Positive = 5.0
    """Advantages are clipped to [-adv_clip, adv_clip]."""
    global_std: bool = True
    """Normalise advantages by the std of all rewards of the epoch (true) or by each group's std (false)."""
    drop_zero_std: bool = True
    """Leave out of the update the samples of groups whose rewards are all equal."""
    ema: bool = True
    """Keep an EMA of the trainable weights and evaluate with it."""
    ema_decay: Fraction = 0.9
    """EMA decay per EMA update."""
    ema_every: Count = 8
    """Optimizer steps between EMA updates."""
    max_nonfinite_steps: Count = 3
    """Optimizer steps in a row skipped for a non-finite loss or gradient norm before the run stops with an error."""


@dataclass
class EvalConfig:
    every: Every = 10
    """Evaluate every this many epochs (and at the end); 0 = only at the end."""
    before_training: bool = True
    """Also evaluate before the first update (logged as epoch 0)."""
    num_prompts: Count = 64
    """Held-out prompts per evaluation (the first ones of data.eval_prompts)."""
    samples_per_prompt: Count = 1
    """Samples per held-out prompt, each with its own noise (more samples, less noisy metrics)."""
    num_steps: Count = 40
    """ODE steps of an evaluation sample."""
    guidance_scale: Guidance = 4.5
    """CFG scale for evaluation samples (>= 1; 1.0 disables CFG)."""
    resolution: Optional[Resolution] = None
    """Image size of evaluation samples, like sample.resolution; unset: sample.resolution. Evaluation is ODE-only, so it can run at the size a model will be used at while rollouts stay small."""
    batch_size: Count = 8
    """Images per forward pass on each rank during evaluation."""
    noise_seed: Optional[int] = None
    """Seed of the evaluation noise; unset: the run's `seed`. Another value checks a trained model on noise its run never evaluated with (compare runs only at the same value)."""
    pass_fail: Optional[str] = None
    """A reward component scored 0 or 1, such as a verifiable monitor (`shapes_geneval/strict`), that frames each image of the evaluation pictures pass or fail; unset: no marks."""
    rewards: dict[str, RewardSpec] = field(default_factory=dict)
    """Reward workers scored on the held-out samples only, entries as in `rewards` (a heavy judge you do not want in the training loop, a benchmark score): logged as eval/<component> with their paired change, beside the training rewards, never trained on (their role is monitor whatever it says). Names must differ from the `rewards` entries."""


@dataclass
class LogConfig:
    wandb_mode: Literal["online", "offline", "disabled"] = "online"
    """W&B mode; offline writes the run under run_dir/wandb for a later `wandb sync`."""
    project: str = "trustgrpo"
    """W&B project."""
    run_name: Optional[str] = None
    """W&B run name; defaults to the run directory's name."""
    group: Optional[str] = None
    """W&B group; `python -m rl.sweep` puts every run of one sweep in one group."""
    image_every: Every = 10
    """Log a grid of rollout images every this many epochs (0 = never)."""
    save_every: Every = 10
    """Checkpoint every this many epochs (the end of a run always saves)."""
    keep_checkpoints: Count = 2
    """How many of this run's newest checkpoints to keep on disk (at least 1; the one just written is never deleted)."""
    progress: bool = True
    """Show progress bars on the main process."""
    reasoning_every: Every = 10
    """Every this many epochs (and the first), write what the judges wrote about some rollout samples beside their images and scores: run_dir/reasoning/epoch_NNNNN.jsonl with the images as PNG, and a W&B table (0 = never; only rewards that keep their replies, such as the FIRM judges, write any)."""
    reasoning_samples: Count = 16
    """Samples per reasoning table (the first ones of each rank, shared out over the ranks)."""
    save_samples: bool = False
    """Write every sample's prompt, group, reward components and advantage to run_dir/samples/epoch_NNNNN.jsonl."""


@dataclass
class RunConfig:
    run_dir: str = "runs/default"
    """Directory for metrics.jsonl, checkpoints, images and W&B files; one run at a time. `{wandb_run_id}` in it becomes the W&B run id (sweeps)."""
    num_epochs: Count = 100
    """Epochs (rollout + update) to train in total; raise it when resuming to train longer."""
    seed: Every = 0
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
    if origin is Annotated:
        base, *rules = typing.get_args(tp)
        shown = [text for rule in rules for text in _rules(rule)]
        return _type_name(base) + (f" ({', '.join(shown)})" if shown else "")
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in typing.get_args(tp))}]"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


_SYMBOLS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<", "multiple_of": "a multiple of", "min_length": "length >=", "max_length": "length <="}


def _rules(field_info) -> list[str]:
    """The constraints of a pydantic Field as short text: ">= 1", "a multiple of 16", "finite"."""
    metadata = getattr(field_info, "metadata", [])
    shown = [f"{symbol} {getattr(meta, name)}" for meta in metadata for name, symbol in _SYMBOLS.items() if getattr(meta, name, None) is not None]
    lengths = [text for text in shown if text.startswith("length")]
    if len(lengths) == 2 and lengths[0].split()[-1] == lengths[1].split()[-1]:  # min == max
        shown = [text for text in shown if not text.startswith("length")] + [f"length {lengths[0].split()[-1]}"]
    return shown + (["finite"] if any(getattr(meta, "allow_inf_nan", True) is False for meta in metadata) else [])


@functools.lru_cache(maxsize=None)
def _adapter(tp: Any) -> TypeAdapter:
    return TypeAdapter(tp)


def _convert(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check `value` against the annotation `tp` and build nested dataclasses."""
    origin = typing.get_origin(tp)
    if origin is Annotated:
        converted = _convert(value, typing.get_args(tp)[0], key, source)
        try:
            _adapter(tp).validate_python(converted)
        except ValidationError as err:
            rule = "; ".join(e["msg"] for e in err.errors())
            raise ConfigError(f"{source}: `{key}` = {value!r}: {rule[0].lower() + rule[1:]}") from None
        return converted
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
    hints = typing.get_type_hints(cls, include_extras=True)
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
    s = config.sample
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
    sde = config.sde
    if sde.window == "fixed":
        if not sde.steps:
            raise ConfigError("`sde.steps` must list step indices when sde.window is fixed")
        if max(sde.steps) >= s.num_steps:
            raise ConfigError(f"`sde.steps` = {sde.steps}: every step must be below sample.num_steps = {s.num_steps}")
    if sde.window == "random":
        low, high = sde.window_range
        if low > high:
            raise ConfigError(f"`sde.window_range` = {sde.window_range} must be [low, high] with low <= high")
        if high + sde.window_size > s.num_steps:
            raise ConfigError(
                f"`sde.window_range` = {sde.window_range} with sde.window_size = {sde.window_size}: a window starting at {high} "
                f"runs past the {s.num_steps} sampling steps; every window it can draw must end before step {s.num_steps}"
            )
    if config.train.objective == "grpo" and config.sde.window == "none":
        raise ConfigError("`sde.window` none samples without stochastic steps, but train.objective grpo trains on them; pick all, fixed or random (nft and awm may sample with ODE)")
    if config.train.objective != "grpo" and config.train.kl == "latent":
        raise ConfigError(f"`train.kl` latent measures the SDE step's Gaussian means, which train.objective {config.train.objective} does not have; use train.kl=velocity (or leave it unset)")
    if config.train.objective != "grpo" and config.train.grpo_guard:
        raise ConfigError(f"`train.grpo_guard` applies to train.objective grpo, not {config.train.objective}: it normalises the SDE step's probability ratio")
    shared = sorted(set(config.eval.rewards) & set(config.rewards))
    if shared:
        raise ConfigError(f"`eval.rewards.{shared[0]}` is also a `rewards` entry: training rewards are scored at evaluation already; rename or remove one")
    if config.eval.pass_fail is not None and config.eval.pass_fail.split("/")[0] not in {**config.rewards, **config.eval.rewards}:
        raise ConfigError(f"`eval.pass_fail` = {config.eval.pass_fail!r} names no reward component; components come from: {', '.join({**config.rewards, **config.eval.rewards})}")
    eval_file = data.eval_prompts or data.eval_edits
    if eval_file:
        available = _count_entries(eval_file)
        if config.eval.num_prompts > available:
            raise ConfigError(f"`eval.num_prompts` = {config.eval.num_prompts} but {eval_file} holds {available}; lower it to at most {available}")


def _count_entries(path: str) -> int:
    """Non-empty lines of a prompt or JSONL file (what the data reader will find)."""
    try:
        return sum(1 for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip())
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path} is not UTF-8 text (byte {err.start}); save it as UTF-8") from None


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
    hints = typing.get_type_hints(cls, include_extras=True)
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
