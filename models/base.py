"""The policy protocol every model adapter implements. The rollout engine and the trainer see
only this; everything model-specific (text encoders, latent packing, source-image conditioning)
stays in the adapter."""

from __future__ import annotations

import contextlib
from typing import Iterator, Protocol, Sequence

import torch


class Conditioning(Protocol):
    """Encoded prompts (and source images) of P unique inputs, kept once per prompt."""

    def take(self, index: torch.Tensor) -> "Conditioning":
        """Rows `index` ([B] long) of every tensor: one row per sample of a batch."""
        ...


class Policy(Protocol):
    transformer: torch.nn.Module
    """The trained network; the trainer may replace it with its DDP / DeepSpeed wrapper."""
    network: torch.nn.Module
    """The same network, never wrapped: for adapters, saving and reference mode."""

    def encode(self, prompts: Sequence[str], source_images: Sequence | None = None) -> Conditioning:
        """Encode unique prompts (no gradient); row i belongs to prompts[i]."""
        ...

    def sigmas(self, num_steps: int, resolution: int) -> torch.Tensor:
        """The num_steps + 1 sigmas from 1 to 0 this model samples with at this image size
        (models with resolution-dependent shifting, like Qwen-Image, need the size)."""
        ...

    def initial_noise(self, generators: Sequence[torch.Generator], resolution: int, cond: Conditioning) -> torch.Tensor:
        """[B, ...] float32 starting latents, one generator per sample."""
        ...

    def velocity(self, latents: torch.Tensor, sigma: torch.Tensor, cond: Conditioning, guidance_scale: float) -> torch.Tensor:
        """Guided velocity prediction, float32, same shape as latents; sigma is [B]."""
        ...

    def decode(self, latents: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """[B, H, W, 3] uint8 images on the CPU."""
        ...

    def trainable_parameters(self) -> list[torch.nn.Parameter]: ...

    def reference(self) -> contextlib.AbstractContextManager:
        """Within this context the network acts as the frozen base model."""
        ...

    def trainable_state_dict(self) -> dict[str, torch.Tensor]: ...

    def save_trainable(self, directory: str, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write the trainable weights in the format the model's pipeline loads (LoRA: load_lora_weights)."""
        ...

    def load_trainable(self, directory: str) -> None: ...


@contextlib.contextmanager
def lora_disabled(network: torch.nn.Module) -> Iterator[None]:
    """Reference policy of a LoRA-adapted diffusers model: the same weights, adapters off."""
    network.disable_adapters()
    try:
        yield
    finally:
        network.enable_adapters()
