"""The Qwen-Image text-to-image adapter against the stock diffusers QwenImagePipeline, on the tiny
random-weight pipeline (models/fixtures/qwen_image.py) loaded through from_pretrained.

The stock pipeline is the reference for everything: prompt encoding (template, dropped system
prompt), packing, the dynamic shift, true CFG with the per-token norm rescale, and decoding."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import forward_batch_sizes, ode_rollout, perturb_lora, pixel_diff, run_cli

RESOLUTION = 64  # tiny VAE x4 and 2x2 packing: an 8x8 grid of packed tokens
CHANNELS = 4  # tiny VAE latent channels (16 packed)
VAE_FACTOR = 4
TEXT_LENGTH = 64  # model.max_sequence_length of the tests
GUIDANCE = 4.0  # FIRM samples Qwen-Image with true CFG 4.0
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2"]
PROMPTS = ["a red cube on a wooden table", "two cats", "the sea at night, oil painting"]

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory) -> Path:
    from models.fixtures.qwen_image import ensure_tiny_qwen_image

    return ensure_tiny_qwen_image(tmp_path_factory.mktemp("models") / "tiny-qwen-image")


@pytest.fixture
def make_policy(tiny_qwen):
    from models import adapter_class
    from models.config import LoraSettings, ModelConfig

    def make(*, dtype: str = "fp32", use_lora: bool = True, rank: int = 4, alpha: int = 4, pretrained: Path | None = None, text_length: int = TEXT_LENGTH):
        config = ModelConfig(
            adapter="qwen_image", pretrained=str(pretrained or tiny_qwen), dtype=dtype, use_lora=use_lora,
            max_sequence_length=text_length, lora=LoraSettings(rank=rank, alpha=alpha, target_modules=LORA_TARGETS),
        )
        return adapter_class("qwen_image")(config, "cpu")

    return make


@pytest.fixture
def stock(tiny_qwen):
    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline.from_pretrained(str(tiny_qwen), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pack(latents: torch.Tensor) -> torch.Tensor:
    """Unpacked [B, C, h, w] latents (the adapter's form) as the stock pipeline's [B, S, 4C] tokens."""
    from diffusers import QwenImagePipeline

    return QwenImagePipeline._pack_latents(latents, *latents.shape)


def unpack(tokens: torch.Tensor, size: tuple[int, int] = (RESOLUTION, RESOLUTION)) -> torch.Tensor:
    from diffusers import QwenImagePipeline

    return QwenImagePipeline._unpack_latents(tokens, *size, VAE_FACTOR)[:, :, 0]


def stock_embeds(pipe, prompt: str) -> torch.Tensor:
    with torch.no_grad():
        embeds, mask = pipe.encode_prompt(prompt=[prompt], max_sequence_length=TEXT_LENGTH)
    assert mask is None  # one prompt: nothing padded
    return embeds


def direct_velocity(pipe, network, latents, sigma, prompt: str) -> torch.Tensor:
    """One unguided transformer call of one sample the way the stock __call__ makes it, on
    unpacked latents [1, C, h, w] of a RESOLUTION-square image."""
    tokens = pack(latents)
    grid = RESOLUTION // (2 * VAE_FACTOR)
    with torch.no_grad():
        out = network(
            hidden_states=tokens, timestep=sigma, encoder_hidden_states=stock_embeds(pipe, prompt), encoder_hidden_states_mask=None,
            img_shapes=[[(1, grid, grid)]], return_dict=False,
        )[0]
    return out.float()


def random_latents(batch: int, seed: int = 0) -> torch.Tensor:
    side = RESOLUTION // VAE_FACTOR
    return torch.randn((batch, CHANNELS, side, side), generator=torch.Generator().manual_seed(seed))


def initial_tokens(seed: int, epoch: int, sample_id: int, size: tuple[int, int]) -> torch.Tensor:
    """A rollout sample's starting noise drawn by hand ([C, h, w] from its generator, seeded by
    (seed, epoch, sample id)), packed by the stock pipeline."""
    from rl.rollout import sample_seed

    generator = torch.Generator().manual_seed(sample_seed(seed, epoch, sample_id))
    noise = torch.randn((CHANNELS, size[0] // VAE_FACTOR, size[1] // VAE_FACTOR), generator=generator)[None]
    return pack(noise)


def stock_sample(pipe, prompt: str, latents: torch.Tensor, num_steps: int, guidance: float, output_type: str, size: tuple[int, int]):
    out = pipe(
        prompt=prompt, negative_prompt=" ", true_cfg_scale=guidance, latents=latents, num_inference_steps=num_steps,
        height=size[0], width=size[1], max_sequence_length=TEXT_LENGTH, output_type=output_type,
    ).images
    return out if output_type == "latent" else np.round(out[0] * 255).astype(np.uint8)


# ------------------------------------------------------------------ fixture, encoding, schedule


def test_tiny_pipeline_loads_through_from_pretrained_and_shares_the_edit_weights(tiny_qwen, tmp_path):
    from diffusers import AutoencoderKLQwenImage, QwenImageEditPipeline, QwenImagePipeline, QwenImageTransformer2DModel

    from models import adapter_class
    from models.config import ModelConfig
    from models.fixtures import ensure_tiny
    from models.fixtures.qwen_image import build_tiny_qwen_image, main
    from models.fixtures.qwen_image_edit import build_tiny_qwen_image_edit
    from models.qwen_image import QwenImagePolicy

    pipe = QwenImagePipeline.from_pretrained(str(tiny_qwen))
    assert isinstance(pipe.transformer, QwenImageTransformer2DModel) and isinstance(pipe.vae, AutoencoderKLQwenImage)
    assert pipe.transformer.config.in_channels == 4 * CHANNELS and pipe.vae_scale_factor == VAE_FACTOR
    reference = pipe.transformer.state_dict()
    edit = build_tiny_qwen_image_edit(tmp_path / "edit", seed=0)
    import models.qwen_image_edit  # noqa: F401  (the torchvision-free processor class)

    edit_weights = QwenImageEditPipeline.from_pretrained(str(edit)).transformer.state_dict()
    assert all(torch.equal(edit_weights[k], reference[k]) for k in reference)
    same = build_tiny_qwen_image(tmp_path / "same", seed=0)
    main([str(tmp_path / "other"), "--seed", "1"])
    for path, equal in ((same, True), (tmp_path / "other", False)):
        weights = QwenImageTransformer2DModel.from_pretrained(str(path), subfolder="transformer").state_dict()
        assert all(torch.equal(weights[k], reference[k]) for k in reference) == equal
    built = ensure_tiny(ModelConfig(adapter="qwen_image", pretrained=str(tmp_path / "by-name")))
    assert QwenImagePipeline.load_config(str(built))["_class_name"] == "QwenImagePipeline"
    assert adapter_class("qwen_image") is QwenImagePolicy


def test_encode_matches_the_stock_prompt_encoding(make_policy, stock):
    """Each row is the stock encode_prompt of its prompt alone (template, system prompt dropped),
    the negative rows that of " "; take() trims padding every picked row shares."""
    policy = make_policy()
    cond = policy.encode(PROMPTS)
    negative = stock_embeds(stock, " ")[0]
    for i, prompt in enumerate(PROMPTS):
        expected = stock_embeds(stock, prompt)[0]
        length = expected.shape[0]
        assert int(cond.prompt_mask[i].sum()) == length and not cond.prompt_mask[i, length:].any()
        torch.testing.assert_close(cond.prompt_embeds[i, :length], expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(cond.negative_embeds[i, : negative.shape[0]], negative, rtol=0, atol=1e-6)
    alone = policy.encode(PROMPTS[1:2])
    torch.testing.assert_close(alone.prompt_embeds[0], cond.prompt_embeds[1, : alone.prompt_embeds.shape[1]], rtol=0, atol=0)
    taken = cond.take(torch.tensor([1, 1]))
    assert taken.prompt_embeds.shape[1] == int(cond.prompt_mask[1].sum())
    # model.max_sequence_length truncates, as the pipeline's argument does.
    short = make_policy(text_length=3).encode(PROMPTS[:1])
    assert short.prompt_embeds.shape[1] == 3


def test_the_adapter_refuses_edits_and_other_checkpoints(make_policy, tmp_path):
    from models.fixtures.qwen_image_edit import build_tiny_qwen_image_edit

    policy = make_policy()
    with pytest.raises(ValueError, match="model.adapter=qwen_image_edit"):
        policy.encode(PROMPTS[:1], [np.zeros((64, 64, 3), dtype=np.uint8)])
    with pytest.raises(ValueError, match="model.adapter=qwen_image_edit"):
        make_policy(pretrained=build_tiny_qwen_image_edit(tmp_path / "edit"))
    with pytest.raises(ValueError, match="max_sequence_length"):
        make_policy(text_length=2048)
    with pytest.raises(ValueError, match="multiple of 8"):
        policy.initial_noise([torch.Generator()], (64, 60), None)


def test_sigmas_are_the_stock_dynamically_shifted_schedule(make_policy, stock):
    """sigmas(N, size) is the schedule the stock call steps through at that size, square or not."""
    policy = make_policy()
    schedules = {}
    for size in ((64, 64), (48, 80), (512, 768)):
        stock(prompt="x", num_inference_steps=8, height=size[0], width=size[1], output_type="latent", max_sequence_length=TEXT_LENGTH)
        schedules[size] = policy.sigmas(8, size)
        torch.testing.assert_close(schedules[size], stock.scheduler.sigmas.float(), rtol=0, atol=1e-7)
    assert (schedules[512, 768][1:-2] > schedules[64, 64][1:-2]).all()  # more tokens, more shift


# ------------------------------------------------------------------ sampling and velocity


@pytest.mark.parametrize(("size", "guidance"), [((64, 64), GUIDANCE), ((48, 80), GUIDANCE), ((64, 64), 1.0)], ids=["square", "48x80", "no_cfg"])
def test_ode_rollout_reproduces_the_stock_pipeline(size, guidance, make_policy, stock, monkeypatch):
    policy = make_policy()
    num_steps, seed, epoch, sample_ids = 5, 3, 1, [4, 9]
    batch, finals = ode_rollout(
        policy, policy.encode(PROMPTS[:2]), sample_ids, num_steps=num_steps, guidance=guidance, seed=seed, epoch=epoch, size=size, monkeypatch=monkeypatch,
    )
    finals = pack(finals)
    assert tuple(batch.images.shape) == (2, *size, 3)
    for i in range(2):
        start = initial_tokens(seed, epoch, sample_ids[i], size)
        expected = stock_sample(stock, PROMPTS[i], start, num_steps, guidance, "latent", size)
        torch.testing.assert_close(finals[i : i + 1], expected, rtol=0, atol=2e-5)
        torch.testing.assert_close(batch.sigmas, stock.scheduler.sigmas.float(), rtol=0, atol=1e-7)
        diff = pixel_diff(batch.images[i], stock_sample(stock, PROMPTS[i], start, num_steps, guidance, "np", size))
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (diff.max(), (diff > 0).mean())
    other = stock_sample(stock, PROMPTS[1], start, num_steps, 2.5 if guidance == 1.0 else 1.0, "latent", size)
    assert (other - finals[1:]).abs().max() > 1e-3  # another guidance, another sample: the match is not vacuous


def test_guided_velocity_is_one_forward_equal_to_two_stock_calls_with_norm_rescale(make_policy, stock):
    policy = make_policy()
    perturb_lora(policy.network)
    cond = policy.encode(PROMPTS)
    latents, sigma = random_latents(3), torch.tensor([0.95, 0.5, 0.2])
    with torch.no_grad():
        (velocity, unguided), batches = forward_batch_sizes(
            policy.network, lambda: (policy.velocity(latents, sigma, cond, GUIDANCE), policy.velocity(latents, sigma, cond, 1.0))
        )
    assert batches == [6, 3], "true CFG must be ONE forward of 2B rows; no CFG one forward of B"
    assert velocity.shape == latents.shape and velocity.dtype == torch.float32
    for i, prompt in enumerate(PROMPTS):
        args = (stock, policy.network, latents[i : i + 1], sigma[i : i + 1])
        conditional, negative = direct_velocity(*args, prompt), direct_velocity(*args, " ")
        combined = negative + GUIDANCE * (conditional - negative)
        expected = combined * (conditional.norm(dim=-1, keepdim=True) / combined.norm(dim=-1, keepdim=True))  # per token
        torch.testing.assert_close(pack(velocity[i : i + 1]), expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(pack(unguided[i : i + 1]), conditional, rtol=0, atol=1e-5)
    assert (velocity - unguided).abs().max() > 1e-3


# ------------------------------------------------------------------ reference, saving, training


def test_reference_is_the_base_model_and_saved_lora_loads_into_the_stock_pipeline(make_policy, stock, tiny_qwen, tmp_path, monkeypatch):
    from diffusers import QwenImageTransformer2DModel

    policy = make_policy(rank=4, alpha=8)  # alpha != rank: the scale must survive the file
    perturb_lora(policy.network)
    base = QwenImageTransformer2DModel.from_pretrained(str(tiny_qwen), subfolder="transformer", dtype=torch.float32)
    cond = policy.encode(PROMPTS[:1])
    latents, sigma = random_latents(1, seed=4), torch.tensor([0.7])
    with torch.no_grad():
        with policy.reference() as reference:
            inside = policy.velocity(latents, sigma, cond, 1.0, network=reference)
        adapted = policy.velocity(latents, sigma, cond, 1.0)
    torch.testing.assert_close(pack(inside), direct_velocity(stock, base, latents, sigma, PROMPTS[0]), rtol=0, atol=1e-5)
    assert (adapted - inside).abs().max() > 1e-3

    policy.save_trainable(tmp_path)
    stock.load_lora_weights(str(tmp_path))
    torch.testing.assert_close(pack(adapted), direct_velocity(stock, stock.transformer, latents, sigma, PROMPTS[0]), rtol=0, atol=1e-5)
    _, finals = ode_rollout(policy, cond, [0], num_steps=3, guidance=GUIDANCE, seed=1, epoch=0, size=(RESOLUTION, RESOLUTION), monkeypatch=monkeypatch)
    finals = pack(finals)
    after = stock_sample(stock, PROMPTS[0], initial_tokens(1, 0, 0, (RESOLUTION, RESOLUTION)), 3, GUIDANCE, "latent", (RESOLUTION, RESOLUTION))
    torch.testing.assert_close(after, finals, rtol=0, atol=2e-5)
    fresh = make_policy(rank=4, alpha=8)
    fresh.load_trainable(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fresh.velocity(latents, sigma, cond, 1.0), adapted, rtol=0, atol=0)


def test_bf16_policy_trains_fp32_lora_and_only_the_last_text_outputs_get_no_gradient(make_policy):
    policy = make_policy(dtype="bf16")
    trainable = {name for name, p in policy.network.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    assert all(p.dtype == torch.float32 for p in policy.trainable_parameters())
    perturb_lora(policy.network)
    velocity = policy.velocity(random_latents(2, seed=7), torch.tensor([0.8, 0.3]), policy.encode(PROMPTS[:2]), GUIDANCE)
    assert velocity.dtype == torch.float32 and torch.isfinite(velocity).all()
    velocity.square().mean().backward()
    without = {name for name, p in policy.network.named_parameters() if p.requires_grad and p.grad is None}
    # The last block's text-stream outputs feed nothing the image reads: DDP needs find_unused_parameters.
    assert without and all(".1.attn.add_q_proj" in n or ".1.attn.to_add_out" in n or ".1.txt_mlp" in n for n in without), sorted(without)
    assert type(policy).find_unused_parameters is True


@pytest.mark.slow
def test_tiny_qwen_image_config_trains_on_policy(tmp_path):
    """configs/tiny_qwen_image_cpu.yaml for its 3 epochs, the tiny pipeline built by the trainer:
    first inner step on-policy, rewards logged, LoRA trained and loadable by the stock pipeline."""
    from diffusers import QwenImagePipeline

    from test_train import read_metrics

    run_dir, model = tmp_path / "run", tmp_path / "tiny"
    run_cli(["configs/tiny_qwen_image_cpu.yaml", f"run_dir={run_dir}", f"model.pretrained={model}", "log.progress=false"])
    metrics = [m for m in read_metrics(run_dir) if m["epoch"] >= 1]
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    assert max(m["train/onpolicy_ratio_err"] for m in metrics) < 1e-5
    assert all(math.isfinite(m["reward/mean"]) for m in metrics)
    checkpoint = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip() / "trainable"
    weights = load_file(checkpoint / "pytorch_lora_weights.safetensors")
    assert max(v.abs().max().item() for k, v in weights.items() if "lora_B" in k) > 0
    QwenImagePipeline.from_pretrained(str(model)).load_lora_weights(str(checkpoint))
