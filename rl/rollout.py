"""The rollout engine: sample images with the SDE sampler and keep what the update needs.

Model-agnostic (it talks to a models.base.Policy) and rank-agnostic: the caller says which global
samples to draw. Every sample's initial noise and SDE noise come from its own generator, seeded
by (seed, epoch, global sample index), so an image does not depend on the batch or the rank it
was drawn in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from models.base import draw_noise
from rl.sde import SDEStep, flow_sde_step, ode_step


@dataclass
class Rollout:
    sample_ids: torch.Tensor  # [B] global sample index within the epoch
    group_ids: torch.Tensor  # [B] group (prompt) index within the epoch
    prompt_rows: torch.Tensor  # [B] row of the epoch's conditioning this sample uses
    latents: torch.Tensor  # [B, T, ...] state before each trained step, float32
    next_latents: torch.Tensor  # [B, T, ...] state after each trained step, float32
    log_probs: torch.Tensor  # [B, T] log-prob of each trained transition when sampled
    means: torch.Tensor  # [B, T, ...] mean of each trained transition when sampled (keep_means), else [B, 0]
    final_latents: torch.Tensor  # [B, ...] the clean latent each sample ends at (keep_final), else [B, 0]
    images: torch.Tensor  # [B, H, W, 3] uint8, CPU
    step_indices: list[int]  # [T] sampling-step index of each trained step
    sigmas: torch.Tensor  # [num_steps + 1] the schedule used

    def __len__(self) -> int:
        return int(self.sample_ids.shape[0])


def sample_seed(seed: int, epoch: int, sample_id: int, stream: int = 0) -> int:
    """A 63-bit seed for one sample, independent across (seed, epoch, sample, stream)."""
    state = np.random.SeedSequence([seed, epoch, sample_id, stream]).generate_state(2, dtype=np.uint64)
    return int(state[0] & np.uint64(2**63 - 1))


GROUP_NOISE = 1  # the seed stream of a group's shared initial noise (sample streams are 0)


@dataclass
class SDESettings:
    dynamics: str
    noise_level: float


def transition(
    policy,
    latents: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    sigma_max: torch.Tensor,
    cond,
    guidance_scale: float,
    sde: SDESettings,
    *,
    prev_sample: torch.Tensor | None = None,
    generators: Sequence[torch.Generator] | None = None,
    noise: torch.Tensor | None = None,
    network=None,
    log_prob: bool = True,
) -> SDEStep:
    """One stochastic step of the policy. Sampling and training both call this, with the same
    batch shapes, so that the first inner step is exactly on-policy. The sigmas are the
    schedule's values as Python numbers (the step's math then needs no tensor op of its own) or
    tensors. log_prob=False skips the log-probability (None in the step): a reference's
    transition needs only its mean and velocity."""
    velocity = policy.velocity(latents, _batch_sigma(sigma, latents), cond, guidance_scale, network=network)
    step = flow_sde_step(
        velocity, latents, sigma, sigma_next,
        noise_level=sde.noise_level, sigma_max=sigma_max, prev_sample=prev_sample, noise=noise,
        generator=list(generators) if generators is not None and noise is None else None, dynamics=sde.dynamics,
        with_log_prob=log_prob,
    )
    return step._replace(velocity=velocity)


def _batch_sigma(sigma, latents: torch.Tensor) -> torch.Tensor:
    """One sigma (a number or a 0-d tensor) as the [B] tensor a velocity call takes."""
    if isinstance(sigma, torch.Tensor):
        return sigma.expand(latents.shape[0])
    return torch.full((latents.shape[0],), sigma, dtype=torch.float32, device=latents.device)


@torch.no_grad()
def rollout(
    policy,
    cond,
    prompt_rows: torch.Tensor,
    sample_ids: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    seed: int,
    epoch: int,
    num_steps: int,
    guidance_scale: float,
    size: "int | tuple[int, int]",
    batch_size: int,
    sde: SDESettings,
    sde_steps: Sequence[int],
    progress: bool = False,
    desc: str = "rollout",
    on_batch: Callable[[int, torch.Tensor], None] | None = None,
    keep_means: bool = False,
    same_initial_noise: bool = False,
    keep_final: bool = False,
    keep_steps: bool = True,
) -> Rollout:
    """Sample len(sample_ids) images in batches of batch_size.

    cond: the policy's conditioning for the epoch's unique prompts; prompt_rows picks each
    sample's row. size: the images' (height, width) in pixels, or one int for square images. Steps in sde_steps are stochastic and recorded; the others are ODE steps.
    With sde_steps empty this is the deterministic ODE sampler used for evaluation.
    on_batch(first_index, images) is called as soon as a batch is decoded, so rewards can be
    scored while the next batch samples. keep_means also records each trained transition's
    mean (GRPO-Guard's ratio needs the sampling policy's). same_initial_noise starts every
    sample of a group from one initial noise, seeded by (seed, epoch, group id); each sample's
    SDE noise stays its own. keep_final records each sample's final (clean) latent, what the
    forward-process objectives train on; keep_steps=False keeps nothing per step (no latents,
    log-probs or means: what those objectives do not need), whatever steps are stochastic.
    """
    sigmas = policy.sigmas(num_steps, size).to(policy.device)
    values = sigmas.tolist()  # the step math takes numbers: read once, not once per step
    sde_set = set(int(i) for i in sde_steps)
    sde_order = {i: k for k, i in enumerate(sorted(sde_set))}  # step -> its slot in the batch's noise
    step_indices = sorted(sde_set) if keep_steps else []
    out_latents, out_next, out_logp, out_means, out_final, out_images = [], [], [], [], [], []
    count = int(sample_ids.shape[0])
    for start in tqdm(range(0, count, batch_size), desc=desc, disable=not progress, leave=False):
        ids = sample_ids[start : start + batch_size]
        rows = prompt_rows[start : start + batch_size]
        batch_cond = cond.take(rows)
        generators = [torch.Generator("cpu").manual_seed(sample_seed(seed, epoch, int(i))) for i in ids]
        if same_initial_noise:
            groups = group_ids[start : start + batch_size]
            shared = [torch.Generator("cpu").manual_seed(sample_seed(seed, epoch, int(g), stream=GROUP_NOISE)) for g in groups]
            x = policy.initial_noise(shared, size, batch_cond)
        else:
            x = policy.initial_noise(generators, size, batch_cond)
        before, after, logps, means = [], [], [], []
        # Every stochastic step's noise in one draw per sample, [B, steps, ...]: each sample's
        # generator gives the same numbers it would give step by step (torch's CPU normal fills
        # blocks of 16 values; every latent here is a multiple of 16), one call instead of one
        # per step and sample.
        noise = draw_noise((len(ids), len(sde_order), *x.shape[1:]), generators, device=x.device) if sde_order else None
        for i in range(num_steps):
            if i in sde_set:
                step = transition(policy, x, values[i], values[i + 1], values[1], batch_cond, guidance_scale, sde, noise=noise[:, sde_order[i]])
                if keep_steps:
                    before.append(x)
                    after.append(step.prev_sample)
                    logps.append(step.log_prob)
                    means.append(step.mean)
                x = step.prev_sample
            else:
                v = policy.velocity(x, _batch_sigma(values[i], x), batch_cond, guidance_scale)
                x = ode_step(v, x, values[i], values[i + 1])
        if keep_final:
            out_final.append(x.float())
        out_images.append(policy.decode(x, batch_cond))
        if on_batch is not None:
            on_batch(start, out_images[-1])
        if step_indices:
            out_latents.append(torch.stack(before, dim=1))
            out_next.append(torch.stack(after, dim=1))
            out_logp.append(torch.stack(logps, dim=1))
            if keep_means:
                out_means.append(torch.stack(means, dim=1))
    empty = torch.empty(count, 0)
    return Rollout(
        sample_ids=sample_ids,
        group_ids=group_ids,
        prompt_rows=prompt_rows,
        latents=torch.cat(out_latents) if out_latents else empty,
        next_latents=torch.cat(out_next) if out_next else empty,
        log_probs=torch.cat(out_logp) if out_logp else empty,
        means=torch.cat(out_means) if out_means else empty,
        final_latents=torch.cat(out_final) if out_final else empty,
        images=torch.cat(out_images),
        step_indices=step_indices,
        sigmas=sigmas,
    )
