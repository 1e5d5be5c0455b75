"""The FLUX.1 adapters (models/flux.py: FluxPolicy for FLUX.1 [dev]; models/flux_kontext.py: FluxKontextPolicy for FLUX.1
Kontext) against the stock diffusers pipelines and the raw transformer, and the tiny configs
through the trainer's CLI.

Reference for whole samples: the stock `FluxPipeline.__call__` / `FluxKontextPipeline.__call__`,
given our initial noise as `latents`. Kontext's call is kept at the caller's size with
`_auto_resize=False` and `max_area` = the image's own area (the adapter uses source images at the
training resolution instead of Kontext's preferred ~1 MP ones); everything else (prompt encoding,
VAE, packing, position ids, scheduler, guidance embedding, decoding) is the stock code path.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import ROOT, check_saved_lora, forward_batch_sizes, ode_rollout, perturb_lora, pixel_diff, run_cli

RESOLUTION = 64  # tiny VAE x8 and 2x2 packing: a 4x4 grid of packed tokens
GRID = RESOLUTION // 16
CHANNELS = 16  # VAE latent channels (64 packed)
TEXT_LENGTH = 32  # T5 tokens (model.max_sequence_length of the tiny configs)
ADAPTERS = ["flux", "flux_kontext"]
# FLUX.1 [dev]'s and Kontext [dev]'s stock guidance (embedded, not CFG).
GUIDANCE = {"flux": 3.5, "flux_kontext": 2.5}
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
PROMPTS = ["a red cube on a wooden table", "two cats", "the sea at night, oil painting"]
INSTRUCTIONS = ["make the sky red", "add a small cat on the left", "remove it"]


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    """The two tiny pipelines, built once per module (same seed, so the same weights)."""
    from models.fixtures.flux import ensure_tiny_flux, ensure_tiny_flux_kontext

    root = tmp_path_factory.mktemp("models")
    return {
        "flux": ensure_tiny_flux(root / "tiny-flux", text_max_length=TEXT_LENGTH),
        "flux_kontext": ensure_tiny_flux_kontext(root / "tiny-flux-kontext", text_max_length=TEXT_LENGTH),
    }


@pytest.fixture
def make_policy(tiny_dirs):
    """Factory for a FluxPolicy / FluxKontextPolicy on its tiny pipeline (fp32, LoRA rank 4 / alpha 4 unless told)."""
    from models import adapter_class
    from models.config import LoraSettings, ModelConfig

    def make(adapter: str, *, dtype: str = "fp32", use_lora: bool = True, rank: int = 4, alpha: int = 4, pretrained: Path | None = None):
        config = ModelConfig(
            adapter=adapter, pretrained=str(pretrained or tiny_dirs[adapter]), dtype=dtype, use_lora=use_lora,
            max_sequence_length=TEXT_LENGTH, lora=LoraSettings(rank=rank, alpha=alpha, target_modules=LORA_TARGETS),
        )
        return adapter_class(adapter)(config, "cpu")

    return make


@pytest.fixture
def make_stock(tiny_dirs):
    """Factory for a fresh stock pipeline (fp32, no LoRA), loaded the way a user loads one."""
    from diffusers import FluxKontextPipeline, FluxPipeline

    def make(adapter: str):
        pipeline_class = FluxKontextPipeline if adapter == "flux_kontext" else FluxPipeline
        pipe = pipeline_class.from_pretrained(str(tiny_dirs[adapter]), dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    return make


def source_images(count: int, seed: int = 0, size: tuple[int, int] = (RESOLUTION, RESOLUTION)) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(count)]


def inputs(adapter: str, count: int, seed: int = 0, size: tuple[int, int] = (RESOLUTION, RESOLUTION)) -> tuple[list[str], list[np.ndarray] | None]:
    """Prompts (and, for Kontext, one source image each, of `size` (height, width)) for `count` rows."""
    if adapter == "flux_kontext":
        return INSTRUCTIONS[:count], source_images(count, seed, size)
    return PROMPTS[:count], None


def pack(latents: torch.Tensor) -> torch.Tensor:
    """Unpacked [B, C, h, w] latents (the adapter's form) as the stock pipeline's [B, S, 4C] tokens."""
    from diffusers import FluxPipeline

    return FluxPipeline._pack_latents(latents, *latents.shape)


def unpack(tokens: torch.Tensor, size: tuple[int, int] = (RESOLUTION, RESOLUTION)) -> torch.Tensor:
    """The stock pipeline's tokens of an image of `size` (height, width) as [B, C, h, w] latents."""
    from diffusers import FluxPipeline

    return FluxPipeline._unpack_latents(tokens, *size, 8)


def packed_noise(pipe, generator_seed: int, size: tuple[int, int] = (RESOLUTION, RESOLUTION)) -> torch.Tensor:
    """[1, S, 64] noise drawn by hand: [C, h, w] from one generator, packed by the pipeline."""
    height, width = size[0] // 8, size[1] // 8
    noise = torch.randn((CHANNELS, height, width), generator=torch.Generator().manual_seed(generator_seed))[None]
    return pipe._pack_latents(noise, 1, CHANNELS, height, width)


def initial_latents(pipe, seed: int, epoch: int, sample_id: int, size: tuple[int, int] = (RESOLUTION, RESOLUTION)) -> torch.Tensor:
    """A rollout sample's starting noise: its generator is seeded by (seed, epoch, sample id)."""
    from rl.rollout import sample_seed

    return packed_noise(pipe, sample_seed(seed, epoch, sample_id), size)


def random_latents(batch: int, seed: int = 0) -> torch.Tensor:
    """Unpacked latents [B, C, h, w] of a RESOLUTION-square image."""
    return torch.randn((batch, CHANNELS, 2 * GRID, 2 * GRID), generator=torch.Generator().manual_seed(seed))


def stock_sample(
    pipe, prompt: str, image: np.ndarray | None, latents: torch.Tensor, num_steps: int, guidance: float, output_type: str,
    size: tuple[int, int] = (RESOLUTION, RESOLUTION),
):
    """The stock __call__ for one sample of `size` (height, width): final packed latents [1, S, 64]
    (output_type="latent") or the uint8 image [H, W, 3] ("np")."""
    height, width = size
    extra = {}
    if image is not None:
        extra = {"image": Image.fromarray(image), "_auto_resize": False, "max_area": height * width}
    out = pipe(
        prompt=prompt, latents=latents, num_inference_steps=num_steps, guidance_scale=guidance,
        height=height, width=width, max_sequence_length=TEXT_LENGTH, output_type=output_type, **extra,
    ).images
    return out if output_type == "latent" else np.round(out[0] * 255).astype(np.uint8)


def stock_image_latents(pipe, image: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """[1, S_cond, 64] packed source latents and their [S_cond, 3] ids through the stock
    preprocess + prepare_latents path of the Kontext pipeline."""
    pixels = pipe.image_processor.preprocess(Image.fromarray(image), RESOLUTION, RESOLUTION)
    with torch.no_grad():
        _, image_latents, _, image_ids = pipe.prepare_latents(
            pixels, 1, CHANNELS, RESOLUTION, RESOLUTION, torch.float32, "cpu", torch.Generator().manual_seed(0)
        )
    return image_latents, image_ids


def direct_velocity(pipe, network, latents, sigma, prompts, guidance, images=None) -> torch.Tensor:
    """One transformer call per sample the way the stock __call__ makes it: the stock prompt
    encoding, the stock ids, `guidance` embedded; Kontext's source tokens appended and cut off.
    Unpacked latents [B, C, h, w] of a RESOLUTION-square image in and out."""
    rows = []
    tokens = pack(latents)
    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            embeds, pooled, text_ids = pipe.encode_prompt(prompt=[prompt], prompt_2=None, max_sequence_length=TEXT_LENGTH)
            hidden = tokens[i : i + 1]
            ids = pipe._prepare_latent_image_ids(1, GRID, GRID, "cpu", torch.float32)
            if images is not None:
                image_latents, image_ids = stock_image_latents(pipe, images[i])
                hidden = torch.cat([hidden, image_latents], dim=1)
                ids = torch.cat([ids, image_ids])
            out = network(
                hidden_states=hidden, timestep=sigma[i : i + 1], guidance=torch.full([1], guidance),
                pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=text_ids, img_ids=ids, return_dict=False,
            )[0]
            rows.append(unpack(out[:, : tokens.shape[1]].float()))
    return torch.cat(rows)


def sde_settings():
    from rl.rollout import SDESettings

    return SDESettings(dynamics="flow_sde", noise_level=0.7)


# ------------------------------------------------------------------ the tiny pipelines


def test_tiny_pipelines_load_through_from_pretrained_deterministically(tiny_dirs, tmp_path):
    """The fixtures are real FLUX.1 / Kontext pipelines a user's loading code reads, the same seed
    gives the same weights, and the trainer's `ensure_tiny` finds the builders by adapter name."""
    from diffusers import AutoencoderKL, FluxKontextPipeline, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    from models import adapter_class
    from models.config import ModelConfig
    from models.fixtures import ensure_tiny
    from models.fixtures.flux import build_tiny_flux, ensure_tiny_flux, main
    from models.flux import FluxPolicy
    from models.flux_kontext import FluxKontextPolicy

    pipe = FluxPipeline.from_pretrained(str(tiny_dirs["flux"]))
    assert isinstance(pipe.transformer, FluxTransformer2DModel) and pipe.transformer.config.guidance_embeds
    assert isinstance(pipe.vae, AutoencoderKL) and pipe.vae_scale_factor == 8
    assert pipe.transformer.config.in_channels == 4 * pipe.vae.config.latent_channels == 4 * CHANNELS
    assert isinstance(pipe.text_encoder, CLIPTextModel) and isinstance(pipe.text_encoder_2, T5EncoderModel)
    kontext = FluxKontextPipeline.from_pretrained(str(tiny_dirs["flux_kontext"]))
    reference = pipe.transformer.state_dict()
    assert all(torch.equal(kontext.transformer.state_dict()[k], reference[k]) for k in reference)

    same = build_tiny_flux(tmp_path / "same", seed=0, text_max_length=TEXT_LENGTH)
    other = tmp_path / "other"
    main([str(other), "--seed", "1", "--kontext"])
    assert FluxKontextPipeline.load_config(str(other))["_class_name"] == "FluxKontextPipeline"
    for path, equal in ((same, True), (other, False)):
        weights = FluxTransformer2DModel.from_pretrained(str(path), subfolder="transformer").state_dict()
        assert all(torch.equal(weights[k], reference[k]) for k in reference) == equal
    stamp = (tiny_dirs["flux"] / "model_index.json").stat().st_mtime_ns
    assert ensure_tiny_flux(tiny_dirs["flux"], seed=1) == tiny_dirs["flux"]
    assert (tiny_dirs["flux"] / "model_index.json").stat().st_mtime_ns == stamp

    built = ensure_tiny(ModelConfig(adapter="flux_kontext", pretrained=str(tmp_path / "by-name"), max_sequence_length=TEXT_LENGTH))
    assert FluxKontextPipeline.load_config(str(built))["_class_name"] == "FluxKontextPipeline"
    assert adapter_class("flux") is FluxPolicy and adapter_class("flux_kontext") is FluxKontextPolicy


# ------------------------------------------------------------------ encode and schedule


def test_encode_matches_the_stock_prompt_and_source_encoding(make_policy, make_stock):
    """Rows hold the stock pipeline's T5 and pooled CLIP embeddings (and Kontext's packed source
    latents), and take() picks them per sample."""
    for adapter in ADAPTERS:
        policy, stock = make_policy(adapter), make_stock(adapter)
        prompts, images = inputs(adapter, 3)
        cond = policy.encode(prompts, images)
        with torch.no_grad():
            embeds, pooled, _ = stock.encode_prompt(prompt=prompts, prompt_2=None, max_sequence_length=TEXT_LENGTH)
        torch.testing.assert_close(cond.prompt_embeds, embeds, rtol=0, atol=1e-6)
        torch.testing.assert_close(cond.pooled_embeds, pooled, rtol=0, atol=1e-6)
        assert not torch.allclose(cond.prompt_embeds[0], cond.prompt_embeds[1])
        index = torch.tensor([2, 0, 2])
        taken = cond.take(index)
        assert torch.equal(taken.prompt_embeds, cond.prompt_embeds[index]) and torch.equal(taken.pooled_embeds, cond.pooled_embeds[index])
        if images is None:
            assert cond.image_latents is None and taken.image_latents is None
            continue
        assert cond.image_grid == (GRID, GRID)
        for i, image in enumerate(images):
            torch.testing.assert_close(cond.image_latents[i], stock_image_latents(stock, image)[0][0], rtol=0, atol=1e-6)
        assert not torch.allclose(cond.image_latents[0], cond.image_latents[1])
        assert torch.equal(taken.image_latents, cond.image_latents[index])


def test_adapters_reject_the_wrong_inputs_and_checkpoints(make_policy, tiny_dirs):
    """A user who mixes up text-to-image and editing (data or checkpoint) gets an error naming the fix."""
    flux, kontext = make_policy("flux"), make_policy("flux_kontext")
    with pytest.raises(ValueError, match="model.adapter=flux_kontext"):
        flux.encode(PROMPTS[:1], source_images(1))
    with pytest.raises(ValueError, match="source image"):
        kontext.encode(INSTRUCTIONS[:1])
    with pytest.raises(ValueError, match="2 instructions but 1 source images"):
        kontext.encode(INSTRUCTIONS[:2], source_images(1))
    with pytest.raises(ValueError, match="multiples of 16"):
        kontext.encode(INSTRUCTIONS[:1], [np.zeros((56, 64, 3), dtype=np.uint8)])
    with pytest.raises(ValueError, match="model.adapter=flux_kontext"):
        make_policy("flux", pretrained=tiny_dirs["flux_kontext"])
    with pytest.raises(ValueError, match="model.adapter=flux"):
        make_policy("flux_kontext", pretrained=tiny_dirs["flux"])
    with pytest.raises(ValueError, match="multiple of 16"):
        flux.sigmas(4, 72)


def test_sigmas_are_the_stock_dynamically_shifted_schedule(make_policy):
    """sigmas(N, resolution) is FLUX's schedule written out: linspace(1, 1/N, N) time-shifted with
    mu linear in the image token count (exp(mu) / (exp(mu) + 1/t - 1)), then 0; larger images
    shift more. Kontext's schedule counts only the noisy tokens."""
    flux, kontext = make_policy("flux"), make_policy("flux_kontext")
    config = flux.pipe.scheduler.config
    schedules = {}
    for size in ((64, 64), (512, 512), (48, 400)):
        tokens = (size[0] // 16) * (size[1] // 16)  # a non-square image counts its h x w tokens
        slope = (config.max_shift - config.base_shift) / (config.max_image_seq_len - config.base_image_seq_len)
        mu = config.base_shift + slope * (tokens - config.base_image_seq_len)
        t = np.linspace(1.0, 1 / 8, 8)
        expected = torch.tensor(np.append(np.exp(mu) / (np.exp(mu) + (1 / t - 1)), 0.0), dtype=torch.float32)
        sigmas = flux.sigmas(8, size)
        assert sigmas.dtype == torch.float32 and sigmas.shape == (9,) and sigmas[0] == 1.0 and sigmas[-1] == 0.0
        torch.testing.assert_close(sigmas, expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(kontext.sigmas(8, size), sigmas, rtol=0, atol=0)
        schedules[size] = sigmas
    torch.testing.assert_close(flux.sigmas(8, 64), schedules[64, 64], rtol=0, atol=0)  # one int: a square
    assert (schedules[512, 512][1:-1] > schedules[48, 400][1:-1]).all() and (schedules[48, 400][1:-1] > schedules[64, 64][1:-1]).all()


# ------------------------------------------------------------------ whole samples


@pytest.mark.parametrize("size", [(RESOLUTION, RESOLUTION), (48, 96)], ids=["square", "48x96"])
@pytest.mark.parametrize("adapter", ADAPTERS)
def test_ode_rollout_reproduces_the_stock_pipeline(adapter, size, make_policy, make_stock, monkeypatch):
    """Our deterministic sampler (rl.rollout with no SDE step) draws, from the same noise, the
    images of the stock pipeline, square or not: same schedule, guidance embedding, position ids,
    Kontext source tokens and decoding."""
    policy, stock = make_policy(adapter), make_stock(adapter)
    num_steps, guidance, seed, epoch, sample_ids = 6, GUIDANCE[adapter], 5, 2, [3, 7]
    prompts, images = inputs(adapter, 2, size=size)
    batch, finals = ode_rollout(
        policy, policy.encode(prompts, images), sample_ids, num_steps=num_steps, guidance=guidance, seed=seed, epoch=epoch,
        monkeypatch=monkeypatch, size=size,
    )
    finals = pack(finals)
    assert batch.images.dtype == torch.uint8 and tuple(batch.images.shape) == (2, *size, 3)
    for i in range(2):
        latents = initial_latents(stock, seed, epoch, sample_ids[i], size)
        image = None if images is None else images[i]
        expected = stock_sample(stock, prompts[i], image, latents, num_steps, guidance, "latent", size)
        torch.testing.assert_close(finals[i : i + 1], expected, rtol=0, atol=2e-5)
        # The stock call stepped through exactly our schedule, terminal 0 included.
        torch.testing.assert_close(batch.sigmas, stock.scheduler.sigmas, rtol=0, atol=1e-6)
        expected_image = stock_sample(stock, prompts[i], image, latents, num_steps, guidance, "np", size)
        diff = pixel_diff(batch.images[i], expected_image)
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (diff.max(), (diff > 0).mean())
    # Not a vacuous match: other prompts and noise give other images, another guidance another sample.
    assert pixel_diff(batch.images[0], batch.images[1]).max() > 10
    other = stock_sample(stock, prompts[1], None if images is None else images[1], latents, num_steps, 1.0, "latent", size)
    assert (other - finals[1:]).abs().max() > 1e-3


# ------------------------------------------------------------------ velocity


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_velocity_is_one_forward_with_the_guidance_embedded(adapter, make_policy, make_stock):
    """velocity() is ONE forward of B rows at any guidance (guidance-distilled: no CFG), equal to
    direct stock-style transformer calls with that guidance embedded, float32, noisy tokens only."""
    policy, stock = make_policy(adapter), make_stock(adapter)
    perturb_lora(policy.network)  # the velocity must be that of the adapted network
    prompts, images = inputs(adapter, 3, seed=1)
    cond = policy.encode(prompts, images)
    latents, sigma, guidance = random_latents(3), torch.tensor([0.95, 0.5, 0.2]), GUIDANCE[adapter]

    with torch.no_grad():
        (velocity, unguided), batches = forward_batch_sizes(
            policy.network, lambda: (policy.velocity(latents, sigma, cond, guidance), policy.velocity(latents, sigma, cond, 1.0))
        )
    assert batches == [3, 3]
    assert velocity.dtype == torch.float32 and velocity.shape == latents.shape
    torch.testing.assert_close(velocity, direct_velocity(stock, policy.network, latents, sigma, prompts, guidance, images), rtol=0, atol=1e-5)
    torch.testing.assert_close(unguided, direct_velocity(stock, policy.network, latents, sigma, prompts, 1.0, images), rtol=0, atol=1e-5)
    assert (velocity - unguided).abs().max() > 1e-3  # the embedding must matter, or the checks above prove nothing
    if images is not None:  # ... and so must the source image
        with torch.no_grad():
            swapped = policy.velocity(latents, sigma, policy.encode(prompts, images[::-1]), guidance)
        assert (swapped[0] - velocity[0]).abs().max() > 1e-4


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_reference_is_the_base_model_and_lora_comes_back(adapter, make_policy, make_stock, tiny_dirs):
    """reference() gives the base model's velocity (LoRA off), then the adapted one comes back,
    also after an exception inside the context."""
    from diffusers import FluxTransformer2DModel

    policy, stock = make_policy(adapter), make_stock(adapter)
    perturb_lora(policy.network)
    base = FluxTransformer2DModel.from_pretrained(str(tiny_dirs[adapter]), subfolder="transformer", dtype=torch.float32)
    prompts, images = inputs(adapter, 2, seed=4)
    cond = policy.encode(prompts, images)
    latents, sigma, guidance = random_latents(2, seed=4), torch.tensor([0.7, 0.3]), GUIDANCE[adapter]
    expected = direct_velocity(stock, base, latents, sigma, prompts, guidance, images)
    with torch.no_grad():
        adapted = policy.velocity(latents, sigma, cond, guidance)
        with policy.reference() as reference:
            inside = policy.velocity(latents, sigma, cond, guidance, network=reference)
        after = policy.velocity(latents, sigma, cond, guidance)
        with pytest.raises(RuntimeError, match="boom"):
            with policy.reference():
                raise RuntimeError("boom")
        after_error = policy.velocity(latents, sigma, cond, guidance)
    torch.testing.assert_close(inside, expected, rtol=0, atol=1e-5)
    assert (adapted - expected).abs().max() > 1e-3
    torch.testing.assert_close(after, adapted, rtol=0, atol=0)
    torch.testing.assert_close(after_error, adapted, rtol=0, atol=0)


# ------------------------------------------------------------------ saving and training


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_saved_lora_changes_the_stock_pipeline_as_our_velocity_predicts(adapter, make_policy, make_stock, monkeypatch, tmp_path):
    """A saved LoRA (alpha != rank) loads with the stock load_lora_weights and reproduces our
    velocity and rollout; resume reads it back (conftest.check_saved_lora)."""
    policy, stock = make_policy(adapter, rank=4, alpha=8), make_stock(adapter)
    prompts, images = inputs(adapter, 1, seed=6)
    image = None if images is None else images[0]
    guidance, num_steps, seed, epoch = GUIDANCE[adapter], 3, 1, 0
    noise = initial_latents(stock, seed, epoch, 0)
    cond = policy.encode(prompts, images)
    latents, sigma = random_latents(1, seed=6), torch.tensor([0.6])
    check_saved_lora(
        policy, lambda: make_policy(adapter, rank=4, alpha=8), stock, tmp_path,
        velocity_inputs=(latents, sigma, cond, guidance),
        stock_velocity=lambda: direct_velocity(stock, stock.transformer, latents, sigma, prompts, guidance, images),
        stock_final=lambda: stock_sample(stock, prompts[0], image, noise, num_steps, guidance, "latent"),
        our_final=lambda: pack(ode_rollout(policy, cond, [0], size=(RESOLUTION, RESOLUTION), num_steps=num_steps, guidance=guidance, seed=seed, epoch=epoch, monkeypatch=monkeypatch)[1]),
    )


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_bf16_policy_trains_fp32_lora_and_every_adapter_gets_a_gradient(adapter, make_policy):
    """Frozen weights in bf16, adapters in fp32, a finite fp32 velocity; every adapter gets a
    gradient, so DDP runs without find_unused_parameters."""
    policy = make_policy(adapter, dtype="bf16")
    trainable = {name for name, p in policy.network.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    assert all(p.dtype == torch.float32 for p in policy.trainable_parameters())
    assert all(p.dtype == torch.bfloat16 for name, p in policy.network.named_parameters() if name not in trainable)
    assert getattr(type(policy), "find_unused_parameters", False) is False

    perturb_lora(policy.network)
    prompts, images = inputs(adapter, 2, seed=7)
    velocity = policy.velocity(random_latents(2, seed=7), torch.tensor([0.8, 0.3]), policy.encode(prompts, images), GUIDANCE[adapter])
    assert velocity.dtype == torch.float32 and torch.isfinite(velocity).all()
    velocity.square().mean().backward()
    missing = [name for name, p in policy.network.named_parameters() if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all())]
    assert not missing, missing


def _trains_on_policy(config: str, adapter: str, tmp_path: Path, reward_keys: tuple[str, ...]) -> None:
    """Run a tiny config for its 3 epochs through `python -m rl.train`, the tiny pipeline built by
    the trainer itself (model.build_tiny_if_missing), and check what a user relies on."""
    from diffusers import FluxKontextPipeline, FluxPipeline

    from test_train import read_metrics

    run_dir, model = tmp_path / "run", tmp_path / "tiny"
    run_cli([config, f"run_dir={run_dir}", f"model.pretrained={model}", "log.progress=false"])
    metrics = [m for m in read_metrics(run_dir) if m["epoch"] >= 1]
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    assert max(m["train/onpolicy_ratio_err"] for m in metrics) < 1e-5
    for key in reward_keys:
        assert all(math.isfinite(m[key]) for m in metrics), key
    checkpoint = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip() / "trainable"
    weights = load_file(checkpoint / "pytorch_lora_weights.safetensors")
    assert max(v.abs().max().item() for k, v in weights.items() if "lora_B" in k) > 0, "nothing was trained"
    pipeline_class = FluxKontextPipeline if adapter == "flux_kontext" else FluxPipeline
    pipe = pipeline_class.from_pretrained(str(model))
    pipe.load_lora_weights(str(checkpoint))


@pytest.mark.slow
def test_tiny_flux_config_trains_on_policy(tmp_path):
    """configs/tiny_flux_cpu.yaml: 3 epochs of Flow-GRPO on FLUX.1, first inner step on-policy,
    rewards logged, LoRA trained and loadable by the stock pipeline."""
    _trains_on_policy("configs/tiny_flux_cpu.yaml", "flux", tmp_path, ("reward/jpeg_compressibility/mean", "reward/mean"))


@pytest.mark.slow
def test_tiny_kontext_config_trains_on_policy(tmp_path):
    """configs/tiny_kontext_cpu.yaml: 3 epochs of Flow-GRPO editing with Kontext on the synthetic
    edit set, first inner step on-policy, every reward component logged, LoRA trained and loadable."""
    _trains_on_policy(
        "configs/tiny_kontext_cpu.yaml", "flux_kontext", tmp_path,
        ("reward/edit_color/execution/mean", "reward/edit_color/consistency/mean", "reward/jpeg_compressibility/mean"),
    )


def test_forward_objectives_train_at_the_embedded_guidance_they_sample_with(tiny_dirs, tmp_path):
    """nft on a guidance-distilled model: every training forward (trained, old, reference) gets
    the guidance the rollouts sample with (the embedding's value), where CFG-free SD3 gets 1.0."""
    from rl.config import load_config
    from rl.train import Trainer

    config = load_config(ROOT / "configs/tiny_kontext_cpu.yaml", [
        f"model.pretrained={tiny_dirs['flux_kontext']}", f"run_dir={tmp_path / 'run'}", "num_epochs=1", "train.objective=nft",
        "sde.window=none", "train.beta=1e-4", "data.eval_edits=null", "log.wandb_mode=disabled",
        "log.progress=false", "log.image_every=0", "log.save_every=0",
    ])
    trainer = Trainer(config)
    assert trainer.forward_guidance == config.sample.guidance_scale == 2.5
    seen = []
    velocity = trainer.policy.velocity

    def recording(latents, sigma, cond, guidance_scale, **kwargs):
        seen.append(guidance_scale)
        return velocity(latents, sigma, cond, guidance_scale, **kwargs)

    trainer.policy.velocity = recording
    drawn = trainer.draw(1)
    sampled = trainer.roll_out(1, drawn)
    trainer.update(1, sampled, trainer.advantages(1, drawn, sampled, trainer.score(sampled)), 0)
    assert len(seen) > 3 * config.sample.num_steps and set(seen) == {2.5}
