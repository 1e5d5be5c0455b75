"""Policy adapter for Qwen-Image-Edit (diffusers QwenImageEditPipeline; QwenImageEditPlusPipeline
for the 2509 / 2511 checkpoints).

Everything Qwen-specific lives here: the VL text encoder that reads the instruction together with
the source image, packed 2x2 latents, the source image's VAE latents appended to the noisy tokens
along the sequence, per-sample image shapes for RoPE, the dynamic (resolution-dependent) shift of
the sigma schedule, true CFG with the per-token norm rescale, and the frame axis of the 3D VAE.

Unlike the stock pipeline, which resizes every source image to about 1024x1024 (16k condition
tokens), the condition is used at the size the caller gives (the training resolution).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Sequence

import torch
from diffusers import DiffusionPipeline, QwenImageEditPipeline, QwenImageEditPlusPipeline
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as edit_plus_module

# ProcessorMixin is imported by name on purpose: a pipeline saved with ImageOnlyQwen2VLProcessor
# records this module as the processor's library, and diffusers finds the processor's load method
# by looking the base classes up by name in that module.
from transformers import ProcessorMixin, Qwen2VLProcessor  # noqa: F401

from models.base import DTYPES, DiffusersPolicy, PackedLatents
from models.config import ModelConfig


__all__ = ["ImageOnlyQwen2VLProcessor", "QwenEditConditioning", "QwenImageEditPolicy", "NEGATIVE_PROMPT"]

# The negative prompt of the Qwen-Image-Edit model card (true CFG needs a negative prompt; a single
# space, not the empty string).
NEGATIVE_PROMPT = " "
PIPELINE_CLASSES = (QwenImageEditPipeline, QwenImageEditPlusPipeline)


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """Qwen2VLProcessor without a video processor.

    transformers 5 builds Qwen2-VL's video processor on torchvision; without torchvision the stock
    processor cannot be built or loaded. Editing never passes videos, so this subclass drops that
    attribute (ProcessorMixin derives its sub-processors from the __init__ signature) and works with
    the PIL image processor. A pipeline saved with it loads through
    `QwenImageEditPipeline.from_pretrained` once this module is imported.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


def _needs_image_only_processor(pretrained: str, revision: str | None) -> bool:
    """True when the checkpoint names the stock Qwen2VLProcessor and torchvision is missing, so that
    loading it as declared would fail."""
    if importlib.util.find_spec("torchvision") is not None:
        return False
    declared = DiffusionPipeline.load_config(pretrained, revision=revision).get("processor", [None, None])
    return tuple(declared) == ("transformers", "Qwen2VLProcessor")


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
class QwenEditConditioning:
    """P encoded (instruction, source image) pairs, one row each."""

    prompt_embeds: torch.Tensor  # [P, L, D] VL hidden states of the instruction with the source image, zero-padded
    prompt_mask: torch.Tensor  # [P, L] bool, True on real tokens
    negative_embeds: torch.Tensor  # [P, Ln, D] the same for the negative prompt (it sees the same image)
    negative_mask: torch.Tensor  # [P, Ln] bool
    image_latents: torch.Tensor  # [P, S_cond, 4 C] packed, normalised VAE latents of the source image
    image_grid: tuple[int, int]  # (rows, cols) of the packed source-image token grid; S_cond = rows * cols

    def take(self, index: torch.Tensor) -> "QwenEditConditioning":
        index = index.to(self.prompt_embeds.device)
        embeds, mask = _trim(self.prompt_embeds[index], self.prompt_mask[index])
        negative, negative_mask = _trim(self.negative_embeds[index], self.negative_mask[index])
        return QwenEditConditioning(embeds, mask, negative, negative_mask, self.image_latents[index], self.image_grid)


class QwenImageEditPolicy(PackedLatents, DiffusersPolicy):
    """models.base.Policy for Qwen-Image-Edit checkpoints.

    Uses config.pretrained / revision / build_tiny_if_missing / dtype / use_lora / lora /
    gradient_checkpointing. config.max_sequence_length is not used: the text length is that of the
    instruction plus the source image's VL tokens, and the stock edit pipelines do not truncate it
    either (they accept the argument and ignore it).
    """

    # With LoRA on Qwen-Image some adapter weights get no gradient (the last block's text-stream
    # outputs feed nothing the image tokens read), so DDP must look for unused parameters.
    find_unused_parameters = True

    def __init__(self, config: ModelConfig, device: torch.device | str = "cpu", *, needs_reference: bool = True):
        self.config = config
        self.device = torch.device(device)
        self.compute_dtype = DTYPES[config.dtype]
        extra = {}
        if _needs_image_only_processor(config.pretrained, config.revision):
            extra["processor"] = ImageOnlyQwen2VLProcessor.from_pretrained(
                config.pretrained, subfolder="processor", revision=config.revision
            )
        # Frozen parts load in the compute dtype; a fully trained transformer stays fp32 (master
        # weights) and runs under autocast.
        pipe = DiffusionPipeline.from_pretrained(config.pretrained, revision=config.revision, dtype=self.compute_dtype, **extra)
        if not isinstance(pipe, PIPELINE_CLASSES):
            raise ValueError(
                f"{config.pretrained} holds a {type(pipe).__name__}; the qwen_image_edit adapter needs a "
                "QwenImageEditPipeline or QwenImageEditPlusPipeline checkpoint (e.g. Qwen/Qwen-Image-Edit)"
            )
        if pipe.transformer.config.guidance_embeds:
            raise ValueError(f"{config.pretrained}: guidance-distilled transformers (guidance_embeds=True) are not supported")
        pipe.set_progress_bar_config(disable=True)
        for module in (pipe.text_encoder, pipe.vae, pipe.transformer):
            module.requires_grad_(False).eval().to(self.device)
        self.pipe = pipe
        # Plus checkpoints were trained with the VL encoder seeing the source image at about
        # 384x384 (its own constant); the original Edit model sees the same image as the VAE.
        self._vl_image_area = edit_plus_module.CONDITION_IMAGE_SIZE if isinstance(pipe, QwenImageEditPlusPipeline) else None
        self._setup_training(needs_reference)

    # ------------------------------------------------------------------ conditioning

    def _encode_one(self, prompt: str, image) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int]]:
        """Instruction and negative embeddings [L, D] and packed source latents [S, 4C] of one pair."""
        pil = self._source_image(image)
        width, height = pil.size
        vl_image = pil
        if self._vl_image_area is not None:
            vl_width, vl_height = edit_plus_module.calculate_dimensions(self._vl_image_area, width / height)
            vl_image = self.pipe.image_processor.resize(pil, vl_height, vl_width)
        embeds = []
        for text in (prompt, NEGATIVE_PROMPT):
            # The pipeline's own prompt encoding: the VL model reads the instruction and the image.
            row, _ = self.pipe.encode_prompt(prompt=[text], image=vl_image, device=self.device)
            embeds.append(row[0])
        pixels = self.pipe.image_processor.preprocess(pil, height, width).unsqueeze(2)  # [1, 3, 1, H, W]
        latents = self.pipe._encode_vae_image(pixels.to(self.device, self.pipe.vae.dtype), generator=None)
        latent_height, latent_width = latents.shape[3:]
        packed = self.pipe._pack_latents(latents, 1, self._latent_channels, latent_height, latent_width)
        return embeds[0], embeds[1], packed[0], (latent_height // 2, latent_width // 2)

    @torch.no_grad()
    def encode(self, prompts: Sequence[str], source_images: Sequence | None = None) -> QwenEditConditioning:
        """Encode (instruction, source image) pairs; row i belongs to prompts[i].

        Each pair is encoded on its own (batch of one, as the stock pipeline does), so a row's
        embeddings do not depend on which other prompts share the call. encode_prompt is not under
        no_grad by itself; the decorator keeps cached embeddings out of the autograd graph.
        """
        if not prompts:
            raise ValueError("encode needs at least one instruction")
        if source_images is None:
            raise ValueError("the qwen_image_edit adapter edits images: pass one source image per instruction (data.train_edits)")
        if len(source_images) != len(prompts):
            raise ValueError(f"got {len(prompts)} instructions but {len(source_images)} source images; pass one image per instruction")
        rows = [self._encode_one(prompt, image) for prompt, image in zip(prompts, source_images)]
        grids = {row[3] for row in rows}
        if len(grids) > 1:
            raise ValueError(f"source images of one batch must share one size, got latent grids {sorted(grids)}")
        prompt_embeds, prompt_mask = _pad_rows([row[0] for row in rows])
        negative_embeds, negative_mask = _pad_rows([row[1] for row in rows])
        return QwenEditConditioning(
            prompt_embeds=prompt_embeds,
            prompt_mask=prompt_mask,
            negative_embeds=negative_embeds,
            negative_mask=negative_mask,
            image_latents=torch.stack([row[2] for row in rows]),
            image_grid=grids.pop(),
        )

    # ------------------------------------------------------------------ model calls

    def velocity(
        self,
        latents: torch.Tensor,
        sigma: torch.Tensor,
        cond: QwenEditConditioning,
        guidance_scale: float,
        *,
        network: torch.nn.Module | None = None,
    ) -> torch.Tensor:
        """Guided velocity [B, C, h, w] of the (unpacked) latents, float32.

        The transformer reads the noisy latents as packed tokens followed by the source image's
        tokens (one RoPE grid each) and predicts for all; only the noisy image's tokens are kept
        and unpacked. With guidance_scale > 1, conditional and negative halves run in ONE forward,
        their text padded to one length and masked.
        """
        network = network if network is not None else self.transformer
        batch = latents.shape[0]
        latents, (rows, cols) = self._pack(latents)
        seq = latents.shape[1]
        # The pipeline feeds timestep / 1000 with timestep = 1000 sigma: the model's timestep is sigma.
        timestep = sigma.to(self.device, torch.float32).expand(batch)
        embeds, mask = cond.prompt_embeds, cond.prompt_mask
        image_latents = cond.image_latents
        guided = guidance_scale > 1.0
        if guided:
            embeds, mask = _concat_padded((cond.prompt_embeds, cond.prompt_mask), (cond.negative_embeds, cond.negative_mask))
            latents = torch.cat([latents, latents])
            image_latents = torch.cat([image_latents, image_latents])
            timestep = torch.cat([timestep, timestep])
        hidden = torch.cat([latents.to(self.compute_dtype), image_latents.to(self.compute_dtype)], dim=1)
        img_shapes = [[(1, rows, cols), (1, *cond.image_grid)]] * hidden.shape[0]
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
    def decode(self, latents: torch.Tensor, cond: QwenEditConditioning | None = None) -> torch.Tensor:
        """[B, H, W, 3] uint8 images on the CPU from latents [B, C, h, w]."""
        vae = self.pipe.vae
        latents = latents.unsqueeze(2)  # [B, C, 1, h, w]: the Qwen-Image VAE is a video VAE
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean, device=latents.device).view(shape)
        std = torch.tensor(vae.config.latents_std, device=latents.device).view(shape)
        latents = latents.float() * std + mean
        # The Qwen-Image VAE is a video VAE: one frame in, one frame out.
        images = vae.decode(latents.to(vae.dtype), return_dict=False)[0][:, :, 0].float()
        images = ((images / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        return images.permute(0, 2, 3, 1).cpu()
