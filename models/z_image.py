"""Policy adapter for Z-Image (diffusers ZImagePipeline), e.g. Tongyi-MAI/Z-Image-Turbo.

Everything Z-Image-specific lives here: prompts encoded by a Qwen3 language model through its
chat template, taken from its second-to-last hidden layer and kept at each prompt's own length
(the transformer reads a list of variable-length captions and pads each one itself, with a
learned pad token, to a multiple of 32 tokens: zero padding of ours would change its output);
latents handed to the transformer as a list of [C, 1, h, w] tensors that it patchifies 2x2
itself; Z-Image's timestep
convention (t = 1 - sigma: 0 is noise, 1 the clean image) and its prediction, which points from
the noise to the clean image and is therefore the NEGATIVE of the d x / d sigma velocity the Euler
step uses; the schedule of the stock pipeline (linspace(1, 1/N, N) through the scheduler's shift:
a fixed shift of 3 for Z-Image-Turbo, mu from the image token count where a scheduler enables
dynamic shifting); and the VAE's scaling and shift factors (FLUX.1's VAE).

Guidance: Z-Image-Turbo is distilled to sample WITHOUT CFG (its model card uses the pipeline's
guidance_scale 0), which here is guidance 1.0: one forward of B rows. The pipeline also has true
CFG (for the undistilled Z-Image); guidance w > 1 here runs conditional and empty-prompt rows as
ONE forward of 2B rows and combines them as the pipeline does, pos + (w - 1) (pos - neg): the
pipeline's guidance_scale g is this w - 1. Its optional CFG renormalisation and truncation are off
by default in the pipeline and not offered here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from diffusers import ZImagePipeline

from models.base import DiffusersPolicy, PackedLatents
from models.config import ModelConfig

__all__ = ["NEGATIVE_PROMPT", "ZImageConditioning", "ZImagePolicy"]

# The pipeline's negative prompt when none is given (true CFG only).
NEGATIVE_PROMPT = ""


@dataclass
class ZImageConditioning:
    """P encoded prompts, one row each, and the negative prompt's embeddings for true CFG."""

    prompt_embeds: torch.Tensor  # [P, L, D] each prompt's real tokens first (its own length), then zeros
    prompt_lengths: torch.Tensor  # [P] long, on the CPU: real tokens of each row
    negative_embeds: torch.Tensor  # [Ln, D] the empty negative prompt's tokens, shared by every row

    def take(self, index: torch.Tensor) -> "ZImageConditioning":
        lengths = self.prompt_lengths[index.cpu()]
        embeds = self.prompt_embeds[index.to(self.prompt_embeds.device), : int(lengths.max())]
        return ZImageConditioning(embeds, lengths, self.negative_embeds)

    def captions(self) -> list[torch.Tensor]:
        """The rows as the transformer reads them: a list of [L_i, D] tensors, no padding."""
        return [row[:length] for row, length in zip(self.prompt_embeds, self.prompt_lengths.tolist())]


class ZImagePolicy(PackedLatents, DiffusersPolicy):
    """models.base.Policy for Z-Image checkpoints (ZImagePipeline; e.g. Tongyi-MAI/Z-Image-Turbo).

    Uses config.pretrained / revision / dtype / use_lora / lora / gradient_checkpointing /
    max_sequence_length (tokens of the chat-formatted prompt, the pipeline's max_sequence_length;
    longer prompts are truncated as the pipeline truncates them; 512 is the pipeline's default).
    Latents are [B, C, h, w] (h, w = image sides / 8, even); sides are multiples of 16 px.
    """

    pipeline_classes = (ZImagePipeline,)
    adapter_name = "z_image"
    example_checkpoint = "Tongyi-MAI/Z-Image-Turbo"

    def __init__(self, config: ModelConfig, device: torch.device | str = "cpu", *, needs_reference: bool = True):
        pipe = self._load_pipeline(config, device)
        self.pipe = pipe
        self._setup_training(needs_reference)

    # ------------------------------------------------------------------ sizes and schedule

    @property
    def _latent_channels(self) -> int:
        # The transformer patchifies by itself: it reads the VAE's channels unpacked.
        return self.network.config.in_channels

    def _initial_sigmas(self, num_steps: int):
        """The stock pipeline's own initial sigmas (get_default_z_image_sigmas; the scheduler then
        shifts them: by a fixed 3 for Z-Image-Turbo, whose schedule therefore does not depend on
        the image size, or by mu from the token count where a scheduler shifts dynamically)."""
        return self._pipeline_module.get_default_z_image_sigmas(num_steps)

    # ------------------------------------------------------------------ conditioning

    @torch.no_grad()
    def encode(self, prompts: Sequence[str], source_images: Sequence | None = None) -> ZImageConditioning:
        """Encode unique prompts with the pipeline's own encode_prompt (chat template, Qwen3's
        second-to-last hidden layer, each prompt's real tokens only); row i belongs to prompts[i].

        Each prompt is padded to max_sequence_length on its own and the language model is causal,
        so a row does not depend on the others. The empty negative prompt is encoded in the same
        call. encode_prompt is not under no_grad by itself; the decorator keeps cached embeddings
        out of the autograd graph."""
        if source_images is not None:
            raise ValueError("the z_image adapter is text-to-image and takes no source images (data.train_edits); use data.train_prompts")
        if not prompts:
            raise ValueError("encode needs at least one prompt")
        rows, _ = self.pipe.encode_prompt(
            prompt=[*prompts, NEGATIVE_PROMPT],
            device=self.device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.config.max_sequence_length,
        )
        *rows, negative = rows
        lengths = torch.tensor([row.shape[0] for row in rows], dtype=torch.long)
        embeds = rows[0].new_zeros((len(rows), int(lengths.max()), rows[0].shape[1]))
        for i, row in enumerate(rows):
            embeds[i, : row.shape[0]] = row
        return ZImageConditioning(embeds, lengths, negative)

    # ------------------------------------------------------------------ model calls

    def velocity(
        self,
        latents: torch.Tensor,
        sigma: torch.Tensor,
        cond: ZImageConditioning,
        guidance_scale: float,
        *,
        network: torch.nn.Module | None = None,
    ) -> torch.Tensor:
        """Velocity d x / d sigma [B, C, h, w] of the latents, float32: ONE forward of B rows at
        guidance 1.0 (Z-Image-Turbo's), of 2B rows (prompts, then the negative prompt) with true
        CFG at guidance w > 1."""
        if guidance_scale < 1.0:
            raise ValueError(
                f"guidance {guidance_scale}: set sample.guidance_scale / eval.guidance_scale to 1.0 for Z-Image-Turbo "
                "(no CFG; the pipeline's guidance_scale 0) or to w > 1 for true CFG (the pipeline's guidance_scale w - 1)"
            )
        network = network if network is not None else self.transformer
        batch = latents.shape[0]
        guided = guidance_scale > 1.0
        sigma = sigma.to(self.device, torch.float32).expand(batch)
        # The pipeline's arithmetic on the scheduler's timestep T sigma: t = (T - T sigma) / T, the
        # flow time that runs from 0 (noise) to 1 (clean); the transformer scales it by t_scale.
        steps = float(self.pipe.scheduler.config.num_train_timesteps)
        timestep = (steps - sigma * steps) / steps
        images = list(latents.to(self.compute_dtype).unsqueeze(2).unbind(0))  # B x [C, 1, h, w]
        captions = [caption.to(self.compute_dtype) for caption in cond.captions()]
        if guided:
            images = images + images
            captions = captions + [cond.negative_embeds.to(self.compute_dtype)] * batch
            timestep = torch.cat([timestep, timestep])
        with self._autocast():
            out = network(x=images, t=timestep, cap_feats=captions, return_dict=False)[0]
        out = torch.stack([row.float() for row in out]).squeeze(2)
        if guided:
            conditional, negative = out[:batch], out[batch:]
            out = conditional + (guidance_scale - 1.0) * (conditional - negative)
        # Z-Image predicts noise-to-image (x0 - eps); the pipeline negates it before its Euler
        # step x + (sigma_next - sigma) v, and so do we.
        return -out

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, cond: ZImageConditioning | None = None) -> torch.Tensor:
        """[B, H, W, 3] uint8 images on the CPU from latents [B, C, h, w]."""
        vae = self.pipe.vae
        latents = latents.float() / vae.config.scaling_factor + vae.config.shift_factor
        images = vae.decode(latents.to(vae.dtype), return_dict=False)[0].float()
        images = ((images / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        return images.permute(0, 2, 3, 1).cpu()
