"""The rollout engine on the tiny SD3 policy: the ODE sampler reproduces the stock diffusers
pipeline, recorded log-probs are those of the Flow-SDE transition and are exactly on-policy, and a
sample does not depend on the batch (or rank) it was drawn in."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import guided_transformer_velocity, pixel_diff
from rl.rollout import SDESettings, rollout, sample_seed, transition

PROMPTS = ["a red cube on a wooden table", "two cats", "the sea at night, oil painting"]
RESOLUTION = 64
LATENT_SHAPE = (16, 8, 8)  # 16 latent channels, x8 VAE downsampling
GUIDANCE = 4.5
SDE = SDESettings(dynamics="flow_sde", noise_level=0.7)
SD3_SHIFT = 3.0


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture
def policy(make_sd3_policy):
    return make_sd3_policy()


def stock_schedule(num_steps: int, shift: float = SD3_SHIFT, train_steps: int = 1000) -> np.ndarray:
    """SD3's scheduler schedule, written out: N points from 1 to the shifted smallest training
    sigma, time-shifted s*u / (1 + (s-1)*u), then a terminal 0 (float64)."""

    def shifted(u):
        return shift * u / (1.0 + (shift - 1.0) * u)

    grid = np.linspace(1.0, shifted(1.0 / train_steps), num_steps)
    return np.append(shifted(grid), 0.0)


def initial_latents(seed: int, epoch: int, sample_ids) -> torch.Tensor:
    """The documented seeding: each sample's noise comes from its own generator seeded by
    (seed, epoch, sample id)."""
    return torch.stack([
        torch.randn(LATENT_SHAPE, generator=torch.Generator().manual_seed(sample_seed(seed, epoch, int(i))))
        for i in sample_ids
    ])


def run(policy, cond, rows, ids, *, num_steps=4, sde_steps=(0, 1, 2), batch_size=2, seed=0, epoch=0, **kwargs):
    rows, ids = torch.as_tensor(rows), torch.as_tensor(ids)
    return rollout(
        policy, cond, rows, ids, rows, seed=seed, epoch=epoch, num_steps=num_steps, guidance_scale=GUIDANCE,
        size=RESOLUTION, batch_size=batch_size, sde=SDE, sde_steps=list(sde_steps), **kwargs,
    )


# ------------------------------------------------------------------ the ODE sampler


def test_ode_rollout_reproduces_the_stock_pipeline(policy, stock_sd3):
    num_steps, seed, epoch, ids = 6, 5, 2, [3, 7]
    cond = policy.encode(PROMPTS[:2])
    ours = run(policy, cond, [0, 1], ids, num_steps=num_steps, sde_steps=[], seed=seed, epoch=epoch)

    expected_sigmas = stock_schedule(num_steps)
    np.testing.assert_allclose(ours.sigmas.numpy(), expected_sigmas, rtol=0, atol=1e-6)

    images = stock_sd3(
        prompt=PROMPTS[:2], latents=initial_latents(seed, epoch, ids),
        num_inference_steps=num_steps, guidance_scale=GUIDANCE, height=RESOLUTION, width=RESOLUTION,
        max_sequence_length=32, output_type="np",
    ).images
    # The stock pipeline ran exactly our schedule, terminal 0 included.
    torch.testing.assert_close(stock_sd3.scheduler.sigmas, ours.sigmas, rtol=0, atol=1e-6)

    expected = np.round(images * 255).astype(np.uint8)
    assert ours.images.dtype == torch.uint8
    assert tuple(ours.images.shape) == expected.shape == (2, RESOLUTION, RESOLUTION, 3)
    diff = pixel_diff(ours.images, expected)
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (diff.max(), (diff > 0).mean())
    # Not a vacuous match: different prompts and noise give different images.
    assert pixel_diff(ours.images[0], ours.images[1]).max() > 10
    assert ours.log_probs.shape == (2, 0) and ours.step_indices == []


# ------------------------------------------------------------------ the SDE rollout


def test_rollout_fields_have_documented_shapes(policy):
    cond = policy.encode(PROMPTS)
    rows, ids = [0, 0, 1, 2], [0, 1, 2, 3]
    out = run(policy, cond, rows, ids, num_steps=4, sde_steps=[2, 0, 1], batch_size=2)

    assert len(out) == 4
    assert out.step_indices == [0, 1, 2]
    assert tuple(out.latents.shape) == (4, 3, *LATENT_SHAPE)
    assert tuple(out.next_latents.shape) == (4, 3, *LATENT_SHAPE)
    assert out.latents.dtype == out.next_latents.dtype == torch.float32
    assert tuple(out.log_probs.shape) == (4, 3) and out.log_probs.dtype == torch.float32
    assert torch.isfinite(out.log_probs).all()
    assert tuple(out.images.shape) == (4, RESOLUTION, RESOLUTION, 3) and out.images.dtype == torch.uint8
    assert torch.equal(out.sample_ids, torch.tensor(ids)) and torch.equal(out.prompt_rows, torch.tensor(rows))
    assert tuple(out.sigmas.shape) == (5,)
    # Consecutive trained steps chain: the state after step t is the state before step t + 1.
    torch.testing.assert_close(out.latents[:, 1:], out.next_latents[:, :-1], rtol=0, atol=0)
    # The first state is the sample's seeded initial noise (step 0 is trained).
    torch.testing.assert_close(out.latents[:, 0], initial_latents(0, 0, ids), rtol=0, atol=0)


def flow_sde_log_prob(velocity, x, x_next, sigma, sigma_next, sigma_1, noise_level):
    """Flow-GRPO's transition density (REFERENCE.md section 1), written out with
    torch.distributions.Normal and averaged over elements."""
    dt = sigma_next - sigma
    sigma_tilde = sigma_1 if sigma == 1.0 else sigma
    s_t = noise_level * math.sqrt(sigma / (1.0 - sigma_tilde))
    mean = x * (1 + s_t**2 * dt / (2 * sigma)) + velocity * (1 + s_t**2 * (1 - sigma) / (2 * sigma)) * dt
    std = s_t * math.sqrt(-dt)
    return torch.distributions.Normal(mean.double(), std).log_prob(x_next.double()).mean(dim=(1, 2, 3))


def test_recorded_log_probs_are_the_transition_density_and_on_policy(policy):
    cond = policy.encode(PROMPTS)
    rows, ids, batch_size = [0, 1, 2, 1], [4, 5, 6, 7], 2
    out = run(policy, cond, rows, ids, num_steps=4, sde_steps=[0, 1, 2], batch_size=batch_size)
    sigmas = out.sigmas

    for start in range(0, len(out), batch_size):
        batch = slice(start, start + batch_size)
        batch_cond = cond.take(out.prompt_rows[batch])
        for t, step in enumerate(out.step_indices):
            x, x_next = out.latents[batch, t], out.next_latents[batch, t]
            # The trainer's recomputation, same batch shape: exactly on-policy.
            with torch.no_grad():
                recomputed = transition(
                    policy, x, sigmas[step], sigmas[step + 1], sigmas[1], batch_cond, GUIDANCE, SDE, prev_sample=x_next,
                ).log_prob
            ratio = torch.exp(recomputed - out.log_probs[batch, t])
            assert (ratio - 1).abs().max() < 1e-6, (step, ratio)

            # An independent computation from the raw transformer and the published formula.
            velocity = guided_transformer_velocity(policy.network, x, sigmas[step].expand(x.shape[0]), batch_cond, GUIDANCE)
            independent = flow_sde_log_prob(
                velocity, x, x_next, float(sigmas[step]), float(sigmas[step + 1]), float(sigmas[1]), SDE.noise_level
            )
            torch.testing.assert_close(out.log_probs[batch, t].double(), independent, rtol=0, atol=1e-4)


def test_sde_noise_is_each_samples_generator_after_its_initial_noise_step_by_step(policy):
    """The documented noise stream: sample i's generator (seed, epoch, id) draws its initial noise,
    then one standard normal latent per stochastic step in order; the rollout draws them all at
    once and must give exactly these numbers."""
    cond = policy.encode(PROMPTS)
    rows, ids, batch_size = [0, 1, 2, 1], [4, 5, 6, 7], 2
    out = run(policy, cond, rows, ids, num_steps=4, sde_steps=[0, 2], batch_size=batch_size, seed=3, epoch=2)
    generators = [torch.Generator().manual_seed(sample_seed(3, 2, i)) for i in ids]
    initial = torch.stack([torch.randn(LATENT_SHAPE, generator=g) for g in generators])
    per_step = [torch.stack([torch.randn(LATENT_SHAPE, generator=g) for g in generators]) for _ in out.step_indices]
    torch.testing.assert_close(out.latents[:, 0], initial, rtol=0, atol=0)
    sigmas = out.sigmas.tolist()
    for start in range(0, len(out), batch_size):
        batch = slice(start, start + batch_size)
        batch_cond = cond.take(out.prompt_rows[batch])
        for t, step in enumerate(out.step_indices):
            with torch.no_grad():
                again = transition(policy, out.latents[batch, t], sigmas[step], sigmas[step + 1], sigmas[1], batch_cond,
                                   GUIDANCE, SDE, noise=per_step[t][batch])
            assert torch.equal(again.prev_sample, out.next_latents[batch, t]), (start, step)


def test_sample_does_not_depend_on_batch_composition_or_size(policy):
    cond = policy.encode(PROMPTS)
    # Sample 10 (prompt row 0) drawn with one companion, and with three other companions in a
    # batch of 4: what a run on 4 ranks vs 1 rank would do.
    small = run(policy, cond, [0, 1], [10, 11], batch_size=2, seed=3, epoch=1)
    large = run(policy, cond, [1, 2, 0, 1], [20, 21, 10, 22], batch_size=4, seed=3, epoch=1)
    single = run(policy, cond, [0], [10], batch_size=1, seed=3, epoch=1)

    for other, row in ((large, 2), (single, 0)):
        # Batched convolutions of different batch sizes may round differently in the last bit,
        # which can move a pixel by one level; the trainer itself keeps batch sizes fixed.
        diff = pixel_diff(other.images[row], small.images[0])
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-2, (diff.max(), (diff > 0).mean())
        assert (other.log_probs[row] - small.log_probs[0]).abs().max() < 1e-6
        torch.testing.assert_close(other.next_latents[row], small.next_latents[0], rtol=0, atol=1e-5)


def test_samples_differ_by_id_and_epoch_and_repeat_exactly(policy):
    cond = policy.encode(PROMPTS)
    out = run(policy, cond, [0, 0], [0, 1], seed=3, epoch=1)
    # Two samples of one group (same prompt) must explore: different noise, different images.
    assert pixel_diff(out.images[0], out.images[1]).max() > 10
    # A new epoch draws new noise for the same sample id.
    next_epoch = run(policy, cond, [0, 0], [0, 1], seed=3, epoch=2)
    assert pixel_diff(out.images[0], next_epoch.images[0]).max() > 10
    # The same (seed, epoch, id) repeats bit for bit (what resuming a run relies on).
    again = run(policy, cond, [0, 0], [0, 1], seed=3, epoch=1)
    assert torch.equal(again.images, out.images)
    assert torch.equal(again.log_probs, out.log_probs)
    assert torch.equal(again.next_latents, out.next_latents)


def test_on_batch_is_called_once_per_decoded_batch(policy):
    cond = policy.encode(PROMPTS)
    calls = []
    out = run(
        policy, cond, [0, 1, 2, 0, 1], [0, 1, 2, 3, 4], num_steps=2, sde_steps=[0], batch_size=2,
        on_batch=lambda first, images: calls.append((first, images.clone())),
    )
    assert [first for first, _ in calls] == [0, 2, 4]
    assert [len(images) for _, images in calls] == [2, 2, 1]
    for first, images in calls:
        assert torch.equal(images, out.images[first : first + len(images)])


def test_steps_outside_the_window_are_deterministic_ode_steps(policy, stock_sd3):
    """With sde_steps = [1, 2] of 4: step 0 and step 3 are plain Euler steps of the guided
    velocity, so the SDE noise only enters at the trained steps."""
    seed, epoch, ids = 1, 0, [8, 9]
    cond = policy.encode(PROMPTS[:2])
    out = run(policy, cond, [0, 1], ids, num_steps=4, sde_steps=[1, 2], seed=seed, epoch=epoch)
    sigmas = torch.tensor(stock_schedule(4), dtype=torch.float32)
    batch_cond = cond.take(torch.tensor([0, 1]))

    def euler(x, i):
        velocity = guided_transformer_velocity(policy.network, x, sigmas[i].expand(x.shape[0]), batch_cond, GUIDANCE)
        return x + (sigmas[i + 1] - sigmas[i]) * velocity

    # Before the window: the ODE trajectory from the seeded noise.
    torch.testing.assert_close(out.latents[:, 0], euler(initial_latents(seed, epoch, ids), 0), rtol=0, atol=1e-5)
    # The trained steps add noise (the outcome is not the Euler step).
    assert (out.next_latents[:, 0] - euler(out.latents[:, 0], 1)).abs().max() > 1e-2
    # After the window: one Euler step to sigma = 0, then the stock VAE decode.
    final = euler(out.next_latents[:, -1], 3)
    vae = stock_sd3.vae
    with torch.no_grad():
        decoded = vae.decode(final / vae.config.scaling_factor + vae.config.shift_factor, return_dict=False)[0]
    expected = np.round(stock_sd3.image_processor.postprocess(decoded, output_type="np") * 255).astype(np.uint8)
    diff = pixel_diff(out.images, expected)
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (diff.max(), (diff > 0).mean())


def test_same_initial_noise_is_shared_within_a_group_and_only_there(policy):
    """same_initial_noise: with ODE steps only, the start decides the image, so the samples of one
    group are the same image and two groups of the same prompt are not; with SDE steps a group's
    samples still explore; the shared start depends on (seed, epoch, group), not on the batch."""
    cond = policy.encode(PROMPTS)
    rows, ids, groups = torch.zeros(4, dtype=torch.long), torch.tensor([5, 6, 7, 8]), torch.tensor([3, 3, 4, 4])

    def sample(sde_steps, batch_size=4, **kwargs):
        return rollout(policy, cond, rows, ids, groups, seed=1, epoch=2, num_steps=4, guidance_scale=GUIDANCE, size=RESOLUTION,
                       batch_size=batch_size, sde=SDE, sde_steps=sde_steps, same_initial_noise=True, **kwargs)

    ode = sample([])
    assert torch.equal(ode.images[0], ode.images[1]) and torch.equal(ode.images[2], ode.images[3])
    assert pixel_diff(ode.images[0], ode.images[2]).max() > 10
    one_by_one = sample([], batch_size=1)
    assert pixel_diff(one_by_one.images, ode.images).max() <= 1
    sde = sample([0, 1, 2])
    assert pixel_diff(sde.images[0], sde.images[1]).max() > 10
    # Without the option every sample has its own start.
    own = rollout(policy, cond, rows, ids, groups, seed=1, epoch=2, num_steps=4, guidance_scale=GUIDANCE, size=RESOLUTION,
                  batch_size=4, sde=SDE, sde_steps=[])
    assert pixel_diff(own.images[0], own.images[1]).max() > 10


def test_forward_objective_rollouts_keep_the_final_latent_and_nothing_per_step(policy):
    """keep_steps=False (nft, awm): SDE steps still add their noise, so the images are those a
    recording rollout draws, but no per-step latents, log-probs or means are kept; the final
    latent is kept and decodes to the image."""
    cond = policy.encode(PROMPTS)
    rows, ids = torch.tensor([0, 1, 0]), torch.tensor([3, 4, 5])
    recorded = run(policy, cond, rows, ids, keep_final=True)
    light = run(policy, cond, rows, ids, keep_final=True, keep_steps=False)
    assert torch.equal(light.images, recorded.images) and torch.equal(light.final_latents, recorded.final_latents)
    assert recorded.latents.shape[1] == 3 and recorded.log_probs.shape == (3, 3)
    for kept in (light.latents, light.next_latents, light.log_probs, light.means):
        assert kept.numel() == 0
    assert light.step_indices == []
    # Decoded in the rollout's own batches (2 + 1): a conv's rounding may depend on the batch size.
    decoded = torch.cat([policy.decode(light.final_latents[part], cond.take(rows[part])) for part in (slice(0, 2), slice(2, 3))])
    assert torch.equal(decoded, light.images)
