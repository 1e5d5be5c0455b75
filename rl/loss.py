"""The Flow-GRPO objective for one trained step of a batch. Pure tensor code."""

from __future__ import annotations

import torch


def grpo_step_loss(
    log_prob: torch.Tensor | None,
    old_log_prob: torch.Tensor | None,
    advantages: torch.Tensor,
    *,
    clip_range: float,
    log_ratio: torch.Tensor | None = None,
    policy_scale: float = 1.0,
    beta: float = 0.0,
    mean: torch.Tensor | None = None,
    ref_mean: torch.Tensor | None = None,
    kl_scale: torch.Tensor | float | None = None,
    velocity: torch.Tensor | None = None,
    ref_velocity: torch.Tensor | None = None,
    sample_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate plus beta * KL to the reference policy, averaged over the batch.

    log_prob, old_log_prob, advantages: [B]. mean, ref_mean: [B, ...] transition means under the
    current and the reference policy; kl_scale: a number or [B, 1, ...], the noise scale s_t (see
    rl.sde.kl_scale). The KL between the two Gaussian transitions is
    mean((mean - ref_mean)^2) / (2 s_t^2) per sample (Flow-GRPO's convention). Given velocity
    and ref_velocity ([B, ...], the step's guided velocities) instead, the KL is measured on them:
    mean((velocity - ref_velocity)^2) per sample (Flow-Factory's v-based KL), the same at every
    step whatever its noise.

    sample_weights: [B] optional; the loss is then sum(w_i * loss_i) instead of the batch mean
    (the trainer uses it to leave samples out and to normalise over a global minibatch).

    log_ratio: [B] used instead of log_prob - old_log_prob when given (GRPO-Guard's normalised
    ratio, rl.forward.guard_log_ratio); policy_scale multiplies the clipped surrogate (Guard
    divides each step's by its dt), not the KL.

    Returns the scalar loss and detached per-batch metrics (approx_kl is the usual
    0.5 * (logp - logp_old)^2 estimator; clipfrac the share of ratios outside the clip range).
    """
    advantages = advantages.float()
    log_ratio = (log_prob.float() - old_log_prob.float()) if log_ratio is None else log_ratio.float()
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    per_sample_policy = policy_scale * torch.maximum(unclipped, clipped)
    per_sample_kl = torch.zeros_like(per_sample_policy)
    if beta > 0 and velocity is not None:
        if ref_velocity is None:
            raise ValueError("a velocity KL needs ref_velocity")
        elementwise = (velocity.float() - ref_velocity.float()) ** 2
        per_sample_kl = elementwise.mean(dim=tuple(range(1, elementwise.ndim)))
    elif beta > 0:
        if mean is None or ref_mean is None or kl_scale is None:
            raise ValueError("beta > 0 needs mean, ref_mean and kl_scale (or velocity and ref_velocity)")
        squared = (mean.float() - ref_mean.float()).square().flatten(1).mean(dim=1)
        if isinstance(kl_scale, torch.Tensor):
            kl_scale = kl_scale.float().flatten() if kl_scale.ndim else kl_scale.float()
        per_sample_kl = squared / (2 * kl_scale**2)
    per_sample = per_sample_policy + beta * per_sample_kl
    loss = per_sample.mean() if sample_weights is None else (per_sample * sample_weights.float()).sum()
    policy_loss = per_sample_policy.mean()
    kl = per_sample_kl.mean()
    metrics = {
        "policy_loss": policy_loss.detach(),
        "kl": kl.detach(),
        "approx_kl": (0.5 * log_ratio.detach() ** 2).mean(),
        "clipfrac": ((ratio.detach() - 1.0).abs() > clip_range).float().mean(),
        "ratio_err": (ratio.detach() - 1.0).abs().max(),
    }
    return loss, metrics
