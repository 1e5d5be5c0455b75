"""PickScore (Kirstain et al. 2023): a CLIP ViT-H/14 fine-tuned on human preferences (Pick-a-Pic).

Score = exp(logit_scale) * cosine(text embedding, image embedding), both embeddings L2-normalised;
that is the diagonal of CLIPModel's `logits_per_image`, computed per pair instead of for the whole
B x B matrix. SD3.5 images score about 20 to 24; Flow-GRPO trains on score / 26 (scale=1/26).

The helpers below (dtype names, image conversion, CLIP features) are shared with rewards/artifact.py.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoProcessor, CLIPModel, ProcessorMixin
from transformers.image_processing_utils import BaseImageProcessor
from transformers.utils import ModelOutput

from rewards.base import RewardBatch, RewardOutput

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype for a config name ("fp32", "bf16", "fp16")."""
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def check_batch_size(batch_size: int) -> int:
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    return batch_size


def to_pil(images: np.ndarray) -> list[Image.Image]:
    """[B, H, W, 3] uint8 -> B RGB PIL images.

    PIL rather than raw arrays: image processors guess the channel axis of an array from its
    shape, and a guess can go wrong on small images; a PIL image is unambiguous.
    """
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"reward images must be a uint8 [B, H, W, 3] array, got {images.dtype} {images.shape}")
    return [Image.fromarray(image) for image in images]


def projected(features: torch.Tensor | ModelOutput) -> torch.Tensor:
    """The projected embedding from CLIPModel.get_{text,image}_features.

    transformers 4 returns the projected tensor itself; transformers 5 returns a
    BaseModelOutputWithPooling whose pooler_output holds the projection (not the raw pooled
    hidden state, which a naive `.pooler_output` of the tower would give).
    """
    if isinstance(features, torch.Tensor):
        return features
    return features.pooler_output


def load_clip(path: str | os.PathLike[str], device: torch.device, dtype: torch.dtype) -> CLIPModel:
    """A frozen CLIPModel in eval mode on device."""
    model = CLIPModel.from_pretrained(path, dtype=dtype)
    return model.to(device).eval().requires_grad_(False)


def clip_image_features(
    model: CLIPModel,
    processor: ProcessorMixin | BaseImageProcessor,
    images: list[Image.Image],
    device: torch.device,
    *,
    normalize: bool = True,
) -> torch.Tensor:
    """Projected CLIP image embeddings, L2-normalised unless told otherwise: [B, D] float32."""
    pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
    features = projected(model.get_image_features(pixel_values=pixel_values.to(device, model.dtype))).float()
    # Normalised in float32: in bf16 the norm alone carries a ~0.4% error.
    return F.normalize(features, dim=-1) if normalize else features


class PickScore:
    """Reward = PickScore * scale, one score per (image, prompt) pair.

    Args:
        model: CLIPModel checkpoint (hub id or local directory).
        processor: Processor checkpoint; PickScore ships without one and uses the LAION
            ViT-H/14 processor (224 px CLIP preprocessing, 77-token text).
        scale: Multiplies the score; Flow-GRPO uses 1/26 to bring it near 1.
        device: Where the model runs.
        dtype: Model weights' dtype ("fp32", "bf16", "fp16"); the score is computed in float32.
        batch_size: Pairs per forward pass, to bound memory.
        name: The component name in RewardOutput.scores.
    """

    def __init__(
        self,
        model: str | os.PathLike[str] = "yuvalkirstain/PickScore_v1",
        processor: str | os.PathLike[str] = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        *,
        scale: float = 1.0,
        device: str = "cpu",
        dtype: str = "fp32",
        batch_size: int = 16,
        name: str = "pickscore",
    ):
        self.device = torch.device(device)
        self.batch_size = check_batch_size(batch_size)
        self.scale = scale
        self.model = load_clip(model, self.device, torch_dtype(dtype))
        self.processor = AutoProcessor.from_pretrained(processor)
        # Prompts longer than the text tower's position table would crash the forward pass;
        # truncate instead (CLIP's 77 tokens). The tokenizer's own limit can be unset (a huge
        # sentinel), hence the min with the model's.
        self.max_text_tokens = min(
            self.processor.tokenizer.model_max_length, self.model.config.text_config.max_position_embeddings
        )
        self.components = (name,)

    @torch.inference_mode()
    def unscaled_scores(self, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        """PickScore of each (images[i], prompts[i]) pair, before `scale`: [B] float64."""
        if len(images) != len(prompts):
            raise ValueError(f"PickScore needs one prompt per image, got {len(images)} images and {len(prompts)} prompts")
        pil_images = to_pil(images)
        # exp in float32: PickScore's logit_scale is about 4.6 (exp = 100), where bf16 steps by 0.5.
        logit_scale = self.model.logit_scale.float().exp()
        scores = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = slice(start, start + self.batch_size)
            image_embeds = clip_image_features(self.model, self.processor, pil_images[chunk], self.device)
            text_inputs = self.processor(
                text=prompts[chunk], padding=True, truncation=True, max_length=self.max_text_tokens, return_tensors="pt"
            ).to(self.device)
            text_features = projected(
                self.model.get_text_features(input_ids=text_inputs["input_ids"], attention_mask=text_inputs["attention_mask"])
            )
            text_embeds = F.normalize(text_features.float(), dim=-1)
            scores.append(logit_scale * (text_embeds * image_embeds).sum(dim=-1))
        if not scores:
            return np.zeros(0, dtype=np.float64)
        return torch.cat(scores).cpu().numpy().astype(np.float64)

    def __call__(self, batch: RewardBatch) -> RewardOutput:
        unscaled = self.unscaled_scores(batch.images, batch.prompts)
        # The unscaled mean is logged because it is the number papers report (about 20 to 24 for SD3.5).
        extras = {"unscaled_mean": float(unscaled.mean())} if len(unscaled) else {}
        return RewardOutput(scores={self.components[0]: unscaled * self.scale}, extras=extras)
