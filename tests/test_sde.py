"""rl.sde against an independent float64 implementation of REFERENCE.md section 1.

The reference functions below are written straight from the published equations, one sample at a
time, so a vectorisation, broadcasting or sign mistake in rl.sde shows up as a mismatch.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models.base import draw_noise
from rl.sde import (

    flow_sde_step,
    kl_scale,
    ode_step,
    sde_step_indices,
    sigma_schedule,
)

SHAPE = (4, 6, 6)  # non-batch shape of a latent


# --------------------------------------------------------------------------- reference math


def ref_flow_sde(x, v, sigma, sigma_next, a, sigma_1):
    """Flow-GRPO's Flow-SDE step for ONE sample (float64): returns mean, std, s_t."""
    dt = sigma_next - sigma
    sigma_tilde = sigma_1 if sigma == 1.0 else sigma
    s_t = a * math.sqrt(sigma / (1.0 - sigma_tilde))
    mean = x * (1 + s_t**2 * dt / (2 * sigma)) + v * (1 + s_t**2 * (1 - sigma) / (2 * sigma)) * dt
    std = s_t * math.sqrt(-dt)
    return mean, std, s_t


def ref_dance_sde(x, v, sigma, sigma_next, eta):
    """DanceGRPO's step written the way DanceGRPO writes it: Euler step plus a score correction."""
    dt = sigma_next - sigma
    x0_hat = x - sigma * v
    score = -(x - (1 - sigma) * x0_hat) / sigma**2
    mean = x + v * dt - 0.5 * eta**2 * score * dt
    std = eta * math.sqrt(-dt)
    return mean, std


def ref_cps(x, v, sigma, sigma_next, a):
    """Coefficients-preserving sampling for ONE sample (float64)."""
    std = sigma_next * math.sin(a * math.pi / 2)
    x0_hat = x - sigma * v
    x1_hat = x + (1 - sigma) * v
    mean = x0_hat * (1 - sigma_next) + x1_hat * math.sqrt(sigma_next**2 - std**2)
    return mean, std


def ref_log_prob(x, mean, std):
    """Per-sample Normal log-density averaged over the non-batch elements."""
    std_t = torch.as_tensor(std, dtype=torch.float64)
    return torch.distributions.Normal(mean, std_t).log_prob(x).mean().item()


def random_inputs(batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, *SHAPE), generator=g, dtype=torch.float64)
    v = torch.randn((batch, *SHAPE), generator=g, dtype=torch.float64)
    return x, v


# Per-sample (sigma, sigma_next) pairs from a shifted 10-step schedule, including the first step
# (sigma == 1) and a late step, so the batch mixes very different noise scales.
SCHED = [1.0 * 3 * u / (1 + 2 * u) for u in np.linspace(1.0, 0.0, 11)]
PAIRS = [(SCHED[0], SCHED[1]), (SCHED[1], SCHED[2]), (SCHED[4], SCHED[5]), (SCHED[8], SCHED[9]), (SCHED[0], SCHED[1])]


def pair_tensors(pairs):
    sig = torch.tensor([p[0] for p in pairs], dtype=torch.float32)
    nxt = torch.tensor([p[1] for p in pairs], dtype=torch.float32)
    return sig, nxt


# --------------------------------------------------------------------------- Flow-SDE


@pytest.mark.parametrize("dynamics", ["flow_sde", "dance_sde", "cps"])
def test_step_matches_reference_per_sample_sigmas(dynamics):
    """mean, std and log_prob of every dynamics match the published formulas with per-sample sigmas."""
    a = 0.7 if dynamics != "dance_sde" else 0.3
    x, v = random_inputs(len(PAIRS))
    sig, nxt = pair_tensors(PAIRS)
    sigma_1 = float(sig[1])  # the schedule's sigma_1 (== next sigma of the first step)
    noise = torch.randn((len(PAIRS), *SHAPE), generator=torch.Generator().manual_seed(1))
    out = flow_sde_step(v.float(), x.float(), sig, nxt, noise_level=a, sigma_max=sigma_1, noise=noise, dynamics=dynamics)

    assert out.prev_sample.shape == x.shape and out.mean.shape == x.shape
    assert out.log_prob.shape == (len(PAIRS),)
    for i in range(len(PAIRS)):
        s, sn = float(sig[i]), float(nxt[i])
        if dynamics == "flow_sde":
            mean, std, _ = ref_flow_sde(x[i], v[i], s, sn, a, sigma_1)
        elif dynamics == "dance_sde":
            mean, std = ref_dance_sde(x[i], v[i], s, sn, a)
        else:
            mean, std = ref_cps(x[i], v[i], s, sn, a)
        torch.testing.assert_close(out.mean[i].double(), mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.std[i].double().expand(SHAPE), torch.full(SHAPE, std, dtype=torch.float64), rtol=1e-5, atol=1e-7)
        expected_prev = mean + std * noise[i].double()
        torch.testing.assert_close(out.prev_sample[i].double(), expected_prev, rtol=1e-5, atol=1e-5)
        expected_lp = ref_log_prob(out.prev_sample[i].double(), mean, std)
        assert out.log_prob[i].item() == pytest.approx(expected_lp, rel=1e-5, abs=1e-4)


def test_scalar_sigmas_match_reference():
    """Scalar sigma / sigma_next (what a single-schedule sampler passes) broadcast over the batch."""
    x, v = random_inputs(3, seed=5)
    s, sn = SCHED[3], SCHED[4]
    noise = torch.randn((3, *SHAPE), generator=torch.Generator().manual_seed(2))
    out = flow_sde_step(v.float(), x.float(), s, sn, noise_level=0.7, sigma_max=SCHED[1], noise=noise)
    for i in range(3):
        mean, std, _ = ref_flow_sde(x[i], v[i], s, sn, 0.7, SCHED[1])
        torch.testing.assert_close(out.mean[i].double(), mean, rtol=1e-5, atol=1e-5)
        assert isinstance(out.std, float) and out.std == pytest.approx(std, rel=1e-5)
        expected_lp = ref_log_prob(out.prev_sample[i].double(), mean, std)
        assert out.log_prob[i].item() == pytest.approx(expected_lp, rel=1e-5, abs=1e-4)


@pytest.mark.parametrize("dynamics", ["flow_sde", "dance_sde", "cps"])
@pytest.mark.parametrize("index", [0, 3])
def test_number_and_tensor_sigmas_take_the_same_step(dynamics, index):
    """The sampler passes the schedule as numbers (no tensor op for the coefficients); per-sample
    tensors of the same values give the same mean, std, sample and log-prob."""
    x, v = random_inputs(3, seed=9)
    s, sn, smax = SCHED[index], SCHED[index + 1], SCHED[1]
    noise = torch.randn((3, *SHAPE), generator=torch.Generator().manual_seed(4))
    numbers = flow_sde_step(v.float(), x.float(), s, sn, noise_level=0.7, sigma_max=smax, noise=noise, dynamics=dynamics)
    tensors = flow_sde_step(
        v.float(), x.float(), torch.full((3,), s), torch.full((3,), sn), noise_level=0.7, sigma_max=torch.tensor(smax), noise=noise, dynamics=dynamics
    )
    for a, b in ((numbers.mean, tensors.mean), (numbers.prev_sample, tensors.prev_sample), (numbers.log_prob, tensors.log_prob)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.full((3,), numbers.std), tensors.std.flatten(), rtol=1e-6, atol=0)
    assert kl_scale(numbers.std, s, sn) == pytest.approx(float(kl_scale(tensors.std, torch.tensor(s), torch.tensor(sn)).flatten()[0]), rel=1e-6)


def test_first_step_uses_sigma_max_for_noise_scale():
    """At sigma == 1, s_t = a * sqrt(1 / (1 - sigma_max)); sigma_max (not sigma_next) sets the noise."""
    x, v = random_inputs(1, seed=3)
    a, sn, sigma_max = 0.7, 0.97, 0.9  # sigma_max deliberately != sigma_next
    out = flow_sde_step(v.float(), x.float(), 1.0, sn, noise_level=a, sigma_max=sigma_max,
                        noise=torch.zeros(1, *SHAPE))
    s_t = a * math.sqrt(1.0 / (1.0 - sigma_max))
    assert math.isfinite(out.std) and torch.isfinite(out.log_prob).all()
    assert out.std == pytest.approx(s_t * math.sqrt(1.0 - sn), rel=1e-6)
    mean, _, _ = ref_flow_sde(x[0], v[0], 1.0, sn, a, sigma_max)
    torch.testing.assert_close(out.mean[0].double(), mean, rtol=1e-5, atol=1e-5)
    # and sigma_max is per-sample when given as a tensor
    out2 = flow_sde_step(v.float().repeat(2, 1, 1, 1), x.float().repeat(2, 1, 1, 1), 1.0, sn, noise_level=a,
                         sigma_max=torch.tensor([0.9, 0.5]), noise=torch.zeros(2, *SHAPE))
    assert out2.std[1].flatten()[0].item() == pytest.approx(a * math.sqrt(1 / 0.5) * math.sqrt(1 - sn), rel=1e-6)


def test_log_prob_is_normal_density_averaged_not_summed():
    """log_prob equals Normal(mean, std).log_prob(x') averaged over all non-batch elements."""
    x, v = random_inputs(2, seed=11)
    prev = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(4))
    out = flow_sde_step(v.float(), x.float(), SCHED[2], SCHED[3], noise_level=0.7, sigma_max=SCHED[1], prev_sample=prev)
    dist = torch.distributions.Normal(out.mean.double(), torch.tensor(out.std, dtype=torch.float64))
    expected = dist.log_prob(prev.double()).mean(dim=(1, 2, 3))
    torch.testing.assert_close(out.log_prob.double(), expected, rtol=1e-6, atol=1e-5)
    assert out.log_prob.dtype == torch.float32


def test_prev_sample_reproduces_log_prob_exactly():
    """Recomputing the log-prob of a drawn sample (what the trainer does) gives the same number: ratio == 1."""
    x, v = random_inputs(len(PAIRS), seed=7)
    sig, nxt = pair_tensors(PAIRS)
    gens = [torch.Generator().manual_seed(50 + i) for i in range(len(PAIRS))]
    for dynamics in ("flow_sde", "dance_sde", "cps"):
        drawn = flow_sde_step(v.float(), x.float(), sig, nxt, noise_level=0.7, sigma_max=SCHED[1], generator=gens, dynamics=dynamics)
        again = flow_sde_step(v.float(), x.float(), sig, nxt, noise_level=0.7, sigma_max=SCHED[1],
                              prev_sample=drawn.prev_sample, dynamics=dynamics)
        assert torch.equal(again.prev_sample, drawn.prev_sample)
        assert torch.equal(again.log_prob, drawn.log_prob), dynamics
        # and it is a real density: another sample has another log-prob
        other = flow_sde_step(v.float(), x.float(), sig, nxt, noise_level=0.7, sigma_max=SCHED[1],
                              prev_sample=drawn.prev_sample + 0.5, dynamics=dynamics)
        assert not torch.allclose(other.log_prob, drawn.log_prob)


def test_low_precision_inputs_give_float32_outputs():
    """bf16 model outputs still give float32 samples and log-probs (log-prob math is fp32)."""
    x, v = random_inputs(2, seed=8)
    out = flow_sde_step(v.bfloat16(), x.bfloat16(), SCHED[2], SCHED[3], noise_level=0.7, sigma_max=SCHED[1],
                        generator=torch.Generator().manual_seed(0))
    assert out.prev_sample.dtype == torch.float32
    assert out.log_prob.dtype == torch.float32
    assert out.mean.dtype == torch.float32
    again = flow_sde_step(v.bfloat16(), x.bfloat16(), SCHED[2], SCHED[3], noise_level=0.7, sigma_max=SCHED[1],
                          prev_sample=out.prev_sample)
    assert torch.equal(again.log_prob, out.log_prob)


def test_per_sample_generators_make_draws_independent_of_batch():
    """Sample i drawn alone equals sample i drawn inside a batch when its generator has the same seed."""
    batch = len(PAIRS)
    x, v = random_inputs(batch, seed=9)
    sig, nxt = pair_tensors(PAIRS)
    seeds = [1000 + 17 * i for i in range(batch)]
    full = flow_sde_step(v.float(), x.float(), sig, nxt, noise_level=0.7, sigma_max=SCHED[1],
                         generator=[torch.Generator().manual_seed(s) for s in seeds])
    for i in range(batch):
        alone = flow_sde_step(v[i:i + 1].float(), x[i:i + 1].float(), sig[i:i + 1], nxt[i:i + 1], noise_level=0.7,
                              sigma_max=SCHED[1], generator=[torch.Generator().manual_seed(seeds[i])])
        assert torch.equal(alone.prev_sample[0], full.prev_sample[i])
        assert torch.equal(alone.log_prob[0], full.log_prob[i])
    # a different batch composition (reversed order) gives the same per-sample draws
    rev = list(reversed(range(batch)))
    reordered = flow_sde_step(v[rev].float(), x[rev].float(), sig[rev], nxt[rev], noise_level=0.7, sigma_max=SCHED[1],
                              generator=[torch.Generator().manual_seed(seeds[i]) for i in rev])
    assert torch.equal(reordered.prev_sample, full.prev_sample[rev])


def test_draw_noise_per_sample_rows_and_errors():
    """Each row of draw_noise uses its own generator; the generator count must match the batch."""
    noise = draw_noise((3, *SHAPE), [torch.Generator().manual_seed(s) for s in (1, 2, 1)])
    assert torch.equal(noise[0], noise[2])
    assert not torch.equal(noise[0], noise[1])
    torch.testing.assert_close(noise[1], torch.randn(SHAPE, generator=torch.Generator().manual_seed(2)))
    with pytest.raises(ValueError):
        draw_noise((3, *SHAPE), [torch.Generator().manual_seed(0)] * 2)


def _ks_statistic(z: np.ndarray) -> float:
    """Kolmogorov-Smirnov distance between the empirical CDF of z and the standard normal CDF."""
    z = np.sort(z)
    n = len(z)
    cdf = 0.5 * (1 + np.vectorize(math.erf)(z / math.sqrt(2)))
    upper = np.arange(1, n + 1) / n - cdf
    lower = cdf - np.arange(0, n) / n
    return float(max(upper.max(), lower.max()))


@pytest.mark.parametrize("dynamics", ["flow_sde", "cps"])
def test_draws_are_distributed_as_reference_gaussian(dynamics):
    """Drawn samples follow N(mean, std^2) of the REFERENCE equations (moments and a KS test)."""
    batch, shape = 4, (4, 32, 32)
    g = torch.Generator().manual_seed(123)
    x = torch.randn((batch, *shape), generator=g, dtype=torch.float64)
    v = torch.randn((batch, *shape), generator=g, dtype=torch.float64)
    pairs = PAIRS[:batch]
    sig, nxt = pair_tensors(pairs)
    out = flow_sde_step(v.float(), x.float(), sig, nxt, noise_level=0.7, sigma_max=SCHED[1],
                        generator=torch.Generator().manual_seed(321), dynamics=dynamics)
    residuals = []
    for i in range(batch):
        if dynamics == "flow_sde":
            mean, std, _ = ref_flow_sde(x[i], v[i], float(sig[i]), float(nxt[i]), 0.7, SCHED[1])
        else:
            mean, std = ref_cps(x[i], v[i], float(sig[i]), float(nxt[i]), 0.7)
        residuals.append(((out.prev_sample[i].double() - mean) / std).flatten().numpy())
    z = np.concatenate(residuals)
    n = len(z)
    assert abs(z.mean()) < 4 / math.sqrt(n)
    assert abs(z.var() - 1) < 4 * math.sqrt(2 / n)
    try:
        from scipy import stats  # optional
        assert stats.kstest(z, "norm").pvalue > 1e-3
    except ImportError:
        assert _ks_statistic(z) < 1.95 / math.sqrt(n)  # alpha = 0.001


def test_unknown_dynamics_is_rejected():
    """A typo in sde.dynamics fails loudly, naming the choices."""
    x, v = random_inputs(1)
    with pytest.raises(ValueError, match="flow_sde"):
        flow_sde_step(v.float(), x.float(), 0.5, 0.4, noise_level=0.7, dynamics="flowsde")


def test_per_sample_sigma_of_wrong_length_is_rejected():
    """A [B'] sigma tensor that does not match the batch is an error, not a silent broadcast."""
    x, v = random_inputs(3)
    with pytest.raises(ValueError):
        flow_sde_step(v.float(), x.float(), torch.tensor([0.5, 0.6]), 0.4, noise_level=0.7)


# --------------------------------------------------------------------------- kl_scale, ODE


def test_kl_scale_is_s_t_for_flow_sde():
    """kl_scale(std) recovers Flow-GRPO's s_t (incl. the sigma == 1 step), so the KL divides by s_t^2."""
    x, v = random_inputs(len(PAIRS), seed=12)
    sig, nxt = pair_tensors(PAIRS)
    out = flow_sde_step(v.float(), x.float(), sig, nxt, noise_level=0.7, sigma_max=SCHED[1], noise=torch.zeros_like(x).float())
    scale = kl_scale(out.std, sig, nxt)
    for i in range(len(PAIRS)):
        _, _, s_t = ref_flow_sde(x[i], v[i], float(sig[i]), float(nxt[i]), 0.7, SCHED[1])
        assert scale[i].flatten()[0].item() == pytest.approx(s_t, rel=1e-5)
    dance = flow_sde_step(v.float(), x.float(), sig, nxt, noise_level=0.3, noise=torch.zeros_like(x).float(), dynamics="dance_sde")
    torch.testing.assert_close(kl_scale(dance.std, sig, nxt).flatten(), torch.full((len(PAIRS),), 0.3))


def test_ode_step_is_euler():
    """ode_step is x + v * (sigma_next - sigma) per sample, in float32."""
    x, v = random_inputs(len(PAIRS), seed=13)
    sig, nxt = pair_tensors(PAIRS)
    out = ode_step(v.bfloat16(), x.float(), sig, nxt)
    assert out.dtype == torch.float32
    for i in range(len(PAIRS)):
        expected = x[i] + v[i].bfloat16().double() * (float(nxt[i]) - float(sig[i]))
        torch.testing.assert_close(out[i].double(), expected, rtol=1e-5, atol=1e-5)
    scalar = ode_step(v.float(), x.float(), 0.5, 0.25)
    torch.testing.assert_close(scalar.double(), x - 0.25 * v, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- schedule


@pytest.mark.parametrize("num_steps,shift", [(10, 1.0), (10, 3.0), (40, 3.0), (1, 3.0), (6, 0.5)])
def test_sigma_schedule_shape_endpoints_and_shift(num_steps, shift):
    """num_steps + 1 sigmas from exactly 1 to exactly 0, strictly decreasing, shifted as s*u/(1+(s-1)u)."""
    sigmas = sigma_schedule(num_steps, shift)
    assert sigmas.shape == (num_steps + 1,)
    assert sigmas[0].item() == 1.0 and sigmas[-1].item() == 0.0
    assert bool((sigmas[1:] < sigmas[:-1]).all())
    u = np.linspace(1.0, 0.0, num_steps + 1)
    expected = shift * u / (1 + (shift - 1) * u)
    np.testing.assert_allclose(sigmas.double().numpy(), expected, rtol=1e-6, atol=1e-7)


def test_sigma_schedule_shift_spends_more_steps_at_high_noise():
    """SD3's shift 3 puts every interior sigma above the unshifted one."""
    plain, shifted = sigma_schedule(10, 1.0), sigma_schedule(10, 3.0)
    assert bool((shifted[1:-1] > plain[1:-1]).all())


@pytest.mark.parametrize("num_steps,shift", [(0, 1.0), (10, 0.0), (10, -1.0)])
def test_sigma_schedule_rejects_bad_arguments(num_steps, shift):
    with pytest.raises(ValueError):
        sigma_schedule(num_steps, shift)


# --------------------------------------------------------------------------- SDE windows


def test_window_all_trains_every_step_but_the_last():
    """Flow-GRPO trains 9 of its 10 steps: the last step lands on sigma = 0."""
    assert sde_step_indices(10, "all") == list(range(9))
    assert sde_step_indices(2, "all") == [0]


def test_window_fixed_returns_sorted_unique_steps():
    assert sde_step_indices(10, "fixed", steps=[5, 1, 5]) == [1, 5]


@pytest.mark.parametrize("steps", [[10], [-1], [0, 12], []])
def test_window_fixed_rejects_out_of_range_or_empty(steps):
    """Step indices outside the sampling steps (or none at all) are errors."""
    with pytest.raises(ValueError):
        sde_step_indices(10, "fixed", steps=steps)


def test_window_random_is_deterministic_given_seed():
    """Every rank seeding its generator by the epoch draws the same window."""
    draws = [sde_step_indices(10, "random", window_size=2, window_range=(0, 6), generator=torch.Generator().manual_seed(s))
             for s in range(30)]
    again = [sde_step_indices(10, "random", window_size=2, window_range=(0, 6), generator=torch.Generator().manual_seed(s))
             for s in range(30)]
    assert draws == again
    assert len({tuple(d) for d in draws}) > 1  # the seed matters


def test_window_random_stays_in_range_and_covers_it():
    """Windows are window_size consecutive steps starting anywhere in the inclusive window_range."""
    low, high, size = 2, 5, 3
    g = torch.Generator().manual_seed(0)
    starts = set()
    for _ in range(200):
        idx = sde_step_indices(10, "random", window_size=size, window_range=(low, high), generator=g)
        assert idx == list(range(idx[0], idx[0] + size))
        assert low <= idx[0] <= high
        starts.add(idx[0])
    assert starts == set(range(low, high + 1))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(window_size=2, window_range=(9, 9)),  # window runs past the last step
        dict(window_size=2, window_range=(5, 3)),  # high < low
        dict(window_size=0, window_range=(0, 3)),  # empty window
    ],
)
def test_window_random_rejects_bad_settings(kwargs):
    with pytest.raises(ValueError):
        sde_step_indices(10, "random", generator=torch.Generator().manual_seed(0), **kwargs)


def test_unknown_window_is_rejected():
    with pytest.raises(ValueError, match="random"):
        sde_step_indices(10, "sometimes")
