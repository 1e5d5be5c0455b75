"""The SD3 policy adapter against the stock diffusers pipeline and the raw transformer: prompt
encoding, guided velocity, decoding, reference mode, trainable parameters and LoRA files that a
stock pipeline loads."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

from conftest import guided_transformer_velocity, perturb_lora, transformer_velocity

PROMPTS = ["a red cube on a wooden table", "two cats", "the sea at night, oil painting"]
LATENT_SHAPE = (16, 8, 8)  # tiny SD3 at 64 px: 16 latent channels, x8 VAE downsampling


def random_latents(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn((batch, *LATENT_SHAPE), generator=torch.Generator().manual_seed(seed))


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def assert_images_match(ours: np.ndarray, expected: np.ndarray) -> None:
    """uint8 images equal up to rounding: two loads of the same weights may pick CPU kernels
    that differ in the last float bits, moving a pixel that sits at .5 by one level."""
    assert ours.shape == expected.shape
    diff = np.abs(ours.astype(np.int16) - expected.astype(np.int16))
    assert diff.max() <= 1, diff.max()
    assert (diff > 0).mean() < 1e-3, (diff > 0).mean()


# ------------------------------------------------------------------ encode


def test_encode_matches_pipeline_encode_prompt(make_sd3_policy, stock_sd3):
    policy = make_sd3_policy()
    cond = policy.encode(PROMPTS)

    with torch.no_grad():  # as in the pipeline's __call__ (grad mode picks other CPU kernels)
        embeds, _, pooled, _ = stock_sd3.encode_prompt(
            prompt=PROMPTS, prompt_2=None, prompt_3=None, do_classifier_free_guidance=False, max_sequence_length=32,
        )
        empty, _, empty_pooled, _ = stock_sd3.encode_prompt(
            prompt=[""], prompt_2=None, prompt_3=None, do_classifier_free_guidance=False, max_sequence_length=32,
        )
    torch.testing.assert_close(cond.prompt_embeds, embeds, rtol=0, atol=1e-6)
    torch.testing.assert_close(cond.pooled_embeds, pooled, rtol=0, atol=1e-6)

    assert cond.negative_embeds.shape == (1, *embeds.shape[1:])
    torch.testing.assert_close(cond.negative_embeds, empty, rtol=0, atol=1e-6)
    torch.testing.assert_close(cond.negative_pooled, empty_pooled, rtol=0, atol=1e-6)

    # A second encode with other prompts keeps the negatives of the empty prompt.
    other = policy.encode(["a dog"])
    torch.testing.assert_close(other.negative_embeds, empty, rtol=0, atol=1e-6)


def test_conditioning_take_picks_rows(make_sd3_policy):
    policy = make_sd3_policy()
    cond = policy.encode(PROMPTS)
    # Distinct prompts must give distinct rows, or picking rows proves nothing.
    assert not torch.allclose(cond.prompt_embeds[0], cond.prompt_embeds[1])

    index = torch.tensor([2, 0, 2, 1])
    taken = cond.take(index)
    assert torch.equal(taken.prompt_embeds, cond.prompt_embeds[index])
    assert torch.equal(taken.pooled_embeds, cond.pooled_embeds[index])
    assert torch.equal(taken.negative_embeds, cond.negative_embeds)
    assert torch.equal(taken.negative_pooled, cond.negative_pooled)


# ------------------------------------------------------------------ velocity


def test_guided_velocity_is_cfg_of_two_direct_calls_in_one_forward(make_sd3_policy):
    policy = make_sd3_policy()
    perturb_lora(policy.network)  # the velocity must be that of the adapted network
    cond = policy.encode(PROMPTS[:2])
    latents = random_latents(2)
    sigma = torch.tensor([0.9, 0.35])  # per-sample sigmas

    batches = []
    handle = policy.network.register_forward_pre_hook(
        lambda module, args, kwargs: batches.append(kwargs["hidden_states"].shape[0]), with_kwargs=True
    )
    try:
        with torch.no_grad():
            velocity = policy.velocity(latents, sigma, cond, 4.5)
    finally:
        handle.remove()
    assert batches == [4], "CFG must be batched into ONE forward of 2B rows"

    expected = guided_transformer_velocity(policy.network, latents, sigma, cond, 4.5)
    assert velocity.dtype == torch.float32
    assert velocity.shape == latents.shape
    torch.testing.assert_close(velocity, expected, rtol=0, atol=1e-5)


def test_unguided_velocity_is_one_conditional_call(make_sd3_policy):
    policy = make_sd3_policy()
    cond = policy.encode(PROMPTS[:2])
    latents = random_latents(2, seed=1)
    sigma = torch.tensor([1.0, 0.5])
    with torch.no_grad():
        velocity = policy.velocity(latents, sigma, cond, 1.0)
    expected = transformer_velocity(policy.network, latents, sigma, cond.prompt_embeds, cond.pooled_embeds)
    assert velocity.dtype == torch.float32
    torch.testing.assert_close(velocity, expected, rtol=0, atol=1e-6)
    # Guidance must matter, or the guided test above could not tell the two apart.
    with torch.no_grad():
        guided = policy.velocity(latents, sigma, cond, 4.5)
    assert (guided - velocity).abs().max() > 1e-3


# ------------------------------------------------------------------ decode


def test_decode_matches_pipeline_vae_and_postprocess(make_sd3_policy, stock_sd3):
    policy = make_sd3_policy()
    latents = random_latents(2, seed=2)
    images = policy.decode(latents)

    vae = stock_sd3.vae
    with torch.no_grad():
        decoded = vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor, return_dict=False)[0]
    expected = stock_sd3.image_processor.postprocess(decoded, output_type="np")  # [B, H, W, 3] in [0, 1]
    expected = np.round(expected * 255).astype(np.uint8)

    assert images.dtype == torch.uint8
    assert images.device.type == "cpu"
    assert tuple(images.shape) == (2, 64, 64, 3)
    assert_images_match(images.numpy(), expected)


# ------------------------------------------------------------------ reference mode


def test_reference_is_the_base_model_and_lora_comes_back(make_sd3_policy, tiny_sd3):
    policy = make_sd3_policy()
    base = SD3Transformer2DModel.from_pretrained(str(tiny_sd3), subfolder="transformer", dtype=torch.float32)
    cond = policy.encode(PROMPTS[:2])
    latents = random_latents(2, seed=3)
    sigma = torch.tensor([0.8, 0.6])
    base_velocity = guided_transformer_velocity(base, latents, sigma, cond, 4.5)

    perturb_lora(policy.network)
    trainable = policy.trainable_parameters()
    with torch.no_grad():
        adapted = policy.velocity(latents, sigma, cond, 4.5)
        assert (adapted - base_velocity).abs().max() > 1e-3, "perturbed LoRA must change the velocity"
        with policy.reference() as reference:
            inside = policy.velocity(latents, sigma, cond, 4.5, network=reference)
            inside_default = policy.velocity(latents, sigma, cond, 4.5)
        after = policy.velocity(latents, sigma, cond, 4.5)
    torch.testing.assert_close(inside, base_velocity, rtol=0, atol=1e-5)
    torch.testing.assert_close(inside_default, base_velocity, rtol=0, atol=1e-5)
    torch.testing.assert_close(after, adapted, rtol=0, atol=0)
    # The same LoRA parameters train afterwards (the switch restores their requires_grad).
    assert [id(p) for p in policy.trainable_parameters()] == [id(p) for p in trainable] and len(trainable) > 0

    # An exception inside the context (e.g. a failed KL forward) must not leave adapters off.
    with pytest.raises(RuntimeError, match="boom"):
        with policy.reference():
            raise RuntimeError("boom")
    with torch.no_grad():
        torch.testing.assert_close(policy.velocity(latents, sigma, cond, 4.5), adapted, rtol=0, atol=0)


def test_reference_of_full_finetuning_is_the_base_model(make_sd3_policy, tiny_sd3):
    policy = make_sd3_policy(use_lora=False)
    base = SD3Transformer2DModel.from_pretrained(str(tiny_sd3), subfolder="transformer", dtype=torch.float32)
    cond = policy.encode(PROMPTS[:1])
    latents = random_latents(1, seed=4)
    sigma = torch.tensor([0.7])
    base_velocity = guided_transformer_velocity(base, latents, sigma, cond, 4.5)

    with torch.no_grad():
        for param in policy.network.parameters():
            param.add_(0.05 * torch.randn_like(param))
        trained = policy.velocity(latents, sigma, cond, 4.5)
        with policy.reference() as reference:
            inside = policy.velocity(latents, sigma, cond, 4.5, network=reference)
    assert (trained - base_velocity).abs().max() > 1e-3
    torch.testing.assert_close(inside, base_velocity, rtol=0, atol=1e-5)


# ------------------------------------------------------------------ saving and loading


def test_saved_lora_loads_into_stock_pipeline_and_back(make_sd3_policy, stock_sd3, tmp_path):
    policy = make_sd3_policy()
    perturb_lora(policy.network, seed=5)
    policy.save_trainable(str(tmp_path))

    stock_sd3.load_lora_weights(str(tmp_path))
    cond = policy.encode(PROMPTS[:2])
    latents = random_latents(2, seed=5)
    sigma = torch.tensor([0.95, 0.3])
    with torch.no_grad():
        ours = policy.velocity(latents, sigma, cond, 4.5)
    theirs = guided_transformer_velocity(stock_sd3.transformer, latents, sigma, cond, 4.5)
    base = make_sd3_policy()  # LoRA B = 0: the base model
    with torch.no_grad():
        assert (base.velocity(latents, sigma, cond, 4.5) - ours).abs().max() > 1e-3
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)

    restored = make_sd3_policy()
    restored.load_trainable(str(tmp_path))
    saved, loaded = policy.trainable_state_dict(), restored.trainable_state_dict()
    assert saved.keys() == loaded.keys() and len(saved) > 0
    for key in saved:
        assert torch.equal(saved[key], loaded[key]), key
    assert all(p.dtype == torch.float32 and p.requires_grad for p in restored.trainable_parameters())
    with torch.no_grad():
        torch.testing.assert_close(restored.velocity(latents, sigma, cond, 4.5), ours, rtol=0, atol=0)


def test_saved_lora_keeps_its_alpha_in_a_stock_pipeline(make_sd3_policy, stock_sd3, tmp_path):
    policy = make_sd3_policy(rank=4, alpha=8)
    perturb_lora(policy.network, seed=6)
    policy.save_trainable(str(tmp_path))

    stock_sd3.load_lora_weights(str(tmp_path))
    cond = policy.encode(PROMPTS[:1])
    latents = random_latents(1, seed=6)
    sigma = torch.tensor([0.5])
    with torch.no_grad():
        ours = policy.velocity(latents, sigma, cond, 1.0)
    theirs = guided_transformer_velocity(stock_sd3.transformer, latents, sigma, cond, 1.0)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


def test_full_weights_round_trip(make_sd3_policy, tmp_path):
    policy = make_sd3_policy(use_lora=False)
    with torch.no_grad():
        for param in policy.network.parameters():
            param.add_(0.01 * torch.randn_like(param))
    policy.save_trainable(str(tmp_path))

    restored = make_sd3_policy(use_lora=False)
    restored.load_trainable(str(tmp_path))
    saved, loaded = policy.network.state_dict(), restored.network.state_dict()
    assert saved.keys() == loaded.keys()
    for key in saved:
        assert torch.equal(saved[key], loaded[key]), key


# ------------------------------------------------------------------ trainable parameters and dtypes


def frozen_modules(policy):
    pipe = policy.pipe
    return [pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3, pipe.vae]


def test_lora_policy_trains_only_lora(make_sd3_policy):
    policy = make_sd3_policy()
    trainable = {id(p) for p in policy.trainable_parameters()}
    lora = {id(p) for name, p in policy.network.named_parameters() if "lora_" in name}
    assert lora and trainable == lora
    assert all(not p.requires_grad for name, p in policy.network.named_parameters() if "lora_" not in name)
    for module in frozen_modules(policy):
        assert all(not p.requires_grad for p in module.parameters())


def test_full_policy_trains_the_whole_transformer_in_fp32(make_sd3_policy):
    policy = make_sd3_policy(use_lora=False, dtype="bf16")
    trainable = {id(p) for p in policy.trainable_parameters()}
    assert trainable == {id(p) for p in policy.network.parameters()}
    assert all(p.dtype == torch.float32 for p in policy.trainable_parameters())
    for module in frozen_modules(policy):
        assert all(not p.requires_grad for p in module.parameters())


def test_bf16_policy_keeps_lora_and_velocity_in_fp32(make_sd3_policy):
    policy = make_sd3_policy(dtype="bf16")
    reference = make_sd3_policy(dtype="fp32")
    lora = [p for name, p in policy.network.named_parameters() if "lora_" in name]
    base = [p for name, p in policy.network.named_parameters() if "lora_" not in name]
    assert lora and base
    assert all(p.dtype == torch.float32 and p.requires_grad for p in lora)
    assert all(p.dtype == torch.bfloat16 for p in base)
    assert all(p.dtype == torch.bfloat16 for p in policy.pipe.text_encoder_3.parameters())

    cond = policy.encode(PROMPTS[:2])
    cond32 = reference.encode(PROMPTS[:2])
    latents = random_latents(2, seed=7)
    sigma = torch.tensor([0.9, 0.4])
    velocity = policy.velocity(latents, sigma, cond, 4.5)
    assert velocity.dtype == torch.float32
    assert torch.isfinite(velocity).all()
    with torch.no_grad():
        exact = reference.velocity(latents, sigma, cond32, 4.5)
    # bf16 keeps ~3 significant digits; the bf16 model must still compute the same function.
    assert (velocity.detach() - exact).norm() / exact.norm() < 0.1

    # Gradients reach the fp32 adapters through the bf16 autocast forward.
    velocity.square().mean().backward()
    grads = [p.grad for p in policy.trainable_parameters()]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().max() > 0 for g in grads)


def test_gradient_checkpointing_gives_the_same_gradients(make_sd3_policy):
    """model.gradient_checkpointing trades compute for memory without changing the update."""
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        policy = make_sd3_policy(gradient_checkpointing=checkpointing)
        perturb_lora(policy.network, seed=3)
        policy.network.train()
        cond = policy.encode(PROMPTS[:2])
        latents = random_latents(2, seed=4)
        velocity = policy.velocity(latents, torch.tensor([0.7, 0.4]), cond, 4.5)
        velocity.square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in policy.network.named_parameters() if p.requires_grad})
        assert policy.network.is_gradient_checkpointing == checkpointing
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7)
