"""Throughput of one Flow-GRPO epoch on a fixed tiny SD3 configuration.

    python bench/epoch.py [--epochs 3] [--warmup 1] [--dtype fp32|bf16]

128 px, 10 sampling steps, CFG 4.5, 4 prompts x group size 8, LoRA rank 4, 9 trained steps.
Prints the time split (rollout, reward, advantages, train), images/s and peak RSS, then one JSON
object as the last line. Compare figures only within one run: machines here are noisy.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rl.config import load_config  # noqa: E402
from rl.train import Trainer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs")
    parser.add_argument("--warmup", type=int, default=1, help="untimed epochs first")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        overrides = [
            f"run_dir={tmp}/run", f"num_epochs={args.warmup + args.epochs}",
            f"model.pretrained={ROOT}/.cache/models/tiny-sd3-bench", "model.tiny_warm_start_steps=0",
            "model.max_sequence_length=32",
            f"model.dtype={args.dtype}", "model.lora.rank=4", "model.lora.alpha=4",
            f"data.train_prompts={ROOT}/configs/prompts/tiny.txt", "data.eval_prompts=null",
            "sample.resolution=128", "sample.num_steps=10", "sample.guidance_scale=4.5",
            "sample.num_groups=4", "sample.group_size=8", "sample.batch_size=8",
            "sde.window=all", "train.batch_size=8", "train.num_minibatches=2",
            "log.wandb_mode=disabled", "log.image_every=0", "log.save_every=0", "log.progress=false",
        ]
        config = load_config(ROOT / "configs/tiny_cpu.yaml", overrides)
        trainer = Trainer(config)
        trainer.run()
        rows = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in rows if r["epoch"] > args.warmup]
    samples = config.sample.num_groups * config.sample.group_size
    split = {
        key: float(np.mean([r[f"time/{key}_s"] for r in timed]))
        for key in ("rollout", "reward", "reward_wait", "advantages", "train")
    }
    epoch_s = split["rollout"] + split["reward_wait"] + split["advantages"] + split["train"]
    result = {
        "config": {"resolution": 128, "num_steps": 10, "guidance": 4.5, "prompts": 4, "group_size": 8,
                   "lora_rank": 4, "trained_steps": 9, "dtype": args.dtype},
        "epochs_timed": len(timed),
        "seconds_per_epoch": epoch_s,
        "split_s": split,
        "split_fraction": {k: v / epoch_s for k, v in split.items() if k != "reward"},
        "rollout_images_per_s": samples / split["rollout"],
        "epoch_images_per_s": samples / epoch_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    print(f"epoch {epoch_s:.2f} s: rollout {split['rollout']:.2f} s, reward {split['reward']:.2f} s "
          f"(waited {split['reward_wait']:.2f} s), advantages {split['advantages']:.3f} s, train {split['train']:.2f} s")
    print(f"rollout {result['rollout_images_per_s']:.1f} images/s, whole epoch {result['epoch_images_per_s']:.1f} images/s, "
          f"peak RSS {result['peak_rss_mb']:.0f} MB")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
