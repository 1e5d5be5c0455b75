"""The FLUX.2 [klein] adapter (models/flux2.py: Flux2KleinPolicy) against the stock diffusers
Flux2KleinPipeline and the raw transformer, and the tiny config through the trainer's CLI.

Two tiny checkpoints with the same weights: the step-distilled klein (CFG refused, as the stock
pipeline ignores it) and the undistilled klein base (true CFG against the empty prompt).
Reference for whole samples: the stock `Flux2KleinPipeline.__call__`, given our initial noise as
`latents`; its final (normalised, packed) latents are read with `callback_on_step_end`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import check_saved_lora, forward_batch_sizes, ode_rollout, perturb_lora, pixel_diff, run_cli

SQUARE = (64, 64)  # (height, width): a 4 x 4 token grid (x8 VAE, 2x2 patches)
WIDE = (48, 80)  # a 3 x 5 grid: rows and columns differ, so a swapped axis shows
CHANNELS = 32  # the transformer's input channels: 8 VAE channels patchified 2x2
TEXT_LENGTH = 64  # Qwen3 tokens (model.max_sequence_length of the tiny config)
KINDS = ["distilled", "base"]
# The distilled klein samples without CFG; 4.0 is the stock pipeline's default for the base.
GUIDANCE = {"distilled": 1.0, "base": 4.0}
# FIRM's klein targets as one regular expression (model.lora.target_modules as a string), as the
# real config writes them: the single-stream blocks' `attn.to_out` is a Linear where the
# double-stream blocks' `attn.to_out` is a ModuleList, so no list of suffixes can name it.
LORA_TARGETS = (
    r"transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
    r"|ff\.linear_in|ff\.linear_out|ff_context\.linear_in|ff_context\.linear_out)"
    r"|single_transformer_blocks\.\d+\.attn\.(to_qkv_mlp_proj|to_out)"
)
PROMPTS = ["a red cube on a wooden table", "two cats", "the sea at night, oil painting"]


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    """The two tiny pipelines, built once per module (same seed, so the same weights)."""
    from models.fixtures.flux2 import ensure_tiny_flux2_klein

    root = tmp_path_factory.mktemp("models")
    return {
        "distilled": ensure_tiny_flux2_klein(root / "tiny-klein"),
        "base": ensure_tiny_flux2_klein(root / "tiny-klein-base", base=True),
    }


@pytest.fixture
def make_policy(tiny_dirs):
    """Factory for a Flux2KleinPolicy on a tiny pipeline (fp32, LoRA rank 4 / alpha 4 unless told)."""
    from models import adapter_class
    from models.config import LoraSettings, ModelConfig

    def make(kind: str = "distilled", *, dtype: str = "fp32", use_lora: bool = True, rank: int = 4, alpha: int = 4):
        config = ModelConfig(
            adapter="flux2_klein", pretrained=str(tiny_dirs[kind]), dtype=dtype, use_lora=use_lora,
            max_sequence_length=TEXT_LENGTH, lora=LoraSettings(rank=rank, alpha=alpha, target_modules=LORA_TARGETS),
        )
        return adapter_class("flux2_klein")(config, "cpu")

    return make


@pytest.fixture
def make_stock(tiny_dirs):
    """Factory for a fresh stock pipeline (fp32, no LoRA), loaded the way a user loads one."""
    from diffusers import Flux2KleinPipeline

    def make(kind: str = "distilled"):
        pipe = Flux2KleinPipeline.from_pretrained(str(tiny_dirs[kind]), dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    return make


def grid_of(size: tuple[int, int]) -> tuple[int, int]:
    return size[0] // 16, size[1] // 16


def grid_noise(generator_seed: int, size: tuple[int, int]) -> torch.Tensor:
    """[1, 32, rows, cols] noise drawn by hand from one generator: the patchified latent grid the
    stock prepare_latents takes as `latents`."""
    return torch.randn((CHANNELS, *grid_of(size)), generator=torch.Generator().manual_seed(generator_seed))[None]


def initial_latents(seed: int, epoch: int, sample_id: int, size: tuple[int, int]) -> torch.Tensor:
    """A rollout sample's starting noise: its generator is seeded by (seed, epoch, sample id)."""
    from rl.rollout import sample_seed

    return grid_noise(sample_seed(seed, epoch, sample_id), size)


def random_latents(batch: int, size: tuple[int, int] = SQUARE, seed: int = 0) -> torch.Tensor:
    return torch.randn((batch, CHANNELS, *grid_of(size)), generator=torch.Generator().manual_seed(seed))


def stock_sample(pipe, prompt: str, latents: torch.Tensor, num_steps: int, guidance: float, size: tuple[int, int]):
    """The stock __call__ for one sample of `size` (height, width): its final packed latents
    [1, S, 32] in the normalised space (read at the last step's callback) and its uint8 image."""
    finals = []

    def keep(pipeline, step, timestep, tensors):
        finals.append(tensors["latents"].clone())
        return {}

    out = pipe(
        prompt=prompt, latents=latents, num_inference_steps=num_steps, guidance_scale=guidance, height=size[0], width=size[1],
        max_sequence_length=TEXT_LENGTH, output_type="np", callback_on_step_end=keep,
    ).images
    assert len(finals) == num_steps
    return finals[-1], np.round(out[0] * 255).astype(np.uint8)


def direct_velocity(pipe, network, latents, sigma, prompts, guidance) -> torch.Tensor:
    """Transformer calls per sample the way the stock __call__ makes them: the stock prompt
    encoding, latents packed with their ids by the stock prepare_latents, no guidance input, and
    for guidance > 1 on an undistilled pipeline a second call on the empty prompt, combined as the
    stock CFG. Latent grids [B, 32, rows, cols] in and out."""
    rows, cols = latents.shape[2:]
    out_rows = []
    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            tokens, ids = pipe.prepare_latents(1, CHANNELS // 4, 16 * rows, 16 * cols, torch.float32, "cpu", None, latents=latents[i : i + 1])

            def call(text: str) -> torch.Tensor:
                embeds, text_ids = pipe.encode_prompt(prompt=[text], max_sequence_length=TEXT_LENGTH)
                return network(
                    hidden_states=tokens, timestep=sigma[i : i + 1], guidance=None, encoder_hidden_states=embeds,
                    txt_ids=text_ids, img_ids=ids, return_dict=False,
                )[0].float()

            out = call(prompt)
            if guidance > 1 and not pipe.config.is_distilled:
                negative = call("")
                out = negative + guidance * (out - negative)
            out_rows.append(pipe._unpack_latents_with_ids(out, ids, rows, cols))
    return torch.cat(out_rows)


# ------------------------------------------------------------------ the tiny pipelines


def test_tiny_pipelines_load_through_from_pretrained_deterministically(tiny_dirs, tmp_path):
    """The fixtures are real FLUX.2 [klein] pipelines a user's loading code reads (distilled and
    base flavours of the same weights, non-trivial batch-norm latent statistics), the same seed
    gives the same weights, and the trainer's `ensure_tiny` finds the builder by adapter name."""
    from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline, Flux2Transformer2DModel
    from transformers import Qwen3ForCausalLM

    from models import adapter_class
    from models.config import ModelConfig
    from models.fixtures import ensure_tiny
    from models.fixtures.flux2 import build_tiny_flux2_klein, ensure_tiny_flux2_klein, main
    from models.flux2 import Flux2KleinPolicy

    pipe = Flux2KleinPipeline.from_pretrained(str(tiny_dirs["distilled"]))
    assert pipe.config.is_distilled and isinstance(pipe.text_encoder, Qwen3ForCausalLM)
    assert isinstance(pipe.transformer, Flux2Transformer2DModel) and not pipe.transformer.config.guidance_embeds
    assert isinstance(pipe.vae, AutoencoderKLFlux2) and pipe.vae_scale_factor == 8
    assert pipe.transformer.config.in_channels == 4 * pipe.vae.config.latent_channels == CHANNELS
    # The default hidden layers the pipeline stacks (9, 18, 27) exist and are not the last one.
    assert pipe.text_encoder.config.num_hidden_layers > 27
    assert pipe.transformer.config.joint_attention_dim == 3 * pipe.text_encoder.config.hidden_size
    assert pipe.vae.bn.running_mean.abs().min() > 0 and (pipe.vae.bn.running_var - 1).abs().max() > 0.1
    base = Flux2KleinPipeline.from_pretrained(str(tiny_dirs["base"]))
    assert not base.config.is_distilled
    reference = pipe.transformer.state_dict()
    assert all(torch.equal(base.transformer.state_dict()[k], reference[k]) for k in reference)

    same = build_tiny_flux2_klein(tmp_path / "same", seed=0)
    other = tmp_path / "other"
    main([str(other), "--seed", "1", "--base"])
    assert Flux2KleinPipeline.load_config(str(other))["is_distilled"] is False
    for path, equal in ((same, True), (other, False)):
        weights = Flux2Transformer2DModel.from_pretrained(str(path), subfolder="transformer").state_dict()
        assert all(torch.equal(weights[k], reference[k]) for k in reference) == equal
    assert torch.equal(AutoencoderKLFlux2.from_pretrained(str(same), subfolder="vae").bn.running_var, pipe.vae.bn.running_var)
    stamp = (tiny_dirs["distilled"] / "model_index.json").stat().st_mtime_ns
    assert ensure_tiny_flux2_klein(tiny_dirs["distilled"], seed=1) == tiny_dirs["distilled"]
    assert (tiny_dirs["distilled"] / "model_index.json").stat().st_mtime_ns == stamp

    built = ensure_tiny(ModelConfig(adapter="flux2_klein", pretrained=str(tmp_path / "by-name")))
    assert Flux2KleinPipeline.load_config(str(built))["_class_name"] == "Flux2KleinPipeline"
    assert adapter_class("flux2_klein") is Flux2KleinPolicy


# ------------------------------------------------------------------ encode, schedule, noise


def test_encode_matches_the_stock_prompt_encoding_row_by_row(make_policy, make_stock):
    """Rows hold the stock encode_prompt's stacked Qwen3 states, a prompt encoded alone equals its
    row in a batch, take() picks rows per sample, and only the undistilled checkpoint keeps the
    empty prompt (CFG's negative)."""
    for kind in KINDS:
        policy, stock = make_policy(kind), make_stock(kind)
        cond = policy.encode(PROMPTS)
        with torch.no_grad():
            embeds, _ = stock.encode_prompt(prompt=PROMPTS, max_sequence_length=TEXT_LENGTH)
            empty, _ = stock.encode_prompt(prompt="", max_sequence_length=TEXT_LENGTH)
        assert cond.prompt_embeds.shape == (3, TEXT_LENGTH, 48)
        torch.testing.assert_close(cond.prompt_embeds, embeds, rtol=0, atol=1e-6)
        torch.testing.assert_close(policy.encode(PROMPTS[1:2]).prompt_embeds[0], cond.prompt_embeds[1], rtol=0, atol=1e-5)
        assert not torch.allclose(cond.prompt_embeds[0], cond.prompt_embeds[1])
        index = torch.tensor([2, 0, 2])
        taken = cond.take(index)
        assert torch.equal(taken.prompt_embeds, cond.prompt_embeds[index])
        if kind == "distilled":
            assert cond.negative_embeds is None and taken.negative_embeds is None
        else:
            torch.testing.assert_close(cond.negative_embeds, empty, rtol=0, atol=1e-6)
            assert taken.negative_embeds is cond.negative_embeds


def test_adapter_rejects_what_the_checkpoint_cannot_do(make_policy):
    """Errors a user can hit name the setting to change: CFG on the distilled klein, source images,
    image sides that are not multiples of 16."""
    distilled, base = make_policy("distilled"), make_policy("base")
    cond = distilled.encode(PROMPTS[:1])
    with pytest.raises(ValueError, match="sample.guidance_scale and eval.guidance_scale to 1.0"):
        distilled.velocity(random_latents(1), torch.tensor([0.5]), cond, 4.0)
    with pytest.raises(ValueError, match=">= 1.0"):
        base.velocity(random_latents(1), torch.tensor([0.5]), base.encode(PROMPTS[:1]), 0.5)
    with pytest.raises(ValueError, match="data.train_prompts"):
        distilled.encode(PROMPTS[:1], [np.zeros((64, 64, 3), dtype=np.uint8)])
    with pytest.raises(ValueError, match="multiple of 16"):
        distilled.sigmas(4, (64, 72))
    with pytest.raises(ValueError, match="multiple of 16"):
        distilled.initial_noise([torch.Generator()], (40, 64))


def test_sigmas_are_the_stock_schedule_at_square_and_non_square_sizes(make_policy, make_stock):
    """sigmas(N, (height, width)) is the schedule the stock __call__ steps through at that size,
    terminal 0 included: FLUX.2's empirical shift depends on the token count (rows x cols of a
    non-square image) and on the step count, and larger images shift more."""
    policy, stock = make_policy(), make_stock()
    schedules = {}
    for size in (SQUARE, WIDE, (512, 768)):
        for num_steps in (4, 10):
            sigmas = policy.sigmas(num_steps, size)
            stock(prompt="x", num_inference_steps=num_steps, guidance_scale=1.0, height=size[0], width=size[1], max_sequence_length=TEXT_LENGTH, output_type="latent")
            assert sigmas.dtype == torch.float32 and sigmas.shape == (num_steps + 1,) and sigmas[0] == 1.0 and sigmas[-1] == 0.0
            torch.testing.assert_close(sigmas, stock.scheduler.sigmas.float(), rtol=0, atol=1e-6)
            schedules[size, num_steps] = sigmas
    assert (schedules[(512, 768), 10][1:-1] > schedules[SQUARE, 10][1:-1]).all()
    assert not torch.allclose(schedules[WIDE, 10], schedules[SQUARE, 10])
    torch.testing.assert_close(policy.sigmas(4, 64), schedules[SQUARE, 4], rtol=0, atol=0)  # one int: a square


def test_initial_noise_is_the_stock_prepare_latents_noise(make_policy, make_stock):
    """initial_noise gives each sample the noise the stock prepare_latents draws from the same
    generator, as a [B, 32, rows, cols] grid of a non-square image."""
    policy, stock = make_policy(), make_stock()
    noise = policy.initial_noise([torch.Generator().manual_seed(s) for s in (3, 4)], WIDE, None)
    assert noise.dtype == torch.float32 and noise.shape == (2, CHANNELS, *grid_of(WIDE))
    generators = [torch.Generator().manual_seed(s) for s in (3, 4)]
    expected, _ = stock.prepare_latents(2, CHANNELS // 4, *WIDE, torch.float32, "cpu", generators)
    torch.testing.assert_close(stock._pack_latents(noise), expected, rtol=0, atol=0)


# ------------------------------------------------------------------ whole samples


@pytest.mark.parametrize("size", [SQUARE, WIDE], ids=["square", "wide"])
@pytest.mark.parametrize("kind", KINDS)
def test_ode_rollout_reproduces_the_stock_pipeline(kind, size, make_policy, make_stock, monkeypatch):
    """Our deterministic sampler (rl.rollout with no SDE step) draws, from the same noise, the
    latents and images of the stock pipeline: same prompt encoding, schedule, position ids,
    guidance convention (none for the distilled klein, true CFG for the base), normalisation and
    decoding, at a square and a non-square size."""
    from diffusers import Flux2KleinPipeline

    policy, stock = make_policy(kind), make_stock(kind)
    num_steps, guidance, seed, epoch, sample_ids = 6, GUIDANCE[kind], 5, 2, [3, 7]
    prompts = PROMPTS[:2]
    batch, finals = ode_rollout(
        policy, policy.encode(prompts), sample_ids, num_steps=num_steps, guidance=guidance, seed=seed, epoch=epoch,
        size=size, monkeypatch=monkeypatch,
    )
    finals = Flux2KleinPipeline._pack_latents(finals)
    assert batch.images.dtype == torch.uint8 and tuple(batch.images.shape) == (2, *size, 3)
    for i in range(2):
        expected, expected_image = stock_sample(stock, prompts[i], initial_latents(seed, epoch, sample_ids[i], size), num_steps, guidance, size)
        torch.testing.assert_close(finals[i : i + 1], expected, rtol=0, atol=2e-5)
        # The stock call stepped through exactly our schedule, terminal 0 included.
        torch.testing.assert_close(batch.sigmas, stock.scheduler.sigmas, rtol=0, atol=1e-6)
        diff = pixel_diff(batch.images[i], expected_image)
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (diff.max(), (diff > 0).mean())
    # Not a vacuous match: other prompts and noise give other images.
    assert pixel_diff(batch.images[0], batch.images[1]).max() > 10
    if kind == "base":  # ... and the CFG must matter
        unguided, _ = stock_sample(stock, prompts[1], initial_latents(seed, epoch, sample_ids[1], size), num_steps, 1.0, size)
        assert (unguided - finals[1:]).abs().max() > 1e-3


# ------------------------------------------------------------------ velocity


def test_velocity_follows_each_checkpoints_guidance_convention(make_policy, make_stock):
    """The distilled klein: ONE forward of B rows (guidance 1 only). The base: true CFG as ONE
    forward of 2B rows (conditional and empty-prompt halves), B rows at guidance 1. Both equal
    direct stock-style transformer calls, float32, in the latent grid's shape."""
    latents, sigma = random_latents(3, WIDE), torch.tensor([0.95, 0.5, 0.2])
    for kind in KINDS:
        policy, stock = make_policy(kind), make_stock(kind)
        perturb_lora(policy.network)  # the velocity must be that of the adapted network
        cond = policy.encode(PROMPTS)
        guidance = GUIDANCE[kind]
        with torch.no_grad():
            (guided, unguided), batches = forward_batch_sizes(
                policy.network, lambda: (policy.velocity(latents, sigma, cond, guidance), policy.velocity(latents, sigma, cond, 1.0))
            )
        assert batches == ([3, 3] if kind == "distilled" else [6, 3]), (kind, batches)
        assert guided.dtype == torch.float32 and guided.shape == latents.shape
        torch.testing.assert_close(guided, direct_velocity(stock, policy.network, latents, sigma, PROMPTS, guidance), rtol=0, atol=1e-5)
        torch.testing.assert_close(unguided, direct_velocity(stock, policy.network, latents, sigma, PROMPTS, 1.0), rtol=0, atol=1e-5)
        if kind == "base":
            assert (guided - unguided).abs().max() > 1e-3  # CFG must matter, or the checks above prove less


@pytest.mark.parametrize("kind", KINDS)
def test_reference_is_the_base_model_and_lora_comes_back(kind, make_policy, make_stock, tiny_dirs):
    """reference() gives the base model's velocity (LoRA off), then the adapted one comes back,
    also after an exception inside the context."""
    policy, stock = make_policy(kind), make_stock(kind)
    perturb_lora(policy.network)
    cond = policy.encode(PROMPTS[:2])
    latents, sigma, guidance = random_latents(2, seed=4), torch.tensor([0.7, 0.3]), GUIDANCE[kind]
    expected = direct_velocity(stock, stock.transformer, latents, sigma, PROMPTS[:2], guidance)
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


@pytest.mark.parametrize("kind", KINDS)
def test_saved_lora_changes_the_stock_pipeline_as_our_velocity_predicts(kind, make_policy, make_stock, monkeypatch, tmp_path):
    """A saved LoRA (alpha != rank, every target incl. the feed-forwards and the single blocks'
    fused projection) loads with the stock load_lora_weights and reproduces our velocity and
    rollout; resume reads it back (conftest.check_saved_lora)."""
    from diffusers import Flux2KleinPipeline

    policy, stock = make_policy(kind, rank=4, alpha=8), make_stock(kind)
    guidance, num_steps, seed, epoch, size = GUIDANCE[kind], 3, 1, 0, WIDE
    noise = initial_latents(seed, epoch, 0, size)
    cond = policy.encode(PROMPTS[:1])
    latents, sigma = random_latents(1, size, seed=6), torch.tensor([0.6])
    check_saved_lora(
        policy, lambda: make_policy(kind, rank=4, alpha=8), stock, tmp_path,
        velocity_inputs=(latents, sigma, cond, guidance),
        stock_velocity=lambda: direct_velocity(stock, stock.transformer, latents, sigma, PROMPTS[:1], guidance),
        stock_final=lambda: stock_sample(stock, PROMPTS[0], noise, num_steps, guidance, size)[0],
        our_final=lambda: Flux2KleinPipeline._pack_latents(ode_rollout(policy, cond, [0], size=size, num_steps=num_steps, guidance=guidance, seed=seed, epoch=epoch, monkeypatch=monkeypatch)[1]),
    )


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_policy_trains_fp32_lora_and_every_adapter_gets_a_gradient(kind, make_policy):
    """Frozen weights in bf16, adapters in fp32, a finite fp32 velocity (with CFG for the base);
    every adapter gets a gradient, so DDP runs without find_unused_parameters."""
    policy = make_policy(kind, dtype="bf16")
    trainable = {name for name, p in policy.network.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    adapted = {name.split(".lora_")[0] for name in trainable}
    assert "single_transformer_blocks.0.attn.to_out" in adapted and "transformer_blocks.0.attn.to_out.0" in adapted
    assert len(adapted) == 14  # 12 double-stream linears + the single block's fused projection and output
    assert all(p.dtype == torch.float32 for p in policy.trainable_parameters())
    assert all(p.dtype == torch.bfloat16 for name, p in policy.network.named_parameters() if name not in trainable)
    assert getattr(type(policy), "find_unused_parameters", False) is False
    assert not getattr(type(policy), "embedded_guidance", False)  # no guidance input: nft / awm train CFG-free

    perturb_lora(policy.network)
    velocity = policy.velocity(random_latents(2, seed=7), torch.tensor([0.8, 0.3]), policy.encode(PROMPTS[:2]), GUIDANCE[kind])
    assert velocity.dtype == torch.float32 and torch.isfinite(velocity).all()
    velocity.square().mean().backward()
    missing = [name for name, p in policy.network.named_parameters() if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all())]
    assert not missing, missing


@pytest.mark.slow
def test_tiny_flux2_klein_config_trains_on_policy(tmp_path):
    """configs/tiny_flux2_klein_cpu.yaml through `python -m rl.train`, the tiny pipeline built by
    the trainer itself (model.build_tiny_if_missing): 3 epochs of Flow-GRPO, first inner step
    on-policy, rewards logged, LoRA trained and loadable by the stock pipeline."""
    import math

    from diffusers import Flux2KleinPipeline

    from test_train import read_metrics

    run_dir, model = tmp_path / "run", tmp_path / "tiny"
    run_cli(["configs/tiny_flux2_klein_cpu.yaml", f"run_dir={run_dir}", f"model.pretrained={model}", "log.progress=false"])
    metrics = [m for m in read_metrics(run_dir) if m["epoch"] >= 1]
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    assert max(m["train/onpolicy_ratio_err"] for m in metrics) < 1e-5
    for key in ("reward/jpeg_compressibility/mean", "reward/mean"):
        assert all(math.isfinite(m[key]) for m in metrics), key
    checkpoint = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip() / "trainable"
    weights = load_file(checkpoint / "pytorch_lora_weights.safetensors")
    assert max(v.abs().max().item() for k, v in weights.items() if "lora_B" in k) > 0, "nothing was trained"
    pipe = Flux2KleinPipeline.from_pretrained(str(model))
    pipe.load_lora_weights(str(checkpoint))
