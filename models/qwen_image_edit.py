"""Policy adapter for Qwen-Image-Edit (diffusers QwenImageEditPipeline; QwenImageEditPlusPipeline
for the 2509 / 2511 checkpoints): the Qwen-Image text-to-image adapter (models/qwen_image.py) plus
the source image, read twice: by the VL text encoder together with the instruction, and as VAE
latents appended to the noisy tokens along the sequence.

Unlike the stock pipeline, which resizes every source image to about 1024x1024 (16k condition
tokens), the condition is used at the size the caller gives (the training resolution).
"""

from __future__ import annotations

import importlib.util
from typing import Sequence

import torch
from diffusers import DiffusionPipeline, QwenImageEditPipeline, QwenImageEditPlusPipeline
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as edit_plus_module

# ProcessorMixin is imported by name on purpose: a pipeline saved with ImageOnlyQwen2VLProcessor
# records this module as the processor's library, and diffusers finds the processor's load method
# by looking the base classes up by name in that module.
from transformers import ProcessorMixin, Qwen2VLProcessor  # noqa: F401

from models.config import ModelConfig
from models.qwen_image import NEGATIVE_PROMPT, QwenConditioning, QwenImagePolicy, _pad_rows

__all__ = ["ImageOnlyQwen2VLProcessor", "QwenImageEditPolicy", "NEGATIVE_PROMPT"]


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


class QwenImageEditPolicy(QwenImagePolicy):
    """models.base.Policy for Qwen-Image-Edit checkpoints.

    Uses config.pretrained / revision / build_tiny_if_missing / dtype / use_lora / lora /
    gradient_checkpointing. config.max_sequence_length is not used: the text length is that of the
    instruction plus the source image's VL tokens, and the stock edit pipelines do not truncate it
    either (they accept the argument and ignore it).
    """

    pipeline_classes = (QwenImageEditPipeline, QwenImageEditPlusPipeline)
    adapter_name = "qwen_image_edit"
    example_checkpoint = "Qwen/Qwen-Image-Edit"
    reads_max_sequence_length = False

    def __init__(self, config: ModelConfig, device: torch.device | str = "cpu", *, needs_reference: bool = True):
        super().__init__(config, device, needs_reference=needs_reference)
        # Plus checkpoints were trained with the VL encoder seeing the source image at about
        # 384x384 (its own constant); the original Edit model sees the same image as the VAE.
        self._vl_image_area = edit_plus_module.CONDITION_IMAGE_SIZE if isinstance(self.pipe, QwenImageEditPlusPipeline) else None

    def _load_extras(self, config: ModelConfig) -> dict:
        if _needs_image_only_processor(config.pretrained, config.revision):
            return {"processor": ImageOnlyQwen2VLProcessor.from_pretrained(config.pretrained, subfolder="processor", revision=config.revision)}
        return {}

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
    def encode(self, prompts: Sequence[str], source_images: Sequence | None = None) -> QwenConditioning:
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
        return QwenConditioning(
            prompt_embeds=prompt_embeds,
            prompt_mask=prompt_mask,
            negative_embeds=negative_embeds,
            negative_mask=negative_mask,
            image_latents=torch.stack([row[2] for row in rows]),
            image_grid=grids.pop(),
        )
