"""The Z-Image adapter (models/z_image.py: ZImagePolicy) against the stock diffusers ZImagePipeline
and the raw transformer, and the tiny config through the trainer's CLI.

Reference for whole samples: the stock `ZImagePipeline.__call__`, given our initial noise as
`latents`. Our guidance w is the pipeline's guidance_scale w - 1 (its CFG is pos + g (pos - neg),
off at g = 0, Z-Image-Turbo's setting); everything else (chat template, Qwen3 hidden layer,
variable-length captions, timestep convention, the negated prediction, scheduler and shift,
decoding) is the stock code path.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, check_saved_lora, forward_batch_sizes, ode_rollout, perturb_lora, pixel_diff, run_cli

SQUARE = (64, 64)  # (height, width) px: x8 VAE and 2x2 patches, a 4x4 grid of image tokens
NON_SQUARE = (48, 80)  # a 3x5 grid
CHANNELS = 16  # VAE latent channels, read unpacked by the transformer
TEXT_LENGTH = 64  # tokens of the chat-formatted prompt (model.max_sequence_length of the tiny config)
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3"]
# Prompts of different lengths: their captions reach the transformer at their own lengths.
PROMPTS = ["a red cube on a wooden table", "two cats", "the sea at night, oil painting"]

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    from models.fixtures.z_image import ensure_tiny_z_image

    return ensure_tiny_z_image(tmp_path_factory.mktemp("models") / "tiny-z-image")


@pytest.fixture
def make_policy(tiny_dir):
    """Factory for a ZImagePolicy on the tiny pipeline (fp32, LoRA rank 4 / alpha 4, no gradient
    checkpointing unless told)."""
    from models import adapter_class
    from models.config import LoraSettings, ModelConfig

    def make(*, dtype: str = "fp32", use_lora: bool = True, rank: int = 4, alpha: int = 4, pretrained: Path | None = None, checkpointing: bool = False):
        config = ModelConfig(
            adapter="z_image", pretrained=str(pretrained or tiny_dir), dtype=dtype, use_lora=use_lora, gradient_checkpointing=checkpointing,
            max_sequence_length=TEXT_LENGTH, lora=LoraSettings(rank=rank, alpha=alpha, target_modules=LORA_TARGETS),
        )
        return adapter_class("z_image")(config, "cpu")

    return make


@pytest.fixture
def stock(tiny_dir):
    """A fresh stock ZImagePipeline (fp32, no LoRA), loaded the way a user loads one."""
    from diffusers import ZImagePipeline

    pipe = ZImagePipeline.from_pretrained(str(tiny_dir), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def latent_shape(size: tuple[int, int]) -> tuple[int, int, int]:
    return CHANNELS, size[0] // 8, size[1] // 8


def initial_latents(seed: int, epoch: int, sample_id: int, size: tuple[int, int]) -> torch.Tensor:
    """A rollout sample's starting noise [1, C, h, w], drawn by hand: its generator is seeded by
    (seed, epoch, sample id)."""
    from rl.rollout import sample_seed

    generator = torch.Generator().manual_seed(sample_seed(seed, epoch, sample_id))
    return torch.randn(latent_shape(size), generator=generator)[None]


def random_latents(batch: int, size: tuple[int, int], seed: int = 0) -> torch.Tensor:
    return torch.randn((batch, *latent_shape(size)), generator=torch.Generator().manual_seed(seed))


def stock_sample(pipe, prompt: str, latents: torch.Tensor, size, num_steps: int, guidance: float, output_type: str):
    """The stock __call__ for one sample at OUR guidance w (the pipeline's w - 1): final latents
    [1, C, h, w] (output_type="latent") or the uint8 image [H, W, 3] ("np")."""
    out = pipe(
        prompt=prompt, latents=latents, num_inference_steps=num_steps, guidance_scale=guidance - 1.0,
        height=size[0], width=size[1], max_sequence_length=TEXT_LENGTH, output_type=output_type,
    ).images
    return out if output_type == "latent" else np.round(out[0] * 255).astype(np.uint8)


def stock_embeds(pipe, prompts: list[str]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The stock prompt and (empty) negative prompt embeddings, lists of [L_i, D]."""
    with torch.no_grad():
        return pipe.encode_prompt(prompt=list(prompts), do_classifier_free_guidance=True, max_sequence_length=TEXT_LENGTH)


def direct_velocity(pipe, network, latents, sigma, prompts, guidance) -> torch.Tensor:
    """One transformer call per sample and prompt the way the stock __call__ makes them, with the
    stock prompt encoding: t = 1 - sigma, the negative prompt's prediction combined as
    pos + (w - 1) (pos - neg), and the result negated (d x / d sigma)."""
    embeds, negatives = stock_embeds(pipe, prompts)
    rows = []
    with torch.no_grad():
        for i in range(latents.shape[0]):

            def predict(caption):
                out = network([latents[i].unsqueeze(1)], 1.0 - sigma[i : i + 1], [caption], return_dict=False)[0]
                return out[0].squeeze(1).float()

            pos = predict(embeds[i])
            pred = pos if guidance == 1.0 else pos + (guidance - 1.0) * (pos - predict(negatives[i]))
            rows.append(-pred)
    return torch.stack(rows)


# ------------------------------------------------------------------ the tiny pipeline


def test_tiny_pipeline_loads_through_from_pretrained_deterministically(tiny_dir, tmp_path):
    """The fixture is a real ZImagePipeline a user's loading code reads (Qwen3 text encoder with a
    Qwen chat template, FLUX.1's VAE, Z-Image-Turbo's scheduler), the same seed gives the same
    weights, and the trainer's `ensure_tiny` finds the builder by adapter name."""
    from diffusers import AutoencoderKL, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Model

    from models import adapter_class
    from models.config import ModelConfig
    from models.fixtures import ensure_tiny
    from models.fixtures.z_image import build_tiny_z_image, ensure_tiny_z_image, main
    from models.z_image import ZImagePolicy

    pipe = ZImagePipeline.from_pretrained(str(tiny_dir))
    assert isinstance(pipe.transformer, ZImageTransformer2DModel) and isinstance(pipe.text_encoder, Qwen3Model)
    assert isinstance(pipe.vae, AutoencoderKL) and pipe.vae_scale_factor == 8
    assert pipe.transformer.config.in_channels == pipe.vae.config.latent_channels == CHANNELS
    assert pipe.transformer.config.cap_feat_dim == pipe.text_encoder.config.hidden_size
    assert not pipe.scheduler.config.use_dynamic_shifting and pipe.scheduler.config.shift == 3.0
    chat = pipe.tokenizer.apply_chat_template([{"role": "user", "content": "two cats"}], tokenize=False, add_generation_prompt=True, enable_thinking=True)
    assert chat == "<|im_start|>user\ntwo cats<|im_end|>\n<|im_start|>assistant\n"
    reference = pipe.transformer.state_dict()

    same = build_tiny_z_image(tmp_path / "same", seed=0)
    other = tmp_path / "other"
    main([str(other), "--seed", "1"])
    for path, equal in ((same, True), (other, False)):
        weights = ZImageTransformer2DModel.from_pretrained(str(path), subfolder="transformer").state_dict()
        assert all(torch.equal(weights[k], reference[k]) for k in reference) == equal
    stamp = (tiny_dir / "model_index.json").stat().st_mtime_ns
    assert ensure_tiny_z_image(tiny_dir, seed=1) == tiny_dir
    assert (tiny_dir / "model_index.json").stat().st_mtime_ns == stamp

    built = ensure_tiny(ModelConfig(adapter="z_image", pretrained=str(tmp_path / "by-name")))
    assert ZImagePipeline.load_config(str(built))["_class_name"] == "ZImagePipeline"
    assert adapter_class("z_image") is ZImagePolicy


def test_adapter_rejects_the_wrong_inputs_and_checkpoints(make_policy, tmp_path):
    """A user who feeds editing data, a non-Z-Image checkpoint, an image size off the 16 px grid
    or a guidance below 1 gets an error naming the fix."""
    from models.fixtures.flux import build_tiny_flux

    policy = make_policy()
    with pytest.raises(ValueError, match="data.train_prompts"):
        policy.encode(PROMPTS[:1], [np.zeros((64, 64, 3), dtype=np.uint8)])
    with pytest.raises(ValueError, match="multiples? of 16"):
        policy.sigmas(4, (72, 64))
    with pytest.raises(ValueError, match="sample.guidance_scale / eval.guidance_scale to 1.0"):
        policy.velocity(random_latents(1, SQUARE), torch.tensor([0.5]), policy.encode(PROMPTS[:1]), 0.0)
    with pytest.raises(ValueError, match="needs a ZImagePipeline checkpoint: use model.adapter=flux$"):
        make_policy(pretrained=build_tiny_flux(tmp_path / "flux"))


# ------------------------------------------------------------------ encode and schedule


def test_encode_matches_the_stock_prompt_encoding_row_by_row(make_policy, stock):
    """Rows hold the stock encode_prompt's embeddings at each prompt's own length, the negative
    prompt's too; a row does not depend on its batch-mates; take() picks rows and trims padding."""
    policy = make_policy()
    cond = policy.encode(PROMPTS)
    embeds, negatives = stock_embeds(stock, PROMPTS)
    captions = cond.captions()
    assert [c.shape[0] for c in captions] == [e.shape[0] for e in embeds] and len(set(cond.prompt_lengths.tolist())) == 3
    for ours, theirs, negative in zip(captions, embeds, negatives):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
        torch.testing.assert_close(cond.negative_embeds, negative, rtol=0, atol=1e-6)
    # Each row alone, and among other prompts, is the same.
    for i, prompt in enumerate(PROMPTS):
        torch.testing.assert_close(policy.encode([prompt]).captions()[0], captions[i], rtol=0, atol=1e-6)
    torch.testing.assert_close(policy.encode(["x", PROMPTS[1]]).captions()[1], captions[1], rtol=0, atol=1e-6)
    index = torch.tensor([1, 1, 0])
    taken = cond.take(index)
    assert taken.prompt_embeds.shape[1] == int(cond.prompt_lengths[[0, 1]].max())
    assert [c.shape[0] for c in taken.captions()] == [captions[1].shape[0], captions[1].shape[0], captions[0].shape[0]]
    assert all(torch.equal(a, captions[int(i)]) for a, i in zip(taken.captions(), index))
    short = cond.take(torch.tensor([1]))
    assert short.prompt_embeds.shape[1] == captions[1].shape[0]  # nothing but padding is dropped
    assert not torch.allclose(captions[0][-5:], captions[2][-5:])


def test_sigmas_are_the_stock_schedule_at_any_size(make_policy, stock):
    """Z-Image-Turbo's schedule: linspace(1, 1/N, N) shifted by a fixed 3, 3 t / (1 + 2 t), then
    0, at any size. With a scheduler that shifts dynamically, mu follows the image's rows * cols
    tokens, exp(mu) / (exp(mu) + 1/t - 1): a square and a non-square size, equal to what the stock
    __call__ steps through."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    policy = make_policy()
    t = np.linspace(1.0, 1 / 8, 8)
    turbo = torch.tensor(np.append(3 * t / (1 + 2 * t), 0.0), dtype=torch.float32)
    for size in (SQUARE, NON_SQUARE, (512, 768)):
        sigmas = policy.sigmas(8, size)
        assert sigmas.dtype == torch.float32 and sigmas.shape == (9,) and sigmas[0] == 1.0 and sigmas[-1] == 0.0
        torch.testing.assert_close(sigmas, turbo, rtol=0, atol=1e-6)

    dynamic = {"use_dynamic_shifting": True, "base_image_seq_len": 256, "max_image_seq_len": 4096, "base_shift": 0.5, "max_shift": 1.15}
    policy.pipe.scheduler = FlowMatchEulerDiscreteScheduler(**dynamic)
    stock.scheduler = FlowMatchEulerDiscreteScheduler(**dynamic)
    schedules = {}
    for size in (NON_SQUARE, (512, 512), (512, 768)):
        tokens = (size[0] // 16) * (size[1] // 16)
        mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (tokens - 256)
        expected = torch.tensor(np.append(np.exp(mu) / (np.exp(mu) + (1 / t - 1)), 0.0), dtype=torch.float32)
        schedules[size] = policy.sigmas(8, size)
        torch.testing.assert_close(schedules[size], expected, rtol=0, atol=1e-6)
    assert (schedules[(512, 768)][1:-1] > schedules[(512, 512)][1:-1]).all()
    stock_sample(stock, PROMPTS[0], initial_latents(0, 0, 0, NON_SQUARE), NON_SQUARE, 8, 1.0, "latent")
    torch.testing.assert_close(stock.scheduler.sigmas, schedules[NON_SQUARE], rtol=0, atol=0)


# ------------------------------------------------------------------ whole samples


@pytest.mark.parametrize("size, guidance", [(SQUARE, 1.0), (NON_SQUARE, 1.0), (NON_SQUARE, 3.0)], ids=["square", "non-square", "cfg"])
def test_ode_rollout_reproduces_the_stock_pipeline(size, guidance, make_policy, stock, monkeypatch):
    """Our deterministic sampler (rl.rollout with no SDE step) draws, from the same noise, the
    images of the stock pipeline: the same schedule, captions, timestep convention, sign, true CFG
    and decoding, for square and non-square images."""
    policy = make_policy()
    num_steps, seed, epoch, sample_ids = 5, 5, 2, [3, 7]
    prompts = PROMPTS[:2]
    batch, finals = ode_rollout(
        policy, policy.encode(prompts), sample_ids, size=size, num_steps=num_steps, guidance=guidance, seed=seed, epoch=epoch,
        monkeypatch=monkeypatch,
    )
    assert batch.images.dtype == torch.uint8 and tuple(batch.images.shape) == (2, *size, 3)
    assert finals.shape == (2, *latent_shape(size))
    for i in range(2):
        latents = initial_latents(seed, epoch, sample_ids[i], size)
        expected = stock_sample(stock, prompts[i], latents, size, num_steps, guidance, "latent")
        torch.testing.assert_close(finals[i : i + 1], expected, rtol=0, atol=2e-5)
        # The stock call stepped through exactly our schedule, terminal 0 included.
        torch.testing.assert_close(batch.sigmas, stock.scheduler.sigmas, rtol=0, atol=1e-6)
        expected_image = stock_sample(stock, prompts[i], latents, size, num_steps, guidance, "np")
        diff = pixel_diff(batch.images[i], expected_image)
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (diff.max(), (diff > 0).mean())
    # Not a vacuous match: other prompts and noise give other images, another guidance another sample.
    assert pixel_diff(batch.images[0], batch.images[1]).max() > 10
    other = stock_sample(stock, prompts[1], latents, size, num_steps, 2.0 if guidance == 1.0 else 1.0, "latent")
    assert (other - finals[1:]).abs().max() > 1e-3


# ------------------------------------------------------------------ velocity


def test_velocity_is_one_forward_of_b_rows_or_of_2b_with_cfg(make_policy, stock):
    """velocity() is ONE forward of B rows at guidance 1 (Z-Image-Turbo: no CFG) and ONE forward
    of 2B rows (prompts, then the empty negative prompt) with true CFG, equal to direct stock-style
    transformer calls one sample at a time, float32, in the latents' shape."""
    policy = make_policy()
    perturb_lora(policy.network)  # the velocity must be that of the adapted network
    cond = policy.encode(PROMPTS)
    latents, sigma = random_latents(3, NON_SQUARE, seed=1), torch.tensor([0.95, 0.5, 0.2])

    with torch.no_grad():
        (plain, guided), rows = forward_batch_sizes(
            policy.network, lambda: (policy.velocity(latents, sigma, cond, 1.0), policy.velocity(latents, sigma, cond, 3.0))
        )
    assert rows == [3, 6]
    for velocity in (plain, guided):
        assert velocity.dtype == torch.float32 and velocity.shape == latents.shape
    torch.testing.assert_close(plain, direct_velocity(stock, policy.network, latents, sigma, PROMPTS, 1.0), rtol=0, atol=1e-5)
    torch.testing.assert_close(guided, direct_velocity(stock, policy.network, latents, sigma, PROMPTS, 3.0), rtol=0, atol=1e-5)
    assert (guided - plain).abs().max() > 1e-3  # CFG must matter, or the checks above prove nothing


def test_reference_is_the_base_model_and_lora_comes_back(make_policy, stock, tiny_dir):
    """reference() gives the base model's velocity (LoRA off), then the adapted one comes back,
    also after an exception inside the context."""
    from diffusers import ZImageTransformer2DModel

    policy = make_policy()
    perturb_lora(policy.network)
    base = ZImageTransformer2DModel.from_pretrained(str(tiny_dir), subfolder="transformer", dtype=torch.float32)
    prompts = PROMPTS[:2]
    cond = policy.encode(prompts)
    latents, sigma = random_latents(2, SQUARE, seed=4), torch.tensor([0.7, 0.3])
    expected = direct_velocity(stock, base, latents, sigma, prompts, 1.0)
    with torch.no_grad():
        adapted = policy.velocity(latents, sigma, cond, 1.0)
        with policy.reference() as reference:
            inside = policy.velocity(latents, sigma, cond, 1.0, network=reference)
        after = policy.velocity(latents, sigma, cond, 1.0)
        with pytest.raises(RuntimeError, match="boom"):
            with policy.reference():
                raise RuntimeError("boom")
        after_error = policy.velocity(latents, sigma, cond, 1.0)
    torch.testing.assert_close(inside, expected, rtol=0, atol=1e-5)
    assert (adapted - expected).abs().max() > 1e-3
    torch.testing.assert_close(after, adapted, rtol=0, atol=0)
    torch.testing.assert_close(after_error, adapted, rtol=0, atol=0)


# ------------------------------------------------------------------ saving and training


def test_saved_lora_changes_the_stock_pipeline_as_our_velocity_predicts(make_policy, stock, monkeypatch, tmp_path):
    """A saved LoRA (alpha != rank) loads with the stock load_lora_weights and reproduces our
    velocity and rollout; resume reads it back (conftest.check_saved_lora)."""
    policy = make_policy(rank=4, alpha=8)
    prompts = PROMPTS[2:]
    num_steps, seed, epoch = 3, 1, 0
    noise = initial_latents(seed, epoch, 0, NON_SQUARE)
    cond = policy.encode(prompts)
    latents, sigma = random_latents(1, NON_SQUARE, seed=6), torch.tensor([0.6])
    check_saved_lora(
        policy, lambda: make_policy(rank=4, alpha=8), stock, tmp_path,
        velocity_inputs=(latents, sigma, cond, 1.0),
        stock_velocity=lambda: direct_velocity(stock, stock.transformer, latents, sigma, prompts, 1.0),
        stock_final=lambda: stock_sample(stock, prompts[0], noise, NON_SQUARE, num_steps, 1.0, "latent"),
        our_final=lambda: ode_rollout(policy, cond, [0], size=NON_SQUARE, num_steps=num_steps, guidance=1.0, seed=seed, epoch=epoch, monkeypatch=monkeypatch)[1],
    )


@pytest.mark.parametrize("guidance", [1.0, 3.0], ids=["no-cfg", "cfg"])
def test_bf16_policy_trains_fp32_lora_and_every_adapter_gets_a_gradient(guidance, make_policy):
    """Frozen weights in bf16, adapters in fp32, a finite fp32 velocity; every adapter (attention
    and feed-forward of the noise refiner, the context refiner and the main blocks) gets a
    gradient, so DDP runs without find_unused_parameters."""
    policy = make_policy(dtype="bf16")
    trainable = {name for name, p in policy.network.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    for part in ("noise_refiner", "context_refiner", "layers"):
        for module in ("to_q", "to_out.0", "w1", "w2", "w3"):
            assert any(name.startswith(part + ".") and f".{module}.lora_A" in name for name in trainable), (part, module)
    assert all(p.dtype == torch.float32 for p in policy.trainable_parameters())
    assert all(p.dtype == torch.bfloat16 for name, p in policy.network.named_parameters() if name not in trainable)
    assert getattr(type(policy), "find_unused_parameters", False) is False

    perturb_lora(policy.network)
    velocity = policy.velocity(random_latents(2, NON_SQUARE, seed=7), torch.tensor([0.8, 0.3]), policy.encode(PROMPTS[:2]), guidance)
    assert velocity.dtype == torch.float32 and torch.isfinite(velocity).all()
    velocity.square().mean().backward()
    missing = [name for name, p in policy.network.named_parameters() if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all())]
    assert not missing, missing


def test_gradient_checkpointing_changes_memory_not_results(make_policy):
    """model.gradient_checkpointing (on in the real config): the same velocity and the same LoRA
    gradients as without it."""
    results = []
    for checkpointing in (False, True):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # peft draws lora_A from the global stream
            policy = make_policy(checkpointing=checkpointing)
        assert policy.network.is_gradient_checkpointing == checkpointing
        perturb_lora(policy.network)
        policy.network.train()
        velocity = policy.velocity(random_latents(2, NON_SQUARE, seed=8), torch.tensor([0.8, 0.3]), policy.encode(PROMPTS[:2]), 1.0)
        velocity.square().mean().backward()
        results.append((velocity.detach(), [p.grad for p in policy.trainable_parameters()]))
    (plain, plain_grads), (checkpointed, checkpointed_grads) = results
    torch.testing.assert_close(checkpointed, plain, rtol=0, atol=1e-6)
    for a, b in zip(checkpointed_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_tiny_z_image_config_trains_on_policy(tmp_path):
    """configs/tiny_z_image_cpu.yaml: 3 epochs of Flow-GRPO on Z-Image without CFG, the tiny
    pipeline built by the trainer itself (model.build_tiny_if_missing): first inner step
    on-policy, rewards logged, LoRA trained and loadable by the stock pipeline."""
    from diffusers import ZImagePipeline

    from test_train import read_metrics

    run_dir, model = tmp_path / "run", tmp_path / "tiny"
    run_cli(["configs/tiny_z_image_cpu.yaml", f"run_dir={run_dir}", f"model.pretrained={model}", "log.progress=false"])
    metrics = [m for m in read_metrics(run_dir) if m["epoch"] >= 1]
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    assert max(m["train/onpolicy_ratio_err"] for m in metrics) < 1e-5
    for key in ("reward/jpeg_compressibility/mean", "reward/jpeg_incompressibility/mean", "reward/mean"):
        assert all(math.isfinite(m[key]) for m in metrics), key
    checkpoint = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip() / "trainable"
    weights = load_file(checkpoint / "pytorch_lora_weights.safetensors")
    assert max(v.abs().max().item() for k, v in weights.items() if "lora_B" in k) > 0, "nothing was trained"
    assert any(".feed_forward.w2." in k for k in weights)
    pipe = ZImagePipeline.from_pretrained(str(model))
    pipe.load_lora_weights(str(checkpoint))


def test_firm_nft_settings_train_on_the_tiny_pipeline(tiny_dir, tmp_path):
    """The real config's objective on the tiny pipeline: DiffusionNFT with FIRM's Z-Image-Turbo
    settings (ODE rollouts, beta 0.2, KL 1e-3, positive_only) runs an epoch in which every training
    forward (trained, old, reference) is CFG-free, guidance 1, and the LoRA moves."""
    from rl.config import load_config
    from rl.train import Trainer

    config = load_config(ROOT / "configs/tiny_z_image_cpu.yaml", [
        f"model.pretrained={tiny_dir}", f"run_dir={tmp_path / 'run'}", "num_epochs=1", "train.objective=nft",
        "sde.window=none", "train.nft_beta=0.2", "train.beta=1e-3", "train.nft_optimality=positive_only",
        "data.eval_prompts=null", "log.wandb_mode=disabled", "log.progress=false", "log.image_every=0", "log.save_every=0",
    ])
    trainer = Trainer(config)
    assert trainer.forward_guidance == 1.0
    seen = []
    velocity = trainer.policy.velocity

    def recording(latents, sigma, cond, guidance_scale, **kwargs):
        seen.append(guidance_scale)
        return velocity(latents, sigma, cond, guidance_scale, **kwargs)

    trainer.policy.velocity = recording
    before = [p.detach().clone() for p in trainer.policy.trainable_parameters()]
    drawn = trainer.draw(1)
    sampled = trainer.roll_out(1, drawn)
    _, metrics = trainer.update(1, sampled, trainer.advantages(1, drawn, sampled, trainer.score(sampled)), 0)
    assert len(seen) > 3 * config.sample.num_steps and set(seen) == {1.0}
    assert math.isfinite(metrics["train/policy_loss"]) and math.isfinite(metrics["train/kl"])
    moved = max((p.detach() - q).abs().max().item() for p, q in zip(trainer.policy.trainable_parameters(), before))
    assert moved > 0
