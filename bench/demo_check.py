"""Check a sweep's runs on noise they never saw, through the stock diffusers pipeline.

    python bench/demo_check.py runs/demo [--samples 4] [--noise-seed 12345]

For every run in the sweep folder (each subfolder with checkpoints/), this loads the base model
with `StableDiffusion3Pipeline.from_pretrained`, samples every held-out caption of the run's
eval list `--samples` times with generators the trainer never uses, loads the run's final LoRA
with `pipe.load_lora_weights` and samples the same captions and noise again, and scores both
with the shapes checker (strict, partial) and JPEG compressibility. It prints each score before
-> after with the paired change and its standard error over captions (rl/stats.py), one line
per run and score, then one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rewards.base import RewardBatch  # noqa: E402
from rewards.jpeg import JpegCompressibility  # noqa: E402
from rewards.shapes_geneval import ShapesGenEval  # noqa: E402
from rl.stats import paired_change  # noqa: E402


def sample(pipe, captions: list[str], seeds: list[int], config: dict, batch: int = 64) -> np.ndarray:
    import torch

    images = []
    for start in range(0, len(captions), batch):
        generators = [torch.Generator().manual_seed(s) for s in seeds[start:start + batch]]
        out = pipe(prompt=captions[start:start + batch], num_inference_steps=config["eval"]["num_steps"],
                   guidance_scale=config["eval"]["guidance_scale"], height=config["sample"]["resolution"],
                   width=config["sample"]["resolution"], generator=generators,
                   max_sequence_length=config["model"]["max_sequence_length"], output_type="np")
        images.append((np.clip(out.images, 0, 1) * 255).round().astype(np.uint8))
    return np.concatenate(images)


def score(images: np.ndarray, captions: list[str]) -> dict[str, np.ndarray]:
    batch = RewardBatch(images=images, prompts=captions)
    scores = dict(ShapesGenEval()(batch).scores)
    scores["jpeg_compressibility"] = JpegCompressibility()(batch).scores["jpeg_compressibility"]
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--samples", type=int, default=4, help="samples per held-out caption")
    parser.add_argument("--noise-seed", type=int, default=12345, help="first generator seed (the trainer seeds its own streams)")
    args = parser.parse_args()

    import torch
    from diffusers import StableDiffusion3Pipeline

    torch.set_grad_enabled(False)
    runs = sorted(p for p in args.sweep_dir.iterdir() if (p / "checkpoints" / "latest").exists() or list(p.glob("checkpoints/epoch-*")))
    if not runs:
        sys.exit(f"{args.sweep_dir}: no run with checkpoints in it")
    results, base_cache = {}, {}
    for run in runs:
        config = json.loads((run / "run.json").read_text())["config"]
        lines = [line.strip() for line in Path(config["data"]["eval_prompts"]).read_text().splitlines() if line.strip()]
        lines = lines[: config["eval"]["num_prompts"]]
        captions = [line for line in lines for _ in range(args.samples)]
        prompts = np.repeat(np.arange(len(lines)), args.samples)
        seeds = [args.noise_seed + i for i in range(len(captions))]
        pipe = StableDiffusion3Pipeline.from_pretrained(config["model"]["pretrained"], torch_dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        key = (config["model"]["pretrained"], tuple(captions))
        if key not in base_cache:
            base_cache[key] = score(sample(pipe, captions, seeds, config), captions)
        before = base_cache[key]
        checkpoint = max(run.glob("checkpoints/epoch-*"))
        pipe.load_lora_weights(str(checkpoint / "trainable"))
        after = score(sample(pipe, captions, seeds, config), captions)
        results[run.name] = {}
        for name in before:
            change, se = paired_change(before[name], after[name], prompts)
            results[run.name][name] = {"before": float(before[name].mean()), "after": float(after[name].mean()), "change": change, "se": se}
            print(f"{run.name:>18} {name:>22}: {before[name].mean():.4f} -> {after[name].mean():.4f} "
                  f"({change:+.4f} +- {se:.4f}, {change / se if se else float('nan'):+.1f} se)  [{checkpoint.name}]", flush=True)
    print(json.dumps({"samples_per_caption": args.samples, "noise_seed": args.noise_seed, "runs": results}))


if __name__ == "__main__":
    main()
