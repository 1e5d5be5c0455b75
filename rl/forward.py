"""Forward-process objectives: DiffusionNFT and Advantage Weighted Matching, and GRPO-Guard's
normalised log-ratio. Pure tensor code: tensors in, a scalar loss and detached metrics out.

Notation (rectified flow): x0 the clean latent a rollout produced, eps ~ N(0, I), t = sigma in
[0, 1], x_t = (1 - t) x0 + t eps, so the velocity that carries x_t back to x0 is v* = eps - x0 and
x0 = x_t - t v*. `mean_d` is the mean over every non-batch dimension. The formulas follow the
official code as summarised in ../shared/REFERENCE.md section 8; these are our own words.
"""

from __future__ import annotations

from typing import Literal

import torch

OptimalityMode = Literal["linear", "positive_only", "binary"]
AWMWeighting = Literal["ghuber", "mse", "t_mse", "t2_mse"]


def mean_d(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the first: [B, ...] -> [B]."""
    return x.mean(dim=tuple(range(1, x.ndim))) if x.ndim > 1 else x


def _per_sample(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """t as [B, 1, ..., 1] to broadcast against a [B, ...] tensor."""
    return t.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def noised(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t eps, t per sample."""
    tt = _per_sample(t, x0)
    return (1 - tt) * x0 + tt * eps


def nft_optimality(advantages: torch.Tensor, mode: OptimalityMode = "linear", adv_clip: float = 5.0) -> torch.Tensor:
    """DiffusionNFT's reward as an optimality probability r in [0, 1]: 0.5 + A / (2 * adv_clip)
    with A clipped to +-adv_clip (r = 0.5 at the group mean, 1 at +adv_clip). `positive_only`
    keeps A in [0, adv_clip] (below-average samples count as neutral); `binary` uses only the
    sign of A (r in {0.4, 0.5, 0.6} for the default clip of 5, as sign(A) / 10 around 0.5)."""
    a = advantages.float()
    if mode == "positive_only":
        a = a.clamp(0.0, adv_clip)
    elif mode == "binary":
        a = torch.sign(a)
    elif mode != "linear":
        raise ValueError(f"unknown optimality mode {mode!r}")
    a = a.clamp(-adv_clip, adv_clip)
    return (0.5 + a / (2 * adv_clip)).clamp(0.0, 1.0)


def _adaptive_x0_error(diff: torch.Tensor) -> torch.Tensor:
    """mean_d diff^2 of an x0 error diff = x0_hat - x0, divided by its own (detached) mean
    absolute error: the adaptive weight makes every sample and time count about equally
    (accumulated in float64, floored 1e-5)."""
    flat = diff.flatten(1)
    weight = flat.detach().abs().sum(dim=1, dtype=torch.float64).div_(flat.shape[1]).clamp_min(1e-5)
    return flat.square().mean(dim=1) / weight.to(diff.dtype)


def nft_loss(
    v_theta: torch.Tensor,
    v_old: torch.Tensor,
    x_t: torch.Tensor,
    x0: torch.Tensor,
    t: torch.Tensor,
    optimality: torch.Tensor,
    *,
    beta: float = 1.0,
    kl: float = 0.0,
    v_ref: torch.Tensor | None = None,
    sample_weights: torch.Tensor | None = None,
    scale: float = 5.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DiffusionNFT on one batch of forward-process samples.

    The trained velocity v_theta and the sampling (old) policy's v_old define an implicit positive
    policy v+ = beta v_theta + (1 - beta) v_old and an implicit negative one v- = (1 + beta) v_old -
    beta v_theta, mirrored about v_old. Each predicts a clean latent x0_hat = x_t - t v; the loss
    pulls the positive prediction toward the sample in proportion to its optimality r and the
    negative one in proportion to 1 - r:

        per sample: (r L(v+) + (1 - r) L(v-)) / beta,   L = adaptive x0 error (above)
        loss = scale * batch mean + kl * batch mean of mean_d (v_theta - v_ref)^2

    v_theta: [B, ...] with grad; v_old, v_ref: [B, ...] no grad; x_t, x0: [B, ...]; t,
    optimality: [B]. sample_weights [B]: sum(w_i * per-sample loss) instead of the batch mean.
    """
    if beta <= 0:
        raise ValueError("nft_loss needs beta > 0")
    v_old = v_old.detach().float()
    v_theta = v_theta.float()
    tt = _per_sample(t, v_theta)
    # x0_hat(v) - x0 = x_t - t v - x0, so with the old policy's error d = x_t - t v_old - x0 and
    # the step's change delta = t (v_theta - v_old): v+ errs by d - beta delta, v- by d + beta delta.
    d = (x_t.float() - x0.float()).sub_(tt * v_old)
    gap = v_theta - v_old
    delta = tt * gap
    loss_pos = _adaptive_x0_error(torch.add(d, delta, alpha=-beta))
    loss_neg = _adaptive_x0_error(torch.add(d, delta, alpha=beta))
    r = optimality.float()
    per_sample_policy = scale * (r * loss_pos + (1 - r) * loss_neg) / beta
    per_sample_kl = torch.zeros_like(per_sample_policy)
    if kl > 0:
        if v_ref is None:
            raise ValueError("kl > 0 needs v_ref")
        per_sample_kl = mean_d((v_theta - v_ref.detach().float()) ** 2)
    per_sample = per_sample_policy + kl * per_sample_kl
    loss = per_sample.mean() if sample_weights is None else (per_sample * sample_weights.float()).sum()
    metrics = {
        "policy_loss": per_sample_policy.mean().detach(),
        "kl": per_sample_kl.mean().detach(),
        "nft_loss_pos": loss_pos.mean().detach(),
        "nft_loss_neg": loss_neg.mean().detach(),
        "optimality": r.mean().detach(),
        "v_old_gap": mean_d(gap.detach().square()).mean(),
    }
    return loss, metrics


def awm_log_likelihood(mse: torch.Tensor, t: torch.Tensor, weighting: AWMWeighting = "ghuber", power: float = 0.25) -> torch.Tensor:
    """AWM's surrogate log-likelihood of a sample at time t from its velocity error mse [B]:
    ghuber: -t ((mse + 1e-10)^p - 1e-10^p) / p (robust, grows like mse^p); mse: -mse;
    t_mse: -t mse; t2_mse: -t^2 mse. Computed in float64."""
    mse, t = mse.double(), t.double()
    if weighting == "ghuber":
        return -t * ((mse + 1e-10) ** power - 1e-10**power) / power
    if weighting == "mse":
        return -mse
    if weighting == "t_mse":
        return -t * mse
    if weighting == "t2_mse":
        return -(t**2) * mse
    raise ValueError(f"unknown AWM weighting {weighting!r}")


def awm_loss(
    v_theta: torch.Tensor,
    target: torch.Tensor,
    t: torch.Tensor,
    advantages: torch.Tensor,
    *,
    old_log_likelihood: torch.Tensor | None = None,
    clip_range: float = 1.0,
    weighting: AWMWeighting = "ghuber",
    power: float = 0.25,
    beta_ref: float = 0.0,
    v_ref: torch.Tensor | None = None,
    beta_ema: float = 0.0,
    v_ema: torch.Tensor | None = None,
    sample_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Advantage Weighted Matching on one batch of forward-process samples.

    log p_hat = awm_log_likelihood(mean_d (v_theta - target)^2, t), target = eps - x0; the ratio
    rho = exp(log p_hat - old log p_hat) (rho = 1 when `old_log_likelihood` is None: the first,
    on-policy pass, where the gradient is -A grad log p_hat) enters a clipped surrogate
    max(-A rho, -A clip(rho, 1 - c, 1 + c)), so samples better than their group pull the
    velocity toward their own flow-matching target and worse ones push it away. Regularisers:
    beta_ref mean_d (v_theta - v_ref)^2 and beta_ema mean_d (v_theta - v_ema)^2.
    """
    v_theta = v_theta.float()
    mse = mean_d((v_theta.double() - target.detach().double()) ** 2)
    log_p = awm_log_likelihood(mse, t, weighting, power)
    old = log_p.detach() if old_log_likelihood is None else old_log_likelihood.detach().double()
    ratio = torch.exp(log_p - old)
    a = advantages.double()
    per_sample_policy = torch.maximum(-a * ratio, -a * ratio.clamp(1 - clip_range, 1 + clip_range)).float()
    per_sample_reg = torch.zeros_like(per_sample_policy)
    for weight, other, name in ((beta_ref, v_ref, "v_ref"), (beta_ema, v_ema, "v_ema")):
        if weight > 0:
            if other is None:
                raise ValueError(f"a regulariser weight > 0 needs {name}")
            per_sample_reg = per_sample_reg + weight * mean_d((v_theta - other.detach().float()) ** 2)
    per_sample = per_sample_policy + per_sample_reg
    loss = per_sample.mean() if sample_weights is None else (per_sample * sample_weights.float()).sum()
    metrics = {
        "policy_loss": per_sample_policy.mean().detach(),
        "kl": per_sample_reg.mean().detach(),
        "awm_mse": mse.mean().detach().float(),
        "clipfrac": ((ratio.detach() - 1).abs() > clip_range).float().mean(),
        "ratio_err": (ratio.detach() - 1).abs().max().float(),
    }
    return loss, metrics


def awm_advantages(advantages: torch.Tensor, adv_clip: float = 5.0) -> torch.Tensor:
    """AWM's advantage scale: group-normalised advantages clipped to +-adv_clip, then / adv_clip."""
    return advantages.float().clamp(-adv_clip, adv_clip) / adv_clip


def guard_log_ratio(mean_theta: torch.Tensor, mean_old: torch.Tensor, next_latent: torch.Tensor, std: torch.Tensor | float) -> torch.Tensor:
    """GRPO-Guard's normalised log-ratio of one Flow-SDE step, per sample.

    With x_next = mean_old + s eps, the exact Gaussian log-ratio is
    eps (mean_theta - mean_old) / s - (mean_theta - mean_old)^2 / (2 s^2) per element; its size
    grows as 1/s, so steps with little noise dominate the clipped surrogate. Guard keeps only the
    first-order term times s: mean_d[eps * (mean_theta - mean_old)], the same for every step's
    noise level. std: the step's s, a number, [B] or broadcastable to the latents."""
    if isinstance(std, torch.Tensor):
        std = (std if std.ndim == mean_theta.ndim else _per_sample(std, mean_theta)).float()
    eps = (next_latent.float() - mean_old.float()) / std
    return mean_d(eps * (mean_theta.float() - mean_old.float()))


def nft_train_steps(num_steps: int) -> int:
    """Timesteps each sample trains on per epoch: the first 99 % of a random permutation of the
    rollout's num_steps timesteps (9 of 10), at least one."""
    return max(1, int(num_steps * 0.99))


def lagged_decay(optimizer_steps: int, cap: float) -> float:
    """The decay d of a lagged copy of the trained weights, moved after each epoch as
    lagged <- d lagged + (1 - d) theta with d = min(0.001 * optimizer steps so far, cap): it tracks
    the trained weights closely early on and lags by at most `cap` later."""
    return min(0.001 * optimizer_steps, cap)


def nft_old_decay(optimizer_steps: int) -> float:
    """DiffusionNFT's old (sampling) policy: the lagged copy with cap 0.5."""
    return lagged_decay(optimizer_steps, 0.5)


def awm_timesteps(num_steps: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """AWM's timesteps of one sample: the rollout's num_steps step indices split into `count`
    (at most num_steps) contiguous strata of near-equal size, one index drawn uniformly from each."""
    count = min(count, num_steps)
    edges = torch.linspace(0, num_steps, count + 1).round().long()
    low, high = edges[:-1], edges[1:]
    return low + (torch.rand(count, generator=generator) * (high - low)).long().clamp_max(high - low - 1)
