"""rl.sweep: a base config under named variants and grids, every variant checked before the first
runs, each run in its own folder, a failing variant reported while the others go on, and the
comparison (table, words, picture, W&B group) read from what the runs wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from rl.config import ConfigError, load_config
from rl.sweep import Change, Outcome, Variant, load_sweep, main, read_changes, table, what_happened

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny_cpu.yaml"


def write_sweep(folder: Path, data: dict) -> Path:
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_named_variants_times_a_grid_in_order_with_command_line_overrides_last(tmp_path):
    path = write_sweep(tmp_path, {
        "base": str(TINY), "run_dir": str(tmp_path / "sweep"), "overrides": {"num_epochs": 3, "seed": 5},
        "variants": {"low": {"overrides": {"train.learning_rate": 1e-4}}, "high": {"description": "fast", "overrides": {"train.learning_rate": 1e-2}}},
        "grid": {"train.beta": [0.0, 0.04]},
    })
    sweep = load_sweep(path, ["seed=3", f"run_dir={tmp_path / 'moved'}"])
    names = [v.name for v in sweep.variants]
    assert names == ["low-train.beta=0.0", "low-train.beta=0.04", "high-train.beta=0.0", "high-train.beta=0.04"]
    assert [v.run_dir for v in sweep.variants] == [tmp_path / "moved" / n for n in names]
    assert sweep.variants[3].description == "fast; train.beta=0.04"
    seen = []
    for variant in sweep.variants:
        config = load_config(sweep.base, variant.overrides)
        seen.append((config.train.learning_rate, config.train.beta))
        assert config.num_epochs == 3 and config.seed == 3  # the command line wins over the sweep file
    assert seen == [(1e-4, 0.0), (1e-4, 0.04), (1e-2, 0.0), (1e-2, 0.04)]
    assert sweep.group.startswith("sweep-")


def bad_sweeps(tmp_path):
    good = {"base": str(TINY), "run_dir": str(tmp_path / "s"), "variants": {"a": {}}}
    return {
        "W&B sweep file": (ROOT / "configs" / "sweeps" / "reward_mix.yaml", "is a W&B sweep file: run it with `wandb sweep"),
        "missing base": ({**good, "base": "nowhere.yaml"}, "`base` = 'nowhere.yaml': no such config"),
        "nothing to compare": ({"base": str(TINY)}, "list `variants` or `grid`"),
        "unknown key": ({**good, "varients": {}}, "unknown key `varients`"),
        "bad variant value": ({**good, "variants": {"a": {}, "b": {"overrides": {"train.beta": -1}}}}, "variant `b`:"),
        "unknown config key": ({**good, "variants": {"a": {"overrides": {"train.betta": 0.1}}}}, "variant `a`:"),
        "folder name": ({**good, "variants": {"a/b": {}}}, "variant name 'a/b'"),
        "empty grid": ({**good, "grid": {"train.beta": []}}, "`grid.train.beta` lists no values"),
        "resume": ({**good, "variants": {"a": {"overrides": {"resume": "runs/x"}}}}, "a sweep starts new runs"),
    }


@pytest.mark.parametrize("case", list(bad_sweeps(Path("/tmp"))))
def test_a_bad_sweep_fails_in_one_line_before_anything_runs(tmp_path, case, capsys):
    data, expected = bad_sweeps(tmp_path)[case]
    path = data if isinstance(data, Path) else write_sweep(tmp_path, data)
    assert main([str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sweep error:") and expected in err and "\n" not in err, err
    assert not (tmp_path / "s").exists()


def test_a_sweep_will_not_start_over_runs_already_in_its_folder(tmp_path, capsys):
    path = write_sweep(tmp_path, {"base": str(TINY), "run_dir": str(tmp_path / "s"), "variants": {"a": {}, "b": {}}})
    (tmp_path / "s" / "b" / "checkpoints" / "epoch-00005").mkdir(parents=True)
    assert main([str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 's' / 'b'} already hold runs" in err and "overwrite=true" in err
    assert not (tmp_path / "s" / "a").exists()
    assert load_sweep(path, ["overwrite=true"]).variants[1].run_dir == tmp_path / "s" / "b"


def test_the_demo_sweep_trains_compressibility_alone_then_strict_gating_compressibility():
    from rewards.runner import RewardRunner
    from rl.config import to_dict

    sweep = load_sweep(ROOT / "configs" / "sweeps" / "demo.yaml", ["run_dir=/nonexistent/demo"])
    assert [v.name for v in sweep.variants] == ["compressibility", "base_bonus"]
    configs = [load_config(sweep.base, [*v.overrides, f"run_dir={v.run_dir}"]) for v in sweep.variants]
    runners = [RewardRunner(c.rewards, c.reward_mix) for c in configs]
    assert runners[0].roles == {"shapes_geneval/strict": "monitor", "shapes_geneval/partial": "monitor", "jpeg_compressibility": "train"}
    assert runners[1].roles == {"shapes_geneval/strict": "train", "shapes_geneval/partial": "monitor", "jpeg_compressibility": "train"}
    scores = {"shapes_geneval/strict": np.array([1.0, 1.0, 1.0, 0.0]), "shapes_geneval/partial": np.array([1.0, 1.0, 1.0, 0.5]),
              "jpeg_compressibility": np.array([-0.005, -0.003, -0.001, -0.001])}
    np.testing.assert_allclose(runners[0].trained_reward(scores), [-0.005, -0.003, -0.001, -0.001])
    # strict x (0.4 + 0.6 q), q = (jpeg + 0.004) / 0.002 clipped to [0, 1]: a blank canvas with the caption wrong earns 0.
    np.testing.assert_allclose(runners[1].trained_reward(scores), [0.4, 0.7, 1.0, 0.0])
    # The two runs differ in their reward only: the same recipe, noise and evaluation.
    a, b = (to_dict(c) for c in configs)
    assert {k for k in a if a[k] != b[k]} == {"rewards", "reward_mix", "run_dir"}
    assert configs[0].eval.pass_fail == "shapes_geneval/strict"
    # demo_mixes.yaml is the demo plus FIRM's normalised 0.5 / 0.5 sum, its first two runs the demo's own.
    mixes = load_sweep(ROOT / "configs" / "sweeps" / "demo_mixes.yaml", ["run_dir=/nonexistent/mixes"])
    assert [v.name for v in mixes.variants] == ["compressibility", "base_bonus", "normalized_sum"]
    assert [v.overrides for v in mixes.variants[:2]] == [v.overrides for v in sweep.variants]
    third = load_config(mixes.base, mixes.variants[2].overrides)
    assert third.reward_mix.group_normalize and {k: s.weight for k, s in third.rewards.items()} == {"shapes_geneval": 0.5, "jpeg_compressibility": 0.5}


def write_run(run_dir: Path, before: dict, after: dict, roles: dict, last_epoch: int = 12) -> None:
    (run_dir / "images").mkdir(parents=True)
    rows = [{"epoch": 0, **{f"eval/{k}": v for k, (v, _) in before.items()}, "time/eval_s": 3.0},
            {"epoch": 1, "reward/x": 0.5},
            {"epoch": last_epoch, **{f"eval/{k}": v for k, (v, _) in after.items()},
             **{f"eval/{k}/change_se": se for k, (_, se) in after.items()}}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run_dir / "images" / "eval_shown.json").write_text(json.dumps({"captions": ["a"], "pass_fail": None, "roles": roles}))


def test_the_report_says_which_critic_was_gamed_which_held_and_which_run_failed(tmp_path):
    gamed, held = tmp_path / "gamed", tmp_path / "held"
    write_run(gamed, {"reward": (-0.0031, None), "jpeg": (-0.0031, None), "geneval/strict": (0.227, None), "geneval/partial": (0.42, None)},
              {"reward": (-0.0023, 0.00003), "jpeg": (-0.0023, 0.00003), "geneval/strict": (0.0, 0.034), "geneval/partial": (0.0, 0.028)},
              {"jpeg": "train", "geneval/strict": "monitor", "geneval/partial": "monitor"})
    write_run(held, {"reward": (0.1, None), "jpeg": (-0.0031, None), "geneval/strict": (0.227, None), "geneval/partial": (0.42, None)},
              {"reward": (0.13, 0.01), "jpeg": (-0.0030, 0.00004), "geneval/strict": (0.229, 0.016), "geneval/partial": (0.444, 0.016)},
              {"jpeg": "train", "geneval/strict": "train", "geneval/partial": "monitor"})
    outcomes = []
    traded = tmp_path / "traded"
    write_run(traded, {"reward": (0.12, None), "jpeg": (-0.0031, None), "geneval/strict": (0.25, None)},
              {"reward": (0.01, 0.02), "jpeg": (-0.0025, 0.00003), "geneval/strict": (0.02, 0.04)},
              {"jpeg": "train", "geneval/strict": "train"})
    cases = ((gamed, 0, ""), (held, 0, ""), (tmp_path / "broken", 4, "reward error: judge unreachable"), (tmp_path / "unevaluated", 0, ""),
             (traded, 0, ""))
    for run_dir, code, error in cases:
        outcome = Outcome(Variant(run_dir.name, "", [], run_dir), exit_code=code, error=error)
        outcome.epochs, outcome.changes = read_changes(run_dir)
        outcomes.append(outcome)
    assert outcomes[0].epochs == (0, 12) and [c.role for c in outcomes[0].changes] == ["trained reward", "train", "monitor", "monitor"]

    words = [what_happened(o) for o in outcomes]
    assert "the trained reward rose (-0.003100 -> -0.002300 (+0.000800 +- 0.000030, +26.7 se))" in words[0]
    assert "geneval/strict 0.227 -> 0.000 (-0.227 +- 0.034, -6.7 se)" in words[0]
    assert "the critic was gamed" in words[0]
    assert "the trained reward rose (0.100 -> 0.130 (+0.030 +- 0.010, +3.0 se))" in words[1]
    assert "No monitor fell by more than two standard errors (geneval/partial 0.420 -> 0.444 (+0.024 +- 0.016, +1.5 se))" in words[1]
    assert "gamed" not in words[1]
    assert words[2].startswith("broken failed (exit code 4): reward error: judge unreachable.")
    assert words[3].startswith("unevaluated finished but left no evaluation before and after training to compare")
    assert [o.failed for o in outcomes] == [False, False, True, False, False]
    assert "the trained reward fell" in words[4] and "They pulled apart: jpeg rose while geneval/strict fell" in words[4]
    assert "pulled apart" not in words[0] + words[1]

    lines = table(outcomes).splitlines()
    assert "| gamed | geneval/strict | monitor | 0.227 | 0.000 | -0.227 | 0.034 | -6.7 |" in lines
    assert "| held | geneval/strict | train | 0.227 | 0.229 | +0.002 | 0.016 | +0.1 |" in lines
    assert "| broken | failed | | | | | | |" in lines
    assert "| unevaluated | no evaluation to compare | | | | | | |" in lines


def test_a_change_in_standard_errors():
    assert Change("eval/x", "monitor", 0.5, 0.3, 0.1).z == pytest.approx(-2.0)
    assert Change("eval/x", "monitor", 0.5, 0.5, 0.0).z == 0.0
    assert Change("eval/x", "monitor", 0.5, 0.6, 0.0).z == float("inf")
    assert Change("eval/x", "monitor", 0.5, 0.6, None).z is None


def wandb_group(run_dir: Path) -> str | None:
    """The group of the offline W&B run under run_dir, from the run record of its .wandb log
    (a LevelDB-style log after a 7-byte W&B header: 32 KiB blocks of chunks with a 7-byte header
    of crc, little-endian length and type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    (log,) = run_dir.rglob("run-*.wandb")
    data = log.read_bytes()
    assert data[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "run":
                return record.run.run_group
    return None


def test_a_sweep_runs_each_variant_goes_on_past_a_failure_and_compares_them(tmp_path):
    """Real runs of the shapes model, shortened: a variant whose reward server is unreachable
    fails first, the next one still runs, and the comparison names both."""
    from PIL import Image

    quick = {"num_epochs": 1, "sample.num_groups": 2, "sample.group_size": 4, "sample.batch_size": 8, "train.batch_size": 4,
             "eval.num_prompts": 4, "eval.samples_per_prompt": 2, "eval.batch_size": 8, "log.progress": False}
    path = write_sweep(tmp_path, {
        "base": str(ROOT / "configs" / "demo.yaml"), "run_dir": str(tmp_path / "sweep"), "overrides": quick,
        "variants": {
            "unreachable": {"description": "its compressibility server is down",
                            "overrides": {"rewards.jpeg_compressibility.urls": ["http://127.0.0.1:9/"], "rewards.jpeg_compressibility.retries": 1,
                                          "rewards.jpeg_compressibility.timeout_s": 2}},
            "compressibility": {"description": "compressibility alone",
                                "overrides": {"reward_mix": {"kind": "weighted_sum"}, "rewards.shapes_geneval.role": "monitor",
                                              "rewards.shapes_geneval.monitor_components": []}},
        },
    })
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "rl.sweep", str(path), "seed=1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stderr[-3000:]
    folder = tmp_path / "sweep"
    report = json.loads((folder / "comparison.json").read_text())
    broken, good = report["runs"]
    assert broken["failed"] and broken["exit_code"] not in (0, None) and broken["what_happened"].startswith("unreachable failed (exit code")
    assert not good["failed"] and good["exit_code"] == 0 and good["epochs"] == [0, 1]
    assert {m["metric"]: m["role"] for m in good["metrics"]} == {
        "reward": "trained reward", "jpeg_compressibility": "train", "shapes_geneval/strict": "monitor", "shapes_geneval/partial": "monitor"}
    # The table's numbers are the run's own metrics.jsonl.
    rows = [json.loads(line) for line in (folder / "compressibility" / "metrics.jsonl").read_text().splitlines()]
    first, last = rows[0], rows[-1]
    strict = next(m for m in good["metrics"] if m["metric"] == "shapes_geneval/strict")
    assert (strict["before"], strict["after"], strict["se"]) == (
        first["eval/shapes_geneval/strict"], last["eval/shapes_geneval/strict"], last["eval/shapes_geneval/strict/change_se"])
    assert load_config(ROOT / "configs" / "demo.yaml", ["seed=1"]).seed == json.loads((folder / "compressibility" / "run.json").read_text())["config"]["seed"]
    assert "| compressibility | shapes_geneval/strict | monitor |" in result.stdout and "unreachable failed (exit code" in result.stdout
    picture = Image.open(folder / "comparison.png")
    assert picture.width > 4 * 128 and (folder / "comparison.md").read_text().strip() in result.stdout
    # Both training runs and the comparison are W&B runs of one group.
    groups = {wandb_group(d) for d in (folder / "compressibility" / "wandb", folder / "wandb")}
    assert groups == {report["group"]} and report["group"].startswith("sweep-")


@pytest.mark.slow
def test_the_accelerate_launcher_runs_each_variant_on_several_ranks(tiny_sd3, tmp_path):
    """launcher: accelerate (what auto picks where CUDA is) with an accelerate config: each
    variant is one `accelerate launch`, here on 2 CPU ranks, and is compared like any other."""
    path = write_sweep(tmp_path, {
        "base": str(TINY), "run_dir": str(tmp_path / "sweep"), "launcher": "accelerate",
        "accelerate_config": str(ROOT / "launch" / "accelerate" / "cpu_2proc.yaml"),
        "overrides": {"model.pretrained": str(tiny_sd3), "model.max_sequence_length": 32, "num_epochs": 1,
                      "sample.num_groups": 2, "sample.group_size": 4, "sample.batch_size": 2, "sample.num_steps": 4,
                      "train.batch_size": 2, "train.num_minibatches": 2, "eval.num_prompts": 4, "eval.num_steps": 4,
                      "eval.batch_size": 2, "log.progress": False},
        "variants": {"two_ranks": {}},
    })
    sweep = load_sweep(path)
    from rl.sweep import command

    cmd = command(sweep, sweep.variants[0], "accelerate")
    assert cmd[:5] == [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "launch" / "accelerate" / "cpu_2proc.yaml")]
    assert cmd[5:8] == ["-m", "rl.train", str(TINY)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "rl.sweep", str(path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "over 2 rank(s)" in result.stdout
    report = json.loads((tmp_path / "sweep" / "comparison.json").read_text())
    assert report["runs"][0]["exit_code"] == 0 and report["runs"][0]["epochs"] == [0, 1]
