"""Flow-GRPO, DiffusionNFT and Advantage Weighted Matching head to head, for equal training time.

    python bench/objectives.py [--objectives grpo nft awm] [--seeds 0 1 2] [--minutes 10]
        [--marks 2.5 5 7.5 10] [--jobs 1] [--threads 2] [--out runs/objectives]

Each (objective, seed) trains the shapes model (configs/shapes_strict.yaml: models/pretrained/
shapes-sd3, held-out configs/prompts/shapes_eval.txt, 64 captions x 8 = 512 paired evaluation
samples) with the objective's recipe below, in a process of its own, for --minutes of training
time: sampling, scoring and updates count, evaluations do not. At the first epoch past each mark
it evaluates and records the change in held-out strict accuracy since the base model, with its
standard error over captions (the same noise before and after). At the end the final weights
are evaluated once more on evaluation noise the run never used (eval.noise_seed = seed + 1000,
paired with the base model on that noise): a real gain holds there.

It prints one row per run (the change at each mark, the minutes to reach +5 points or "not
reached", the fresh-noise change), the mean over seeds per objective, and whether the goal holds
(an objective gains >= 5 points and >= 3 standard errors on every seed within the time, and
its fresh-noise change is at least 2 standard errors above 0); then writes objectives.md and
objectives.json to --out and one JSON object as the last line. Every run keeps its run_dir
(metrics.jsonl, the final LoRA under checkpoints/).

--jobs runs that many processes at once, each with --threads threads: on 2 cores, --jobs 2
--threads 1 takes about half the wall time, each run with one core for its minutes. Compare
figures only within one invocation: these machines are noisy.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BASE = ROOT / "configs" / "shapes_strict.yaml"
ATTENTION = "[to_q,to_k,to_v,to_out.0,add_q_proj,add_k_proj,add_v_proj,to_add_out]"
# Each objective's recipe on top of configs/shapes_strict.yaml (16 groups x 8 samples per epoch,
# 10 sampling steps, no CFG, LoRA rank 16 at lr 1e-3, 2 optimizer steps per epoch).
RECIPES: dict[str, list[str]] = {
    # Today's best Flow-GRPO recipe, as configs/shapes_strict.yaml has it: LoRA on the text stream,
    # SDE steps 0-2 trained, KL 0.01 on the step means.
    "grpo": [],
    # DiffusionNFT as published: ODE rollouts with the old policy, 9 of 10 timesteps per sample,
    # beta 1, KL 1e-4 on velocities, LoRA on the attention of both streams.
    "nft": ["train.objective=nft", "train.nft_beta=1.0", "train.beta=1e-4", "sde.window=none", f"model.lora.target_modules={ATTENTION}"],
    # AWM as published for GenEval: 6 stratified timesteps, ghuber likelihood, clip 1, KL 1e-3 and
    # the EMA regulariser (weight 1), ODE rollouts, LoRA on the attention of both streams.
    "awm": ["train.objective=awm", "train.awm_steps=6", "train.beta=1e-3", "train.awm_ema_weight=1.0", "sde.window=none",
            f"model.lora.target_modules={ATTENTION}"],
}
STRICT = "eval/shapes_geneval/strict"
FRESH_SEED_OFFSET = 1000


def train_one(objective: str, seed: int, minutes: float, marks: list[float], run_dir: Path, threads: int) -> dict:
    """One run, in this process: evaluations at the marks, the fresh-noise check at the end."""
    import torch

    torch.set_num_threads(threads)
    from rl.config import load_config
    from rl.evaluate import Evaluator
    from rl.tracking import NullTracker
    from rl.train import Trainer, reward_batch

    common = [*RECIPES[objective], f"seed={seed}", "num_epochs=100000", "log.progress=false", "log.wandb_mode=disabled",
              "log.image_every=0", "log.save_every=0"]
    config = load_config(BASE, [*common, f"run_dir={run_dir}"])
    fresh_config = load_config(BASE, [*common, f"run_dir={run_dir / 'fresh_noise'}", f"eval.noise_seed={seed + FRESH_SEED_OFFSET}"])
    (run_dir / "fresh_noise").mkdir(parents=True, exist_ok=True)
    trainer = Trainer(config)
    fresh = Evaluator(fresh_config, trainer.eval_items, policy=trainer.policy, rewards=trainer.rewards, ranks=trainer.ranks,
                      tracker=NullTracker(), sources=trainer.sources, ema=trainer.ema, show=False)
    trainer.evaluator.forget_earlier_run()
    fresh.forget_earlier_run()
    base = trainer.evaluator(0, reward_batch)
    fresh(0, reward_batch)
    budget, pending = minutes * 60.0, sorted(marks)
    elapsed, epoch, global_step, points, epochs = 0.0, 0, 0, [], []
    while pending:
        epoch += 1
        start = time.perf_counter()
        global_step, _, metrics = trainer.train_epoch(epoch, global_step)
        elapsed += time.perf_counter() - start
        epochs.append({"epoch": epoch, "minutes": elapsed / 60, "reward": metrics.get("reward/mean")})
        if elapsed >= pending[0] * 60 or elapsed >= budget:
            evaluated = trainer.evaluator(epoch, reward_batch)
            points.append({"mark": pending.pop(0), "minutes": elapsed / 60, "epoch": epoch,
                           "change": evaluated[f"{STRICT}/change"], "se": evaluated[f"{STRICT}/change_se"],
                           "strict": evaluated[STRICT]})
            print(f"{objective} seed {seed}: {elapsed / 60:.2f} min, epoch {epoch}: strict {100 * evaluated[STRICT]:.1f} % "
                  f"({100 * points[-1]['change']:+.1f} +- {100 * points[-1]['se']:.1f})", flush=True)
            while pending and elapsed >= pending[0] * 60:  # an epoch longer than the gap between marks
                points.append({**points[-1], "mark": pending.pop(0)})
    after = fresh(epoch, reward_batch)
    trainer.save(epoch, global_step)
    trainer.executor.shutdown()
    trainer.tracker.finish()
    return {
        "objective": objective, "seed": seed, "recipe": RECIPES[objective], "threads": threads,
        "base_strict": base[STRICT], "points": points, "epochs": epochs,
        "seconds_per_epoch": elapsed / epoch, "samples": epoch * config.sample.num_groups * config.sample.group_size,
        "fresh": {"noise_seed": seed + FRESH_SEED_OFFSET, "change": after[f"{STRICT}/change"], "se": after[f"{STRICT}/change_se"]},
    }


def minutes_to(points: list[dict], target: float) -> float | None:
    """Training minutes at the first evaluation whose change reaches `target` (None: never)."""
    return next((p["minutes"] for p in points if p["change"] >= target), None)


def cell(change: float, se: float) -> str:
    return f"{100 * change:+.1f} +- {100 * se:.1f}"


def report(results: list[dict], marks: list[float]) -> tuple[str, dict]:
    """The markdown table, the means over seeds and the goal's verdict per objective."""
    head = "| objective | seed | epochs | " + " | ".join(f"{m:g} min" for m in marks) + " | minutes to +5 | fresh noise |"
    lines = [head, "|" + "---|" * (len(marks) + 5)]
    summary = {}
    for objective in dict.fromkeys(r["objective"] for r in results):
        runs = [r for r in results if r["objective"] == objective]
        for r in runs:
            by_mark = {p["mark"]: p for p in r["points"]}
            reached = minutes_to(r["points"], 0.05)
            lines.append(
                f"| {objective} | {r['seed']} | {r['epochs'][-1]['epoch']} | "
                + " | ".join(cell(by_mark[m]["change"], by_mark[m]["se"]) if m in by_mark else "-" for m in marks)
                + f" | {'not reached' if reached is None else f'{reached:.1f}'} | {cell(r['fresh']['change'], r['fresh']['se'])} |"
            )
        means = []
        for m in marks:
            got = [next(p for p in r["points"] if p["mark"] == m) for r in runs if any(p["mark"] == m for p in r["points"])]
            if len(got) == len(runs):
                means.append((sum(p["change"] for p in got) / len(got), math.sqrt(sum(p["se"] ** 2 for p in got)) / len(got)))
        fresh_mean = (sum(r["fresh"]["change"] for r in runs) / len(runs), math.sqrt(sum(r["fresh"]["se"] ** 2 for r in runs)) / len(runs))
        lines.append(f"| {objective} | mean | | " + " | ".join(cell(*m) for m in means) + f" | | {cell(*fresh_mean)} |")
        goal = all(
            any(p["change"] >= 0.05 and p["change"] >= 3 * p["se"] for p in r["points"]) and r["fresh"]["change"] >= 2 * r["fresh"]["se"]
            for r in runs
        )
        summary[objective] = {"mean_change": means, "fresh_mean": fresh_mean, "goal_met": goal,
                              "seconds_per_epoch": sum(r["seconds_per_epoch"] for r in runs) / len(runs)}
    words = [
        f"- {objective}: {'meets' if s['goal_met'] else 'does not meet'} the goal (>= 5 points and >= 3 se on every seed, "
        f"fresh-noise change >= 2 se); {s['seconds_per_epoch']:.1f} s per epoch"
        for objective, s in summary.items()
    ]
    return "\n".join(lines) + "\n\n" + "\n".join(words) + "\n", summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objectives", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--minutes", type=float, default=10.0, help="training minutes per run (evaluations not counted)")
    parser.add_argument("--marks", nargs="+", type=float, default=None, help="minutes at which to evaluate (default: quarters of --minutes)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once, each its own process")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run (default: cores / jobs)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "objectives")
    parser.add_argument("--one", nargs=2, metavar=("OBJECTIVE", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    marks = args.marks or [args.minutes * q / 4 for q in (1, 2, 3, 4)]
    if max(marks) > args.minutes:
        parser.error(f"--marks {marks} go past --minutes {args.minutes}")
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)

    if args.one:
        objective, seed = args.one[0], int(args.one[1])
        run_dir = args.out / f"{objective}-s{seed}"
        result = train_one(objective, seed, args.minutes, marks, run_dir, threads)
        (run_dir / "result.json").write_text(json.dumps(result, indent=1))
        return

    args.out.mkdir(parents=True, exist_ok=True)
    taken = [f"{o}-s{s}" for s in args.seeds for o in args.objectives if (args.out / f"{o}-s{s}").exists()]
    if taken:
        sys.exit(f"bench/objectives.py: {args.out} already holds {', '.join(taken)}; pass another --out (nothing is overwritten)")
    # Seed-major order: runs that share the machine at once are of different objectives.
    queue = [(o, s) for s in args.seeds for o in args.objectives]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    running: list[tuple[subprocess.Popen, str]] = []
    failed = []
    start = time.time()
    while queue or running:
        while queue and len(running) < args.jobs:
            objective, seed = queue.pop(0)
            name = f"{objective}-s{seed}"
            log = open(args.out / f"{name}.log", "w")
            cmd = [sys.executable, __file__, "--one", objective, str(seed), "--minutes", str(args.minutes), "--marks", *map(str, marks),
                   "--threads", str(threads), "--out", str(args.out)]
            running.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT), name))
            print(f"started {name} ({threads} thread(s))", flush=True)
        time.sleep(2)
        for proc, name in list(running):
            if proc.poll() is not None:
                running.remove((proc, name))
                print(f"{name} finished (exit {proc.returncode}) after {(time.time() - start) / 60:.1f} min", flush=True)
                if proc.returncode != 0:
                    failed.append(name)
    results = [json.loads((args.out / f"{o}-s{s}" / "result.json").read_text())
               for s in args.seeds for o in args.objectives if (args.out / f"{o}-s{s}" / "result.json").exists()]
    if not results:
        sys.exit(f"bench/objectives.py: every run failed ({', '.join(failed)}); see the logs in {args.out}")
    text, summary = report(results, marks)
    header = (f"Held-out strict accuracy on the shapes model: change since the base model in points +- standard error "
              f"(512 paired samples), {args.minutes:g} training minutes per run, {threads} thread(s) each, {args.jobs} run(s) at once.\n\n")
    print("\n" + header + text)
    if failed:
        print(f"failed runs: {', '.join(failed)} (logs in {args.out})")
    (args.out / "objectives.md").write_text(header + text)
    out = {"marks": marks, "minutes": args.minutes, "threads": threads, "jobs": args.jobs, "failed": failed,
           "summary": summary, "runs": [{k: v for k, v in r.items() if k != "epochs"} for r in results]}
    (args.out / "objectives.json").write_text(json.dumps(out, indent=1))
    print(json.dumps({"summary": summary, "failed": failed}))


if __name__ == "__main__":
    main()
