"""Run one config under several sets of overrides and compare the runs.

    python -m rl.sweep SWEEP.yaml [key=value ...]      (or: trustgrpo-sweep SWEEP.yaml ...)

A sweep file names a base run config and its variants, as a list of named override sets, a grid
(every combination of the listed values), or both (each variant at every grid point):

    base: ../demo.yaml                 # relative to the sweep file
    run_dir: runs/demo                 # each variant runs in run_dir/<variant>
    overrides: {num_epochs: 20}        # applied to every variant
    variants:
      compressibility:
        description: trained on JPEG compressibility alone
        overrides: {rewards.jpeg_compressibility.role: train, rewards.shapes_geneval.role: monitor}
    grid: {train.beta: [0.01, 0.04]}

Every variant's config is loaded and checked before the first one starts. The variants run one
after another, each as its own `python -m rl.train` (on a machine with CUDA: `accelerate launch`,
with `accelerate_config` when set); a variant that fails is reported and the others go on. The
overrides after SWEEP.yaml apply to every variant (`seed=1`), except `run_dir=`, which moves the
sweep's folder. All W&B runs of one sweep share a group. At the end the sweep prints, for every
run, the trained reward and every other reward component before -> after training with the
standard error of the change, says in words what happened, and writes into its folder
comparison.md, comparison.json and comparison.png (the base model's held-out images above each
run's, the same prompts and noise, each image marked pass or fail by eval.pass_fail).

`--report` writes the comparison again from the runs on disk without training anything.
W&B's own sweep files (configs/sweeps/reward_mix.yaml: `program`, `method`, `parameters`) are run
with `wandb sweep FILE` and `wandb agent`, not here.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np

from rl.config import ConfigError, _build, _yaml, load_config, parse_overrides
from rl.evaluate import read_shown

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.=,+-]*$")


@dataclass
class VariantSpec:
    description: str = ""
    """What this variant is, in words; printed above its numbers and beside its row of images."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Dotted config keys and their values for this variant."""


@dataclass
class SweepFile:
    base: str
    """The run config every variant starts from (relative to the sweep file, or the working directory)."""
    name: Optional[str] = None
    """The sweep's name (default: the file's name); it prefixes the W&B group."""
    run_dir: Optional[str] = None
    """The sweep's folder; each variant runs in run_dir/<variant> (default: runs/<name>)."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Overrides applied to every variant, before its own."""
    variants: dict[str, VariantSpec] = field(default_factory=dict)
    """Named variants."""
    grid: dict[str, list[Any]] = field(default_factory=dict)
    """Keys and the values to try; every combination is a variant (of each named variant, when both are given)."""
    launcher: Literal["auto", "python", "accelerate"] = "auto"
    """How each variant runs: python -m rl.train, accelerate launch, or auto (accelerate when CUDA is available)."""
    accelerate_config: Optional[str] = None
    """`accelerate launch --config_file` for every variant (accelerate launcher only)."""


@dataclass
class Variant:
    name: str
    description: str
    overrides: list[str]  # key=value strings, in the order they apply
    run_dir: Path


@dataclass
class Sweep:
    name: str
    base: Path
    run_dir: Path
    variants: list[Variant]
    launcher: str
    accelerate_config: str | None
    group: str
    wandb_mode: str
    project: str


def _as_override(key: str, value: Any) -> str:
    return f"{key}={json.dumps(value)}"  # JSON is YAML: parse_overrides reads it back as the same value


def _resolve(path: str, folder: Path) -> Path:
    candidate = Path(path)
    if candidate.is_absolute() or not (folder / candidate).exists():
        return candidate
    return folder / candidate


def load_sweep(path: str | os.PathLike, extra: list[str] = (), *, new_runs: bool = True) -> Sweep:
    """Read and check a sweep file; load every variant's config (errors name the variant). With
    `new_runs`, refuse variant folders that already hold runs (unless overwrite=true)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file {path} does not exist")
    try:
        data = _yaml(path.read_text())
    except Exception as err:  # yaml errors and duplicate keys
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping (base:, variants: or grid:)")
    if {"program", "method", "command"} & set(data):
        raise ConfigError(f"{path} is a W&B sweep file: run it with `wandb sweep {path}` and `wandb agent`; "
                          "rl.sweep runs files with base: and variants: or grid:")
    spec: SweepFile = _build(SweepFile, data, "", str(path))
    if not spec.variants and not spec.grid:
        raise ConfigError(f"{path}: list `variants` or `grid` (or both); with neither there is nothing to compare")
    for key, values in spec.grid.items():
        if not values:
            raise ConfigError(f"{path}: `grid.{key}` lists no values")
    base = _resolve(spec.base, path.parent)
    if not base.is_file():
        raise ConfigError(f"{path}: `base` = {spec.base!r}: no such config (looked beside the sweep file and in {Path.cwd()})")
    name = spec.name or path.stem
    extra_pairs = parse_overrides(list(extra))
    run_dir = Path(spec.run_dir or f"runs/{name}")
    passed = []
    for key, value in extra_pairs:
        if key == "run_dir":
            run_dir = Path(str(value))
        else:
            passed.append(_as_override(key, value))
    named = spec.variants or {"": VariantSpec()}
    points = [dict(zip(spec.grid, combo)) for combo in itertools.product(*spec.grid.values())] if spec.grid else [{}]
    variants = []
    for (vname, vspec), point in itertools.product(named.items(), points):
        label = ",".join(f"{k}={v}" for k, v in point.items())
        full = "-".join(part for part in (vname, label) if part)
        if not NAME.match(full):
            raise ConfigError(f"{path}: variant name {full!r} must be letters, digits and _ . = , + - (it names a folder)")
        overrides = [_as_override(k, v) for k, v in spec.overrides.items()]
        overrides += [_as_override(k, v) for k, v in vspec.overrides.items()]
        overrides += [_as_override(k, v) for k, v in point.items()]
        overrides += passed
        description = "; ".join(part for part in (vspec.description, label) if part)
        variants.append(Variant(full, description, overrides, run_dir / full))
    if len({v.name for v in variants}) != len(variants):
        raise ConfigError(f"{path}: two variants share a name")
    configs = []
    for variant in variants:
        try:
            configs.append(load_config(base, [*variant.overrides, f"run_dir={variant.run_dir}"]))
        except ConfigError as err:
            raise ConfigError(f"variant `{variant.name}`: {err}") from None
        if any(key.startswith("resume") for key in variant.overrides):
            raise ConfigError(f"variant `{variant.name}`: a sweep starts new runs; resume one run with python -m rl.train")
    if new_runs and not any(config.overwrite for config in configs):
        from rl.rundir import holds_a_run

        taken = [str(v.run_dir) for v in variants if holds_a_run(v.run_dir)]
        if taken:
            raise ConfigError(f"{', '.join(taken)} already hold runs; give the sweep another folder (run_dir=runs/...), "
                              "or add overwrite=true to start new runs there (earlier ones move to <run_dir>/previous/)")
    if spec.launcher == "python" and spec.accelerate_config:
        raise ConfigError(f"{path}: `accelerate_config` is for launcher accelerate or auto, not python")
    group = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    return Sweep(name, base, run_dir, variants, spec.launcher, spec.accelerate_config, group,
                 configs[0].log.wandb_mode, configs[0].log.project)


def command(sweep: Sweep, variant: Variant, launcher: str) -> list[str]:
    """The command line that runs one variant."""
    args = ["-m", "rl.train", str(sweep.base), *variant.overrides, f"run_dir={variant.run_dir}",
            f"log.group={sweep.group}", f"log.run_name={sweep.name}/{variant.name}"]
    if launcher == "accelerate":
        # `accelerate launch` through this interpreter: the same environment whatever PATH holds.
        launch = [sys.executable, "-m", "accelerate.commands.launch"]
        return [*launch, *(["--config_file", sweep.accelerate_config] if sweep.accelerate_config else []), *args]
    return [sys.executable, *args]


def _launcher(choice: str) -> str:
    if choice != "auto":
        return choice
    import torch

    return "accelerate" if torch.cuda.is_available() else "python"


def run_variant(cmd: list[str]) -> tuple[int, str]:
    """Run one variant, its output passed through; its exit code and the last line it wrote to stderr."""
    process = subprocess.Popen(cmd, stderr=subprocess.PIPE)
    tail: deque[bytes] = deque(maxlen=64)
    out = getattr(sys.stderr, "buffer", None)
    try:
        for chunk in iter(lambda: process.stderr.read1(8192), b""):
            tail.append(chunk)
            if out is not None:
                out.write(chunk)
                out.flush()
            else:
                sys.stderr.write(chunk.decode(errors="replace"))
        code = process.wait()
    except BaseException:
        process.kill()
        process.wait()
        raise
    lines = [line.strip() for line in re.split(r"[\r\n]", b"".join(tail).decode(errors="replace")) if line.strip()]
    return code, (lines[-1] if lines else "")


# --------------------------------------------------------------------------- the comparison


@dataclass
class Change:
    key: str  # eval/<component> or eval/reward
    role: str  # "trained reward", "train" or "monitor"
    before: float
    after: float
    se: float | None

    @property
    def change(self) -> float:
        return self.after - self.before

    @property
    def z(self) -> float | None:
        """The change in standard errors (None without one; inf for a change with no spread)."""
        if self.se is None or not math.isfinite(self.change):
            return None
        if self.se == 0:
            return 0.0 if self.change == 0 else math.copysign(math.inf, self.change)
        return self.change / self.se

    @property
    def name(self) -> str:
        return self.key.removeprefix("eval/")


@dataclass
class Outcome:
    variant: Variant
    exit_code: int | None = None  # None: not run (this report only reads the disk)
    error: str = ""
    seconds: float | None = None
    epochs: tuple[int, int] | None = None  # the evaluations compared
    changes: list[Change] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return self.exit_code not in (0, None) or (self.exit_code is None and not self.changes)

    @property
    def compared(self) -> bool:
        return not self.failed and bool(self.changes)


def read_changes(run_dir: Path) -> tuple[tuple[int, int] | None, list[Change]]:
    """The first evaluation (epoch 0) and the last one from metrics.jsonl, per metric."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return None, []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and "eval/reward" in row:
            rows.append(row)
    if len(rows) < 2 or rows[0].get("epoch") != 0:
        return None, []
    first, last = rows[0], rows[-1]
    shown = run_dir / "images" / "eval_shown.json"
    roles = json.loads(shown.read_text()).get("roles", {}) if shown.exists() else {}
    changes = []
    for key, before in first.items():
        if not key.startswith("eval/") or key.endswith(("/change", "/change_se")) or key.startswith("eval/time"):
            continue
        after = last.get(key)
        if before is None or after is None:
            continue
        role = "trained reward" if key == "eval/reward" else roles.get(key.removeprefix("eval/"), "")
        changes.append(Change(key, role, float(before), float(after), last.get(f"{key}/change_se")))
    changes.sort(key=lambda c: (c.role != "trained reward", c.role != "train", c.key))
    return (int(first["epoch"]), int(last["epoch"])), changes


def _decimals(change: Change) -> int:
    """Enough decimals to show the standard error with two significant digits."""
    scale = change.se if change.se else max(abs(change.before), abs(change.after), 1e-12)
    return int(min(6, max(2, 1 - math.floor(math.log10(scale))))) if math.isfinite(scale) and scale > 0 else 4


def format_change(change: Change) -> str:
    d = _decimals(change)
    text = f"{change.before:.{d}f} -> {change.after:.{d}f} ({change.change:+.{d}f}"
    if change.se is None:
        return text + ")"
    z = change.z
    return text + f" +- {change.se:.{d}f}" + (f", {z:+.1f} se)" if z is not None and math.isfinite(z) else ")")


def what_happened(outcome: Outcome) -> str:
    """One paragraph, in words, with the numbers: did the trained reward rise, and what did the
    components it was not trained on do (a monitor falling while the reward rises is a gamed critic)."""
    v = outcome.variant
    if outcome.failed:
        reason = outcome.error or "it left no evaluation before and after training in metrics.jsonl"
        code = f" (exit code {outcome.exit_code})" if outcome.exit_code not in (0, None) else ""
        return f"{v.name} failed{code}: {reason}. Its numbers are missing; its run_dir is {v.run_dir}."
    if not outcome.changes:
        return (f"{v.name} finished but left no evaluation before and after training to compare "
                f"(it needs eval.before_training and held-out prompts); its run_dir is {v.run_dir}.")
    reward = next(c for c in outcome.changes if c.role == "trained reward")
    z = reward.z
    if z is None:
        moved = f"the trained reward went {reward.before:.4g} -> {reward.after:.4g}"
    elif z > 2:
        moved = f"the trained reward rose ({format_change(reward)})"
    elif z < -2:
        moved = f"the trained reward fell ({format_change(reward)})"
    else:
        moved = f"the trained reward did not move beyond two standard errors ({format_change(reward)})"
    monitors = [c for c in outcome.changes if c.role == "monitor"]
    fell = [c for c in monitors if c.z is not None and c.z < -2]
    rose = [c for c in monitors if c.z is not None and c.z > 2]
    parts = [f"{v.name} ({v.description})" if v.description else v.name, ": ", moved, ". "]
    if fell:
        parts.append("Monitors it never trained on fell: " + "; ".join(f"{c.name} {format_change(c)}" for c in fell) + ". ")
        if z is not None and z > 2:
            parts.append("The policy raised its reward at the expense of what the monitors check: the critic was gamed. ")
    elif monitors:
        held = "; ".join(f"{c.name} {format_change(c)}" for c in monitors if c not in rose)
        parts.append("No monitor fell by more than two standard errors" + (f" ({held})" if held else "") + ". ")
    if rose:
        parts.append("Monitors that rose: " + "; ".join(f"{c.name} {format_change(c)}" for c in rose) + ". ")
    trained = [c for c in outcome.changes if c.role == "train"]
    if trained:
        parts.append("Trained components: " + "; ".join(f"{c.name} {format_change(c)}" for c in trained) + ". ")
        up = [c.name for c in trained if c.z is not None and c.z > 2]
        down = [c.name for c in trained if c.z is not None and c.z < -2]
        if up and down:
            parts.append(f"They pulled apart: {', '.join(up)} rose while {', '.join(down)} fell; "
                         "the policy bought one at the price of the other.")
    return "".join(parts).strip()


def table(outcomes: list[Outcome]) -> str:
    """A markdown table: one row per run and metric, before -> after with the change's standard error."""
    lines = ["| run | metric | role | before | after | change | se | change / se |", "|---|---|---|---|---|---|---|---|"]
    for outcome in outcomes:
        if not outcome.compared:
            lines.append(f"| {outcome.variant.name} | {'failed' if outcome.failed else 'no evaluation to compare'} | | | | | | |")
            continue
        for c in outcome.changes:
            d = _decimals(c)
            se = f"{c.se:.{d}f}" if c.se is not None else ""
            z = f"{c.z:+.1f}" if c.z is not None and math.isfinite(c.z) else ""
            lines.append(f"| {outcome.variant.name} | {c.name} | {c.role} | {c.before:.{d}f} | {c.after:.{d}f} | {c.change:+.{d}f} | {se} | {z} |")
    return "\n".join(lines)


def comparison_picture(sweep: Sweep, outcomes: list[Outcome]):
    """The base model's shown held-out images, then each run's after training (same prompts, same
    noise), each marked pass/fail by eval.pass_fail. None when no run kept its images."""
    from rl.pictures import Row, labelled_grid

    rows, captions, pass_name, base = [], None, None, None
    for outcome in outcomes:
        if not outcome.compared:
            continue
        run_dir = outcome.variant.run_dir
        shown_file = run_dir / "images" / "eval_shown.json"
        before, after = read_shown(run_dir, outcome.epochs[0]), read_shown(run_dir, outcome.epochs[1])
        if before is None or after is None or not shown_file.exists():
            continue
        info = json.loads(shown_file.read_text())
        if captions is None:
            captions, pass_name = info["captions"], info.get("pass_fail")
        elif info["captions"] != captions:
            continue  # a run that evaluated other prompts cannot share the columns
        marked = info.get("pass_fail") is not None
        if base is None or not np.array_equal(base, before[0]):
            label = "base model (before training)" if base is None else f"base model, {outcome.variant.name}'s noise"
            rows.append(Row(label, before[0], before[1] if marked else None))
            base = before[0]
        label = f"{outcome.variant.name}, epoch {outcome.epochs[1]}" + (f": {outcome.variant.description}" if outcome.variant.description else "")
        rows.append(Row(label, after[0], after[1] if marked else None))
    if not rows:
        return None
    title = f"sweep {sweep.name}: held-out prompts (columns), the base model and each run after training (rows), the same noise in every row"
    return labelled_grid(rows, captions, title=title, pass_name=pass_name)[0]


def report(sweep: Sweep, outcomes: list[Outcome]) -> str:
    """Write comparison.md / .json / .png into the sweep's folder (and to W&B); return the printed text."""
    sweep.run_dir.mkdir(parents=True, exist_ok=True)
    words = [what_happened(outcome) for outcome in outcomes]
    epochs = sorted({o.epochs for o in outcomes if o.epochs})
    span = ", ".join(f"epoch {a} -> {b}" for a, b in epochs) or "no evaluations"
    heading = (f"sweep {sweep.name}: {len(outcomes)} run(s) in {sweep.run_dir}; held-out evaluation before -> after training "
               f"({span}); change +- its standard error over the held-out prompts, same noise before and after")
    text = "\n".join([heading, "", table(outcomes), "", "What happened:", *[f"- {w}" for w in words]])
    picture = comparison_picture(sweep, outcomes)
    if picture is not None:
        picture.save(sweep.run_dir / "comparison.png")
        text += f"\n\nImages: {sweep.run_dir / 'comparison.png'} (rows: the base model, then each run; columns: held-out prompts)"
    (sweep.run_dir / "comparison.md").write_text(text + "\n")
    (sweep.run_dir / "comparison.json").write_text(json.dumps({
        "sweep": sweep.name, "group": sweep.group, "base": str(sweep.base),
        "runs": [{"name": o.variant.name, "description": o.variant.description, "run_dir": str(o.variant.run_dir),
                  "overrides": o.variant.overrides, "exit_code": o.exit_code, "error": o.error, "seconds": o.seconds,
                  "epochs": o.epochs, "failed": o.failed, "what_happened": w,
                  "metrics": [{"metric": c.name, "role": c.role, "before": c.before, "after": c.after, "se": c.se} for c in o.changes]}
                 for o, w in zip(outcomes, words)],
    }, indent=1))
    if sweep.wandb_mode != "disabled":
        _log_to_wandb(sweep, outcomes, picture)
    return text


def _log_to_wandb(sweep: Sweep, outcomes: list[Outcome], picture) -> None:
    """One more W&B run in the sweep's group holding the comparison table and picture."""
    import wandb

    os.environ.setdefault("WANDB_DIR", str(sweep.run_dir))
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        os.environ.setdefault(var, str(sweep.run_dir / "wandb" / ".cache"))
    (sweep.run_dir / "wandb").mkdir(parents=True, exist_ok=True)
    run = wandb.init(project=sweep.project, group=sweep.group, name=f"{sweep.name}/comparison", job_type="sweep-comparison",
                     dir=str(sweep.run_dir), mode=sweep.wandb_mode, config={"base": str(sweep.base), "variants": [v.name for v in sweep.variants]})
    rows = [[o.variant.name, c.name, c.role, c.before, c.after, c.change, c.se] for o in outcomes for c in o.changes]
    logged = {"comparison/table": wandb.Table(columns=["run", "metric", "role", "before", "after", "change", "se"], data=rows)}
    if picture is not None:
        logged["comparison/images"] = wandb.Image(str(sweep.run_dir / "comparison.png"), caption="rows: the base model, then each run")
    run.log(logged)
    run.finish()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="trustgrpo-sweep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", help="sweep file (see configs/sweeps/demo.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides for every variant, e.g. seed=1; run_dir=DIR moves the sweep")
    parser.add_argument("--report", action="store_true", help="only compare the runs already on disk (train nothing)")
    parser.add_argument("--dry-run", action="store_true", help="print each variant's command and stop")
    args = parser.parse_args(argv)
    try:
        sweep = load_sweep(args.sweep, args.overrides, new_runs=not args.report)
    except ConfigError as err:
        print(f"sweep error: {err}", file=sys.stderr)
        return 2
    launcher = _launcher(sweep.launcher)
    if args.dry_run:
        for variant in sweep.variants:
            print(f"{variant.name}: {' '.join(command(sweep, variant, launcher))}")
        return 0
    outcomes = []
    try:
        for i, variant in enumerate(sweep.variants, 1):
            outcome = Outcome(variant)
            if not args.report:
                print(f"\n=== sweep {sweep.name}: run {i} of {len(sweep.variants)}: {variant.name}"
                      + (f" ({variant.description})" if variant.description else "") + f" -> {variant.run_dir}", flush=True)
                start = time.perf_counter()
                outcome.exit_code, outcome.error = run_variant(command(sweep, variant, launcher))
                outcome.seconds = time.perf_counter() - start
                if outcome.exit_code == 0:
                    outcome.error = ""
            outcome.epochs, outcome.changes = read_changes(variant.run_dir)
            outcomes.append(outcome)
    except KeyboardInterrupt:
        print(f"\nsweep {sweep.name}: interrupted; comparing the runs that finished", file=sys.stderr)
    print("\n" + report(sweep, outcomes), flush=True)
    return 1 if any(o.failed for o in outcomes) or len(outcomes) < len(sweep.variants) else 0


if __name__ == "__main__":
    sys.exit(main())
