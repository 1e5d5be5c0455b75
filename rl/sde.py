"""Sampling math for flow-matching models: sigma schedules, the ODE step, the stochastic steps
whose log-probabilities GRPO trains on, and the choice of which steps are stochastic.

Pure tensor code: no model, no config object, no distributed calls.

Conventions (Flow-GRPO, Liu et al. 2025): x_sigma = (1 - sigma) * x0 + sigma * noise, the model
predicts v = noise - x0, and one reverse step goes from sigma to sigma_next < sigma with
dt = sigma_next - sigma < 0.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch

from models.base import draw_noise

DYNAMICS = ("flow_sde", "dance_sde", "cps")


class SDEStep(NamedTuple):
    prev_sample: torch.Tensor  # [B, ...] the next (less noisy) sample, float32
    log_prob: torch.Tensor  # [B] mean Gaussian log-density of prev_sample per element
    mean: torch.Tensor  # [B, ...] mean of the transition
    std: torch.Tensor  # [B, 1, ...] standard deviation of the transition (broadcastable)
    velocity: torch.Tensor | None = None  # [B, ...] the (guided) velocity the step took, where the caller keeps it


def sigma_schedule(num_steps: int, shift: float = 1.0) -> torch.Tensor:
    """Return num_steps + 1 sigmas from 1 down to 0 (float64 -> float32), time-shifted.

    The shift s maps a uniform grid u to s * u / (1 + (s - 1) * u), spending more steps at high
    noise (3 is a common choice for text-to-image models).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    grid = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    shifted = shift * grid / (1.0 + (shift - 1.0) * grid)
    return shifted.to(torch.float32)


def _per_sample(value: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a scalar or [B] tensor to [B, 1, 1, ...] matching `like`, in float32."""
    value = torch.as_tensor(value, dtype=torch.float32, device=like.device)
    if value.ndim == 0:
        value = value.expand(like.shape[0])
    if value.shape != (like.shape[0],):
        raise ValueError(f"expected a scalar or a [{like.shape[0]}] tensor, got shape {tuple(value.shape)}")
    return value.view(-1, *([1] * (like.ndim - 1)))


def ode_step(velocity: torch.Tensor, sample: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
    """Deterministic Euler step x' = x + v * dt, in float32."""
    sample = sample.float()
    dt = _per_sample(sigma_next, sample) - _per_sample(sigma, sample)
    return sample + velocity.float() * dt


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Per-sample Gaussian log-density, AVERAGED over non-batch elements.

    Averaging instead of summing is Flow-GRPO's convention; it keeps log-ratios small so the
    published clip range (1e-4) carries over.
    """
    log_density = (
        -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    )
    return log_density.mean(dim=tuple(range(1, x.ndim)))


def flow_sde_step(
    velocity: torch.Tensor,
    sample: torch.Tensor,
    sigma,
    sigma_next,
    *,
    noise_level: float,
    sigma_max: float | torch.Tensor | None = None,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    noise: torch.Tensor | None = None,
    dynamics: str = "flow_sde",
) -> SDEStep:
    """One stochastic reverse step and the log-probability of its outcome.

    sigma, sigma_next: scalars or [B] tensors. sigma_max replaces sigma inside the noise scale
    where sigma == 1 (there sigma / (1 - sigma) is infinite); pass the schedule's sigma_1.
    prev_sample: when given, no noise is drawn and the log-prob of this sample is returned (this
    is how the trainer recomputes log-probs). Otherwise noise is drawn from `generator` (one
    generator, or one per sample so draws do not depend on the batch they are in), or taken from
    `noise`.

    All math runs in float32 whatever the model dtype: the log-ratio exp(logp_new - logp_old)
    must be exactly 1 on-policy, and bf16 rounding of latents would break that.
    """
    if dynamics not in DYNAMICS:
        raise ValueError(f"unknown SDE dynamics {dynamics!r}; choose one of {DYNAMICS}")
    x = sample.float()
    v = velocity.float()
    s = _per_sample(sigma, x)
    s_next = _per_sample(sigma_next, x)
    dt = s_next - s

    if dynamics == "flow_sde":
        if sigma_max is None:
            sigma_max = s_next  # a reasonable stand-in; callers should pass the schedule's sigma_1
        s_tilde = torch.where(s >= 1.0, _per_sample(sigma_max, x), s)
        noise_scale = noise_level * torch.sqrt(s / (1 - s_tilde))
        mean = x * (1 + noise_scale**2 * dt / (2 * s)) + v * (1 + noise_scale**2 * (1 - s) / (2 * s)) * dt
        std = noise_scale * torch.sqrt(-dt)
    elif dynamics == "dance_sde":
        # DanceGRPO: Flow-SDE drift with a constant noise scale eta = noise_level.
        noise_scale = torch.full_like(s, noise_level)
        mean = x * (1 + noise_scale**2 * dt / (2 * s)) + v * (1 + noise_scale**2 * (1 - s) / (2 * s)) * dt
        std = noise_scale * torch.sqrt(-dt)
    else:
        # Coefficients-preserving sampling (Flow-GRPO-Fast): re-noise the predicted x0 with a
        # mix of predicted noise and fresh noise whose coefficients square-sum to sigma_next^2.
        std = s_next * math.sin(noise_level * math.pi / 2)
        x0_hat = x - s * v
        x1_hat = x + (1 - s) * v
        mean = x0_hat * (1 - s_next) + x1_hat * torch.sqrt(torch.clamp(s_next**2 - std**2, min=0.0))

    if prev_sample is None:
        if noise is None:
            noise = draw_noise(x.shape, generator, device=x.device)
        prev_sample = mean + std * noise.float()
    else:
        prev_sample = prev_sample.float()
    log_prob = gaussian_log_prob(prev_sample, mean, std)
    return SDEStep(prev_sample, log_prob, mean, std)


def kl_scale(std: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
    """The scale the KL penalty divides by: std / sqrt(-dt), which is Flow-GRPO's s_t for Flow-SDE.

    Flow-GRPO's KL is mean((mean_theta - mean_ref)^2) / (2 s_t^2); for the other dynamics this
    is the same expression with their own noise scale.
    """
    dt = _per_sample(sigma_next, std) - _per_sample(sigma, std)
    return std / torch.sqrt(-dt)


def sde_step_indices(
    num_steps: int,
    window: str,
    *,
    steps: Sequence[int] = (),
    window_size: int = 2,
    window_range: Sequence[int] = (0, 0),
    generator: torch.Generator | None = None,
) -> list[int]:
    """Which of the num_steps sampling steps are stochastic (and trained); the others are ODE steps.

    window = "none": no stochastic step, the ODE sampler (rollouts of the forward-process
        objectives, which train on the final samples only).
    window = "all": every step but the last, which lands on sigma = 0 and so adds no noise to
        the final image (9 of 10 with Flow-GRPO's 10 steps).
    window = "fixed": exactly `steps`.
    window = "random": `window_size` consecutive steps whose first index is drawn uniformly from
        the inclusive range `window_range` (Flow-GRPO-Fast / MixGRPO); draw once per epoch from a
        generator seeded by the epoch so every rank draws the same window.
    """
    if window == "none":
        return []
    if window == "all":
        indices = list(range(max(num_steps - 1, 1)))
    elif window == "fixed":
        indices = sorted(set(int(i) for i in steps))
    elif window == "random":
        low, high = int(window_range[0]), int(window_range[1])
        if high < low:
            raise ValueError(f"window_range must be [low, high] with low <= high, got {list(window_range)}")
        start = low + int(torch.randint(0, high - low + 1, (1,), generator=generator))
        indices = list(range(start, start + window_size))
    else:
        raise ValueError(f"unknown SDE window {window!r}; choose all, fixed, random or none")
    if not indices:
        raise ValueError("the SDE window selects no step; at least one step must be stochastic")
    bad = [i for i in indices if not 0 <= i < num_steps]
    if bad:
        raise ValueError(f"SDE step indices {bad} are outside the {num_steps} sampling steps")
    return indices
