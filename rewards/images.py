"""Helpers the model-backed reward workers share: dtype names, batch sizes, images as PIL, and CLIP
image features (PickScore, the CLIP-probe detector, the FIRM judges)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPModel, ProcessorMixin
from transformers.image_processing_utils import BaseImageProcessor
from transformers.utils import ModelOutput

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


def score_prompted_pairs(
    images: np.ndarray,
    prompts: list[str | None],
    batch_size: int,
    score: Callable[[list[Image.Image], list[str]], torch.Tensor],
    what: str,
) -> np.ndarray:
    """score(images, prompts) -> [n] over the pairs that have a prompt, batch_size at a time:
    [B] float64, NaN where the prompt is missing (empty or None), never 0."""
    if len(images) != len(prompts):
        raise ValueError(f"{what} needs one prompt per image, got {len(images)} images and {len(prompts)} prompts")
    out = np.full(len(prompts), np.nan)
    present = [i for i, prompt in enumerate(prompts) if prompt]
    pil_images = to_pil(images)
    for start in range(0, len(present), batch_size):
        rows = present[start : start + batch_size]
        out[rows] = score([pil_images[i] for i in rows], [prompts[i] for i in rows]).float().cpu().numpy()
    return out


def fit_image(image: np.ndarray, max_side: int) -> Image.Image:
    """A uint8 [H, W, 3] array as a PIL image whose longest side is at most max_side, aspect kept.

    Judge cost grows with pixels (a 1024 x 1024 image is about 1024 tokens for Qwen3-VL), and a
    judge grades content, not pixel-level detail, so images are capped before they are sent.
    """
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"judge images must be uint8 [H, W, 3] arrays, got {image.dtype} {image.shape}")
    pil = Image.fromarray(image)
    longest = max(pil.size)
    if longest <= max_side:
        return pil
    scale = max_side / longest
    size = (max(1, round(pil.width * scale)), max(1, round(pil.height * scale)))
    return pil.resize(size, Image.Resampling.BICUBIC)


def projected(features: torch.Tensor | ModelOutput) -> torch.Tensor:
    """The projected embedding from CLIPModel.get_{text,image}_features.

    transformers 4 returns the projected tensor itself; transformers 5 returns a
    BaseModelOutputWithPooling whose pooler_output holds the projection (not the raw pooled
    hidden state, which a naive `.pooler_output` of the tower would give).
    """
    if isinstance(features, torch.Tensor):
        return features
    return features.pooler_output


def read_state_dict(path: str | os.PathLike[str], what: str) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file, or from a .pth / .bin read with weights_only=True (no
    pickled code runs); a missing file fails naming `what`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{what} {path} holds a {type(state).__name__}, not a state dict")
    return state


def load_clip(path: str | os.PathLike[str], device: torch.device, dtype: torch.dtype, weights: str | os.PathLike[str] | None = None) -> CLIPModel:
    """A frozen CLIPModel in eval mode on device; with `weights`, a fine-tuned state dict (a
    release's pytorch_model.bin, read with weights_only=True, or safetensors) loaded over it.
    Every key must match (buffers such as position_ids aside): a fine-tune that silently left a
    layer at the base weights would score with the wrong model."""
    model = CLIPModel.from_pretrained(path, dtype=dtype)
    if weights is not None:
        state = read_state_dict(weights, "CLIP weights")
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [key for key in missing if not key.endswith("position_ids")]
        unexpected = [key for key in unexpected if not key.endswith("position_ids")]
        if missing or unexpected:
            raise ValueError(
                f"CLIP weights {weights} do not fit the CLIPModel {path}: missing {missing[:3]}, unexpected {unexpected[:3]}; "
                "is `model` / `clip` the base the weights were fine-tuned from?"
            )
    return model.to(device).eval().requires_grad_(False)


def clip_text_features(model: CLIPModel, processor: ProcessorMixin, prompts: list[str], device: torch.device, max_tokens: int) -> torch.Tensor:
    """Projected, L2-normalised CLIP text embeddings, prompts truncated to max_tokens: [B, D] float32."""
    text = processor(text=prompts, padding=True, truncation=True, max_length=max_tokens, return_tensors="pt").to(device)
    features = projected(model.get_text_features(input_ids=text["input_ids"], attention_mask=text["attention_mask"])).float()
    return F.normalize(features, dim=-1)


def clip_max_text_tokens(model: CLIPModel, processor: ProcessorMixin) -> int:
    """The longest prompt the text tower takes: longer ones would crash its position table, so they
    are truncated (CLIP's 77 tokens). The tokenizer's own limit can be unset (a huge sentinel),
    hence the min with the model's."""
    return min(processor.tokenizer.model_max_length, model.config.text_config.max_position_embeddings)


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
