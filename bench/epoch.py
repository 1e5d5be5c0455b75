"""Throughput of one epoch per training objective on a fixed tiny SD3 configuration, and the
share of the epoch that is not a model pass.

    python bench/epoch.py [--objectives grpo nft awm] [--epochs 3] [--warmup 1] [--dtype fp32|bf16] [--resolution 128]

128 px (--resolution), 10 sampling steps, CFG 4.5 (grpo's rollouts; nft and awm sample and train CFG-free, as
published), 4 prompts x group size 8, LoRA rank 4, KL to the reference on (grpo 0.04, nft 1e-4,
awm 1e-3 plus its EMA), trained steps: grpo 9 SDE steps, nft 9 forward-process timesteps, awm 6.
For each objective it prints the time split (rollout, reward, advantages, train), images/s,
the time inside model passes (transformer forwards and backwards, text encoding, VAE decoding)
and the rest, with the number of reference switches (adapters off and on) and weight swaps (nft's
old policy, awm's EMA) per epoch, and the cost of one reference switch next to diffusers' own
disable_adapters() / enable_adapters() on the same network; then one JSON object as the last line. Compare figures only
within one run: machines here are noisy.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import rl.train as train_module  # noqa: E402
from rl.config import load_config  # noqa: E402
from rl.train import Trainer  # noqa: E402

OBJECTIVES = {
    "grpo": ["sde.window=all", "sample.guidance_scale=4.5", "train.beta=0.04"],
    "nft": ["train.objective=nft", "sde.window=none", "sample.guidance_scale=1.0", "train.beta=1e-4"],
    "awm": ["train.objective=awm", "sde.window=none", "sample.guidance_scale=1.0", "train.beta=1e-3", "train.awm_steps=6"],
}


class ModelClock:
    """Time spent inside model passes, and counts of reference switches and weight swaps, by
    wrapping the policy's model calls and the accelerator's backward (synchronising CUDA)."""

    def __init__(self, trainer: Trainer):
        import torch

        self.seconds, self.switches, self.swaps = 0.0, 0, 0
        self.sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
        policy = trainer.policy
        for name in ("velocity", "encode", "decode"):
            setattr(policy, name, self.timed(getattr(policy, name)))
        trainer.accelerator.backward = self.timed(trainer.accelerator.backward)
        reference = policy.reference

        @contextlib.contextmanager
        def counted_reference():
            self.switches += 1
            with reference() as network:
                yield network

        policy.reference = counted_reference
        swapped = train_module.swapped_weights

        @contextlib.contextmanager
        def counted_swap(params, values):
            self.swaps += values is not None
            with swapped(params, values):
                yield

        train_module.swapped_weights = counted_swap

    def timed(self, fn):
        def wrapper(*args, **kwargs):
            self.sync()
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.sync()
                self.seconds += time.perf_counter() - start
        return wrapper

    def reset(self) -> None:
        self.seconds, self.switches, self.swaps = 0.0, 0, 0


def measure(objective: str, args, tmp: str) -> dict:
    overrides = [
        f"run_dir={tmp}/{objective}", "num_epochs=1000",
        f"model.pretrained={ROOT}/.cache/models/tiny-sd3-bench", "model.tiny_warm_start_steps=0",
        "model.max_sequence_length=32",
        f"model.dtype={args.dtype}", "model.lora.rank=4", "model.lora.alpha=4",
        f"data.train_prompts={ROOT}/configs/prompts/tiny.txt", "data.eval_prompts=null",
        f"sample.resolution={args.resolution}", "sample.num_steps=10",
        "sample.num_groups=4", "sample.group_size=8", "sample.batch_size=8",
        "train.batch_size=8", "train.num_minibatches=2", "train.ema=false",
        "log.wandb_mode=disabled", "log.image_every=0", "log.save_every=0", "log.progress=false",
        *OBJECTIVES[objective],
    ]
    config = load_config(ROOT / "configs/tiny_cpu.yaml", overrides)
    trainer = Trainer(config)
    clock = ModelClock(trainer)
    rows, global_step = [], 0
    for epoch in range(1, args.warmup + args.epochs + 1):
        clock.reset()
        start = time.perf_counter()
        global_step, _, metrics = trainer.train_epoch(epoch, global_step)
        total = time.perf_counter() - start
        if epoch > args.warmup:
            rows.append({**metrics, "epoch_s": total,
                         "model_s": clock.seconds, "switches": clock.switches, "swaps": clock.swaps})
    switch = switch_cost(trainer)
    trainer.executor.shutdown()
    split = {key: float(np.mean([r[f"time/{key}_s"] for r in rows])) for key in ("rollout", "reward", "reward_wait", "advantages", "train")}
    epoch_s = float(np.mean([r["epoch_s"] for r in rows]))
    model_s = float(np.mean([r["model_s"] for r in rows]))
    samples = config.sample.num_groups * config.sample.group_size
    return {
        "objective": objective, "trained_steps": trainer.layout.trained_steps, "epochs_timed": len(rows),
        "seconds_per_epoch": epoch_s, "split_s": split, "model_s": model_s, "non_model_s": epoch_s - model_s,
        "non_model_fraction": (epoch_s - model_s) / epoch_s,
        "switches_per_epoch": float(np.mean([r["switches"] for r in rows])), "swaps_per_epoch": float(np.mean([r["swaps"] for r in rows])),
        "rollout_images_per_s": samples / split["rollout"], "epoch_images_per_s": samples / epoch_s,
        "switch_s": switch,
    }


def switch_cost(trainer: Trainer, repeats: int = 200) -> dict:
    """Seconds per reference switch (adapters off and on again), diffusers' own
    disable_adapters() / enable_adapters() against the policy's reference(), same network."""
    network = trainer.policy.network

    def diffusers_switch():
        network.disable_adapters()
        network.enable_adapters()

    def ours():
        with trainer.policy.reference():
            pass

    out = {}
    for name, fn in (("diffusers", diffusers_switch), ("trustgrpo", ours)):
        fn()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        out[name] = (time.perf_counter() - start) / repeats
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=list(OBJECTIVES))
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs")
    parser.add_argument("--warmup", type=int, default=1, help="untimed epochs first")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--resolution", type=int, default=128, help="image side in pixels (a multiple of 16)")
    args = parser.parse_args()

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for objective in args.objectives:
            r = measure(objective, args, tmp)
            results.append(r)
            split = r["split_s"]
            print(f"{objective}: epoch {r['seconds_per_epoch']:.2f} s: rollout {split['rollout']:.2f} s, reward {split['reward']:.2f} s "
                  f"(waited {split['reward_wait']:.3f} s), advantages {split['advantages']:.3f} s, train {split['train']:.2f} s "
                  f"({r['trained_steps']} trained steps)")
            print(f"{objective}: model passes {r['model_s']:.2f} s, the rest {r['non_model_s']:.3f} s = "
                  f"{100 * r['non_model_fraction']:.1f} % of the epoch; {r['switches_per_epoch']:.0f} reference switches and "
                  f"{r['swaps_per_epoch']:.0f} weight swaps per epoch; {r['epoch_images_per_s']:.1f} images/s", flush=True)
            print(f"{objective}: one reference switch {1e3 * r['switch_s']['trustgrpo']:.3f} ms "
                  f"(diffusers' disable_adapters + enable_adapters: {1e3 * r['switch_s']['diffusers']:.3f} ms)", flush=True)
    out = {
        "config": {"resolution": args.resolution, "num_steps": 10, "prompts": 4, "group_size": 8, "lora_rank": 4, "dtype": args.dtype},
        "objectives": results, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
