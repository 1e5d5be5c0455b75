"""Flow-GRPO training: sample groups, score them, normalise advantages over all ranks, update.

    python -m rl.train configs/tiny_cpu.yaml [key=value ...]
    accelerate launch --config_file launch/accelerate/zero2.yaml -m rl.train configs/CONFIG.yaml

Both are the same program. This module is the only place that knows about accelerate, DeepSpeed
and the tracker (rank helpers: rl.ranks; evaluation: rl.evaluate; the epoch's layout over ranks:
rl.layout); the math it calls (rl.sde, rl.advantages, rl.loss) is pure.

`Trainer.run` is the loop. Each epoch runs the phases in order, each returning what the next needs:
draw (this rank's samples and their groups) -> roll_out (images and trajectories; rewards are
scored in a thread as each batch is decoded) -> score (wait for them) -> advantages (gathered over
ranks, normalised per group, this rank's slice) -> update -> evaluate -> log -> save.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from rl.advantages import group_advantages
from rl.config import ConfigError, RunConfig, load_config, to_dict
from rl.data import DataError, Item, draw_prompt_indices, load_source_image, read_items
from rl.layout import EpochLayout, seeded_generator
from rl.forward import (
    awm_advantages, awm_log_likelihood, awm_loss, awm_timesteps, guard_log_ratio, lagged_decay, mean_d, nft_loss, nft_old_decay,
    nft_optimality, noised,
)
from rl.loss import grpo_step_loss
from rl.rollout import Rollout, SDESettings, rollout, transition
from rl.sde import kl_scale, sde_step_indices
from rl.stats import nanmean, nanstd
from models.base import image_size


@dataclass
class Drawn:
    """This rank's samples of one epoch."""

    items: list[Item]  # the epoch's items, one per group: items[g] is group g's prompt
    sample_ids: torch.Tensor  # [n] global sample index of each of this rank's samples
    group_ids: torch.Tensor  # [n] group of each sample


@dataclass
class Sampled:
    """A rollout and what its update needs; its rewards are being scored in the background."""

    batch: Rollout
    cond: object  # the policy's conditioning of `items` (models.base.Conditioning)
    items: list[Item]  # the unique items of this rank's groups; batch.prompt_rows index them
    pending: list[Future]  # one reward job per rollout batch, in sample order
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class Rewards:
    """This rank's reward scores of one epoch."""

    scores: dict[str, np.ndarray]  # component -> [n], NaN = missing
    uncertainty: dict[str, np.ndarray]  # component -> [n], where every batch reported one
    metrics: dict[str, float] = field(default_factory=dict)
    texts: dict[str, list[str]] = field(default_factory=dict)  # component -> [n] judge replies, where every batch kept them


@dataclass
class Advantages:
    advantages: torch.Tensor  # [n] this rank's samples
    trained: torch.Tensor  # [n] bool: this rank's samples that enter the update
    all_trained: torch.Tensor  # [N] bool, every rank's, in gathered (rank-major) order
    metrics: dict[str, float] = field(default_factory=dict)


class SourceImages:
    """Editing: the items' source images at an image size, each decoded once per run and size."""

    def __init__(self):
        self._decoded: dict = {}

    def __call__(self, items: list[Item], size: tuple[int, int]) -> list[np.ndarray] | None:
        if not items or items[0].source is None:
            return None
        for item in items:
            if (item.source, size) not in self._decoded:
                self._decoded[item.source, size] = load_source_image(item.source, size)
        return [self._decoded[item.source, size] for item in items]


def reward_batch(images: torch.Tensor, items: list[Item], sources: list[np.ndarray] | None):
    """What the reward workers take: images, prompts and, for editing, sources and instructions."""
    from rewards.base import RewardBatch

    texts = [item.text for item in items]
    return RewardBatch(
        images=images.numpy(), prompts=texts, source_images=sources,
        instructions=texts if sources is not None else None,
    )


class NonFiniteError(RuntimeError):
    """The update produced non-finite values that must not reach the weights; the run stops."""


class NonFiniteRun:
    """Counts optimizer steps skipped in a row for a non-finite loss or gradient norm."""

    def __init__(self, limit: int):
        self.limit, self.in_a_row = limit, 0

    def skip(self, global_step: int) -> None:
        self.in_a_row += 1
        if self.in_a_row >= self.limit:
            raise NonFiniteError(
                f"{self.in_a_row} optimizer steps in a row after step {global_step} had a non-finite loss or gradient norm "
                f"and were skipped (train.max_nonfinite_steps = {self.limit}); the weights were left as they were. "
                "Lower train.learning_rate, or look for a reward or model output that is not finite"
            )

    def reset(self) -> None:
        self.in_a_row = 0


@contextlib.contextmanager
def swapped_weights(params: list[torch.nn.Parameter], values: list[torch.Tensor] | None):
    """Within this context `params` hold `values` (None: unchanged); restored after. No gradient
    flows through the swap: forward passes inside it are for values only."""
    if values is None:
        yield
        return
    with torch.no_grad():
        kept = torch._foreach_mul(params, 1.0)  # a copy of each, in one call
        torch._foreach_copy_(params, values)
    try:
        yield
    finally:
        with torch.no_grad():
            torch._foreach_copy_(params, kept)


def _trained_rows(trained: torch.Tensor, first: int, size: int) -> torch.Tensor | slice:
    """The trained samples among rows first..first+size: samples of dropped groups (zero
    advantage, zero weight) add nothing to the loss, so their forward and backward passes are
    skipped. With none trained, row `first` alone (weight 0) still runs, so every rank makes the
    same backward calls (DDP and gradient accumulation count them). A run of consecutive rows is
    a slice (indexing with it is a view, not a copy), any other choice an index tensor."""
    index = torch.nonzero(trained[first : first + size]).flatten() + first
    if not index.numel():
        return slice(first, first + 1)
    low, high = int(index[0]), int(index[-1]) + 1
    return slice(low, high) if high - low == index.numel() else index


class Trainer:
    def __init__(self, config: RunConfig, run_id: str | None = None):
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, DistributedType, InitProcessGroupKwargs, set_seed
        from diffusers.optimization import get_scheduler

        from models import adapter_class, build_policy
        from rewards.runner import RewardRunner
        from rl import checkpoint
        from rl.evaluate import Evaluator
        from rl.ranks import Ranks

        self.config = config
        self.run_id = run_id  # rl.rundir's id of this run: pruning only touches its own checkpoints
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.layout = EpochLayout.build(config, world_size)
        # Data files are checked before any model loads (reward models included).
        data = config.data
        self.items = read_items(data.train_prompts, data.train_edits)
        eval_items = read_items(data.eval_prompts, data.eval_edits)[: config.eval.num_prompts] if (data.eval_prompts or data.eval_edits) else []
        # Several samples per held-out prompt, each with its own noise (its own sample id).
        self.eval_items = [item for item in eval_items for _ in range(config.eval.samples_per_prompt)]
        self.sources = SourceImages()
        self.sample_size = image_size(config.sample.resolution)
        self.rewards = RewardRunner(config.rewards, config.reward_mix)
        # Scored on the held-out samples only; loaded now, so a bad entry stops the run before training.
        self.eval_rewards = RewardRunner(config.eval.rewards, evaluation_only=True) if config.eval.rewards else None
        components = self.rewards.components + (self.eval_rewards.components if self.eval_rewards else [])
        if len(set(components)) < len(components):
            raise ConfigError(f"`eval.rewards` components {sorted(set(c for c in components if components.count(c) > 1))} are also training reward components; rename the eval.rewards entries")
        if config.eval.pass_fail is not None and config.eval.pass_fail not in components:
            raise ConfigError(f"`eval.pass_fail` = {config.eval.pass_fail!r} is not a reward component; the components are: {', '.join(components)}")

        # Some adapters leave LoRA parameters without a gradient (they declare it): DDP must know.
        adapter = adapter_class(config.model.adapter)
        unused = getattr(adapter, "find_unused_parameters", False)
        # nft and awm train CFG-free: guidance 1, unless the model takes its guidance scale as an
        # input (guidance-distilled families), where CFG-free means the scale it samples with.
        self.forward_guidance = config.sample.guidance_scale if getattr(adapter, "embedded_guidance", False) else 1.0
        handlers = [DistributedDataParallelKwargs(find_unused_parameters=unused)]
        cpu_ranks = world_size > 1 and not torch.cuda.is_available()
        deepspeed_launch = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
        if cpu_ranks and deepspeed_launch:
            # Without an explicit gloo backend every CPU rank believes it is rank 0 of 1.
            handlers.append(InitProcessGroupKwargs(backend="gloo"))
        self.accelerator = Accelerator(
            gradient_accumulation_steps=self.layout.grad_accum_steps, kwargs_handlers=handlers,
            # Several CPU processes without DeepSpeed: accelerate's MULTI_CPU mode (gloo DDP).
            cpu=cpu_ranks and not deepspeed_launch,
        )
        acc = self.accelerator
        if acc.num_processes != world_size:
            raise RuntimeError(f"WORLD_SIZE={world_size} but accelerate started {acc.num_processes} processes")
        self.deepspeed = acc.distributed_type == DistributedType.DEEPSPEED
        if self.deepspeed:
            self._configure_deepspeed()
        # The same seed on every rank: LoRA initialisation must not depend on the world size.
        set_seed(config.seed)

        if config.model.build_tiny_if_missing:
            from models.fixtures import ensure_tiny

            ensure_tiny(config.model)  # every rank: the build is atomic, the first one wins
        self.policy = build_policy(config.model, acc.device, needs_reference=config.train.beta > 0)
        params = self.policy.trainable_parameters()
        t = config.train
        optimizer = torch.optim.AdamW(params, lr=t.learning_rate, betas=tuple(t.adam_betas), eps=t.adam_eps, weight_decay=t.weight_decay)
        self.policy.transformer, self.optimizer = acc.prepare(self.policy.transformer, optimizer)
        total_steps = config.num_epochs * t.inner_epochs * t.num_minibatches
        # Stepped by hand once per optimizer step: a prepared scheduler would step once per rank.
        self.scheduler = get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=t.lr_warmup_steps, num_training_steps=total_steps)
        self.ema = None
        if t.ema:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(self.policy.trainable_parameters(), decay=t.ema_decay)
        # A lagged copy of the trainable weights that follows the trained ones after each epoch
        # (rl.forward.lagged_decay), swapped in where it is used: DiffusionNFT samples with it (its
        # old policy), AWM regularises toward it (its EMA). Saved and restored with checkpoints.
        lagged = t.objective == "nft" or (t.objective == "awm" and t.awm_ema_weight > 0)
        self.old = [p.detach().clone() for p in self.policy.trainable_parameters()] if lagged else None
        # The schedule and the EMA are saved by rl.checkpoint as JSON and safetensors, not
        # registered with accelerate (which would pickle them and unpickle them on resume).
        checkpoint.register_hooks(acc)
        self.checkpoint = checkpoint

        self.ranks = Ranks(acc)
        self.start_epoch, self.start_step = 1, 0  # first epoch to run, optimizer steps taken before it
        resume_epoch = None
        if config.resume:
            state, path, skipped = checkpoint.load_checkpoint(acc, self.policy, config.resume, scheduler=self.scheduler, ema=self.ema, old=self.old)
            for line in skipped:
                acc.print(f"trustgrpo: resume passes over a broken checkpoint: {line}")
            self.start_epoch, self.start_step = state["epoch"] + 1, state["global_step"]
            resume_epoch = state["epoch"]
        from rl.tracking import NullTracker, Tracker

        self.tracker = (
            Tracker(config.run_dir, mode=config.log.wandb_mode, project=config.log.project, run_name=config.log.run_name, config=to_dict(config), resume_epoch=resume_epoch,
                    group=config.log.group)
            if acc.is_main_process
            else NullTracker()
        )
        self.sde = SDESettings(config.sde.dynamics, config.sde.noise_level)
        self.nonfinite_run = NonFiniteRun(config.train.max_nonfinite_steps)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward")
        self.show = config.log.progress and acc.is_main_process
        self.evaluator = Evaluator(
            config, self.eval_items, policy=self.policy, rewards=self.rewards, eval_rewards=self.eval_rewards, ranks=self.ranks,
            tracker=self.tracker, sources=self.sources, ema=self.ema, show=self.show,
        )
        acc.print(f"trustgrpo: {self.layout.describe()}")
        if resume_epoch is not None:
            acc.print(f"trustgrpo: resumed {config.resume} after epoch {resume_epoch}")

    def _configure_deepspeed(self) -> None:
        """Batch sizes, accumulation and gradient clipping are set here, once, from the config.
        Under DeepSpeed clipping is the engine's job (accelerate's clip_grad_norm_ does nothing)."""
        ds = self.accelerator.state.deepspeed_plugin.deepspeed_config
        clip = ds.get("gradient_clipping", "auto")
        if clip not in ("auto", None) and float(clip) != self.config.train.max_grad_norm:
            raise ConfigError(
                f"DeepSpeed config sets gradient_clipping={clip} but train.max_grad_norm={self.config.train.max_grad_norm}; "
                "set gradient_clipping to auto in the launch config"
            )
        ds["gradient_clipping"] = self.config.train.max_grad_norm
        ds["train_micro_batch_size_per_gpu"] = self.config.train.batch_size
        ds["gradient_accumulation_steps"] = self.layout.grad_accum_steps
        ds["train_batch_size"] = self.config.train.batch_size * self.layout.grad_accum_steps * self.layout.world_size
        if self.accelerator.state.deepspeed_plugin.zero_stage == 3 and self.config.train.ema:
            raise ConfigError("train.ema is not supported with ZeRO-3 (weights are partitioned); set train.ema=false")
        if self.accelerator.state.deepspeed_plugin.zero_stage == 3 and self.config.train.objective == "nft":
            raise ConfigError("train.objective nft keeps an old copy of the trainable weights, which ZeRO-3 partitions; use ZeRO-2 or DDP")

    # ------------------------------------------------------------------ the loop

    def run(self) -> None:
        config, acc = self.config, self.accelerator
        log = config.log
        if self.start_epoch == 1 and acc.is_main_process:
            self.evaluator.forget_earlier_run()
        acc.wait_for_everyone()
        if self.start_epoch == 1 and self.eval_items and config.eval.before_training:
            self.tracker.log(self.evaluator(0, reward_batch), 0)
        global_step = self.start_step
        for epoch in tqdm(range(self.start_epoch, config.num_epochs + 1), desc="epochs", disable=not self.show):
            global_step, sampled, metrics = self.train_epoch(epoch, global_step)

            last = epoch == config.num_epochs
            evaluated = {}
            if self.eval_items and (last or (config.eval.every and epoch % config.eval.every == 0)):
                evaluated = self.evaluator(epoch, reward_batch)

            metrics = {**metrics, **evaluated}
            if log.image_every and (epoch % log.image_every == 0 or epoch == 1):
                shown = sampled.batch.prompt_rows[:16]
                self.tracker.log_images("rollout/images", sampled.batch.images[:16].numpy(), [sampled.items[int(r)].text for r in shown], epoch)
            self.tracker.log(metrics, epoch)
            if acc.is_main_process:
                tqdm.write(self.summary(epoch, metrics))  # above the progress bars, not through them

            if last or (log.save_every and epoch % log.save_every == 0):
                self.save(epoch, global_step)
        self.executor.shutdown()
        self.tracker.finish()
        if acc.is_main_process:
            self.evaluator.print_change()  # last, below W&B's run summary
        acc.end_training()

    def train_epoch(self, epoch: int, global_step: int) -> tuple[int, Sampled, dict[str, float]]:
        """One epoch's phases in order (draw, roll out, score, advantages, update): the optimizer
        steps taken so far, the rollout, and the epoch's metrics assembled from what each returned."""
        drawn = self.draw(epoch)
        sampled = self.roll_out(epoch, drawn)
        rewards = self.score(sampled)
        every = self.config.log.reasoning_every
        if rewards.texts and every and (epoch % every == 0 or epoch == 1):
            self.log_reasoning(epoch, sampled, rewards)
        advantages = self.advantages(epoch, drawn, sampled, rewards)
        global_step, update_metrics = self.update(epoch, sampled, advantages, global_step)
        return global_step, sampled, {**sampled.metrics, **rewards.metrics, **advantages.metrics, **update_metrics}

    # ------------------------------------------------------------------ phases

    def draw(self, epoch: int) -> Drawn:
        """This rank's samples: the epoch's items (one per group), its global sample ids and their group ids."""
        layout, config = self.layout, self.config
        prompt_ids = draw_prompt_indices(len(self.items), config.sample.num_groups, seed=config.seed, epoch=epoch)
        order = torch.randperm(layout.num_samples, generator=seeded_generator(config.seed, epoch, 1))
        sample_ids = order[torch.tensor(layout.rank_positions(self.ranks.rank))]
        return Drawn([self.items[i] for i in prompt_ids], sample_ids, sample_ids // layout.group_size)

    def sde_steps(self, epoch: int) -> list[int]:
        sde = self.config.sde
        return sde_step_indices(
            self.config.sample.num_steps, sde.window, steps=sde.steps, window_size=sde.window_size,
            window_range=sde.window_range, generator=seeded_generator(self.config.seed, epoch, 2),
        )

    def roll_out(self, epoch: int, drawn: Drawn) -> Sampled:
        """Sample this rank's images with the epoch's noise (`epoch` seeds it); each decoded batch
        goes to the reward thread at once, so scoring overlaps with sampling."""
        config = self.config
        start = time.perf_counter()
        # Every group's prompt (and source image) is encoded once per epoch and reused for
        # sampling and training.
        unique_groups, rows = torch.unique(drawn.group_ids, return_inverse=True)
        items = [drawn.items[int(g)] for g in unique_groups]
        sources = self.sources(items, self.sample_size)
        cond = self.policy.encode([item.text for item in items], source_images=sources)
        pending: list[Future] = []

        def score_async(first: int, images: torch.Tensor) -> None:
            failed = next((job for job in pending if job.done() and job.exception() is not None), None)
            if failed is not None:  # a reward already failed: stop sampling now, not after the rollout
                self._abandon_rewards(pending)
                raise failed.exception()
            picked = [int(r) for r in rows[first : first + len(images)]]
            batch = reward_batch(images, [items[r] for r in picked], [sources[r] for r in picked] if sources is not None else None)
            pending.append(self.executor.submit(self.rewards.score, batch))

        sampler = self.old if self.config.train.objective == "nft" else None  # NFT samples with its old policy
        with torch.no_grad(), swapped_weights(self.policy.trainable_parameters(), sampler):
            batch = rollout(
                self.policy, cond, rows, drawn.sample_ids, drawn.group_ids,
                seed=config.seed, epoch=epoch, num_steps=config.sample.num_steps,
                guidance_scale=config.sample.guidance_scale, size=self.sample_size,
                batch_size=config.sample.batch_size, sde=self.sde, sde_steps=self.sde_steps(epoch),
                progress=self.show, on_batch=score_async, keep_means=config.train.grpo_guard,
                same_initial_noise=config.sample.same_initial_noise, keep_final=config.train.objective != "grpo",
                keep_steps=config.train.objective == "grpo",
            )
        return Sampled(batch, cond, items, pending, {"time/rollout_s": time.perf_counter() - start})

    def score(self, sampled: Sampled) -> Rewards:
        """Wait for the rollout's reward jobs; extras and timings are combined over ranks (counts
        summed, other extras averaged)."""
        from rewards.runner import is_count

        start = time.perf_counter()
        try:
            parts = [job.result() for job in sampled.pending]
        except Exception:
            self._abandon_rewards(sampled.pending)
            raise
        metrics = {"time/reward_wait_s": time.perf_counter() - start}
        components = self.rewards.components
        scores = {c: np.concatenate([p.scores[c] for p in parts]) for c in components}
        uncertainty = {c: np.concatenate([p.uncertainty[c] for p in parts]) for c in components if all(c in p.uncertainty for p in parts)}
        for key in parts[0].extras:
            values = [p.extras.get(key, 0.0) for p in parts]
            if is_count(key):
                metrics[f"reward_extras/{key}"] = self.ranks.sum(float(np.sum(values)))
            else:
                metrics[f"reward_extras/{key}"] = self.ranks.mean(float(np.mean(values)))
        for name in parts[0].seconds:
            metrics[f"time/reward/{name}_s"] = self.ranks.sum(sum(p.seconds[name] for p in parts))
        metrics["time/reward_s"] = self.ranks.sum(sum(sum(p.seconds.values()) for p in parts))
        texts = {c: [text for p in parts for text in p.texts[c]] for c in components if all(c in p.texts for p in parts)}
        return Rewards(scores, uncertainty, metrics, texts)

    def log_reasoning(self, epoch: int, sampled: Sampled, rewards: Rewards) -> None:
        """What the judges wrote about the first log.reasoning_samples samples (shared out over the
        ranks), beside each sample's image, prompt and every component's score, for a person to
        audit why the critic scored what it scored."""
        per_rank = -(-self.config.log.reasoning_samples // self.ranks.world_size)
        batch = sampled.batch
        local = [
            {
                "sample_id": int(batch.sample_ids[i]),
                "prompt": sampled.items[int(batch.prompt_rows[i])].text,
                "scores": {name: _json_float(values[i]) for name, values in rewards.scores.items()},
                "texts": {name: texts[i] for name, texts in rewards.texts.items()},
                "image": batch.images[i].numpy(),
            }
            for i in range(min(per_rank, len(batch)))
        ]
        rows = self.ranks.gather_list(local)
        if self.accelerator.is_main_process:
            self.tracker.save_reasoning(epoch, rows)

    def _abandon_rewards(self, pending: list[Future]) -> None:
        """A reward failed and the run stops: queued reward calls are cancelled, not sent, and
        the workers are closed (a remote call in flight fails at once)."""
        for job in pending:
            job.cancel()
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.rewards.close()
        if self.eval_rewards is not None:
            self.eval_rewards.close()

    def advantages(self, epoch: int, drawn: Drawn, sampled: Sampled, rewards: Rewards) -> Advantages:
        """Gather every rank's rewards and group ids, normalise per group, keep this rank's slice."""
        start = time.perf_counter()
        ranks, t = self.ranks, self.config.train
        batch = sampled.batch
        gathered = {name: ranks.gather(values) for name, values in rewards.scores.items()}
        all_groups = ranks.gather_tensor(batch.group_ids)
        # Mixing runs on the gathered scores: per-component group normalisation needs whole groups.
        all_rewards = self.rewards.trained_reward(gathered, all_groups.numpy())
        result = group_advantages(
            torch.from_numpy(all_rewards), all_groups, global_std=t.global_std,
            clip=t.adv_clip, drop_zero_std=t.drop_zero_std,
        )
        metrics: dict[str, float] = {}
        weights = self.rewards.advantage_weights({name: ranks.gather(v) for name, v in rewards.uncertainty.items()})
        if weights is not None:
            result.advantages = result.advantages * torch.from_numpy(weights).float()
            metrics["train/uncertainty_weight_mean"] = float(weights[result.trained.numpy()].mean()) if result.trained.any() else float("nan")
        for name, values in rewards.uncertainty.items():
            metrics[f"reward/{name}/uncertainty_mean"] = nanmean(ranks.gather(values))
        for name, values in gathered.items():
            metrics[f"reward/{name}/mean"] = nanmean(values)
            metrics[f"reward/{name}/std"] = nanstd(values)
            metrics[f"reward/{name}/missing"] = int(np.isnan(values).sum())
            metrics[f"reward/{name}/is_monitor"] = int(self.rewards.roles[name] == "monitor")
        metrics["reward/mean"] = nanmean(all_rewards)
        metrics["reward/std"] = nanstd(all_rewards)
        metrics["reward/missing"] = result.metrics["missing_count"]
        metrics["train/zero_std_ratio"] = result.metrics["zero_std_ratio"]
        metrics["train/trained_fraction"] = result.metrics["trained_fraction"]
        metrics["train/advantage_abs_mean"] = result.metrics["abs_mean"]
        if self.config.log.save_samples:
            all_ids = ranks.gather_tensor(batch.sample_ids)
            self.tracker.save_samples(epoch, [
                {
                    "sample_id": int(all_ids[i]), "group_id": int(all_groups[i]), "prompt": drawn.items[int(all_groups[i])].text,
                    "reward": _json_float(all_rewards[i]), "advantage": float(result.advantages[i]), "trained": bool(result.trained[i]),
                    **{f"reward/{name}": _json_float(values[i]) for name, values in gathered.items()},
                }
                for i in range(len(all_ids))
            ])
        metrics["time/advantages_s"] = time.perf_counter() - start
        mine = slice(ranks.rank * self.layout.per_rank, (ranks.rank + 1) * self.layout.per_rank)
        return Advantages(result.advantages[mine], result.trained[mine], result.trained, metrics)

    def update(self, epoch: int, sampled: Sampled, adv: Advantages, global_step: int) -> tuple[int, dict[str, float]]:
        """train.inner_epochs passes over the epoch's samples, one optimizer step per minibatch
        (in a seeded order); returns the optimizer steps taken so far and the update's metrics."""
        start = time.perf_counter()
        acc, config, layout = self.accelerator, self.config, self.layout
        t = config.train
        batch, trained = sampled.batch, adv.trained
        self.policy.transformer.train()
        device = acc.device
        sigmas = batch.sigmas.tolist()  # numbers: the step math needs no tensor op of its own
        m, W = layout.per_rank_minibatch, layout.world_size
        # Global trained count of each minibatch, from the gathered mask: every rank knows it.
        counts = adv.all_trained.view(W, layout.num_minibatches, m).sum(dim=(0, 2))
        nft, forward = t.objective == "nft", t.objective != "grpo"
        sums = {"policy_loss": 0.0, "kl": 0.0} if forward else {"approx_kl": 0.0, "clipfrac": 0.0, "policy_loss": 0.0, "kl": 0.0}
        draws = self.forward_draws(epoch, batch) if forward else None
        steps = list(range(layout.trained_steps)) if forward else batch.step_indices
        old_likelihood = None
        if t.objective == "awm" and t.inner_epochs * layout.num_minibatches > 1:
            # The sampling policy's log-likelihoods, before any step moves the weights, computed
            # on exactly the batches the update will use (so the first pass's ratio is 1).
            old_likelihood = self.awm_old_likelihoods(sampled, trained, draws)
        terms, ratio_err, grad_norms, first_update_done, skipped = 0, 0.0, [], False, 0
        params = self.policy.trainable_parameters()
        progress = tqdm(total=t.inner_epochs * layout.num_minibatches, desc="train", disable=not self.show, leave=False)
        for inner in range(t.inner_epochs):
            for k in torch.randperm(layout.num_minibatches, generator=seeded_generator(config.seed, epoch, 3, inner)).tolist():
                progress.update(1)
                if counts[k] == 0:
                    continue  # nothing to learn from on any rank: skip consistently everywhere
                # loss = sum(w * per-sample loss), w = 1 / (global count * T), times W (DDP
                # averages over ranks) and times the accumulation steps (accelerate divides by them).
                scale = W * layout.grad_accum_steps / (float(counts[k]) * layout.trained_steps)
                for first in range(k * m, (k + 1) * m, t.batch_size):
                    rows = _trained_rows(trained, first, t.batch_size)
                    weights = trained[rows].float().to(device) * scale
                    cond = sampled.cond.take(batch.prompt_rows[rows])
                    for j, step_index in enumerate(steps):
                        with acc.accumulate(self.policy.transformer):
                            if nft:
                                out = self._nft_step(batch, rows, j, draws, cond, adv.advantages[rows].to(device), weights)
                            elif forward:
                                old = old_likelihood[rows, j].to(device) if old_likelihood is not None else None
                                out = self._awm_step(batch, rows, j, draws, cond, adv.advantages[rows].to(device), weights, old)
                            else:
                                out = self._train_step(batch, rows, j, step_index, sigmas, cond, adv.advantages[rows].to(device), weights)
                            if not first_update_done and "ratio_err" in out:
                                ratio_err = max(ratio_err, float(out["ratio_err"]))
                            for key, value in out.items():
                                if key != "ratio_err":
                                    sums[key] = sums.get(key, 0.0) + float(value)
                            terms += 1
                            finite = True
                            # Between accumulation boundaries accelerate's step and zero_grad do
                            # nothing (DeepSpeed steps inside its backward) but still cost.
                            if acc.sync_gradients:
                                if not self.deepspeed:
                                    # The norm of the gradients all ranks share (DDP has reduced
                                    # them): every rank takes the same decision.
                                    norm = float(acc.clip_grad_norm_(params, t.max_grad_norm))
                                    finite = math.isfinite(norm)
                                    if finite:
                                        grad_norms.append(norm)
                                if finite:
                                    self.optimizer.step()
                                self.optimizer.zero_grad(set_to_none=True)
                        if acc.sync_gradients:
                            first_update_done = True
                            if not finite:
                                skipped += 1
                                self.nonfinite_run.skip(global_step)
                                continue
                            self.nonfinite_run.reset()
                            global_step += 1
                            self._after_optimizer_step(global_step, grad_norms)
        progress.close()
        self.policy.transformer.eval()
        lagged = {}
        if self.old is not None:
            decay = nft_old_decay(global_step) if nft else lagged_decay(global_step, t.awm_ema_max_decay)
            with torch.no_grad():
                for old, p in zip(self.old, params):
                    old.mul_(decay).add_(p.detach(), alpha=1 - decay)
            lagged = {"train/nft_old_decay" if nft else "train/awm_ema_decay": decay}
        metrics = {f"train/{key}": self.ranks.mean(total / max(terms, 1)) for key, total in sums.items()}
        metrics.update(lagged)
        if not nft:
            metrics["train/onpolicy_ratio_err"] = self.ranks.max(ratio_err)
        metrics["train/nonfinite_skipped_steps"] = skipped
        metrics["train/grad_norm"] = float(np.mean(grad_norms)) if grad_norms else float("nan")
        metrics["train/lr"] = self.scheduler.get_last_lr()[0]
        metrics["train/global_step"] = global_step
        metrics["time/train_s"] = time.perf_counter() - start
        return global_step, metrics

    def policy_gradient(self, prompt_epoch: int, noise_epoch: int) -> dict[str, torch.Tensor]:
        """The gradient of one epoch's GRPO loss at the current weights, per trainable parameter
        name, without an optimizer step (one process only; for diagnostics such as
        bench/grad_coherence.py). Prompts are drawn as in epoch `prompt_epoch`, sampling noise
        as in epoch `noise_epoch`, so the same prompts can be sampled again with new noise."""
        if self.layout.world_size != 1:
            raise RuntimeError("policy_gradient runs in a single process")
        if self.config.train.objective != "grpo":
            raise RuntimeError("policy_gradient measures the GRPO objective (train.objective grpo)")
        drawn = self.draw(prompt_epoch)
        sampled = self.roll_out(noise_epoch, drawn)
        adv = self.advantages(noise_epoch, drawn, sampled, self.score(sampled))
        batch, trained = sampled.batch, adv.trained
        named = [(n, p) for n, p in self.accelerator.unwrap_model(self.policy.transformer).named_parameters() if p.requires_grad]
        for _, p in named:
            p.grad = None
        # The epoch's loss with every trained sample and step weighing the same; times the
        # accumulation steps because accelerate's backward divides by them (as in update()).
        weights = trained.float() * self.layout.grad_accum_steps / max(int(trained.sum()), 1) / len(batch.step_indices)
        sigmas = batch.sigmas.tolist()
        for first in range(0, len(batch), self.config.train.batch_size):
            rows = _trained_rows(trained, first, self.config.train.batch_size)
            cond = sampled.cond.take(batch.prompt_rows[rows])
            for j, step_index in enumerate(batch.step_indices):
                self._train_step(batch, rows, j, step_index, sigmas, cond, adv.advantages[rows], weights[rows])
        grads = {n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)) for n, p in named}
        for _, p in named:
            p.grad = None
        return grads

    def _train_step(self, batch: Rollout, rows, j, step_index, sigmas, cond, advantages, weights) -> dict:
        """Forward and backward of the GRPO loss of samples `rows` at their j-th trained step."""
        config, acc = self.config, self.accelerator
        latents = batch.latents[rows, j].to(acc.device)
        next_latents = batch.next_latents[rows, j].to(acc.device)
        sigma, sigma_next = sigmas[step_index], sigmas[step_index + 1]
        guidance = config.sample.guidance_scale
        step = transition(self.policy, latents, sigma, sigma_next, sigmas[1], cond, guidance, self.sde, prev_sample=next_latents)
        ref = None
        if config.train.beta > 0:
            with torch.no_grad(), self.policy.reference() as reference:
                # The reference's mean and velocity only: its log-prob is never used.
                ref = transition(self.policy, latents, sigma, sigma_next, sigmas[1], cond, guidance, self.sde,
                                 prev_sample=next_latents, network=reference, log_prob=False)
        kl = {}
        if ref is not None and config.train.kl == "velocity":
            kl = {"velocity": step.velocity, "ref_velocity": ref.velocity}
        elif ref is not None:
            kl = {"mean": step.mean, "ref_mean": ref.mean, "kl_scale": kl_scale(step.std, sigma, sigma_next)}
        guard = {}
        if config.train.grpo_guard:
            # GRPO-Guard: the ratio from the step's own noise, on one scale at every step, and the
            # step's policy loss divided by its dt.
            old_mean = batch.means[rows, j].to(acc.device)
            guard = {"log_ratio": guard_log_ratio(step.mean, old_mean, next_latents, step.std), "policy_scale": 1.0 / float(sigma - sigma_next)}
        loss, out = grpo_step_loss(
            step.log_prob, batch.log_probs[rows, j].to(acc.device), advantages,
            clip_range=config.train.clip_range, beta=config.train.beta, sample_weights=weights, **kl, **guard,
        )
        acc.backward(loss)
        return out

    def forward_draws(self, epoch: int, batch: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
        """The forward-process draws of this rank's samples: per sample, the sigmas of T of the
        rollout's timesteps (nft: the first T of a random permutation; awm: one from each of T
        strata) and fresh noise for each; seeded by (seed, epoch, sample id), so they do not
        depend on the rank."""
        T, num_steps = self.layout.trained_steps, self.config.sample.num_steps
        sigmas = batch.sigmas.cpu()
        shape = batch.final_latents.shape[1:]
        t, eps = torch.empty(len(batch), T), torch.empty(len(batch), T, *shape)
        for i, sample_id in enumerate(batch.sample_ids.tolist()):
            g = seeded_generator(self.config.seed, epoch, 5, sample_id)
            if self.config.train.objective == "nft":
                t[i] = sigmas[torch.randperm(num_steps, generator=g)[:T]]
            else:
                t[i] = sigmas[awm_timesteps(num_steps, T, g)]
            eps[i] = torch.randn(T, *shape, generator=g)
        return t, eps

    def _nft_step(self, batch: Rollout, rows, j, draws, cond, advantages, weights) -> dict:
        """Forward and backward of DiffusionNFT's loss of samples `rows` at their j-th forward-process
        draw: x_t from the clean latent, the old policy's and the reference's velocities without
        gradients, then the trained one; all CFG-free."""
        acc, t = self.accelerator, self.config.train
        x0 = batch.final_latents[rows].to(acc.device)
        sigma, eps = draws[0][rows, j].to(acc.device), draws[1][rows, j].to(acc.device)
        x_t = noised(x0, eps, sigma)
        with torch.no_grad():
            with swapped_weights(self.policy.trainable_parameters(), self.old):
                v_old = self.policy.velocity(x_t, sigma, cond, self.forward_guidance)
            v_ref = None
            if t.beta > 0:
                with self.policy.reference() as reference:
                    v_ref = self.policy.velocity(x_t, sigma, cond, self.forward_guidance, network=reference)
        v_theta = self.policy.velocity(x_t, sigma, cond, self.forward_guidance)
        optimality = nft_optimality(advantages, t.nft_optimality, t.adv_clip)
        loss, out = nft_loss(
            v_theta, v_old, x_t, x0, sigma, optimality, beta=t.nft_beta, kl=t.beta, v_ref=v_ref, sample_weights=weights, scale=t.nft_loss_scale
        )
        acc.backward(loss)
        return out

    def awm_old_likelihoods(self, sampled: Sampled, trained: torch.Tensor, draws) -> torch.Tensor:
        """AWM's log-likelihood of every trained (sample, timestep) under the weights that
        sampled them, [n, T] (NaN where not trained), on the update's own batches."""
        batch, t, layout = sampled.batch, self.config.train, self.layout
        device = self.accelerator.device
        out = torch.full((len(batch), layout.trained_steps), float("nan"), dtype=torch.float64)
        with torch.no_grad():
            for first in range(0, len(batch), t.batch_size):
                rows = _trained_rows(trained, first, t.batch_size)
                cond = sampled.cond.take(batch.prompt_rows[rows])
                x0 = batch.final_latents[rows].to(device)
                for j in range(layout.trained_steps):
                    sigma, eps = draws[0][rows, j].to(device), draws[1][rows, j].to(device)
                    v = self.policy.velocity(noised(x0, eps, sigma), sigma, cond, self.forward_guidance)
                    mse = mean_d((v.double() - (eps - x0).double()) ** 2)
                    out[rows, j] = awm_log_likelihood(mse, sigma, t.awm_weighting).cpu()
        return out

    def _awm_step(self, batch: Rollout, rows, j, draws, cond, advantages, weights, old_likelihood) -> dict:
        """Forward and backward of AWM's loss of samples `rows` at their j-th forward-process draw
        (CFG-free; the reference's velocity without gradients when train.beta > 0)."""
        acc, t = self.accelerator, self.config.train
        x0 = batch.final_latents[rows].to(acc.device)
        sigma, eps = draws[0][rows, j].to(acc.device), draws[1][rows, j].to(acc.device)
        x_t = noised(x0, eps, sigma)
        v_ref = v_ema = None
        with torch.no_grad():
            if t.beta > 0:
                with self.policy.reference() as reference:
                    v_ref = self.policy.velocity(x_t, sigma, cond, self.forward_guidance, network=reference)
            if t.awm_ema_weight > 0:
                with swapped_weights(self.policy.trainable_parameters(), self.old):
                    v_ema = self.policy.velocity(x_t, sigma, cond, self.forward_guidance)
        v_theta = self.policy.velocity(x_t, sigma, cond, self.forward_guidance)
        loss, out = awm_loss(
            v_theta, eps - x0, sigma, awm_advantages(advantages, t.adv_clip), old_log_likelihood=old_likelihood,
            clip_range=t.awm_clip_range, weighting=t.awm_weighting, beta_ref=t.beta, v_ref=v_ref,
            beta_ema=t.awm_ema_weight, v_ema=v_ema, sample_weights=weights,
        )
        acc.backward(loss)
        return out

    def _after_optimizer_step(self, global_step: int, grad_norms: list[float]) -> None:
        """The learning-rate schedule steps once per optimizer step; the EMA every train.ema_every.
        Weights that the step made non-finite stop the run here, before anything saves them."""
        self.scheduler.step()
        if self.deepspeed:
            norm = self.policy.transformer.get_global_grad_norm()
            if norm is not None:
                grad_norms.append(float(norm))
        params = self.policy.trainable_parameters()
        # One device sync for all parameters, not one per parameter: this runs every step.
        if not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
            raise NonFiniteError(
                f"optimizer step {global_step} made trainable weights non-finite (lower train.learning_rate or "
                "train.max_grad_norm); nothing was saved after it, the last checkpoint is intact"
            )
        if self.ema is not None and global_step % self.config.train.ema_every == 0:
            self.ema.step(params)

    # ------------------------------------------------------------------ checkpoints and the summary line

    def save(self, epoch: int, global_step: int) -> None:
        if self.ema is not None and not all(bool(torch.isfinite(p).all()) for p in self.ema.shadow_params):
            raise NonFiniteError(f"the EMA weights are not finite at epoch {epoch}; not saved, the last checkpoint is intact")
        state = {"epoch": epoch, "global_step": global_step, "seed": self.config.seed, "run_id": self.run_id}
        path = self.checkpoint.save_checkpoint(
            self.accelerator, self.policy, self.config.run_dir, state, keep=self.config.log.keep_checkpoints,
            scheduler=self.scheduler, ema=self.ema, old=self.old,
        )
        self.accelerator.print(f"trustgrpo: saved {path}")

    def summary(self, epoch: int, metrics: dict) -> str:
        parts = [f"epoch {epoch}", f"reward {metrics['reward/mean']:.5g}"]
        shown = {"train/approx_kl": "approx_kl", "train/clipfrac": "clipfrac", "train/onpolicy_ratio_err": "onpolicy_ratio_err",
                 "train/nft_loss_pos": "nft_loss_pos", "train/nft_loss_neg": "nft_loss_neg", "train/awm_mse": "awm_mse",
                 "eval/reward": "eval_reward",
                 "time/rollout_s": "rollout_s", "time/train_s": "train_s"}
        for key, label in shown.items():
            if key in metrics:
                parts.append(f"{label} {metrics[key]:.4g}")
        return " | ".join(parts)


def _json_float(value) -> float | None:
    """NaN (a missing reward) becomes null in JSON files."""
    value = float(value)
    return None if math.isnan(value) else value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="trustgrpo-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML experiment file (see configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. sample.group_size=8 train.beta=0")
    args = parser.parse_args(argv)
    from rl import rundir

    try:
        config = load_config(args.config, args.overrides)
        if config.resume:
            config.run_dir = config.resume
        config.run_dir = rundir.resolve_run_dir(config.run_dir)
        EpochLayout.build(config, int(os.environ.get("WORLD_SIZE", "1")))
    except (ConfigError, rundir.RunDirError) as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    # The main process owns the run_dir: its lock, the new-run and resume checks, run.json.
    lock, run_id = None, None
    if int(os.environ.get("RANK", "0")) == 0:
        try:
            run_id, lock = rundir.prepare(to_dict(config), run_dir=config.run_dir, resume=bool(config.resume), overwrite=config.overwrite)
        except rundir.RunDirError as err:
            print(f"run_dir error: {err}", file=sys.stderr)
            return 2
    try:
        return _train(config, run_id)
    finally:
        if lock is not None:
            lock.release()


def _train(config: RunConfig, run_id: str | None) -> int:
    """Build the trainer and run it; an error a user can act on ends in one line and an exit code
    of its kind (2: bad input, found before training; 3: non-finite values; 4: a reward failed)."""
    from rewards.runner import RewardError
    from rl.checkpoint import CheckpointError

    stops = {
        DataError: ("data error", 2),  # data files, read before any model loads
        ConfigError: ("config error", 2),  # what only the launch reveals (a DeepSpeed config at odds with the run)
        CheckpointError: ("checkpoint error", 2),
        NonFiniteError: ("stopped", 3),
        RewardError: ("reward error", 4),
    }
    try:
        Trainer(config, run_id).run()
    except tuple(stops) as err:
        label, code = next(stop for kind, stop in stops.items() if isinstance(err, kind))
        print(f"{label}: {err}", file=sys.stderr)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
