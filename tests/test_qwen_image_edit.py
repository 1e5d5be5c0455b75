"""The Qwen-Image-Edit policy adapter against the stock diffusers pipelines and the raw transformer.

Reference for whole samples: the stock `QwenImageEditPipeline.__call__` (and the Plus pipeline's).
The stock call always sizes the condition image from a 1024x1024 target area through the module's
`calculate_dimensions`; the tests replace only that function (unittest.mock) so the stock call
keeps the caller's size, as the adapter does. Everything else (prompt encoding, VAE, packing,
scheduler, true CFG, decoding) is the stock code path.
"""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import forward_batch_sizes, perturb_lora

RESOLUTION = 64  # tiny VAE x4 and 2x2 packing: an 8x8 grid of packed tokens
GRID = RESOLUTION // 8
CHANNELS = 4  # tiny VAE latent channels (16 packed)
QWEN_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
# Different lengths on purpose: the conditional texts, and the negative " ", pad to one length.
PROMPTS = ["make the sky red", "add a small cat on the left", "remove it"]


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory) -> Path:
    from models.fixtures.qwen_image_edit import ensure_tiny_qwen_image_edit

    return ensure_tiny_qwen_image_edit(tmp_path_factory.mktemp("models") / "tiny-qwen-image-edit")


@pytest.fixture
def make_policy(tiny_qwen):
    """Factory for a QwenImageEditPolicy on the tiny pipeline (fp32, LoRA rank 4 / alpha 4 unless told)."""
    from models.qwen_image_edit import QwenImageEditPolicy
    from models.config import LoraSettings, ModelConfig

    def make(*, dtype: str = "fp32", use_lora: bool = True, rank: int = 4, alpha: int = 4, pretrained: Path | None = None):
        config = ModelConfig(
            adapter="qwen_image_edit", pretrained=str(pretrained or tiny_qwen), dtype=dtype, use_lora=use_lora,
            lora=LoraSettings(rank=rank, alpha=alpha, target_modules=QWEN_LORA_TARGETS),
        )
        return QwenImageEditPolicy(config, "cpu")

    return make


@pytest.fixture
def stock(tiny_qwen):
    """A fresh stock QwenImageEditPipeline (fp32, no LoRA), loaded the way a user loads one."""
    import models.qwen_image_edit  # noqa: F401  (defines the torchvision-free processor class)
    from diffusers import QwenImageEditPipeline

    pipe = QwenImageEditPipeline.from_pretrained(str(tiny_qwen), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def source_images(count: int, seed: int = 0, size: tuple[int, int] = (RESOLUTION, RESOLUTION)) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(count)]


def stock_prompt_embeds(pipe, prompt: str, image: np.ndarray) -> torch.Tensor:
    """[1, L, D] embeddings of one instruction with its image, as the stock __call__ computes them."""
    with torch.no_grad():
        embeds, mask = pipe.encode_prompt(prompt=[prompt], image=Image.fromarray(image))
    assert mask is None  # one prompt: nothing padded
    return embeds


def stock_image_latents(pipe, image: np.ndarray) -> torch.Tensor:
    """[1, S, 16] packed source latents through the stock preprocess + prepare_latents path."""
    pixels = pipe.image_processor.preprocess(Image.fromarray(image), RESOLUTION, RESOLUTION).unsqueeze(2)
    with torch.no_grad():
        _, image_latents = pipe.prepare_latents(
            pixels, 1, CHANNELS, RESOLUTION, RESOLUTION, torch.float32, "cpu", torch.Generator().manual_seed(0)
        )
    return image_latents


def pack(latents: torch.Tensor) -> torch.Tensor:
    """Unpacked [B, C, h, w] latents (the adapter's form) as the stock pipeline's [B, S, 4C] tokens."""
    from diffusers import QwenImageEditPipeline

    batch, channels, height, width = latents.shape
    return QwenImageEditPipeline._pack_latents(latents, batch, channels, height, width)


def unpack(tokens: torch.Tensor) -> torch.Tensor:
    """The stock pipeline's tokens of a RESOLUTION-square image as [B, C, h, w] latents."""
    from diffusers import QwenImageEditPipeline

    return QwenImageEditPipeline._unpack_latents(tokens, RESOLUTION, RESOLUTION, RESOLUTION // (2 * GRID))[:, :, 0]


def direct_velocity(network, latents, sigma, embeds, image_latents) -> torch.Tensor:
    """One unguided transformer call the way the stock pipeline makes it (unpadded text, no mask),
    on unpacked latents [B, C, h, w]."""
    tokens = pack(latents)
    with torch.no_grad():
        out = network(
            hidden_states=torch.cat([tokens, image_latents], dim=1), timestep=sigma,
            encoder_hidden_states=embeds, encoder_hidden_states_mask=None,
            img_shapes=[[(1, GRID, GRID), (1, GRID, GRID)]] * latents.shape[0], return_dict=False,
        )[0]
    return unpack(out[:, : tokens.shape[1]].float())


def random_latents(batch: int, seed: int = 0) -> torch.Tensor:
    """Unpacked latents [B, C, h, w] of a RESOLUTION-square image."""
    return torch.randn((batch, CHANNELS, 2 * GRID, 2 * GRID), generator=torch.Generator().manual_seed(seed))


def assert_images_match(ours: np.ndarray, expected: np.ndarray) -> None:
    """uint8 images equal up to rounding: a value at .5 may move by one level between kernels."""
    assert ours.shape == expected.shape
    diff = np.abs(ours.astype(np.int16) - expected.astype(np.int16))
    assert diff.max() <= 1, diff.max()
    assert (diff > 0).mean() < 1e-3, (diff > 0).mean()


def sde_settings():
    from rl.rollout import SDESettings

    return SDESettings(dynamics="flow_sde", noise_level=0.7)


# ------------------------------------------------------------------ the tiny pipeline


def test_tiny_pipeline_is_deterministic_and_loads_offline_through_from_pretrained(tiny_qwen, tmp_path):
    import models.qwen_image_edit  # noqa: F401
    from diffusers import AutoencoderKLQwenImage, QwenImageEditPipeline, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLForConditionalGeneration

    from models.fixtures.qwen_image_edit import build_tiny_qwen_image_edit, ensure_tiny_qwen_image_edit, main

    pipe = QwenImageEditPipeline.from_pretrained(str(tiny_qwen))
    assert isinstance(pipe.transformer, QwenImageTransformer2DModel)
    assert isinstance(pipe.vae, AutoencoderKLQwenImage)
    assert isinstance(pipe.text_encoder, Qwen2_5_VLForConditionalGeneration)
    assert pipe.transformer.config.num_layers == 2
    # The processor turns the prompt template's image placeholder into the VL model's image tokens.
    tokenizer = pipe.processor.tokenizer
    inputs = pipe.processor(text=["<|vision_start|><|image_pad|><|vision_end|>hi"], images=[Image.fromarray(source_images(1)[0])], return_tensors="pt")
    assert int((inputs["input_ids"] == tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum()) > 1
    assert pipe.text_encoder.config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    # The pipeline drops the template's first 64 tokens (the system prompt of the real tokenizer);
    # the tiny tokenizer must make them exactly the system prompt too, so embeddings start at the image.
    ids = tokenizer(pipe.prompt_template_encode.format("make it red"))["input_ids"]
    assert ids[pipe.prompt_template_encode_start_idx] == tokenizer.convert_tokens_to_ids("<|vision_start|>")

    # Same seed, same weights; another seed (through the CLI), other weights. ensure_* reuses an
    # existing build.
    same = build_tiny_qwen_image_edit(tmp_path / "same", seed=0)
    other = tmp_path / "other"
    main([str(other), "--seed", "1"])
    reference = pipe.transformer.state_dict()
    for path, equal in ((same, True), (other, False)):
        weights = QwenImageTransformer2DModel.from_pretrained(str(path), subfolder="transformer").state_dict()
        assert all(torch.equal(weights[k], reference[k]) for k in reference) == equal
    stamp = (tiny_qwen / "model_index.json").stat().st_mtime_ns
    assert ensure_tiny_qwen_image_edit(tiny_qwen, seed=1) == tiny_qwen
    assert (tiny_qwen / "model_index.json").stat().st_mtime_ns == stamp


# ------------------------------------------------------------------ encode


def test_encode_matches_the_stock_prompt_and_image_encoding(make_policy, stock):
    policy = make_policy()
    images = source_images(3)
    cond = policy.encode(PROMPTS, images)

    for i, (prompt, image) in enumerate(zip(PROMPTS, images)):
        expected = stock_prompt_embeds(stock, prompt, image)[0]
        length = expected.shape[0]
        assert int(cond.prompt_mask[i].sum()) == length and bool(cond.prompt_mask[i, :length].all())
        torch.testing.assert_close(cond.prompt_embeds[i, :length], expected, rtol=0, atol=1e-6)
        # The negative prompt sees the same source image, so it is per row.
        negative = stock_prompt_embeds(stock, " ", image)[0]
        assert int(cond.negative_mask[i].sum()) == negative.shape[0]
        torch.testing.assert_close(cond.negative_embeds[i, : negative.shape[0]], negative, rtol=0, atol=1e-6)
        torch.testing.assert_close(cond.image_latents[i], stock_image_latents(stock, image)[0], rtol=0, atol=1e-6)
    assert cond.image_grid == (GRID, GRID)
    # The VL encoder must actually read the image: another image, other embeddings.
    assert not torch.allclose(stock_prompt_embeds(stock, " ", images[0]), stock_prompt_embeds(stock, " ", images[1]))

    index = torch.tensor([2, 0, 2])
    taken = cond.take(index)
    longest = int(cond.prompt_mask[index].sum(dim=1).max())
    assert taken.prompt_embeds.shape[1] == longest
    assert torch.equal(taken.prompt_embeds, cond.prompt_embeds[index, :longest])
    assert torch.equal(taken.prompt_mask, cond.prompt_mask[index, :longest])
    assert torch.equal(taken.image_latents, cond.image_latents[index])


def test_checkpoint_declaring_the_stock_processor_loads_without_torchvision(make_policy, stock, tiny_qwen, tmp_path):
    """Qwen/Qwen-Image-Edit declares transformers' Qwen2VLProcessor, whose video processor needs
    torchvision; without it the adapter loads the same files with the image-only processor."""
    import importlib.util
    import json
    import shutil

    from transformers import Qwen2VLProcessor

    from models.qwen_image_edit import ImageOnlyQwen2VLProcessor

    checkpoint = tmp_path / "stock-processor"
    shutil.copytree(tiny_qwen, checkpoint)
    index = json.loads((checkpoint / "model_index.json").read_text())
    index["processor"] = ["transformers", "Qwen2VLProcessor"]
    (checkpoint / "model_index.json").write_text(json.dumps(index))
    policy = make_policy(pretrained=checkpoint)
    if importlib.util.find_spec("torchvision") is None:
        with pytest.raises(OSError, match="video processor"):
            Qwen2VLProcessor.from_pretrained(str(checkpoint / "processor"))
        assert isinstance(policy.pipe.processor, ImageOnlyQwen2VLProcessor)
    image = source_images(1)[0]
    cond = policy.encode(PROMPTS[:1], [image])
    torch.testing.assert_close(cond.prompt_embeds[0], stock_prompt_embeds(stock, PROMPTS[0], image)[0], rtol=0, atol=1e-6)


def test_encode_rejects_missing_or_mismatched_source_images(make_policy):
    policy = make_policy()
    with pytest.raises(ValueError, match="source image"):
        policy.encode(PROMPTS[:1])
    with pytest.raises(ValueError, match="2 instructions but 1 source images"):
        policy.encode(PROMPTS[:2], source_images(1))
    with pytest.raises(ValueError, match="multiples of 8"):
        policy.encode(PROMPTS[:1], [np.zeros((60, 64, 3), dtype=np.uint8)])


# ------------------------------------------------------------------ whole samples


def stock_sample(pipe, module, image: np.ndarray, prompt: str, latents: torch.Tensor, num_steps: int, true_cfg_scale: float, output_type: str):
    """The stock __call__ with the VAE condition kept at the caller's size (see the module docstring),
    the output of the source image's size: final packed latents [1, S, 16] (output_type="latent")
    or the uint8 image [H, W, 3] ("np")."""
    real = module.calculate_dimensions
    height, width = image.shape[:2]

    def caller_size(target_area, ratio):
        computed = real(target_area, ratio)  # (width, height[, None])
        if target_area != 1024 * 1024:  # the Plus pipeline's 384x384 VL condition keeps its own size
            return computed
        return (width, height, *computed[2:])

    with mock.patch.object(module, "calculate_dimensions", caller_size):
        images = pipe(
            image=Image.fromarray(image), prompt=prompt, negative_prompt=" ", true_cfg_scale=true_cfg_scale,
            num_inference_steps=num_steps, latents=latents, output_type=output_type,
        ).images
    return images if output_type == "latent" else np.round(images[0] * 255).astype(np.uint8)


def packed_noise(pipe, generator_seed: int, size: tuple[int, int] = (RESOLUTION, RESOLUTION)) -> torch.Tensor:
    """[1, S, 16] noise drawn by hand: [C, h, w] from one generator, packed by the pipeline."""
    height, width = size[0] // 4, size[1] // 4
    noise = torch.randn((CHANNELS, height, width), generator=torch.Generator().manual_seed(generator_seed))[None]
    return pipe._pack_latents(noise, 1, CHANNELS, height, width)


def initial_latents(pipe, seed: int, epoch: int, sample_id: int, size: tuple[int, int] = (RESOLUTION, RESOLUTION)) -> torch.Tensor:
    """A rollout sample's starting noise: its generator is seeded by (seed, epoch, sample id)."""
    from rl.rollout import sample_seed

    return packed_noise(pipe, sample_seed(seed, epoch, sample_id), size)


@pytest.mark.parametrize(("plus", "size"), [(False, (RESOLUTION, RESOLUTION)), (True, (RESOLUTION, RESOLUTION)), (False, (48, 80))], ids=["edit", "edit_plus", "edit_48x80"])
def test_ode_rollout_equals_the_stock_pipeline_call(make_policy, stock, tiny_qwen, tmp_path, monkeypatch, plus, size):
    from diffusers import QwenImageEditPlusPipeline
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit, pipeline_qwenimage_edit_plus

    from rl.rollout import rollout

    module = pipeline_qwenimage_edit
    pretrained = tiny_qwen
    if plus:  # the same weights as a Plus (2509 / 2511) pipeline
        module = pipeline_qwenimage_edit_plus
        pretrained = tmp_path / "plus"
        QwenImageEditPlusPipeline.from_pretrained(str(tiny_qwen)).save_pretrained(pretrained)
        stock = QwenImageEditPlusPipeline.from_pretrained(str(pretrained), dtype=torch.float32)
        stock.set_progress_bar_config(disable=True)
    policy = make_policy(pretrained=pretrained)
    assert type(policy.pipe) is type(stock)
    num_steps, guidance, seed, epoch = 6, 4.0, 3, 1
    images, prompts, sample_ids = source_images(2, size=size), PROMPTS[:2], [5, 9]
    # The final latents the rollout decodes: compared too, because a random tiny VAE maps
    # small latent differences to identical uint8 images.
    finals, decode = [], policy.decode

    def recording_decode(latents, cond=None):
        finals.append(latents.clone())
        return decode(latents, cond)

    monkeypatch.setattr(policy, "decode", recording_decode)
    batch = rollout(
        policy, policy.encode(prompts, images), torch.arange(2), torch.tensor(sample_ids), torch.arange(2),
        seed=seed, epoch=epoch, num_steps=num_steps, guidance_scale=guidance, size=size,
        batch_size=2, sde=sde_settings(), sde_steps=[],
    )
    assert batch.images.dtype == torch.uint8 and tuple(batch.images.shape) == (2, *size, 3)
    for i in range(2):
        latents = initial_latents(stock, seed, epoch, sample_ids[i], size)
        expected = stock_sample(stock, module, images[i], prompts[i], latents, num_steps, guidance, "latent")
        torch.testing.assert_close(pack(finals[0][i : i + 1]), expected, rtol=0, atol=2e-5)
        expected_image = stock_sample(stock, module, images[i], prompts[i], latents, num_steps, guidance, "np")
        assert_images_match(batch.images[i].numpy(), expected_image)
        # The schedule the stock call used (dynamic shift for this size) is the rollout's.
        torch.testing.assert_close(batch.sigmas, stock.scheduler.sigmas, rtol=0, atol=0)
    # The comparison can fail: without guidance the stock sample is another one.
    unguided = stock_sample(stock, module, images[1], prompts[1], latents, num_steps, 1.0, "latent")
    assert (unguided - pack(finals[0][1:])).abs().max() > 1e-3


# ------------------------------------------------------------------ velocity


def test_guided_velocity_is_one_forward_equal_to_two_stock_calls_with_norm_rescale(make_policy, stock):
    policy = make_policy()
    perturb_lora(policy.network)  # the velocity must be that of the adapted network
    images = source_images(3, seed=1)
    cond = policy.encode(PROMPTS, images)
    latents = random_latents(3)
    sigma = torch.tensor([0.95, 0.5, 0.2])  # per-sample sigmas
    guidance = 4.0

    with torch.no_grad():
        (velocity, unguided), batches = forward_batch_sizes(
            policy.network, lambda: (policy.velocity(latents, sigma, cond, guidance), policy.velocity(latents, sigma, cond, 1.0))
        )
    assert batches == [6, 3], "true CFG must be ONE forward of 2B rows; no CFG one forward of B"

    for i, (prompt, image) in enumerate(zip(PROMPTS, images)):
        image_latents = stock_image_latents(stock, image)
        args = (policy.network, latents[i : i + 1], sigma[i : i + 1])
        # The norm rescale is per token (over a packed token's 4C features): compared as tokens.
        conditional = pack(direct_velocity(*args, stock_prompt_embeds(stock, prompt, image), image_latents))
        negative = pack(direct_velocity(*args, stock_prompt_embeds(stock, " ", image), image_latents))
        combined = negative + guidance * (conditional - negative)
        expected = combined * (torch.linalg.vector_norm(conditional, dim=-1, keepdim=True) / torch.linalg.vector_norm(combined, dim=-1, keepdim=True))
        torch.testing.assert_close(pack(velocity[i : i + 1]), expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(pack(unguided[i : i + 1]), conditional, rtol=0, atol=1e-5)
    assert velocity.dtype == torch.float32 and velocity.shape == latents.shape
    assert (velocity - unguided).abs().max() > 1e-3  # guidance must matter, or the check above proves nothing


# ------------------------------------------------------------------ rollouts


def rollout_of(policy, cond, sample_ids, sde_steps, *, guidance=4.0, num_steps=4):
    from rl.rollout import rollout

    count = len(sample_ids)
    return rollout(
        policy, cond, torch.arange(count), torch.tensor(sample_ids), torch.arange(count),
        seed=7, epoch=0, num_steps=num_steps, guidance_scale=guidance, size=RESOLUTION,
        batch_size=count, sde=sde_settings(), sde_steps=sde_steps,
    )


def test_rollouts_depend_on_the_source_image(make_policy):
    from rl.rollout import transition

    policy = make_policy()
    first, second = source_images(2, seed=2)
    prompt = [PROMPTS[0]]
    conds = [policy.encode(prompt, [image]) for image in (first, second, first)]
    runs = [rollout_of(policy, cond, [0], [0, 1]) for cond in conds]
    # Same instruction, same noise: the source image alone changes the trajectory and the edit.
    assert not torch.equal(runs[0].images, runs[1].images)
    assert (runs[0].next_latents - runs[1].next_latents).abs().max() > 1e-4
    # ... and the policy's density of a transition: the first run's steps under the second source.
    # (A sample's own log-prob depends only on its noise, so the recorded values cannot show it.)
    sigmas = runs[0].sigmas
    with torch.no_grad():
        other = transition(
            policy, runs[0].latents[:, 1], sigmas[1], sigmas[2], sigmas[1], conds[1], 4.0, sde_settings(),
            prev_sample=runs[0].next_latents[:, 1],
        )
    assert (other.log_prob - runs[0].log_probs[:, 1]).abs().max() > 1e-6
    # The same source encoded again reproduces the rollout exactly.
    assert torch.equal(runs[0].images, runs[2].images)
    assert torch.equal(runs[0].log_probs, runs[2].log_probs)
    assert torch.equal(runs[0].next_latents, runs[2].next_latents)


def test_recorded_log_probs_are_on_policy(make_policy):
    from rl.rollout import transition

    policy = make_policy()
    perturb_lora(policy.network)
    cond = policy.encode(PROMPTS, source_images(3, seed=3))
    sde_steps = [0, 1, 2]
    batch = rollout_of(policy, cond, [0, 1, 2], sde_steps)
    assert tuple(batch.log_probs.shape) == (3, len(sde_steps))
    sigmas = batch.sigmas
    with torch.no_grad():
        for j, step_index in enumerate(batch.step_indices):
            step = transition(
                policy, batch.latents[:, j], sigmas[step_index], sigmas[step_index + 1], sigmas[1], cond.take(batch.prompt_rows),
                4.0, sde_settings(), prev_sample=batch.next_latents[:, j],
            )
            ratio = torch.exp(step.log_prob - batch.log_probs[:, j])
            assert (ratio - 1).abs().max() < 1e-6, (ratio - 1).abs().max()
            # Training batches mix samples differently (other text padding): still on-policy.
            for k in range(3):
                alone = transition(
                    policy, batch.latents[k : k + 1, j], sigmas[step_index], sigmas[step_index + 1], sigmas[1],
                    cond.take(batch.prompt_rows[k : k + 1]), 4.0, sde_settings(), prev_sample=batch.next_latents[k : k + 1, j],
                )
                assert (torch.exp(alone.log_prob - batch.log_probs[k : k + 1, j]) - 1).abs().max() < 1e-6


# ------------------------------------------------------------------ reference mode and training state


def test_reference_is_the_base_transformer_and_lora_comes_back(make_policy, tiny_qwen, stock):
    from diffusers import QwenImageTransformer2DModel

    policy = make_policy()
    perturb_lora(policy.network)
    base = QwenImageTransformer2DModel.from_pretrained(str(tiny_qwen), subfolder="transformer", dtype=torch.float32)
    image = source_images(1, seed=4)[0]
    cond = policy.encode(PROMPTS[:1], [image])
    latents, sigma = random_latents(1, seed=4), torch.tensor([0.7])
    expected = direct_velocity(base, latents, sigma, stock_prompt_embeds(stock, PROMPTS[0], image), stock_image_latents(stock, image))
    with torch.no_grad():
        with policy.reference() as reference:
            in_reference = policy.velocity(latents, sigma, cond, 1.0, network=reference)
        adapted = policy.velocity(latents, sigma, cond, 1.0)
    torch.testing.assert_close(in_reference, expected, rtol=0, atol=1e-5)
    assert (adapted - expected).abs().max() > 1e-3


def test_full_fine_tuning_reference_is_a_frozen_copy(make_policy, tiny_qwen, stock):
    from diffusers import QwenImageTransformer2DModel

    policy = make_policy(use_lora=False)
    assert all(p.dtype == torch.float32 for p in policy.trainable_parameters())
    assert len(policy.trainable_parameters()) == len(list(policy.network.parameters()))
    with torch.no_grad():
        for param in policy.network.parameters():
            param.add_(0.05)
    base = QwenImageTransformer2DModel.from_pretrained(str(tiny_qwen), subfolder="transformer", dtype=torch.float32)
    image = source_images(1, seed=5)[0]
    cond = policy.encode(PROMPTS[:1], [image])
    latents, sigma = random_latents(1, seed=5), torch.tensor([0.4])
    expected = direct_velocity(base, latents, sigma, stock_prompt_embeds(stock, PROMPTS[0], image), stock_image_latents(stock, image))
    with torch.no_grad():
        with policy.reference() as reference:
            in_reference = policy.velocity(latents, sigma, cond, 1.0, network=reference)
        trained = policy.velocity(latents, sigma, cond, 1.0)
    torch.testing.assert_close(in_reference, expected, rtol=0, atol=1e-5)
    assert (trained - expected).abs().max() > 1e-3


def test_saved_lora_loads_into_the_stock_pipeline_with_its_alpha(make_policy, stock, tmp_path):
    policy = make_policy(rank=4, alpha=8)  # alpha != rank: the scale must survive the file
    perturb_lora(policy.network)
    policy.save_trainable(tmp_path)
    stock.load_lora_weights(str(tmp_path))

    image = source_images(1, seed=6)[0]
    cond = policy.encode(PROMPTS[1:2], [image])
    latents, sigma = random_latents(1, seed=6), torch.tensor([0.6])
    with torch.no_grad():
        ours = policy.velocity(latents, sigma, cond, 1.0)
    expected = direct_velocity(stock.transformer, latents, sigma, stock_prompt_embeds(stock, PROMPTS[1], image), stock_image_latents(stock, image))
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)

    # The trainer's resume path reads the same file back into a fresh policy.
    fresh = make_policy(rank=4, alpha=8)
    fresh.load_trainable(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fresh.velocity(latents, sigma, cond, 1.0), ours, rtol=0, atol=1e-6)


def test_bf16_policy_trains_only_fp32_lora_and_some_adapters_get_no_gradient(make_policy):
    policy = make_policy(dtype="bf16")
    trainable = {name for name, p in policy.network.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    assert all(p.dtype == torch.float32 for p in policy.trainable_parameters())
    frozen = [p for name, p in policy.network.named_parameters() if name not in trainable]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    # Two adapter matrices per targeted linear layer: 8 targets x 2 blocks.
    assert len(trainable) == 2 * len(QWEN_LORA_TARGETS) * 2

    perturb_lora(policy.network)
    cond = policy.encode(PROMPTS[:2], source_images(2, seed=7))
    velocity = policy.velocity(random_latents(2, seed=7), torch.tensor([0.8, 0.3]), cond, 4.0)
    assert velocity.dtype == torch.float32
    velocity.square().mean().backward()
    without_grad = {name for name, p in policy.network.named_parameters() if p.requires_grad and p.grad is None}
    # The last block's text-stream outputs feed nothing: DDP needs find_unused_parameters.
    assert without_grad and all(".1.attn.add_q_proj" in n or ".1.attn.to_add_out" in n for n in without_grad)
    assert type(policy).find_unused_parameters is True


# ------------------------------------------------------------------ schedule and shapes


def test_sigmas_are_the_stock_dynamically_shifted_schedule(make_policy, stock):
    policy = make_policy()
    config = stock.scheduler.config
    schedules = {}
    for resolution in (64, 256):
        # Qwen-Image's mu: linear in the image token count between the config's two anchors.
        tokens = (resolution // 8) ** 2
        slope = (config.max_shift - config.base_shift) / (config.max_image_seq_len - config.base_image_seq_len)
        mu = config.base_shift + slope * (tokens - config.base_image_seq_len)
        stock.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 8, 8), mu=mu)
        sigmas = policy.sigmas(8, resolution)
        assert sigmas.dtype == torch.float32 and sigmas.shape == (9,)
        assert sigmas[0] == 1.0 and sigmas[-1] == 0.0
        torch.testing.assert_close(sigmas, stock.scheduler.sigmas, rtol=0, atol=1e-7)
        schedules[resolution] = sigmas
    # More tokens, stronger shift; both end at the config's shift_terminal, then 0.
    assert (schedules[256][1:-2] > schedules[64][1:-2]).all()


def test_initial_noise_and_decode_shapes(make_policy, stock):
    policy = make_policy()
    generators = [torch.Generator().manual_seed(s) for s in (1, 2)]
    noise = policy.initial_noise(generators, RESOLUTION, None)
    assert noise.dtype == torch.float32 and tuple(noise.shape) == (2, CHANNELS, 2 * GRID, 2 * GRID)
    torch.testing.assert_close(pack(noise[1:]), packed_noise(stock, 2), rtol=0, atol=0)

    images = policy.decode(noise)
    assert images.dtype == torch.uint8 and images.device.type == "cpu"
    assert tuple(images.shape) == (2, RESOLUTION, RESOLUTION, 3)
    # The stock decode: unpack, de-normalise with the VAE's statistics, decode one frame.
    latents = stock._unpack_latents(pack(noise), RESOLUTION, RESOLUTION, stock.vae_scale_factor)
    mean = torch.tensor(stock.vae.config.latents_mean).view(1, CHANNELS, 1, 1, 1)
    std = torch.tensor(stock.vae.config.latents_std).view(1, CHANNELS, 1, 1, 1)
    with torch.no_grad():
        decoded = stock.vae.decode(latents * std + mean, return_dict=False)[0][:, :, 0]
    expected = np.round(stock.image_processor.postprocess(decoded, output_type="np") * 255).astype(np.uint8)
    assert_images_match(images.numpy(), expected)
    with pytest.raises(ValueError, match="multiple of 8"):
        policy.initial_noise(generators, 60, None)

