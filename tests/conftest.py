"""Shared fixtures: a tiny SD3 pipeline built once per session and saved locally, so every test
loads it through the same from_pretrained path a user takes with a real checkpoint."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")


@pytest.fixture(scope="module")
def one_cpu_thread():
    """Tiny models: thread start-up costs more than it saves, and is slow on busy shared CPUs.
    A module uses it with `pytestmark = pytest.mark.usefixtures("one_cpu_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory) -> Path:
    from models.fixtures.sd3 import ensure_tiny_sd3

    return ensure_tiny_sd3(tmp_path_factory.mktemp("models") / "tiny-sd3", text_max_length=32)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(args: list[str], *, env: dict | None = None, launcher: list[str] | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `python -m rl.train ARGS` (or under an accelerate launcher) from the repo root."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    command = (launcher or [sys.executable]) + ["-m", "rl.train", *args]
    result = subprocess.run(command, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}")
    return result


def accelerate_launcher(config_file: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / config_file), "--main_process_port", str(free_port())]


@pytest.fixture
def make_sd3_policy(tiny_sd3):
    """Factory for an SD3Policy on the tiny pipeline (fp32, LoRA rank 4 / alpha 4 unless told)."""
    from models.sd3 import SD3Policy
    from models.config import LoraSettings, ModelConfig

    def make(*, dtype: str = "fp32", use_lora: bool = True, rank: int = 4, alpha: int = 4, gradient_checkpointing: bool = False):
        config = ModelConfig(
            pretrained=str(tiny_sd3), dtype=dtype, max_sequence_length=32, use_lora=use_lora,
            lora=LoraSettings(rank=rank, alpha=alpha), gradient_checkpointing=gradient_checkpointing,
        )
        return SD3Policy(config, "cpu")

    return make


@pytest.fixture
def stock_sd3(tiny_sd3):
    """A fresh stock StableDiffusion3Pipeline (fp32, no LoRA), loaded the way a user loads one."""
    import torch
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(str(tiny_sd3), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def transformer_velocity(network, latents, sigma, embeds, pooled):
    """A direct, unguided call of an SD3 transformer at sigma ([B]); diffusers takes t = 1000 sigma."""
    import torch

    with torch.no_grad():
        return network(
            hidden_states=latents, encoder_hidden_states=embeds, pooled_projections=pooled,
            timestep=sigma * 1000.0, return_dict=False,
        )[0].float()


def guided_transformer_velocity(network, latents, sigma, cond, guidance_scale):
    """CFG from two separate direct calls: uncond + g * (cond - uncond)."""
    batch = latents.shape[0]
    text = transformer_velocity(network, latents, sigma, cond.prompt_embeds, cond.pooled_embeds)
    if guidance_scale == 1.0:
        return text
    uncond = transformer_velocity(
        network, latents, sigma, cond.negative_embeds.expand(batch, -1, -1), cond.negative_pooled.expand(batch, -1)
    )
    return uncond + guidance_scale * (text - uncond)


def perturb_lora(network, seed: int = 0, scale: float = 0.1) -> None:
    """Give every lora_B a random value (peft initialises it to zero, making LoRA a no-op)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in network.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)


def forward_batch_sizes(network, fn):
    """Call fn() and return its result with the batch size of every forward `network` ran during
    it (checks such as "true CFG is ONE forward of 2B rows")."""
    sizes = []
    def record(module, args, kwargs):
        # Most transformers take a batch tensor `hidden_states`; Z-Image's takes a list `x` of samples.
        sizes.append(kwargs["hidden_states"].shape[0] if "hidden_states" in kwargs else len(kwargs["x"]))

    handle = network.register_forward_pre_hook(record, with_kwargs=True)
    try:
        return fn(), sizes
    finally:
        handle.remove()


def pixel_diff(a, b):
    """Per-pixel absolute difference of two uint8 images (arrays or tensors), as int16."""
    import numpy as np

    return np.abs(np.asarray(a).astype(np.int16) - np.asarray(b).astype(np.int16))


def ode_rollout(policy, cond, sample_ids, *, size, num_steps, guidance, seed, epoch, monkeypatch):
    """The deterministic sampler (no SDE step) over rows 0..n-1 of `cond`; returns the rollout and
    the final latents it decoded, in the adapter's layout (compared too: a random tiny VAE can map
    small latent differences to the same uint8 image)."""
    import torch

    from rl.rollout import SDESettings, rollout

    finals, decode = [], policy.decode

    def recording_decode(latents, cond=None):
        finals.append(latents.clone())
        return decode(latents, cond)

    monkeypatch.setattr(policy, "decode", recording_decode)
    count = len(sample_ids)
    batch = rollout(
        policy, cond, torch.arange(count), torch.tensor(sample_ids), torch.arange(count),
        seed=seed, epoch=epoch, num_steps=num_steps, guidance_scale=guidance, size=size,
        batch_size=count, sde=SDESettings(dynamics="flow_sde", noise_level=0.7), sde_steps=[],
    )
    return batch, torch.cat(finals)


def check_saved_lora(policy, make_fresh, stock, directory, *, velocity_inputs, stock_velocity, stock_final, our_final):
    """The LoRA `policy.save_trainable` writes loads with the stock `pipe.load_lora_weights`: the
    stock transformer then predicts our velocity (`stock_velocity()` on `velocity_inputs` =
    latents, sigma, cond, guidance), the stock call draws our rollout's final latents
    (`stock_final()` against `our_final()`, which the LoRA must change), and the trainer's resume
    path (`make_fresh().load_trainable`) reads the same file back exactly."""
    import torch

    perturb_lora(policy.network, seed=5)
    policy.save_trainable(directory)
    before = stock_final()
    stock.load_lora_weights(str(directory))
    latents, sigma, cond, guidance = velocity_inputs
    with torch.no_grad():
        ours = policy.velocity(latents, sigma, cond, guidance)
    torch.testing.assert_close(stock_velocity(), ours, rtol=0, atol=1e-5)
    after = stock_final()
    torch.testing.assert_close(after, our_final(), rtol=0, atol=2e-5)
    assert (after - before).abs().max() > 1e-3, "the loaded LoRA must change the stock sample"
    fresh = make_fresh()
    fresh.load_trainable(directory)
    with torch.no_grad():
        torch.testing.assert_close(fresh.velocity(latents, sigma, cond, guidance), ours, rtol=0, atol=0)
