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
    log_prob: torch.Tensor | None  # [B] mean Gaussian log-density of prev_sample per element; None when not asked for
    mean: torch.Tensor  # [B, ...] mean of the transition
    std: torch.Tensor | float  # [B, 1, ...] standard deviation of the transition (broadcastable); a number when the sigmas are
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
    """Deterministic Euler step x' = x + v * dt, in float32; sigmas are numbers or tensors."""
    sample = sample.float()
    if isinstance(sigma, (int, float)) and isinstance(sigma_next, (int, float)):
        return sample + velocity.float() * (sigma_next - sigma)
    dt = _per_sample(sigma_next, sample) - _per_sample(sigma, sample)
    return sample + velocity.float() * dt


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor | float) -> torch.Tensor:
    """Per-sample Gaussian log-density, AVERAGED over non-batch elements; std is one number, a 0-d
    tensor or one value per sample ([B] or [B, 1, ...]).

    Averaging instead of summing is Flow-GRPO's convention; it keeps log-ratios small so the
    published clip range (1e-4) carries over. With one std per sample the average is
    -mean((x - mean)^2) / (2 std^2) - log(std) - log(2 pi) / 2: three passes over the latents.
    """
    squared = (x - mean).square().flatten(1).mean(dim=1)
    if isinstance(std, torch.Tensor):
        std = std.flatten() if std.ndim else std
        return -squared / (2 * std.square()) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return squared * (-0.5 / std**2) - (math.log(std) + 0.5 * math.log(2 * math.pi))


def _step_coefficients(s, s_next, sigma_max, noise_level: float, dynamics: str):
    """(a, b, std) of one reverse step, whose mean is a * x + b * v. The same formulas serve
    Python numbers (the sampler and trainer pass the schedule's values: no tensor op) and
    per-sample tensors ([B, 1, ...], or 0-d)."""
    tensors = isinstance(s, torch.Tensor)
    sqrt = torch.sqrt if tensors else math.sqrt
    dt = s_next - s
    if dynamics == "cps":
        # Coefficients-preserving sampling (Flow-GRPO-Fast): re-noise the predicted x0 with a
        # mix of predicted noise and fresh noise whose coefficients square-sum to sigma_next^2:
        # mean = (x - s v)(1 - s_next) + (x + (1 - s) v) c, c = sqrt(s_next^2 - std^2).
        std = s_next * math.sin(noise_level * math.pi / 2)
        c = torch.clamp(s_next**2 - std**2, min=0.0).sqrt() if tensors else math.sqrt(max(s_next**2 - std**2, 0.0))
        return (1 - s_next) + c, -s * (1 - s_next) + (1 - s) * c, std
    if dynamics == "flow_sde":
        # sigma_max replaces sigma where sigma == 1 (there sigma / (1 - sigma) is infinite).
        s_tilde = torch.where(s >= 1.0, sigma_max, s) if tensors else (sigma_max if s >= 1.0 else s)
        noise_scale = noise_level * sqrt(s / (1 - s_tilde))
    else:
        # DanceGRPO: Flow-SDE drift with a constant noise scale eta = noise_level.
        noise_scale = torch.full_like(s, noise_level) if tensors else noise_level
    variance = noise_scale**2
    return 1 + variance * dt / (2 * s), (1 + variance * (1 - s) / (2 * s)) * dt, noise_scale * sqrt(-dt)


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
    with_log_prob: bool = True,
) -> SDEStep:
    """One stochastic reverse step and the log-probability of its outcome.

    sigma, sigma_next, sigma_max: Python numbers (one value for the batch: the cheap path the
    sampler and the trainer take), or scalar or [B] tensors. sigma_max replaces sigma inside the
    noise scale where sigma == 1 (there sigma / (1 - sigma) is infinite); pass the schedule's
    sigma_1. prev_sample: when given, no noise is drawn and the log-prob of this sample is
    returned (this is how the trainer recomputes log-probs). Otherwise noise is drawn from
    `generator` (one generator, or one per sample so draws do not depend on the batch they are
    in), or taken from `noise`. The step's std is a number when the sigmas are. with_log_prob=False
    leaves the log-prob out (None).

    All math runs in float32 whatever the model dtype (coefficients of numbers in float64): the
    log-ratio exp(logp_new - logp_old) must be exactly 1 on-policy, and bf16 rounding of latents
    would break that.
    """
    if dynamics not in DYNAMICS:
        raise ValueError(f"unknown SDE dynamics {dynamics!r}; choose one of {DYNAMICS}")
    x = sample.float()
    v = velocity.float()
    numbers = all(isinstance(value, (int, float)) for value in (sigma, sigma_next, sigma_next if sigma_max is None else sigma_max))
    if numbers:
        s, s_next = float(sigma), float(sigma_next)
        s_max = s_next if sigma_max is None else float(sigma_max)
    else:
        s, s_next = _per_sample(sigma, x), _per_sample(sigma_next, x)
        # A reasonable stand-in for a missing sigma_max; callers should pass the schedule's sigma_1.
        s_max = s_next if sigma_max is None else _per_sample(sigma_max, x)
    a, b, std = _step_coefficients(s, s_next, s_max, noise_level, dynamics)
    mean = x * a + v * b

    if prev_sample is None:
        if noise is None:
            noise = draw_noise(x.shape, generator, device=x.device)
        prev_sample = mean + std * noise.float()
    else:
        prev_sample = prev_sample.float()
    log_prob = gaussian_log_prob(prev_sample, mean, std) if with_log_prob else None
    return SDEStep(prev_sample, log_prob, mean, std)


def kl_scale(std: torch.Tensor | float, sigma, sigma_next) -> torch.Tensor | float:
    """The scale the KL penalty divides by: std / sqrt(-dt), which is Flow-GRPO's s_t for Flow-SDE.

    Flow-GRPO's KL is mean((mean_theta - mean_ref)^2) / (2 s_t^2); for the other dynamics this
    is the same expression with their own noise scale. A number when std and the sigmas are.
    """
    if not isinstance(std, torch.Tensor):
        return std / math.sqrt(float(sigma) - float(sigma_next))
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
