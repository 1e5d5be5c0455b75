"""Policy adapter for Stable Diffusion 3 / 3.5 (diffusers StableDiffusion3Pipeline).

Loads any SD3 pipeline directory or hub id through from_pretrained; trains LoRA adapters (peft,
saved in the format `pipe.load_lora_weights` reads) or the full transformer.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from diffusers import StableDiffusion3Pipeline
from diffusers.training_utils import cast_training_params
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from models.base import lora_disabled
from rl.config import ModelConfig
from rl.sde import draw_noise

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FULL_WEIGHTS_FILE = "transformer.safetensors"


@dataclass
class SD3Conditioning:
    prompt_embeds: torch.Tensor  # [P, L, D] CLIP + T5 token embeddings
    pooled_embeds: torch.Tensor  # [P, Dp] pooled CLIP embeddings
    negative_embeds: torch.Tensor  # [1, L, D] embeddings of the empty prompt (CFG)
    negative_pooled: torch.Tensor  # [1, Dp]

    def take(self, index: torch.Tensor) -> "SD3Conditioning":
        index = index.to(self.prompt_embeds.device)
        return SD3Conditioning(self.prompt_embeds[index], self.pooled_embeds[index], self.negative_embeds, self.negative_pooled)


class SD3Policy:
    def __init__(self, config: ModelConfig, device: torch.device | str = "cpu", *, needs_reference: bool = True):
        self.config = config
        self.device = torch.device(device)
        self.compute_dtype = DTYPES[config.dtype]
        if config.build_tiny_if_missing:
            from models.tiny import ensure_tiny_sd3

            ensure_tiny_sd3(config.pretrained, text_max_length=config.max_sequence_length, warm_start_steps=config.tiny_warm_start_steps)
        # Frozen parts load in the compute dtype; a fully trained transformer stays fp32 (master
        # weights) and runs under autocast.
        pipe = StableDiffusion3Pipeline.from_pretrained(
            config.pretrained, revision=config.revision, dtype=self.compute_dtype
        )
        pipe.set_progress_bar_config(disable=True)
        for module in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3, pipe.vae, pipe.transformer):
            if module is not None:
                module.requires_grad_(False).eval().to(self.device)
        self.pipe = pipe
        self.network = pipe.transformer
        self._reference_copy = None
        if config.use_lora:
            self.network.add_adapter(
                LoraConfig(
                    r=config.lora.rank,
                    lora_alpha=config.lora.alpha,
                    lora_dropout=config.lora.dropout,
                    init_lora_weights="gaussian",
                    target_modules=list(config.lora.target_modules),
                )
            )
            # Adapters train in fp32 even when the frozen base runs in bf16 (stable Adam updates).
            cast_training_params(self.network, dtype=torch.float32)
        else:
            self.network.to(torch.float32)
            if needs_reference:
                self._reference_copy = copy.deepcopy(self.network).requires_grad_(False)
                self._reference_copy.to(self.compute_dtype)
            self.network.requires_grad_(True)
        if config.gradient_checkpointing:
            self.network.enable_gradient_checkpointing()
        self.transformer = self.network
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

    def sigmas(self, num_steps: int, resolution: int) -> torch.Tensor:
        """The pipeline scheduler's own schedule (shifted, ending at 0), so that evaluation
        matches `pipe(num_inference_steps=N)` and Flow-GRPO's published settings carry over.
        SD3's shift does not depend on the resolution."""
        scheduler = copy.deepcopy(self.pipe.scheduler)
        scheduler.set_timesteps(num_steps, device="cpu")
        return scheduler.sigmas.to(torch.float32)

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        size = resolution // self.pipe.vae_scale_factor
        return (self.network.config.in_channels, size, size)

    def initial_noise(self, generators: Sequence[torch.Generator], resolution: int, cond=None) -> torch.Tensor:
        return draw_noise((len(generators), *self.latent_shape(resolution)), list(generators), device=self.device)

    # ------------------------------------------------------------------ model calls

    def _autocast(self):
        enabled = self.compute_dtype != torch.float32
        return torch.autocast(self.device.type, dtype=self.compute_dtype, enabled=enabled)

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

    # ------------------------------------------------------------------ training state

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.network.parameters() if p.requires_grad]

    @contextlib.contextmanager
    def reference(self):
        if self.config.use_lora:
            with lora_disabled(self.network):
                yield self.transformer
        else:
            if self._reference_copy is None:
                raise RuntimeError("full fine-tuning without a reference copy: build SD3Policy with needs_reference=True")
            yield self._reference_copy

    def trainable_state_dict(self, full_state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """LoRA weights (peft names) or the full transformer; `full_state_dict` is a gathered
        state dict (ZeRO-3) to take them from instead of the local module."""
        if self.config.use_lora:
            return get_peft_model_state_dict(self.network, state_dict=full_state_dict)
        return full_state_dict if full_state_dict is not None else self.network.state_dict()

    def save_trainable(self, directory: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        state_dict = state_dict if state_dict is not None else self.trainable_state_dict()
        state_dict = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
        if self.config.use_lora:
            # The adapter metadata carries lora_alpha: without it load_lora_weights assumes
            # alpha == rank and a LoRA trained with alpha != rank loads at the wrong strength.
            StableDiffusion3Pipeline.save_lora_weights(
                directory, transformer_lora_layers=state_dict,
                transformer_lora_adapter_metadata=self.network.peft_config["default"].to_dict(),
            )
        else:
            save_file(state_dict, str(Path(directory) / FULL_WEIGHTS_FILE))

    def load_trainable(self, directory: str | Path) -> None:
        if self.config.use_lora:
            lora = StableDiffusion3Pipeline.lora_state_dict(str(directory))
            prefix = "transformer."
            lora = {k[len(prefix):]: v for k, v in lora.items() if k.startswith(prefix)}
            result = set_peft_model_state_dict(self.network, lora, adapter_name="default")
            if getattr(result, "unexpected_keys", None):
                raise ValueError(f"LoRA checkpoint in {directory} does not match the adapter config: unexpected keys {result.unexpected_keys[:5]}")
            cast_training_params(self.network, dtype=torch.float32)
        else:
            self.network.load_state_dict(load_file(str(Path(directory) / FULL_WEIGHTS_FILE)))
