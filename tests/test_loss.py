"""rl.loss.grpo_step_loss against hand computations of the Flow-GRPO objective (REFERENCE.md s. 2)."""

from __future__ import annotations

import math

import pytest
import torch

from rl.loss import grpo_step_loss

EPS = 1e-4


def hand_policy_terms(log_prob, old_log_prob, adv, clip_range):
    """Per-sample max(-A r, -A clip(r)) computed one sample at a time in float64."""
    terms = []
    for lp, old, a in zip(log_prob.tolist(), old_log_prob.tolist(), adv.tolist()):
        r = math.exp(lp - old)
        r_clipped = min(max(r, 1 - clip_range), 1 + clip_range)
        terms.append(max(-a * r, -a * r_clipped))
    return terms


def test_clipped_surrogate_matches_hand_computation():
    """Loss is the batch mean of max(-A*ratio, -A*clip(ratio)) for ratios inside and outside the clip."""
    old = torch.tensor([-1.0, -1.0, -1.0, -1.0, -1.0, -1.0, 0.5])
    log_prob = old + torch.tensor([0.0, 3e-4, -3e-4, 3e-4, -3e-4, 5e-5, -2e-5])
    adv = torch.tensor([1.5, 2.0, 2.0, -1.0, -1.0, 0.7, -0.3])
    loss, metrics = grpo_step_loss(log_prob, old, adv, clip_range=EPS)
    terms = hand_policy_terms(log_prob.double(), old.double(), adv.double(), EPS)
    assert loss.item() == pytest.approx(sum(terms) / len(terms), rel=1e-6)
    assert metrics["policy_loss"].item() == pytest.approx(sum(terms) / len(terms), rel=1e-6)
    assert metrics["clipfrac"].item() == pytest.approx(4 / 7)
    lr = (log_prob - old).double()
    assert metrics["approx_kl"].item() == pytest.approx((0.5 * lr**2).mean().item(), rel=1e-4)


def test_on_policy_ratio_one_gives_minus_mean_advantage():
    """With logp == logp_old (first inner step) the loss is -mean(A) and nothing is clipped."""
    adv = torch.tensor([0.3, -1.2, 2.0, 0.0])
    lp = torch.tensor([-0.7, 1.1, 0.2, -3.0])
    loss, metrics = grpo_step_loss(lp, lp.clone(), adv, clip_range=EPS)
    assert loss.item() == pytest.approx(-adv.mean().item(), abs=1e-7)
    assert metrics["ratio_err"].item() == 0.0
    assert metrics["clipfrac"].item() == 0.0
    assert metrics["approx_kl"].item() == 0.0


def _grad(delta, adv):
    lp = torch.tensor([delta], requires_grad=True)
    loss, _ = grpo_step_loss(lp, torch.tensor([0.0]), torch.tensor([adv]), clip_range=EPS)
    loss.backward()
    return loss.item(), lp.grad.item()


def test_positive_advantage_clipping():
    """A > 0: gains beyond ratio 1+eps are clipped (no gradient); a ratio below 1-eps still gets pushed up."""
    loss, grad = _grad(math.log(1 + 5 * EPS), 2.0)
    assert loss == pytest.approx(-2.0 * (1 + EPS), rel=1e-6)
    assert grad == 0.0
    loss, grad = _grad(math.log(1 - 5 * EPS), 2.0)
    assert loss == pytest.approx(-2.0 * (1 - 5 * EPS), rel=1e-6)
    assert grad == pytest.approx(-2.0 * (1 - 5 * EPS), rel=1e-5)  # d(-A r)/d logp = -A r


def test_negative_advantage_clipping():
    """A < 0: pushing the ratio below 1-eps is clipped (no gradient); a ratio above 1+eps is still pushed down."""
    loss, grad = _grad(math.log(1 - 5 * EPS), -1.0)
    assert loss == pytest.approx(1.0 * (1 - EPS), rel=1e-6)
    assert grad == 0.0
    loss, grad = _grad(math.log(1 + 5 * EPS), -1.0)
    assert loss == pytest.approx(1.0 * (1 + 5 * EPS), rel=1e-6)
    assert grad == pytest.approx(1.0 + 5 * EPS, rel=1e-5)


def test_gradient_flows_to_log_prob_only():
    """The policy gradient w.r.t. logp is -A * ratio / B inside the clip range; old log-probs get none."""
    adv = torch.tensor([1.0, -2.0, 0.5])
    old = torch.tensor([-1.0, 0.0, 2.0])
    lp = (old + torch.tensor([2e-5, -3e-5, 0.0])).requires_grad_(True)
    loss, _ = grpo_step_loss(lp, old, adv, clip_range=EPS)
    loss.backward()
    ratio = torch.exp((lp - old).detach().double())
    torch.testing.assert_close(lp.grad.double(), -adv.double() * ratio / 3, rtol=1e-5, atol=1e-8)


def test_kl_term_is_beta_mean_squared_mean_gap_over_two_s_squared():
    """loss = policy + beta * mean_b mean_elements((mean - ref)^2 / (2 s_t^2)), per-sample s_t."""
    g = torch.Generator().manual_seed(0)
    batch, shape = 3, (4, 6, 6)
    mean = torch.randn((batch, *shape), generator=g).requires_grad_(True)
    ref = torch.randn((batch, *shape), generator=g)
    s_t = torch.tensor([0.7, 1.3, 0.2]).view(batch, 1, 1, 1)
    adv = torch.tensor([1.0, -1.0, 0.5])
    lp = torch.zeros(batch)
    beta = 0.04
    loss, metrics = grpo_step_loss(lp, lp, adv, clip_range=EPS, beta=beta, mean=mean, ref_mean=ref, kl_scale=s_t)
    per_sample_kl = []
    for i in range(batch):
        d = (mean[i].detach().double() - ref[i].double()) ** 2 / (2 * float(s_t[i]) ** 2)
        per_sample_kl.append(d.mean().item())
    kl = sum(per_sample_kl) / batch
    assert metrics["kl"].item() == pytest.approx(kl, rel=1e-5)
    assert loss.item() == pytest.approx(-adv.mean().item() + beta * kl, rel=1e-5)
    loss.backward()  # the KL pulls the mean towards the reference
    numel = math.prod(shape)
    expected = beta * (mean.detach() - ref) / s_t**2 / numel / batch
    torch.testing.assert_close(mean.grad, expected, rtol=1e-4, atol=1e-9)


def test_velocity_kl_is_beta_mean_squared_velocity_gap_at_any_noise():
    """train.kl velocity: loss = policy + beta * mean_b mean_elements((v - v_ref)^2), no 1/s_t^2,
    and the velocity is what it pulls toward the reference."""
    g = torch.Generator().manual_seed(1)
    batch, shape = 3, (4, 5, 5)
    v = torch.randn((batch, *shape), generator=g).requires_grad_(True)
    v_ref = torch.randn((batch, *shape), generator=g)
    adv, lp, beta = torch.tensor([0.5, -1.0, 2.0]), torch.zeros(batch), 0.1
    loss, metrics = grpo_step_loss(lp, lp, adv, clip_range=EPS, beta=beta, velocity=v, ref_velocity=v_ref)
    kl = sum(((v[i].detach().double() - v_ref[i].double()) ** 2).mean().item() for i in range(batch)) / batch
    assert metrics["kl"].item() == pytest.approx(kl, rel=1e-5)
    assert loss.item() == pytest.approx(-adv.mean().item() + beta * kl, rel=1e-5)
    loss.backward()
    torch.testing.assert_close(v.grad, beta * 2 * (v.detach() - v_ref) / math.prod(shape) / batch, rtol=1e-4, atol=1e-9)
    with pytest.raises(ValueError, match="ref_velocity"):
        grpo_step_loss(lp, lp, adv, clip_range=EPS, beta=beta, velocity=v)


def test_beta_zero_ignores_kl_inputs_and_beta_positive_requires_them():
    lp = torch.zeros(2)
    adv = torch.tensor([1.0, -1.0])
    loss, metrics = grpo_step_loss(lp, lp, adv, clip_range=EPS, beta=0.0,
                                   mean=torch.ones(2, 3), ref_mean=torch.zeros(2, 3), kl_scale=torch.ones(2, 1))
    assert loss.item() == pytest.approx(0.0, abs=1e-7) and metrics["kl"].item() == 0.0
    with pytest.raises(ValueError):
        grpo_step_loss(lp, lp, adv, clip_range=EPS, beta=0.1)


def test_sample_weights_give_weighted_sum():
    """With sample_weights the loss is sum(w_i * loss_i): weight 0 leaves a sample out entirely."""
    old = torch.tensor([0.0, 0.0, 0.0, 0.0])
    lp = torch.tensor([1e-5, -5e-4, 5e-4, 0.0], requires_grad=True)
    adv = torch.tensor([1.0, 2.0, -3.0, 4.0])
    w = torch.tensor([0.25, 0.5, 0.0, 0.125])
    loss, _ = grpo_step_loss(lp, old, adv, clip_range=EPS, sample_weights=w)
    terms = hand_policy_terms(lp.detach().double(), old.double(), adv.double(), EPS)
    assert loss.item() == pytest.approx(sum(wi * t for wi, t in zip(w.tolist(), terms)), rel=1e-6)
    loss.backward()
    assert lp.grad[2].item() == 0.0  # weight 0: no gradient
    uniform, _ = grpo_step_loss(lp.detach(), old, adv, clip_range=EPS, sample_weights=torch.full((4,), 0.25))
    mean_loss, _ = grpo_step_loss(lp.detach(), old, adv, clip_range=EPS)
    assert uniform.item() == pytest.approx(mean_loss.item(), rel=1e-6)


def test_guard_log_ratio_replaces_the_log_prob_difference_and_policy_scale_multiplies_the_surrogate():
    """GRPO-Guard's path: the given log-ratio is clipped like any other, the surrogate is scaled
    (by 1 / dt in the trainer) and the KL is not. By hand, clip 1e-3: ratio e^0.001 with A = 1 is
    clipped to 1.001 (term -1.001); e^-0.002 with A = -1 is clipped to 0.999 (term 0.999)."""
    adv = torch.tensor([1.0, -1.0])
    log_ratio = torch.tensor([0.001, -0.002])
    mean, ref_mean, scale = torch.zeros(2, 3), torch.full((2, 3), 0.1), torch.full((2, 1), 0.5)
    loss, metrics = grpo_step_loss(None, None, adv, clip_range=1e-3, log_ratio=log_ratio, policy_scale=10.0,
                                   beta=0.5, mean=mean, ref_mean=ref_mean, kl_scale=scale)
    kl = 0.1**2 / (2 * 0.5**2)
    assert metrics["policy_loss"].item() == pytest.approx(10.0 * (-1.001 + 0.999) / 2, abs=1e-6)  # float32
    assert loss.item() == pytest.approx(10.0 * (-1.001 + 0.999) / 2 + 0.5 * kl, abs=1e-6)
    assert metrics["clipfrac"].item() == 1.0
