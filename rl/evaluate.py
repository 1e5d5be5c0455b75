"""Held-out evaluation: deterministic ODE samples with the EMA weights swapped in, scored by every
reward component; the paired change of each score since the evaluation before training, with its
standard error over prompts; and the before/after grid of the same prompts and noise."""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from rl.data import Item
from rl.pictures import Row, labelled_grid
from rl.rollout import SDESettings, rollout
from rl.stats import nanmean, paired_change
from models.base import image_size

EVAL_STREAM = 1 << 30  # the "epoch" that seeds evaluation noise: the same images every evaluation
SHOWN = 16  # evaluation samples shown in the pictures


def read_shown(run_dir: str | Path, epoch: int) -> tuple[np.ndarray, np.ndarray] | None:
    """A run's shown evaluation images [N, H, W, 3] and pass/fail scores [N] at `epoch` (None if not kept)."""
    path = Path(run_dir) / "images" / f"eval_epoch_{epoch:05d}.npz"
    if not path.exists():
        return None
    with np.load(path) as data:  # plain arrays only: np.load refuses pickled objects by default
        return data["images"], data["passes"]


@contextmanager
def ema_weights(ema, params: list[torch.nn.Parameter]):
    """Within this context `params` hold the EMA's weights (no EMA: unchanged); restored after."""
    if ema is None:
        yield
        return
    ema.store(params)
    ema.copy_to(params)
    try:
        yield
    finally:
        ema.restore(params)


class Evaluator:
    """Evaluates the policy on `items` (each held-out prompt repeated samples_per_prompt times,
    each repeat with its own noise); keeps the first evaluation in run_dir so a resumed run
    still reports its change."""

    def __init__(self, config, items: list[Item], *, policy, rewards, ranks, tracker, sources, ema, show: bool, eval_rewards=None):
        self.config, self.items = config, items
        self.policy, self.rewards, self.ranks, self.tracker = policy, rewards, ranks, tracker
        self.eval_rewards = eval_rewards  # eval.rewards: scored here only, never trained on
        self.sources, self.ema, self.show = sources, ema, show
        self.run_dir = Path(config.run_dir)
        # Evaluation samples at its own size when eval.resolution is set (source images too).
        self.size = image_size(config.eval.resolution if config.eval.resolution is not None else config.sample.resolution)

    @property
    def before_path(self) -> Path:
        return self.run_dir / "eval_before.npz"

    def forget_earlier_run(self) -> None:
        """A new run never compares against an earlier run's baseline left in the same run_dir."""
        self.before_path.unlink(missing_ok=True)
        for kept in (self.run_dir / "images").glob("eval_epoch_*.npz"):
            kept.unlink()

    def __call__(self, epoch: int, reward_batch) -> dict[str, float]:
        """ODE sampling with the EMA weights on the held-out prompts; the same noise every time.
        `reward_batch(images, items, sources)` builds what the reward workers take."""
        start = time.perf_counter()
        config, ranks = self.config, self.ranks
        indices = list(range(ranks.rank, len(self.items), ranks.world_size))
        extra = self.eval_rewards.components if self.eval_rewards is not None else []
        local_scores: dict[str, list[float]] = {c: [] for c in [*self.rewards.components, *extra]}
        local_reward: list[float] = []
        images = items = None
        if indices:
            items = [self.items[i] for i in indices]
            sources = self.sources(items, self.size)
            ids = torch.tensor(indices)
            with torch.no_grad(), ema_weights(self.ema, self.policy.trainable_parameters()):
                cond = self.policy.encode([item.text for item in items], source_images=sources)
                batch = rollout(
                    self.policy, cond, torch.arange(len(indices)), ids, ids,
                    seed=config.seed if config.eval.noise_seed is None else config.eval.noise_seed, epoch=EVAL_STREAM, num_steps=config.eval.num_steps,
                    guidance_scale=config.eval.guidance_scale, size=self.size,
                    batch_size=config.eval.batch_size, sde=SDESettings(config.sde.dynamics, config.sde.noise_level),
                    sde_steps=[], progress=self.show, desc="eval",
                )
            images = batch.images
            rewarded = reward_batch(images, items, sources)
            scored = self.rewards.score(rewarded)
            # Each held-out prompt is its own group: no group normalisation here.
            local_reward = self.rewards.trained_reward(scored.scores, group_normalize=False).tolist()
            if self.eval_rewards is not None:
                scored.scores.update(self.eval_rewards.score(rewarded).scores)
            for c in local_scores:
                local_scores[c] = scored.scores[c].tolist()
        # Every rank's samples, back in eval-item order (the order is the pairing across evaluations).
        order = np.argsort(np.array(ranks.gather_list(indices), dtype=np.int64), kind="stable")
        per_sample = {f"eval/{c}": np.array(ranks.gather_list(values), dtype=np.float64)[order] for c, values in local_scores.items()}
        per_sample["eval/reward"] = np.array(ranks.gather_list(local_reward), dtype=np.float64)[order]
        metrics = {key: nanmean(values) for key, values in per_sample.items()}
        metrics.update(self.change(epoch, per_sample))
        metrics["time/eval_s"] = time.perf_counter() - start
        self.pictures(epoch, indices, images, scored.scores if indices else {})
        return metrics

    def change(self, epoch: int, per_sample: dict[str, np.ndarray]) -> dict[str, float]:
        """Keep the per-sample scores of the evaluation before training (run_dir/eval_before.npz,
        so a resumed run has them); at a later evaluation, the paired change of each metric since
        then and its standard error over prompts (rl.stats.paired_change), as `<metric>/change`
        and `<metric>/change_se`."""
        path = self.before_path
        if epoch == 0:
            if self.ranks.accelerator.is_main_process:
                np.savez(path, **{key.replace("/", "|"): values for key, values in per_sample.items()})
            return {}
        if not path.exists():
            return {}
        before = {key.replace("|", "/"): values for key, values in np.load(path).items()}
        prompts = np.arange(len(self.items)) // self.config.eval.samples_per_prompt
        out = {}
        for key, values in per_sample.items():
            if key in before and before[key].shape == values.shape:
                out[f"{key}/change"], out[f"{key}/change_se"] = paired_change(before[key], values, prompts)
        return out

    def shown(self) -> list[int]:
        """The evaluation samples the pictures show: the first sample of up to 16 distinct prompts
        spread evenly over the held-out list (so each kind of prompt appears; a prompt listed
        twice is shown once)."""
        spp = self.config.eval.samples_per_prompt
        first: dict = {}
        for p in range(len(self.items) // spp):
            first.setdefault((self.items[p * spp].text, self.items[p * spp].source), p)
        distinct = sorted(first.values())
        picks = np.unique(np.linspace(0, len(distinct) - 1, min(SHOWN, len(distinct))).round().astype(int))
        return [distinct[i] * spp for i in picks]

    def pictures(self, epoch: int, indices: list[int], images, scores: dict[str, np.ndarray]) -> None:
        """Gather the shown samples on the main process with their pass/fail score
        (eval.pass_fail) and keep them as run_dir/images/eval_epoch_NNNNN.npz; at the evaluation
        before training that is the baseline, and at the end of training before_after.png puts
        the base model's images above the trained ones (same prompts, same noise), labelled."""
        wanted = set(self.shown())
        pass_fail = self.config.eval.pass_fail
        local = []
        for position, index in enumerate(indices):
            if index in wanted:
                score = float(scores[pass_fail][position]) if pass_fail else float("nan")
                local.append((index, images[position].numpy(), score))
        gathered = sorted(self.ranks.gather_list(local), key=lambda entry: entry[0])
        if not self.ranks.accelerator.is_main_process or not gathered:
            return
        shown = np.stack([entry[1] for entry in gathered])
        passes = np.array([entry[2] for entry in gathered])
        captions = [self.items[entry[0]].text for entry in gathered]
        self.tracker.log_images("eval/images", shown, captions, epoch)
        folder = self.run_dir / "images"
        folder.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(folder / f"eval_epoch_{epoch:05d}.npz", images=shown, passes=passes)
        (folder / "eval_shown.json").write_text(json.dumps({"captions": captions, "pass_fail": pass_fail, "roles": {**self.rewards.roles, **(self.eval_rewards.roles if self.eval_rewards is not None else {})}}))
        before = read_shown(self.run_dir, 0)
        if epoch == self.config.num_epochs and before is not None and len(before[0]) == len(shown):
            rows = [Row("base model (before training)", before[0], before[1] if pass_fail else None),
                    Row(f"{self.run_dir.name} after epoch {epoch}", shown, passes if pass_fail else None)]
            title = f"{self.run_dir.name}: held-out prompts, the same noise before and after training"
            picture, _ = labelled_grid(rows, captions, title=title, pass_name=pass_fail)
            self.tracker.log_picture("eval/before_after", picture, title, epoch, "before_after.png")

    def weights_used(self) -> str:
        """Which weights the evaluations sampled with, and a warning when that was the EMA and it never moved."""
        t = self.config.train
        if self.ema is None:
            return "weights evaluated: the trained weights (train.ema is false)"
        line = (f"weights evaluated: the EMA of the trained weights (decay {t.ema_decay}, updated every {t.ema_every} "
                f"optimizer steps: {self.ema.optimization_step} updates)")
        if self.ema.optimization_step == 0:
            line += ("\n  warning: the EMA was never updated, so the evaluation after training sampled the initial weights; "
                     "lower train.ema_every or train longer")
        return line

    def print_change(self) -> None:
        """Print every evaluation metric before training (epoch 0) and at the end, from metrics.jsonl."""
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        evals = [row for row in rows if "eval/reward" in row]
        if len(evals) < 2 or evals[0]["epoch"] != 0:
            return
        first, last = evals[0], evals[-1]
        num_prompts = len(self.items) // self.config.eval.samples_per_prompt
        lines = [f"held-out evaluation ({num_prompts} prompts x {self.config.eval.samples_per_prompt} samples, "
                 f"epoch 0 -> epoch {last['epoch']}):"]
        for key in first:
            if key.startswith("eval/") and first[key] is not None and last.get(key) is not None:
                line = f"  {key}: {first[key]:.4f} -> {last[key]:.4f} ({last[key] - first[key]:+.4f}"
                se = last.get(f"{key}/change_se")
                lines.append(line + (f" +- {se:.4f})" if se is not None else ")"))
        lines.append("  " + self.weights_used())
        if any(f"{key}/change_se" in last for key in first):
            lines.append("  (+- is the standard error of the change over the held-out prompts, same noise before and after;\n"
                         "   a change within about two of them could be sampling noise: raise eval.num_prompts or eval.samples_per_prompt)")
        print("\n".join(lines), flush=True)
