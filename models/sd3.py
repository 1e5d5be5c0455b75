"""Policy adapter for Stable Diffusion 3 / 3.5 (diffusers StableDiffusion3Pipeline).

Loads any SD3 pipeline directory or hub id through from_pretrained; trains LoRA adapters (peft,
saved in the format `pipe.load_lora_weights` reads) or the full transformer.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

import torch
from diffusers import StableDiffusion3Pipeline

from models.base import DiffusersPolicy, ImageSize, draw_noise, image_size
from models.config import ModelConfig




@dataclass
class SD3Conditioning:
    prompt_embeds: torch.Tensor  # [P, L, D] CLIP + T5 token embeddings
    pooled_embeds: torch.Tensor  # [P, Dp] pooled CLIP embeddings
    negative_embeds: torch.Tensor  # [1, L, D] embeddings of the empty prompt (CFG)
    negative_pooled: torch.Tensor  # [1, Dp]

    def take(self, index: torch.Tensor) -> "SD3Conditioning":
        index = index.to(self.prompt_embeds.device)
        return SD3Conditioning(self.prompt_embeds[index], self.pooled_embeds[index], self.negative_embeds, self.negative_pooled)


class SD3Policy(DiffusersPolicy):
    pipeline_classes = (StableDiffusion3Pipeline,)
    adapter_name = "sd3"
    example_checkpoint = "stabilityai/stable-diffusion-3.5-medium"

    def __init__(self, config: ModelConfig, device: torch.device | str = "cpu", *, needs_reference: bool = True):
        pipe = self._load_pipeline(config, device)
        self.pipe = pipe
        self._setup_training(needs_reference)
        self._negative = None

    # ------------------------------------------------------------------ conditioning

    @torch.no_grad()
    def encode(self, prompts: Sequence[str], source_images: Sequence | None = None) -> SD3Conditioning:
        if source_images is not None:
            raise ValueError("the sd3 adapter is text-to-image and takes no source images; use model.adapter=qwen_image_edit for editing data")
        # encode_prompt is not under no_grad by itself; without the decorator a second backward
        # through cached embeddings would fail.
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=list(prompts), prompt_2=None, prompt_3=None, device=self.device,
            do_classifier_free_guidance=False, max_sequence_length=self.config.max_sequence_length,
        )
        if self._negative is None:
            negative, _, negative_pooled, _ = self.pipe.encode_prompt(
                prompt=[""], prompt_2=None, prompt_3=None, device=self.device,
                do_classifier_free_guidance=False, max_sequence_length=self.config.max_sequence_length,
            )
            self._negative = (negative, negative_pooled)
        return SD3Conditioning(embeds, pooled, *self._negative)

    def sigmas(self, num_steps: int, size: ImageSize) -> torch.Tensor:
        """The pipeline scheduler's own schedule (shifted, ending at 0), so that evaluation
        matches `pipe(num_inference_steps=N)` and Flow-GRPO's published settings carry over.
        SD3's shift does not depend on the resolution."""
        scheduler = copy.deepcopy(self.pipe.scheduler)
        scheduler.set_timesteps(num_steps, device="cpu")
        return scheduler.sigmas.to(torch.float32)

    def latent_shape(self, size: ImageSize) -> tuple[int, int, int]:
        """[C, h, w] of the latents of an image of `size` pixels (the VAE's x8, then the
        transformer's 2x2 patches: sides are multiples of 16)."""
        height, width = image_size(size)
        multiple = self.pipe.vae_scale_factor * self.network.config.patch_size
        if height % multiple or width % multiple:
            raise ValueError(f"image size {height}x{width} (height x width): each side must be a multiple of {multiple} for SD3; set sample.resolution / eval.resolution")
        factor = self.pipe.vae_scale_factor
        return (self.network.config.in_channels, height // factor, width // factor)

    def initial_noise(self, generators: Sequence[torch.Generator], size: ImageSize, cond=None) -> torch.Tensor:
        return draw_noise((len(generators), *self.latent_shape(size)), list(generators), device=self.device)

    # ------------------------------------------------------------------ model calls

    def velocity(self, latents: torch.Tensor, sigma: torch.Tensor, cond: SD3Conditioning, guidance_scale: float, *, network=None) -> torch.Tensor:
        network = network if network is not None else self.transformer
        batch = latents.shape[0]
        timestep = (sigma.to(self.device, torch.float32) * 1000.0).expand(batch)
        embeds, pooled = cond.prompt_embeds, cond.pooled_embeds
        guided = guidance_scale > 1.0
        if guided:
            # Unconditional and conditional halves in ONE forward (CFG batched).
            latents = torch.cat([latents, latents])
            timestep = torch.cat([timestep, timestep])
            embeds = torch.cat([cond.negative_embeds.expand(batch, -1, -1), embeds])
            pooled = torch.cat([cond.negative_pooled.expand(batch, -1), pooled])
        with self._autocast():
            out = network(
                hidden_states=latents.to(self.compute_dtype),
                encoder_hidden_states=embeds.to(self.compute_dtype),
                pooled_projections=pooled.to(self.compute_dtype),
                timestep=timestep,
                return_dict=False,
            )[0]
        out = out.float()
        if guided:
            uncond, text = out.chunk(2)
            out = uncond + guidance_scale * (text - uncond)
        return out

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, cond=None) -> torch.Tensor:
        vae = self.pipe.vae
        latents = latents / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        images = vae.decode(latents.to(vae.dtype), return_dict=False)[0].float()
        images = ((images / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        return images.permute(0, 2, 3, 1).cpu()
