"""Flow-GRPO training: sample groups, score them, normalise advantages over all ranks, update.

    python -m rl.train configs/tiny_cpu.yaml [key=value ...]
    accelerate launch --config_file launch/accelerate/zero2.yaml -m rl.train configs/sd35m_pickscore.yaml

Both are the same program. This module is the only place that knows about ranks, accelerate,
DeepSpeed and the tracker; the math it calls (rl.sde, rl.advantages, rl.loss) is pure.

Layout of an epoch. N = sample.num_groups * sample.group_size samples, numbered by a seeded
permutation into N positions; positions are split into train.num_minibatches global minibatches
of M = N / num_minibatches, and each rank owns a contiguous 1/world_size of every minibatch.
A sample's noise is seeded by its global index, so for the same config every world size draws the
same images, forms the same minibatches and, up to float summation order, takes the same steps.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from rl.advantages import group_advantages
from rl.config import ConfigError, RunConfig, load_config, to_dict
from rl.data import DataError, Item, draw_prompt_indices, load_source_image, read_items
from rl.loss import grpo_step_loss
from rl.rollout import Rollout, SDESettings, rollout, transition
from rl.sde import kl_scale, sde_step_indices
from rl.stats import paired_change

EVAL_STREAM = 1 << 30  # the "epoch" that seeds evaluation noise: the same images every evaluation


def _trained_rows(trained: torch.Tensor, first: int, size: int) -> torch.Tensor:
    """Indices of the trained samples among rows first..first+size: samples of dropped groups
    (zero advantage, zero weight) add nothing to the loss, so their forward and backward passes
    are skipped. With none trained, row `first` alone (weight 0) still runs, so every rank makes
    the same backward calls (DDP and gradient accumulation count them)."""
    index = torch.nonzero(trained[first : first + size]).flatten() + first
    return index if index.numel() else torch.tensor([first])


def num_trained_steps(config: RunConfig) -> int:
    """Trained steps per sample; fixed for a run so gradient accumulation is fixed too."""
    sde = config.sde
    return len(sde_step_indices(config.sample.num_steps, sde.window, steps=sde.steps, window_size=sde.window_size, window_range=sde.window_range))


@dataclass
class EpochLayout:
    world_size: int
    num_samples: int  # N, all ranks
    group_size: int
    num_minibatches: int
    per_rank: int  # n = N / world_size
    minibatch_size: int  # M, all ranks
    per_rank_minibatch: int  # m = M / world_size
    microbatches_per_minibatch: int  # m / train.batch_size
    trained_steps: int  # T
    grad_accum_steps: int  # backward calls per optimizer step on one rank

    @classmethod
    def build(cls, config: RunConfig, world_size: int) -> "EpochLayout":
        s, t = config.sample, config.train
        total = s.num_groups * s.group_size
        where = f"sample.num_groups * sample.group_size = {s.num_groups} * {s.group_size} = {total} samples"
        if total % world_size:
            raise ConfigError(f"{where} cannot be split over {world_size} ranks; make it a multiple of {world_size}")
        if total % t.num_minibatches or (total // t.num_minibatches) % world_size:
            raise ConfigError(
                f"{where} must split into train.num_minibatches = {t.num_minibatches} minibatches, "
                f"each divisible by {world_size} ranks"
            )
        per_rank, m = total // world_size, total // t.num_minibatches // world_size
        if per_rank % s.batch_size:
            raise ConfigError(f"{per_rank} samples per rank are not a multiple of sample.batch_size = {s.batch_size}")
        if m % t.batch_size:
            raise ConfigError(
                f"each rank's share of a minibatch ({m} samples) is not a multiple of train.batch_size = {t.batch_size}"
            )
        steps = num_trained_steps(config)
        return cls(world_size, total, s.group_size, t.num_minibatches, per_rank, total // t.num_minibatches, m, m // t.batch_size, steps, (m // t.batch_size) * steps)

    def rank_positions(self, rank: int) -> list[int]:
        return [
            k * self.minibatch_size + rank * self.per_rank_minibatch + i
            for k in range(self.num_minibatches)
            for i in range(self.per_rank_minibatch)
        ]

    def describe(self) -> str:
        return (
            f"{self.num_samples} samples per epoch ({self.num_samples // self.group_size} groups x {self.group_size}) "
            f"over {self.world_size} rank(s): {self.per_rank} per rank; {self.num_minibatches} optimizer steps per inner epoch "
            f"of {self.minibatch_size} samples x {self.trained_steps} trained steps "
            f"({self.grad_accum_steps} backward passes per rank per step)"
        )


def _generator(*keys: int) -> torch.Generator:
    seed = int(np.random.SeedSequence(list(keys)).generate_state(1, dtype=np.uint64)[0] & np.uint64(2**63 - 1))
    return torch.Generator().manual_seed(seed)


class Trainer:
    def __init__(self, config: RunConfig):
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, DistributedType, InitProcessGroupKwargs, set_seed
        from diffusers.optimization import get_scheduler

        from models import adapter_class, build_policy
        from rewards.runner import RewardRunner
        from rl import checkpoint

        self.config = config
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.layout = EpochLayout.build(config, world_size)
        # Data files are checked before any model loads (reward models included).
        data = config.data
        self.items = read_items(data.train_prompts, data.train_edits)
        eval_items = read_items(data.eval_prompts, data.eval_edits)[: config.eval.num_prompts] if (data.eval_prompts or data.eval_edits) else []
        # Several samples per held-out prompt, each with its own noise (its own sample id).
        self.eval_items = [item for item in eval_items for _ in range(config.eval.samples_per_prompt)]
        self._sources: dict = {}
        self.rewards = RewardRunner(config.rewards, config.reward_mix)

        # Some adapters leave LoRA parameters without a gradient (Qwen-Image): DDP must know.
        unused = getattr(adapter_class(config.model.adapter), "find_unused_parameters", False)
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

        self.policy = build_policy(config.model, acc.device, needs_reference=config.train.beta > 0)
        params = self.policy.trainable_parameters()
        t = config.train
        optimizer = torch.optim.AdamW(params, lr=t.learning_rate, betas=tuple(t.adam_betas), eps=t.adam_eps, weight_decay=t.weight_decay)
        self.policy.transformer, self.optimizer = acc.prepare(self.policy.transformer, optimizer)
        total_steps = config.num_epochs * t.inner_epochs * t.num_minibatches
        # Stepped by hand once per optimizer step: a prepared scheduler would step once per rank.
        self.scheduler = get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=t.lr_warmup_steps, num_training_steps=total_steps)
        acc.register_for_checkpointing(self.scheduler)
        self.ema = None
        if t.ema:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(self.policy.trainable_parameters(), decay=t.ema_decay)
            acc.register_for_checkpointing(self.ema)
        checkpoint.register_hooks(acc)
        self.checkpoint = checkpoint

        self.start_epoch, self.global_step = 1, 0
        resume_epoch = None
        if config.resume:
            state = checkpoint.load_checkpoint(acc, self.policy, config.resume)
            self.start_epoch, self.global_step = state["epoch"] + 1, state["global_step"]
            resume_epoch = state["epoch"]
        from rl.tracking import NullTracker, Tracker

        self.tracker = (
            Tracker(config.run_dir, mode=config.log.wandb_mode, project=config.log.project, run_name=config.log.run_name, config=to_dict(config), resume_epoch=resume_epoch)
            if acc.is_main_process
            else NullTracker()
        )
        self.sde = SDESettings(config.sde.dynamics, config.sde.noise_level)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward")
        self.show = config.log.progress and acc.is_main_process
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

    # ------------------------------------------------------------------ the loop

    def run(self) -> None:
        config, acc = self.config, self.accelerator
        if self.start_epoch == 1 and acc.is_main_process:
            self.eval_before_path.unlink(missing_ok=True)  # an earlier run's: never a new run's baseline
        acc.wait_for_everyone()
        if self.start_epoch == 1 and self.eval_items and config.eval.before_training:
            self.tracker.log(self.evaluate(0), 0)
        epochs = range(self.start_epoch, config.num_epochs + 1)
        for epoch in tqdm(epochs, desc="epochs", disable=not self.show):
            metrics: dict[str, float] = {}
            items, sample_ids, group_ids = self.draw(epoch)
            batch, rewards = self.sample_and_score(epoch, items, sample_ids, group_ids, metrics)
            advantages, trained = self.advantages(epoch, items, batch, rewards, metrics)
            self.update(epoch, batch, advantages, trained, metrics)
            last = epoch == config.num_epochs
            if self.eval_items and (last or (config.eval.every and epoch % config.eval.every == 0)):
                metrics.update(self.evaluate(epoch))
            if config.log.image_every and (epoch % config.log.image_every == 0 or epoch == 1):
                self.tracker.log_images("rollout/images", batch.images[:16].numpy(), [self.epoch_items[int(r)].text for r in batch.prompt_rows[:16]], epoch)
            self.tracker.log(metrics, epoch)
            if acc.is_main_process:
                tqdm.write(self.summary(epoch, metrics))  # above the progress bars, not through them
            if last or (config.log.save_every and epoch % config.log.save_every == 0):
                self.save(epoch)
        self.executor.shutdown()
        self.tracker.finish()
        if acc.is_main_process:
            self.print_eval_change()  # last, below W&B's run summary
        acc.end_training()

    # ------------------------------------------------------------------ phases

    def draw(self, epoch: int) -> tuple[list[Item], torch.Tensor, torch.Tensor]:
        """This rank's samples: the epoch's items (one per group), its global sample ids and their group ids."""
        layout, config = self.layout, self.config
        prompt_ids = draw_prompt_indices(len(self.items), config.sample.num_groups, seed=config.seed, epoch=epoch)
        order = torch.randperm(layout.num_samples, generator=_generator(config.seed, epoch, 1))
        positions = torch.tensor(layout.rank_positions(self.accelerator.process_index))
        sample_ids = order[positions]
        group_ids = sample_ids // layout.group_size
        return [self.items[i] for i in prompt_ids], sample_ids, group_ids

    def sde_steps(self, epoch: int) -> list[int]:
        sde = self.config.sde
        return sde_step_indices(
            self.config.sample.num_steps, sde.window, steps=sde.steps, window_size=sde.window_size,
            window_range=sde.window_range, generator=_generator(self.config.seed, epoch, 2),
        )

    def source_images(self, items: list[Item]) -> list[np.ndarray] | None:
        """Editing: the items' source images at the training resolution (decoded once per run)."""
        if items and items[0].source is None:
            return None
        resolution = self.config.sample.resolution
        for item in items:
            if item.source not in self._sources:
                self._sources[item.source] = load_source_image(item.source, resolution)
        return [self._sources[item.source] for item in items]

    def reward_batch(self, images: torch.Tensor, items: list[Item], sources: list[np.ndarray] | None):
        from rewards.base import RewardBatch

        texts = [item.text for item in items]
        return RewardBatch(
            images=images.numpy(), prompts=texts, source_images=sources,
            instructions=texts if sources is not None else None,
        )

    def sample_and_score(self, epoch, items, sample_ids, group_ids, metrics) -> tuple[Rollout, dict[str, np.ndarray]]:
        config = self.config
        start = time.perf_counter()
        # Every group's prompt (and source image) is encoded once per epoch and reused for
        # sampling and training.
        unique_groups, rows = torch.unique(group_ids, return_inverse=True)
        self.epoch_items = [items[int(g)] for g in unique_groups]
        sources = self.source_images(self.epoch_items)
        self.cond = self.policy.encode([item.text for item in self.epoch_items], source_images=sources)
        futures: list[Future] = []

        def score_async(first: int, images: torch.Tensor) -> None:
            picked = [int(r) for r in rows[first : first + len(images)]]
            batch = self.reward_batch(
                images, [self.epoch_items[r] for r in picked], [sources[r] for r in picked] if sources is not None else None
            )
            futures.append(self.executor.submit(self.rewards.score, batch))

        with torch.no_grad():
            batch = rollout(
                self.policy, self.cond, rows, sample_ids, group_ids,
                seed=config.seed, epoch=epoch, num_steps=config.sample.num_steps,
                guidance_scale=config.sample.guidance_scale, resolution=config.sample.resolution,
                batch_size=config.sample.batch_size, sde=self.sde, sde_steps=self.sde_steps(epoch),
                progress=self.show, on_batch=score_async,
            )
        metrics["time/rollout_s"] = time.perf_counter() - start
        wait_start = time.perf_counter()
        parts = [f.result() for f in futures]
        metrics["time/reward_wait_s"] = time.perf_counter() - wait_start
        scores = {c: np.concatenate([p.scores[c] for p in parts]) for c in self.rewards.components}
        self.uncertainty = {
            c: np.concatenate([p.uncertainty[c] for p in parts]) for c in self.rewards.components if all(c in p.uncertainty for p in parts)
        }
        from rewards.runner import _is_count

        for key in parts[0].extras:
            values = [p.extras.get(key, 0.0) for p in parts]
            local = float(np.sum(values)) if _is_count(key) else float(np.mean(values))
            metrics[f"reward_extras/{key}"] = self._sum_over_ranks(local) if _is_count(key) else self._mean_over_ranks(local)
        for name in parts[0].seconds:
            metrics[f"time/reward/{name}_s"] = self._sum_over_ranks(sum(p.seconds[name] for p in parts))
        metrics["time/reward_s"] = self._sum_over_ranks(sum(sum(p.seconds.values()) for p in parts))
        return batch, scores

    def advantages(self, epoch: int, items: list[Item], batch: Rollout, scores: dict[str, np.ndarray], metrics) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather every rank's rewards and group ids, normalise per group, keep this rank's slice."""
        start = time.perf_counter()
        acc, t = self.accelerator, self.config.train
        gathered = {name: self._gather(values) for name, values in scores.items()}
        all_groups = acc.gather(batch.group_ids.to(acc.device)).cpu()
        # Mixing runs on the gathered scores: per-component group normalisation needs whole groups.
        all_rewards = self.rewards.trained_reward(gathered, all_groups.numpy())
        result = group_advantages(
            torch.from_numpy(all_rewards), all_groups, global_std=t.global_std,
            clip=t.adv_clip, drop_zero_std=t.drop_zero_std,
        )
        weights = self.rewards.advantage_weights({name: self._gather(v) for name, v in self.uncertainty.items()})
        if weights is not None:
            result.advantages = result.advantages * torch.from_numpy(weights).float()
            metrics["train/uncertainty_weight_mean"] = float(weights[result.trained.numpy()].mean()) if result.trained.any() else float("nan")
        for name, values in self.uncertainty.items():
            metrics[f"reward/{name}/uncertainty_mean"] = _nanmean(self._gather(values))
        for name, values in gathered.items():
            role = self.rewards.roles[name]
            metrics[f"reward/{name}/mean"] = _nanmean(values)
            metrics[f"reward/{name}/std"] = float(np.nanstd(values)) if np.isfinite(values).any() else float("nan")
            metrics[f"reward/{name}/missing"] = int(np.isnan(values).sum())
            metrics[f"reward/{name}/is_monitor"] = int(role == "monitor")
        metrics["reward/mean"] = _nanmean(all_rewards)
        metrics["reward/std"] = float(np.nanstd(all_rewards)) if np.isfinite(all_rewards).any() else float("nan")
        metrics["reward/missing"] = result.metrics["missing_count"]
        metrics["train/zero_std_ratio"] = result.metrics["zero_std_ratio"]
        metrics["train/trained_fraction"] = result.metrics["trained_fraction"]
        metrics["train/advantage_abs_mean"] = result.metrics["abs_mean"]
        self.all_trained = result.trained  # [N] in gathered (rank-major) order
        if self.config.log.save_samples:
            all_ids = acc.gather(batch.sample_ids.to(acc.device)).cpu()
            self.tracker.save_samples(epoch, [
                {
                    "sample_id": int(all_ids[i]), "group_id": int(all_groups[i]), "prompt": items[int(all_groups[i])].text,
                    "reward": _json_float(all_rewards[i]), "advantage": float(result.advantages[i]), "trained": bool(result.trained[i]),
                    **{f"reward/{name}": _json_float(values[i]) for name, values in gathered.items()},
                }
                for i in range(len(all_ids))
            ])
        rank = acc.process_index
        n = self.layout.per_rank
        metrics["time/advantages_s"] = time.perf_counter() - start
        return result.advantages[rank * n : (rank + 1) * n], result.trained[rank * n : (rank + 1) * n]

    def update(self, epoch: int, batch: Rollout, advantages: torch.Tensor, trained: torch.Tensor, metrics) -> None:
        start = time.perf_counter()
        acc, config, layout = self.accelerator, self.config, self.layout
        t = config.train
        self.policy.transformer.train()
        device = acc.device
        sigmas = batch.sigmas.to(device)
        m, W = layout.per_rank_minibatch, layout.world_size
        # Global trained count of each minibatch, from the gathered mask: every rank knows it.
        all_trained = self.all_trained.view(W, layout.num_minibatches, m)
        counts = all_trained.sum(dim=(0, 2))
        sums = {"approx_kl": 0.0, "clipfrac": 0.0, "policy_loss": 0.0, "kl": 0.0}
        terms, ratio_err, grad_norms, first_update_done = 0, 0.0, [], False
        params = self.policy.trainable_parameters()
        progress = tqdm(total=t.inner_epochs * layout.num_minibatches, desc="train", disable=not self.show, leave=False)
        for inner in range(t.inner_epochs):
            for k in torch.randperm(layout.num_minibatches, generator=_generator(config.seed, epoch, 3, inner)).tolist():
                progress.update(1)
                if counts[k] == 0:
                    continue  # nothing to learn from on any rank: skip consistently everywhere
                # loss = sum(w * per-sample loss), w = 1 / (global count * T), times W (DDP
                # averages over ranks) and times the accumulation steps (accelerate divides by them).
                scale = W * layout.grad_accum_steps / (float(counts[k]) * layout.trained_steps)
                for first in range(k * m, (k + 1) * m, t.batch_size):
                    rows = _trained_rows(trained, first, t.batch_size)
                    weights = trained[rows].float().to(device) * scale
                    cond = self.cond.take(batch.prompt_rows[rows])
                    for j, step_index in enumerate(batch.step_indices):
                        with acc.accumulate(self.policy.transformer):
                            out = self._train_step(batch, rows, j, step_index, sigmas, cond, advantages[rows].to(device), weights)
                            if not first_update_done:
                                ratio_err = max(ratio_err, float(out["ratio_err"]))
                            for key in sums:
                                sums[key] += float(out[key])
                            terms += 1
                            if acc.sync_gradients and not self.deepspeed:
                                grad_norms.append(float(acc.clip_grad_norm_(params, t.max_grad_norm)))
                            self.optimizer.step()
                            self.optimizer.zero_grad(set_to_none=True)
                        if acc.sync_gradients:
                            first_update_done = True
                            self._after_optimizer_step(grad_norms)
        progress.close()
        self.policy.transformer.eval()
        for key, total in sums.items():
            metrics[f"train/{key}"] = self._mean_over_ranks(total / max(terms, 1))
        metrics["train/onpolicy_ratio_err"] = self._max_over_ranks(ratio_err)
        metrics["train/grad_norm"] = float(np.mean(grad_norms)) if grad_norms else float("nan")
        metrics["train/lr"] = self.scheduler.get_last_lr()[0]
        metrics["train/global_step"] = self.global_step
        metrics["time/train_s"] = time.perf_counter() - start

    def policy_gradient(self, prompt_epoch: int, noise_epoch: int) -> dict[str, torch.Tensor]:
        """The gradient of one epoch's GRPO loss at the current weights, per trainable parameter
        name, without an optimizer step (one process only; for diagnostics such as
        bench/grad_coherence.py). Prompts are drawn as in epoch `prompt_epoch`, sampling noise
        as in epoch `noise_epoch`, so the same prompts can be sampled again with new noise."""
        if self.layout.world_size != 1:
            raise RuntimeError("policy_gradient runs in a single process")
        metrics: dict[str, float] = {}
        items, sample_ids, group_ids = self.draw(prompt_epoch)
        batch, scores = self.sample_and_score(noise_epoch, items, sample_ids, group_ids, metrics)
        advantages, trained = self.advantages(noise_epoch, items, batch, scores, metrics)
        named = [(n, p) for n, p in self.accelerator.unwrap_model(self.policy.transformer).named_parameters() if p.requires_grad]
        for _, p in named:
            p.grad = None
        # The epoch's loss with every trained sample and step weighing the same; times the
        # accumulation steps because accelerate's backward divides by them (as in update()).
        weights = trained.float() * self.layout.grad_accum_steps / max(int(trained.sum()), 1) / len(batch.step_indices)
        sigmas = batch.sigmas.to(self.accelerator.device)
        for first in range(0, len(batch), self.config.train.batch_size):
            rows = _trained_rows(trained, first, self.config.train.batch_size)
            cond = self.cond.take(batch.prompt_rows[rows])
            for j, step_index in enumerate(batch.step_indices):
                self._train_step(batch, rows, j, step_index, sigmas, cond, advantages[rows], weights[rows])
        grads = {n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)) for n, p in named}
        for _, p in named:
            p.grad = None
        return grads

    def _train_step(self, batch: Rollout, rows, j, step_index, sigmas, cond, advantages, weights) -> dict:
        config, acc = self.config, self.accelerator
        latents = batch.latents[rows, j].to(acc.device)
        next_latents = batch.next_latents[rows, j].to(acc.device)
        sigma, sigma_next = sigmas[step_index], sigmas[step_index + 1]
        guidance = config.sample.guidance_scale
        step = transition(self.policy, latents, sigma, sigma_next, sigmas[1], cond, guidance, self.sde, prev_sample=next_latents)
        ref_mean = None
        if config.train.beta > 0:
            with torch.no_grad(), self.policy.reference() as reference:
                ref_mean = transition(self.policy, latents, sigma, sigma_next, sigmas[1], cond, guidance, self.sde, prev_sample=next_latents, network=reference).mean
        loss, out = grpo_step_loss(
            step.log_prob, batch.log_probs[rows, j].to(acc.device), advantages,
            clip_range=config.train.clip_range, beta=config.train.beta, mean=step.mean, ref_mean=ref_mean,
            kl_scale=kl_scale(step.std, sigma, sigma_next), sample_weights=weights,
        )
        acc.backward(loss)
        return out

    def _after_optimizer_step(self, grad_norms: list[float]) -> None:
        t = self.config.train
        self.scheduler.step()
        self.global_step += 1
        if self.deepspeed:
            norm = self.policy.transformer.get_global_grad_norm()
            if norm is not None:
                grad_norms.append(float(norm))
        if self.ema is not None and self.global_step % t.ema_every == 0:
            self.ema.step(self.policy.trainable_parameters())

    # ------------------------------------------------------------------ evaluation

    @contextmanager
    def ema_weights(self):
        if self.ema is None:
            yield
            return
        params = self.policy.trainable_parameters()
        self.ema.store(params)
        self.ema.copy_to(params)
        try:
            yield
        finally:
            self.ema.restore(params)

    def evaluate(self, epoch: int) -> dict[str, float]:
        """ODE sampling with the EMA weights on the held-out prompts; the same noise every time."""
        start = time.perf_counter()
        acc, config = self.accelerator, self.config
        indices = list(range(acc.process_index, len(self.eval_items), acc.num_processes))
        local_scores: dict[str, list[float]] = {c: [] for c in self.rewards.components}
        local_reward: list[float] = []
        images = None
        if indices:
            items = [self.eval_items[i] for i in indices]
            sources = self.source_images(items)
            ids = torch.tensor(indices)
            with torch.no_grad(), self.ema_weights():
                cond = self.policy.encode([item.text for item in items], source_images=sources)
                batch = rollout(
                    self.policy, cond, torch.arange(len(indices)), ids, ids,
                    seed=config.seed, epoch=EVAL_STREAM, num_steps=config.eval.num_steps,
                    guidance_scale=config.eval.guidance_scale, resolution=config.sample.resolution,
                    batch_size=config.eval.batch_size, sde=self.sde, sde_steps=[], progress=self.show, desc="eval",
                )
            images = batch.images
            scored = self.rewards.score(self.reward_batch(images, items, sources))
            for c in local_scores:
                local_scores[c] = scored.scores[c].tolist()
            # Each held-out prompt is its own group: no group normalisation here.
            local_reward = self.rewards.trained_reward(scored.scores, group_normalize=False).tolist()
        # Every rank's samples, back in eval-item order (the order is the pairing across evaluations).
        order = np.argsort(np.array(self._gather_list(indices), dtype=np.int64), kind="stable")
        per_sample = {f"eval/{c}": np.array(self._gather_list(values), dtype=np.float64)[order] for c, values in local_scores.items()}
        per_sample["eval/reward"] = np.array(self._gather_list(local_reward), dtype=np.float64)[order]
        metrics = {key: _nanmean(values) for key, values in per_sample.items()}
        metrics.update(self.eval_change(epoch, per_sample))
        metrics["time/eval_s"] = time.perf_counter() - start
        if images is not None and acc.is_main_process:
            shown = images[:: config.eval.samples_per_prompt][:16].numpy()  # one sample per prompt
            captions = [item.text for item in items[:: config.eval.samples_per_prompt][:16]]
            self.tracker.log_images("eval/images", shown, captions, epoch)
            self.before_after(epoch, shown, captions)
        return metrics

    @property
    def eval_before_path(self) -> Path:
        return Path(self.config.run_dir) / "eval_before.npz"

    def eval_change(self, epoch: int, per_sample: dict[str, np.ndarray]) -> dict[str, float]:
        """Keep the per-sample scores of the evaluation before training (run_dir/eval_before.npz,
        so a resumed run has them); at a later evaluation, the paired change of each metric since
        then and its standard error over prompts (rl.stats.paired_change), as `<metric>/change`
        and `<metric>/change_se`."""
        path = self.eval_before_path
        if epoch == 0:
            if self.accelerator.is_main_process:
                np.savez(path, **{key.replace("/", "|"): values for key, values in per_sample.items()})
            return {}
        if not path.exists():
            return {}
        before = {key.replace("|", "/"): values for key, values in np.load(path).items()}
        prompts = np.arange(len(self.eval_items)) // self.config.eval.samples_per_prompt
        out = {}
        for key, values in per_sample.items():
            if key in before and before[key].shape == values.shape:
                out[f"{key}/change"], out[f"{key}/change_se"] = paired_change(before[key], values, prompts)
        return out

    def print_eval_change(self) -> None:
        """Print every evaluation metric before training (epoch 0) and at the end, from metrics.jsonl."""
        path = Path(self.config.run_dir) / "metrics.jsonl"
        if not path.exists():
            return
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        evals = [row for row in rows if "eval/reward" in row]
        if len(evals) < 2 or evals[0]["epoch"] != 0:
            return
        first, last = evals[0], evals[-1]
        num_prompts = len(self.eval_items) // self.config.eval.samples_per_prompt
        lines = [f"held-out evaluation ({num_prompts} prompts x {self.config.eval.samples_per_prompt} samples, "
                 f"epoch 0 -> epoch {last['epoch']}):"]
        for key in first:
            if key.startswith("eval/") and first[key] is not None and last.get(key) is not None:
                line = f"  {key}: {first[key]:.4f} -> {last[key]:.4f} ({last[key] - first[key]:+.4f}"
                se = last.get(f"{key}/change_se")
                lines.append(line + (f" +- {se:.4f})" if se is not None else ")"))
        if any(f"{key}/change_se" in last for key in first):
            lines.append("  (+- is the standard error of the change over the held-out prompts, same noise before and after;\n"
                         "   a change within about two of them could be sampling noise: raise eval.num_prompts or eval.samples_per_prompt)")
        print("\n".join(lines), flush=True)

    def before_after(self, epoch: int, images: np.ndarray, captions: list[str]) -> None:
        """Keep the first evaluation's images (run_dir/images/eval_before.npz, so a resumed run
        has them too); at the end of training, write them above the final ones as
        run_dir/before_after.png (and log it), same prompts and same noise in each column."""
        path = Path(self.config.run_dir) / "images" / "eval_before.npz"
        if epoch == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez_compressed(path, images=images)
        elif epoch == self.config.num_epochs and path.exists():
            before = np.load(path)["images"]
            count = min(len(before), len(images))
            self.tracker.log_before_after(before[:count], images[:count], captions[:count], epoch)

    # ------------------------------------------------------------------ checkpoints and helpers

    def save(self, epoch: int) -> None:
        state = {"epoch": epoch, "global_step": self.global_step, "seed": self.config.seed}
        path = self.checkpoint.save_checkpoint(self.accelerator, self.policy, self.config.run_dir, state, keep=self.config.log.keep_checkpoints)
        self.accelerator.print(f"trustgrpo: saved {path}")

    def summary(self, epoch: int, metrics: dict) -> str:
        parts = [f"epoch {epoch}", f"reward {metrics['reward/mean']:.5g}"]
        for key in ("train/approx_kl", "train/clipfrac", "train/onpolicy_ratio_err", "eval/reward", "time/rollout_s", "time/train_s"):
            if key in metrics:
                parts.append(f"{key.split('/')[-1]} {metrics[key]:.4g}")
        return " | ".join(parts)

    def _gather(self, values: np.ndarray) -> np.ndarray:
        acc = self.accelerator
        return acc.gather(torch.as_tensor(values, dtype=torch.float64, device=acc.device)).cpu().numpy()

    def _gather_list(self, values: list) -> list:
        from accelerate.utils import gather_object

        return gather_object(values) if self.accelerator.num_processes > 1 else list(values)

    def _sum_over_ranks(self, value: float) -> float:
        return float(self._gather(np.array([value])).sum())

    def _mean_over_ranks(self, value: float) -> float:
        return float(self._gather(np.array([value])).mean())

    def _max_over_ranks(self, value: float) -> float:
        return float(self._gather(np.array([value])).max())


def _json_float(value) -> float | None:
    """NaN (a missing reward) becomes null in JSON files."""
    value = float(value)
    return None if math.isnan(value) else value


def _nanmean(values: np.ndarray) -> float:
    values = np.asarray(values, dtype=np.float64)
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="trustgrpo-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML experiment file (see configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. sample.group_size=8 train.beta=0")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        if config.resume:
            config.run_dir = config.resume
        EpochLayout.build(config, int(os.environ.get("WORLD_SIZE", "1")))
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    try:
        trainer = Trainer(config)
    except DataError as err:
        # Raised while reading the data files, before any model loads.
        print(f"data error: {err}", file=sys.stderr)
        return 2
    trainer.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
