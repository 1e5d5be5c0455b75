"""ImageReward (Xu et al., NeurIPS 2023, arXiv 2304.05977; THUDM/ImageReward): a human-preference
score for a (prompt, image) pair, mapped onto transformers' BLIP classes.

The released model is BLIP: a ViT-L/16 image encoder (224 px) whose patch tokens a BERT text
encoder reads through cross-attention; the text encoder's [CLS] state goes through a five-layer
MLP (no activations: Linear layers at 0, 2, 4, 6, 7 of an nn.Sequential, the aesthetic
predictor's layout) and the result is standardised with the training set's mean and std
(0.16717362830052426 and 1.0333394966054072): reward = (mlp(cls) - mean) / std, roughly -2..2.

The checkpoint (`ImageReward.pt`, a plain state dict, with `med_config.json` beside it) is read
with `weights_only=True` (no pickled code runs) or from the same tensors as safetensors, and its
keys are renamed onto transformers' classes:

- `blip.visual_encoder.*` (BLIP's timm-style ViT) -> BlipVisionModel: cls_token ->
  embeddings.class_embedding, pos_embed -> embeddings.position_embedding, patch_embed.proj ->
  embeddings.patch_embedding, blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2} ->
  encoder.layers.N.{layer_norm1, self_attn.qkv, self_attn.projection, layer_norm2, mlp.fc1,
  mlp.fc2}, norm -> post_layernorm. Both fuse q, k, v in one Linear laid out (3, heads, dim)
  and use LayerNorm eps 1e-6 (BLIP's ViT) and exact GELU.
- `blip.text_encoder.*` (BLIP's med BertModel) -> BlipTextModel, whose parameter names are the
  same (self- and cross-attention, no token-type embeddings), as an encoder (bidirectional).
- `mlp.layers.*` -> the MLP head; `blip.vision_proj` / `blip.text_proj` (ITC projections) are
  not used by the score and are dropped.

The tokenizer is BLIP's: bert-base-uncased with "[DEC]" added as bos and "[ENC]" as an extra
special token (30524 tokens); prompts are padded / truncated to 35 tokens as ImageReward does.
Images: shortest side resized to 224 (bicubic), centre crop, CLIP's mean and std.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import torch
from transformers import BertTokenizer, BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel, CLIPImageProcessorPil

from rewards.base import RewardBatch, RewardOutput
from rewards.clip_scores import mlp_head
from rewards.images import check_batch_size, score_prompted_pairs, torch_dtype

__all__ = ["IMAGE_REWARD_MEAN", "IMAGE_REWARD_STD", "ImageReward", "convert_blip_state"]

IMAGE_REWARD_MEAN = 0.16717362830052426
IMAGE_REWARD_STD = 1.0333394966054072
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TEXT_MAX_LENGTH = 35  # ImageReward pads and truncates prompts to 35 tokens
VIT_LAYER_NORM_EPS = 1e-6  # BLIP's ViT

_VIT_NAMES = {
    "norm1": "layer_norm1",
    "attn.qkv": "self_attn.qkv",
    "attn.proj": "self_attn.projection",
    "norm2": "layer_norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_VIT_TOP = {
    "cls_token": "embeddings.class_embedding",
    "pos_embed": "embeddings.position_embedding",
    "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
    "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
    "norm.weight": "post_layernorm.weight",
    "norm.bias": "post_layernorm.bias",
}
# In the checkpoint but not part of the score: the ITC projections and buffers.
_UNUSED = re.compile(r"^blip\.(vision_proj|text_proj)\.|position_ids$")


def convert_blip_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """ImageReward's state dict as (BlipVisionModel state, BlipTextModel state, MLP head state).
    A key the mapping does not know is an error naming it: a silently dropped weight would leave
    a layer at its random initialisation."""
    vision, text, head, unknown = {}, {}, {}, []
    for key, value in state.items():
        if _UNUSED.search(key):
            continue
        if key.startswith("blip.visual_encoder."):
            name = key.removeprefix("blip.visual_encoder.")
            block = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias)", name)
            if name in _VIT_TOP:
                vision[_VIT_TOP[name]] = value
            elif block and block.group(2) in _VIT_NAMES:
                vision[f"encoder.layers.{block.group(1)}.{_VIT_NAMES[block.group(2)]}.{block.group(3)}"] = value
            else:
                unknown.append(key)
        elif key.startswith("blip.text_encoder."):
            text[key.removeprefix("blip.text_encoder.")] = value
        elif key.startswith("mlp.layers."):
            head[key.removeprefix("mlp.")] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"ImageReward checkpoint holds keys the BLIP mapping does not know: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
    if not vision or not text or not head:
        missing = [what for what, part in (("blip.visual_encoder", vision), ("blip.text_encoder", text), ("mlp.layers", head)) if not part]
        raise ValueError(f"not an ImageReward checkpoint: no {', '.join(missing)} weights")
    return vision, text, head


def _locate(model: str | os.PathLike[str], filename: str) -> Path:
    """`filename` in the local directory `model`, or downloaded from the hub repo `model`."""
    local = Path(model)
    if local.is_dir():
        path = local / filename
        if not path.is_file():
            raise FileNotFoundError(f"ImageReward: {path} not found; the directory must hold ImageReward.pt (or .safetensors) and med_config.json")
        return path
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo_id=str(model), filename=filename))


def _read_state(model: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    local = Path(model)
    if local.is_dir() and (local / "ImageReward.safetensors").is_file():
        from safetensors.torch import load_file

        return load_file(str(local / "ImageReward.safetensors"))
    state = torch.load(_locate(model, "ImageReward.pt"), map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


class ImageReward:
    """Reward = scale * ImageReward's standardised score of each (prompt, image) pair.

    Args:
        model: a directory holding ImageReward.pt (or ImageReward.safetensors) and med_config.json,
            or the hub repo that does (THUDM/ImageReward).
        tokenizer: BLIP's tokenizer source, bert-base-uncased ("[DEC]" and "[ENC]" are added).
        vision_heads: attention heads of the ViT (not recorded in the checkpoint); None = width / 64
            (16 for ViT-L, 12 for ViT-B).
        scale, device, dtype, batch_size: as the other workers' (the head runs in float32).
        name: the component name in RewardOutput.scores.

    A sample without a prompt (empty or None) scores NaN: missing, never 0.
    """

    def __init__(
        self,
        model: str | os.PathLike[str] = "THUDM/ImageReward",
        *,
        tokenizer: str | os.PathLike[str] = "bert-base-uncased",
        vision_heads: int | None = None,
        scale: float = 1.0,
        device: str = "cpu",
        dtype: str = "fp32",
        batch_size: int = 16,
        name: str = "image_reward",
    ):
        self.device = torch.device(device)
        self.batch_size = check_batch_size(batch_size)
        self.scale = scale
        med = json.loads(_locate(model, "med_config.json").read_text(encoding="utf-8"))
        vision_state, text_state, head_state = convert_blip_state(_read_state(model))

        width = vision_state["embeddings.class_embedding"].shape[-1]
        patch = vision_state["embeddings.patch_embedding.weight"].shape[-1]
        positions = vision_state["embeddings.position_embedding"].shape[1]
        grid = round((positions - 1) ** 0.5)
        heads = vision_heads or max(width // 64, 1)
        if width % heads:
            raise ValueError(f"ImageReward: the ViT is {width} wide, which {heads} attention heads do not divide; set vision_heads")
        vision_config = BlipVisionConfig(
            hidden_size=width,
            intermediate_size=vision_state["encoder.layers.0.mlp.fc1.weight"].shape[0],
            num_hidden_layers=len({key.split(".")[2] for key in vision_state if key.startswith("encoder.layers.")}),
            num_attention_heads=heads,
            image_size=grid * patch,
            patch_size=patch,
            hidden_act="gelu",
            layer_norm_eps=VIT_LAYER_NORM_EPS,
        )

        self.tokenizer = BertTokenizer.from_pretrained(tokenizer)
        self.tokenizer.add_special_tokens({"bos_token": "[DEC]"})
        self.tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        vocab = text_state["embeddings.word_embeddings.weight"].shape[0]
        if len(self.tokenizer) != vocab:
            raise ValueError(f"ImageReward: the tokenizer {tokenizer} has {len(self.tokenizer)} tokens with [DEC] and [ENC], the text encoder {vocab}")
        text_config = BlipTextConfig(
            vocab_size=vocab,
            hidden_size=med["hidden_size"],
            encoder_hidden_size=width,
            intermediate_size=med["intermediate_size"],
            num_hidden_layers=med["num_hidden_layers"],
            num_attention_heads=med["num_attention_heads"],
            max_position_embeddings=text_state["embeddings.position_embeddings.weight"].shape[0],
            hidden_act=med.get("hidden_act", "gelu"),
            layer_norm_eps=med.get("layer_norm_eps", 1e-12),
            pad_token_id=self.tokenizer.pad_token_id,
            bos_token_id=self.tokenizer.bos_token_id,
            sep_token_id=self.tokenizer.sep_token_id,
        )
        self.head = mlp_head(head_state, med["hidden_size"], what="ImageReward's MLP").to(self.device)
        compute = torch_dtype(dtype)
        self.vision = BlipVisionModel(vision_config)
        self.vision.load_state_dict(vision_state, strict=True)
        self.text = BlipTextModel(text_config, add_pooling_layer=False)
        self.text.load_state_dict(text_state, strict=True)
        for network in (self.vision, self.text):
            network.to(self.device, compute).eval().requires_grad_(False)
        self.processor = CLIPImageProcessorPil(
            size={"shortest_edge": vision_config.image_size},
            crop_size={"height": vision_config.image_size, "width": vision_config.image_size},
            do_center_crop=True, resample=3, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD),
        )
        self.max_length = min(TEXT_MAX_LENGTH, text_config.max_position_embeddings)
        self.components = (name,)

    @torch.inference_mode()
    def raw_scores(self, images: np.ndarray, prompts: list[str | None]) -> np.ndarray:
        """The standardised ImageReward of each pair: [B] float64, NaN where the prompt is missing."""
        return score_prompted_pairs(images, prompts, self.batch_size, self._rewards, "ImageReward")

    def _rewards(self, pil_images: list, prompts: list[str]) -> torch.Tensor:
        pixels = self.processor(images=pil_images, return_tensors="pt")["pixel_values"]
        image_tokens = self.vision(pixel_values=pixels.to(self.device, self.vision.dtype)).last_hidden_state
        text = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt")
        hidden = self.text(
            input_ids=text["input_ids"].to(self.device),
            attention_mask=text["attention_mask"].to(self.device),
            encoder_hidden_states=image_tokens,
            encoder_attention_mask=torch.ones(image_tokens.shape[:2], dtype=torch.long, device=self.device),
        ).last_hidden_state
        rewards = self.head(hidden[:, 0].float())[:, 0]
        return (rewards - IMAGE_REWARD_MEAN) / IMAGE_REWARD_STD

    def __call__(self, batch: RewardBatch) -> RewardOutput:
        raw = self.raw_scores(batch.images, list(batch.prompts))
        finite = raw[np.isfinite(raw)]
        extras = {"raw_mean": float(finite.mean())} if len(finite) else {}
        return RewardOutput(scores={self.components[0]: self.scale * raw}, extras=extras)

