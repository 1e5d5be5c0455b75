"""PickScore (Kirstain et al. 2023): a CLIP ViT-H/14 fine-tuned on human preferences (Pick-a-Pic).

Score = exp(logit_scale) * cosine(text embedding, image embedding), both embeddings L2-normalised;
that is the diagonal of CLIPModel's `logits_per_image`, computed per pair instead of for the whole
B x B matrix. Images of current text-to-image models score about 20 to 24; Flow-GRPO trains on score / 26 (scale=1/26).
"""

from __future__ import annotations

import os

import numpy as np
import torch
from transformers import AutoProcessor

from rewards.base import RewardBatch, RewardOutput
from rewards.images import check_batch_size, clip_image_features, clip_max_text_tokens, clip_text_features, load_clip, to_pil, torch_dtype


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
        self.max_text_tokens = clip_max_text_tokens(self.model, self.processor)
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
            text_embeds = clip_text_features(self.model, self.processor, prompts[chunk], self.device, self.max_text_tokens)
            scores.append(logit_scale * (text_embeds * image_embeds).sum(dim=-1))
        if not scores:
            return np.zeros(0, dtype=np.float64)
        return torch.cat(scores).cpu().numpy().astype(np.float64)

    def __call__(self, batch: RewardBatch) -> RewardOutput:
        unscaled = self.unscaled_scores(batch.images, batch.prompts)
        # The unscaled mean is logged because it is the number papers report (about 20 to 24 for current text-to-image models).
        extras = {"unscaled_mean": float(unscaled.mean())} if len(unscaled) else {}
        return RewardOutput(scores={self.components[0]: unscaled * self.scale}, extras=extras)
