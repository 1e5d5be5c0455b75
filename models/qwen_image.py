"""Policy adapters for the Qwen-Image family: Qwen-Image text-to-image (diffusers QwenImagePipeline)
here, Qwen-Image-Edit instruction editing in models/qwen_image_edit.py on the same base.

Everything Qwen-Image-specific lives in these two files: the Qwen2.5-VL text encoder read through
the pipeline's prompt template, packed 2x2 latents with per-sample image shapes for RoPE, the
dynamic (resolution-dependent) shift of the sigma schedule, true CFG with the per-token norm
rescale, and the frame axis of the 3D VAE.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from diffusers import QwenImagePipeline

from models.base import DiffusersPolicy, PackedLatents
from models.config import ModelConfig

__all__ = ["NEGATIVE_PROMPT", "QwenConditioning", "QwenImagePolicy"]

# The negative prompt of the Qwen-Image model cards (true CFG needs a negative prompt; a single
# space, not the empty string).
NEGATIVE_PROMPT = " "
# The stock pipelines refuse longer prompts.
MAX_TEXT_TOKENS = 1024


def _pad_rows(rows: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack [L_i, D] rows into [N, max L, D] zero-padded embeddings and an [N, max L] bool mask."""
    length = max(row.shape[0] for row in rows)
    embeds = rows[0].new_zeros((len(rows), length, rows[0].shape[1]))
    mask = torch.zeros((len(rows), length), dtype=torch.bool, device=rows[0].device)
    for i, row in enumerate(rows):
        embeds[i, : row.shape[0]] = row
        mask[i, : row.shape[0]] = True
    return embeds, mask


def _trim(embeds: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop trailing columns that are padding in every row (less attention work per forward)."""
    length = int(mask.sum(dim=1).max())
    return embeds[:, :length], mask[:, :length]


def _concat_padded(first: tuple[torch.Tensor, torch.Tensor], second: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate two (embeds [B, L, D], mask [B, L]) batches along the batch, padding to one length."""
    length = max(first[0].shape[1], second[0].shape[1])

    def pad(embeds: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        extra = length - embeds.shape[1]
        return (
            torch.nn.functional.pad(embeds, (0, 0, 0, extra)),
            torch.nn.functional.pad(mask, (0, extra), value=False),
        )

    (a, mask_a), (b, mask_b) = pad(*first), pad(*second)
    return torch.cat([a, b]), torch.cat([mask_a, mask_b])


@dataclass
class QwenConditioning:
    """P encoded prompts (editing: instructions with their source images), one row each."""

    prompt_embeds: torch.Tensor  # [P, L, D] VL hidden states of the prompt (editing: with the source image), zero-padded
    prompt_mask: torch.Tensor  # [P, L] bool, True on real tokens
    negative_embeds: torch.Tensor  # [P, Ln, D] the same for the negative prompt (editing: it sees the same image)
    negative_mask: torch.Tensor  # [P, Ln] bool
    image_latents: torch.Tensor | None = None  # editing: [P, S_cond, 4 C] packed, normalised source latents
    image_grid: tuple[int, int] | None = None  # editing: (rows, cols) of the packed source token grid; S_cond = rows * cols

    def take(self, index: torch.Tensor) -> "QwenConditioning":
        index = index.to(self.prompt_embeds.device)
        embeds, mask = _trim(self.prompt_embeds[index], self.prompt_mask[index])
        negative, negative_mask = _trim(self.negative_embeds[index], self.negative_mask[index])
        image_latents = None if self.image_latents is None else self.image_latents[index]
        return QwenConditioning(embeds, mask, negative, negative_mask, image_latents, self.image_grid)


class QwenImagePolicy(PackedLatents, DiffusersPolicy):
    """models.base.Policy for Qwen-Image text-to-image checkpoints (e.g. Qwen/Qwen-Image).

    Uses config.pretrained / revision / dtype / use_lora / lora / gradient_checkpointing /
    max_sequence_length (text tokens kept after the prompt template, at most 1024; the stock
    pipeline's default is 512). Guidance is true CFG against NEGATIVE_PROMPT with the norm rescale
    (FIRM samples Qwen-Image at 4.0).
    """

    pipeline_classes: tuple[type, ...] = (QwenImagePipeline,)
    adapter_name = "qwen_image"
    example_checkpoint = "Qwen/Qwen-Image"
    reads_max_sequence_length = True
    # With LoRA on Qwen-Image some adapter weights get no gradient (the last block's text-stream
    # outputs feed nothing the image tokens read), so DDP must look for unused parameters.
    find_unused_parameters = True

    def __init__(self, config: ModelConfig, device: torch.device | str = "cpu", *, needs_reference: bool = True):
        if self.reads_max_sequence_length and config.max_sequence_length > MAX_TEXT_TOKENS:
            raise ValueError(f"model.max_sequence_length {config.max_sequence_length}: Qwen-Image takes at most {MAX_TEXT_TOKENS} text tokens")
        pipe = self._load_pipeline(config, device, **self._load_extras(config))
        if pipe.transformer.config.guidance_embeds:
            raise ValueError(f"{config.pretrained}: guidance-distilled transformers (guidance_embeds=True) are not supported")
        self.pipe = pipe
        self._setup_training(needs_reference)

    def _load_extras(self, config: ModelConfig) -> dict:
        """Components to pass to from_pretrained instead of loading them as declared."""
        return {}

    # ------------------------------------------------------------------ conditioning

    def _encode_text(self, text: str) -> torch.Tensor:
        """[L, D] embeddings of one prompt: the pipeline's own encoding (template, last hidden
        layer, template tokens dropped), truncated to model.max_sequence_length."""
        embeds, _ = self.pipe.encode_prompt(prompt=[text], device=self.device, max_sequence_length=self.config.max_sequence_length)
        return embeds[0]

    @torch.no_grad()
    def encode(self, prompts: Sequence[str], source_images: Sequence | None = None) -> QwenConditioning:
        """Encode prompts; row i belongs to prompts[i]. Each prompt is encoded on its own (batch
        of one, as the stock pipeline does for one prompt), so a row's embeddings do not depend on
        which other prompts share the call. encode_prompt is not under no_grad by itself; the
        decorator keeps cached embeddings out of the autograd graph."""
        if not prompts:
            raise ValueError("encode needs at least one prompt")
        if source_images is not None:
            raise ValueError("the qwen_image adapter is text-to-image and takes no source images; use model.adapter=qwen_image_edit for editing data")
        negative = self._encode_text(NEGATIVE_PROMPT)
        prompt_embeds, prompt_mask = _pad_rows([self._encode_text(prompt) for prompt in prompts])
        negative_embeds, negative_mask = _pad_rows([negative] * len(prompts))
        return QwenConditioning(prompt_embeds, prompt_mask, negative_embeds, negative_mask)

    # ------------------------------------------------------------------ model calls

    def velocity(
        self,
        latents: torch.Tensor,
        sigma: torch.Tensor,
        cond: QwenConditioning,
        guidance_scale: float,
        *,
        network: torch.nn.Module | None = None,
    ) -> torch.Tensor:
        """Guided velocity [B, C, h, w] of the (unpacked) latents, float32.

        The transformer reads the noisy latents as packed tokens (editing: followed by the source
        image's tokens, one RoPE grid each, of which only the noisy image's predictions are kept)
        and the prediction is unpacked. With guidance_scale > 1, conditional and negative halves
        run in ONE forward, their text padded to one length and masked.
        """
        network = network if network is not None else self.transformer
        batch = latents.shape[0]
        tokens, (rows, cols) = self._pack(latents)
        seq = tokens.shape[1]
        # The pipeline feeds timestep / 1000 with timestep = 1000 sigma: the model's timestep is sigma.
        timestep = sigma.to(self.device, torch.float32).expand(batch)
        hidden = tokens.to(self.compute_dtype)
        shapes = [(1, rows, cols)]
        if cond.image_latents is not None:
            hidden = torch.cat([hidden, cond.image_latents.to(self.compute_dtype)], dim=1)
            shapes.append((1, *cond.image_grid))
        embeds, mask = cond.prompt_embeds, cond.prompt_mask
        guided = guidance_scale > 1.0
        if guided:
            embeds, mask = _concat_padded((cond.prompt_embeds, cond.prompt_mask), (cond.negative_embeds, cond.negative_mask))
            hidden = torch.cat([hidden, hidden])
            timestep = torch.cat([timestep, timestep])
        img_shapes = [shapes] * hidden.shape[0]
        # No mask when nothing is padded: the stock pipeline passes None then, and unmasked
        # attention can use the fastest kernels.
        attention_mask = None if bool(mask.all()) else mask
        with self._autocast():
            out = network(
                hidden_states=hidden,
                timestep=timestep,
                encoder_hidden_states=embeds.to(self.compute_dtype),
                encoder_hidden_states_mask=attention_mask,
                img_shapes=img_shapes,
                return_dict=False,
            )[0]
        out = out[:, :seq].float()
        if guided:
            conditional, negative = out.chunk(2)
            combined = negative + guidance_scale * (conditional - negative)
            # Qwen-Image's true CFG keeps each token's velocity norm that of the conditional
            # prediction (as in the diffusers Qwen-Image pipelines).
            scale = conditional.norm(dim=-1, keepdim=True) / combined.norm(dim=-1, keepdim=True)
            out = combined * scale
        return self._unpack(out, rows, cols)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, cond: QwenConditioning | None = None) -> torch.Tensor:
        """[B, H, W, 3] uint8 images on the CPU from latents [B, C, h, w]."""
        vae = self.pipe.vae
        latents = latents.unsqueeze(2)  # [B, C, 1, h, w]
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean, device=latents.device).view(shape)
        std = torch.tensor(vae.config.latents_std, device=latents.device).view(shape)
        latents = latents.float() * std + mean
        # The Qwen-Image VAE is a video VAE: one frame in, one frame out.
        images = vae.decode(latents.to(vae.dtype), return_dict=False)[0][:, :, 0].float()
        images = ((images / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        return images.permute(0, 2, 3, 1).cpu()
