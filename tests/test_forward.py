"""The forward-process objectives (rl/forward.py) against independent float64 numpy computations,
hand-worked values, and the limiting cases the papers state."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rl.forward import awm_advantages, awm_log_likelihood, awm_loss, guard_log_ratio, noised, nft_loss, nft_optimality

B, SHAPE = 6, (4, 3, 5)


def draw(seed: int):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(B, *SHAPE, generator=g)
    eps = torch.randn(B, *SHAPE, generator=g)
    t = torch.rand(B, generator=g) * 0.9 + 0.05
    v_old = eps - x0 + 0.3 * torch.randn(B, *SHAPE, generator=g)
    v_theta = v_old + 0.1 * torch.randn(B, *SHAPE, generator=g)
    v_ref = v_old + 0.2 * torch.randn(B, *SHAPE, generator=g)
    return x0, eps, t, v_old, v_theta, v_ref


def np_nft(v_theta, v_old, x_t, x0, t, r, beta, kl, v_ref, scale=5.0):
    """DiffusionNFT written out in numpy, per sample, from the formulas."""
    total = []
    for i in range(len(t)):
        vp = beta * v_theta[i] + (1 - beta) * v_old[i]
        vn = (1 + beta) * v_old[i] - beta * v_theta[i]
        terms = []
        for v in (vp, vn):
            err = (x_t[i] - t[i] * v) - x0[i]
            terms.append(np.mean(err**2) / max(np.mean(np.abs(err)), 1e-5))
        policy = scale * (r[i] * terms[0] + (1 - r[i]) * terms[1]) / beta
        total.append(policy + kl * np.mean((v_theta[i] - v_ref[i]) ** 2))
    return float(np.mean(total))


@pytest.mark.parametrize("beta, kl", [(1.0, 0.0), (0.1, 1e-4), (0.5, 0.3)])
def test_nft_loss_matches_the_formula_in_numpy(beta, kl):
    x0, eps, t, v_old, v_theta, v_ref = draw(0)
    x_t = noised(x0, eps, t)
    r = torch.tensor([0.0, 0.2, 0.5, 0.5, 0.9, 1.0])
    loss, metrics = nft_loss(v_theta, v_old, x_t, x0, t, r, beta=beta, kl=kl, v_ref=v_ref)
    as_np = [a.double().numpy() for a in (v_theta, v_old, x_t, x0, t, r, v_ref)]
    expected = np_nft(*as_np[:6], beta, kl, as_np[6])
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert metrics["optimality"].item() == pytest.approx(float(r.mean()))


def test_noised_is_the_rectified_flow_interpolation():
    x0, eps, t, *_ = draw(1)
    x_t = noised(x0, eps, t)
    i = 2
    np.testing.assert_allclose(x_t[i].numpy(), ((1 - t[i]) * x0[i] + t[i] * eps[i]).numpy(), rtol=1e-6)
    # x0 = x_t - t (eps - x0): the target velocity takes x_t back to the sample.
    np.testing.assert_allclose((x_t - t.view(-1, 1, 1, 1) * (eps - x0)).numpy(), x0.numpy(), atol=1e-5)


def test_nft_with_zero_advantage_gives_no_gradient_at_the_old_policy():
    """r = 0.5 everywhere and v_theta = v_old: the positive and negative policies coincide and pull
    equally in opposite directions."""
    x0, eps, t, v_old, _, _ = draw(2)
    v_theta = v_old.clone().requires_grad_(True)
    loss, _ = nft_loss(v_theta, v_old, noised(x0, eps, t), x0, t, torch.full((B,), 0.5), beta=0.7)
    loss.backward()
    assert v_theta.grad.abs().max().item() < 1e-6


def test_nft_fully_optimal_samples_with_beta_one_regress_the_velocity_onto_the_sample():
    """r = 1 and beta = 1: only the positive policy, which is v_theta itself, so the gradient points
    v_theta toward eps - x0 (the loss falls along that direction) whatever v_old is."""
    x0, eps, t, v_old, v_theta, _ = draw(3)
    v = v_theta.clone().requires_grad_(True)
    loss, _ = nft_loss(v, v_old, noised(x0, eps, t), x0, t, torch.ones(B), beta=1.0)
    loss.backward()
    toward_target = (eps - x0) - v_theta
    assert (v.grad * toward_target).sum().item() < 0  # descending moves v toward the target
    ignoring_old, _ = nft_loss(v_theta, torch.randn_like(v_old), noised(x0, eps, t), x0, t, torch.ones(B), beta=1.0)
    assert ignoring_old.item() == pytest.approx(loss.item(), rel=1e-6)


def test_nft_optimality_by_hand():
    a = torch.tensor([-10.0, -5.0, -1.0, 0.0, 1.0, 5.0, 10.0])
    assert nft_optimality(a).tolist() == pytest.approx([0.0, 0.0, 0.4, 0.5, 0.6, 1.0, 1.0])
    assert nft_optimality(a, "positive_only").tolist() == pytest.approx([0.5, 0.5, 0.5, 0.5, 0.6, 1.0, 1.0])
    assert nft_optimality(a, "binary").tolist() == pytest.approx([0.4, 0.4, 0.4, 0.5, 0.6, 0.6, 0.6])
    with pytest.raises(ValueError):
        nft_optimality(a, "cubic")


def test_awm_log_likelihood_by_hand():
    mse, t = torch.tensor([1.0, 0.0, 4.0]), torch.tensor([0.5, 0.5, 0.25])
    ghuber = awm_log_likelihood(mse, t).tolist()
    assert ghuber[0] == pytest.approx(-0.5 * (1 - 10**-2.5) / 0.25, rel=1e-9)
    assert ghuber[1] == pytest.approx(0.0, abs=1e-12)
    assert ghuber[2] == pytest.approx(-0.25 * (math.sqrt(2) - 10**-2.5) / 0.25, rel=1e-6)
    assert awm_log_likelihood(mse, t, "mse").tolist() == [-1.0, -0.0, -4.0]
    assert awm_log_likelihood(mse, t, "t_mse").tolist() == [-0.5, -0.0, -1.0]
    assert awm_log_likelihood(mse, t, "t2_mse").tolist() == [-0.25, -0.0, -0.25]


def np_awm(v, target, t, a, old, clip, beta_ref, v_ref, p=0.25, beta_ema=0.0, v_ema=None):
    out = []
    for i in range(len(t)):
        mse = np.mean((v[i] - target[i]) ** 2)
        logp = -t[i] * ((mse + 1e-10) ** p - 1e-10**p) / p
        rho = math.exp(logp - old[i])
        policy = max(-a[i] * rho, -a[i] * min(max(rho, 1 - clip), 1 + clip))
        ema = beta_ema * np.mean((v[i] - v_ema[i]) ** 2) if beta_ema else 0.0
        out.append(policy + beta_ref * np.mean((v[i] - v_ref[i]) ** 2) + ema)
    return float(np.mean(out))


def test_awm_loss_matches_the_formula_in_numpy():
    x0, eps, t, _, v_theta, v_ref = draw(4)
    target = eps - x0
    a = torch.tensor([-1.0, -0.4, 0.0, 0.2, 0.6, 1.0])
    old = awm_log_likelihood(((v_theta - target) ** 2).mean(dim=(1, 2, 3)), t) + torch.tensor([0.0, 0.5, -0.5, 2.0, -2.0, 0.1], dtype=torch.float64)
    loss, metrics = awm_loss(v_theta, target, t, a, old_log_likelihood=old, clip_range=0.2, beta_ref=1e-3, v_ref=v_ref)
    expected = np_awm(*(x.double().numpy() for x in (v_theta, target, t, a, old)), 0.2, 1e-3, v_ref.double().numpy())
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert metrics["clipfrac"].item() == pytest.approx(4 / 6)  # rho = e^-0.5, e^0.5, e^-2, e^2 lie outside [0.8, 1.2]
    # With the EMA regulariser at AWM's published weight 1.
    v_ema = v_ref + 0.3 * torch.randn(v_ref.shape, generator=torch.Generator().manual_seed(9))
    loss, _ = awm_loss(v_theta, target, t, a, old_log_likelihood=old, clip_range=0.2, beta_ref=1e-3, v_ref=v_ref, beta_ema=1.0, v_ema=v_ema)
    expected = np_awm(*(x.double().numpy() for x in (v_theta, target, t, a, old)), 0.2, 1e-3, v_ref.double().numpy(),
                      beta_ema=1.0, v_ema=v_ema.double().numpy())
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="v_ema"):
        awm_loss(v_theta, target, t, a, beta_ema=1.0)


def test_awm_with_equal_advantages_is_plain_flow_matching_onto_the_samples():
    """All advantages equal to c (rho = 1, mse weighting): the gradient is c times that of the
    flow-matching regression mean (v - (eps - x0))^2 on the rollout's own samples."""
    x0, eps, t, _, v_theta, _ = draw(5)
    target = eps - x0
    v = v_theta.clone().requires_grad_(True)
    loss, _ = awm_loss(v, target, t, torch.full((B,), 0.7), weighting="mse")
    loss.backward()
    w = v_theta.clone().requires_grad_(True)
    (0.7 * ((w - target) ** 2).mean(dim=(1, 2, 3)).mean()).backward()
    np.testing.assert_allclose(v.grad.numpy(), w.grad.numpy(), rtol=1e-5, atol=1e-9)
    zero = v_theta.clone().requires_grad_(True)
    loss, _ = awm_loss(zero, target, t, torch.zeros(B))
    loss.backward()
    assert zero.grad.abs().max().item() == 0.0


def test_awm_clipped_ratio_stops_the_gradient_of_a_sample():
    x0, eps, t, _, v_theta, _ = draw(6)
    target = eps - x0
    logp = awm_log_likelihood(((v_theta - target) ** 2).mean(dim=(1, 2, 3)), t)
    v = v_theta.clone().requires_grad_(True)
    # Sample 0: rho = e^1 > 1 + 0.2 with A > 0 -> clipped, no gradient; sample 1: rho = 1 -> gradient.
    old = logp - torch.tensor([1.0, 0, 0, 0, 0, 0], dtype=torch.float64)
    loss, _ = awm_loss(v, target, t, torch.tensor([1.0, 1.0, 0, 0, 0, 0]), old_log_likelihood=old, clip_range=0.2)
    loss.backward()
    assert v.grad[0].abs().max().item() == 0.0 and v.grad[1].abs().max().item() > 0.0


def test_awm_advantages_clip_then_scale():
    assert awm_advantages(torch.tensor([-8.0, -2.5, 0.0, 5.0, 7.0])).tolist() == pytest.approx([-1.0, -0.5, 0.0, 1.0, 1.0])


def test_guard_log_ratio_by_hand_and_against_the_gaussian_log_ratio():
    mean_old = torch.zeros(2, 2)
    mean_theta = torch.tensor([[0.1, -0.2], [0.1, -0.2]])
    next_latent = torch.tensor([[0.5, 0.25], [0.5, -0.5]])
    std = torch.tensor([0.5, 0.5])
    # eps = [1, 0.5] and [1, -1]; eps * (mean_theta - mean_old) = [0.1, -0.1] and [0.1, 0.2].
    assert guard_log_ratio(mean_theta, mean_old, next_latent, std).tolist() == pytest.approx([0.0, 0.15])
    # In general it is s times the first-order part of the exact Gaussian log-ratio.
    g = torch.Generator().manual_seed(7)
    mu_old, mu = torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g)
    s = torch.tensor([0.05, 0.3, 1.2])
    x = mu_old + s[:, None] * torch.randn(3, 8, generator=g)
    exact = (torch.distributions.Normal(mu.double(), s[:, None].double()).log_prob(x.double())
             - torch.distributions.Normal(mu_old.double(), s[:, None].double()).log_prob(x.double()))
    first_order = exact + (mu - mu_old).double() ** 2 / (2 * s[:, None].double() ** 2)
    np.testing.assert_allclose(guard_log_ratio(mu, mu_old, x, s).numpy(), (s[:, None] * first_order).mean(dim=1).numpy(), rtol=1e-5)


def test_awm_timesteps_draw_one_index_from_each_stratum():
    from rl.forward import awm_timesteps

    g = torch.Generator().manual_seed(0)
    strata = [(0, 2), (2, 3), (3, 5), (5, 7), (7, 8), (8, 10)]  # 10 steps in 6 near-equal strata
    seen = set()
    for _ in range(200):
        drawn = awm_timesteps(10, 6, g).tolist()
        assert all(low <= i < high for i, (low, high) in zip(drawn, strata)), drawn
        seen.update(drawn)
    assert seen == set(range(10))
    assert sorted(awm_timesteps(4, 6, g).tolist()) == [0, 1, 2, 3]  # never more than the rollout's steps


def test_lagged_copies_follow_by_a_decay_capped_per_objective():
    """d = min(0.001 s, cap): AWM's EMA caps at 0.3, NFT's old policy at 0.5."""
    from rl.forward import lagged_decay, nft_old_decay

    assert lagged_decay(100, 0.3) == pytest.approx(0.1)
    assert lagged_decay(1000, 0.3) == 0.3 and nft_old_decay(1000) == 0.5 and nft_old_decay(200) == pytest.approx(0.2)
