"""ImageReward on transformers' BLIP classes: a tiny checkpoint written in the release's own layout
(BLIP's module names, a plain state dict read with weights_only=True) scores exactly what an
independent forward written here from those tensors computes: BLIP's ViT (fused qkv, pre-norm
blocks), the med BERT with cross-attention to the image tokens, the MLP and the standardisation,
with the preprocessing (shortest side to the crop size, bicubic, centre crop, CLIP normalisation)
done with PIL and numpy."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from models.fixtures.reward_models import build_tiny_image_reward
from rewards import build_worker
from rewards.base import RewardBatch
from rewards.image_reward import ImageReward, convert_blip_state

VISION_HEADS = 4
PROMPTS = ["a red cube", "two dogs on grass", None, "a lighthouse at night, oil painting"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return build_tiny_image_reward(tmp_path_factory.mktemp("image-reward"), seed=0, vision_heads=VISION_HEADS)


def worker(checkpoint: Path, **kwargs) -> ImageReward:
    return ImageReward(str(checkpoint), tokenizer=str(checkpoint / "tokenizer"), vision_heads=VISION_HEADS, **kwargs)


# ---------------------------------------------------------------- the independent forward


def layer_norm(x: torch.Tensor, state: dict, prefix: str, eps: float) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], state[f"{prefix}.weight"], state[f"{prefix}.bias"], eps)


def dense(x: torch.Tensor, state: dict, prefix: str) -> torch.Tensor:
    return x @ state[f"{prefix}.weight"].T + state[f"{prefix}.bias"]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax(q k^T / sqrt(d)) v over `heads` heads; mask [B, keys] of 0/1."""
    b, n, width = q.shape
    split = lambda t: t.reshape(b, t.shape[1], heads, width // heads).transpose(1, 2)  # noqa: E731
    scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(width // heads)
    if mask is not None:
        scores = scores.masked_fill(mask[:, None, None, :] == 0, float("-inf"))
    return (scores.softmax(-1) @ split(v)).transpose(1, 2).reshape(b, n, width)


def vit(pixels: torch.Tensor, state: dict) -> torch.Tensor:
    p = "blip.visual_encoder"
    patch = state[f"{p}.patch_embed.proj.weight"]
    x = F.conv2d(pixels, patch, state[f"{p}.patch_embed.proj.bias"], stride=patch.shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([state[f"{p}.cls_token"].expand(len(x), -1, -1), x], dim=1) + state[f"{p}.pos_embed"]
    blocks = len({key.split(".")[3] for key in state if key.startswith(f"{p}.blocks.")})
    for block in range(blocks):
        b = f"{p}.blocks.{block}"
        h = layer_norm(x, state, f"{b}.norm1", 1e-6)
        q, k, v = dense(h, state, f"{b}.attn.qkv").chunk(3, dim=-1)  # qkv is laid out (3, heads, dim)
        x = x + dense(attend(q, k, v, VISION_HEADS), state, f"{b}.attn.proj")
        h = layer_norm(x, state, f"{b}.norm2", 1e-6)
        x = x + dense(F.gelu(dense(h, state, f"{b}.mlp.fc1")), state, f"{b}.mlp.fc2")
    return layer_norm(x, state, f"{p}.norm", 1e-6)


def bert_cls(ids: torch.Tensor, mask: torch.Tensor, image_tokens: torch.Tensor, state: dict, med: dict) -> torch.Tensor:
    p = "blip.text_encoder"
    heads, eps = med["num_attention_heads"], med["layer_norm_eps"]
    x = state[f"{p}.embeddings.word_embeddings.weight"][ids] + state[f"{p}.embeddings.position_embeddings.weight"][: ids.shape[1]]
    x = layer_norm(x, state, f"{p}.embeddings.LayerNorm", eps)
    for layer in range(med["num_hidden_layers"]):
        lp = f"{p}.encoder.layer.{layer}"
        for kind, keys, keys_mask in (("attention", x, mask), ("crossattention", image_tokens, None)):
            a = f"{lp}.{kind}"
            context = attend(dense(x, state, f"{a}.self.query"), dense(keys, state, f"{a}.self.key"), dense(keys, state, f"{a}.self.value"), heads, keys_mask)
            x = layer_norm(x + dense(context, state, f"{a}.output.dense"), state, f"{a}.output.LayerNorm", eps)
        h = F.gelu(dense(x, state, f"{lp}.intermediate.dense"))
        x = layer_norm(x + dense(h, state, f"{lp}.output.dense"), state, f"{lp}.output.LayerNorm", eps)
    return x[:, 0]


def preprocess(image: np.ndarray, size: int) -> torch.Tensor:
    pil = Image.fromarray(image)
    w, h = pil.size
    short = min(w, h)
    pil = pil.resize((round(w * size / short), round(h * size / short)), Image.BICUBIC)
    left, top = (pil.size[0] - size) // 2, (pil.size[1] - size) // 2
    array = np.asarray(pil.crop((left, top, left + size, top + size)), dtype=np.float64) / 255.0
    mean, std = np.array([0.48145466, 0.4578275, 0.40821073]), np.array([0.26862954, 0.26130258, 0.27577711])
    return torch.from_numpy(((array - mean) / std).transpose(2, 0, 1)).float()


def reference_scores(checkpoint: Path, images: np.ndarray, prompts: list[str | None]) -> np.ndarray:
    from transformers import BertTokenizer

    state = {k: v.float() for k, v in torch.load(checkpoint / "ImageReward.pt", weights_only=True).items()}
    med = json.loads((checkpoint / "med_config.json").read_text())
    tokenizer = BertTokenizer.from_pretrained(checkpoint / "tokenizer")
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    out = []
    for image, prompt in zip(images, prompts):
        if not prompt:
            out.append(math.nan)
            continue
        tokens = tokenizer(prompt, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
        with torch.no_grad():
            image_tokens = vit(preprocess(image, 32)[None], state)
            x = bert_cls(tokens["input_ids"], tokens["attention_mask"], image_tokens, state, med)
            for index in (0, 2, 4, 6, 7):  # no activations between the Linear layers
                x = dense(x, state, f"mlp.layers.{index}")
        out.append((float(x[0, 0]) - 0.16717362830052426) / 1.0333394966054072)
    return np.array(out)


# ---------------------------------------------------------------- tests


def test_scores_equal_the_independent_forward_and_missing_prompts_are_nan(checkpoint: Path) -> None:
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (4, 48, 48, 3), dtype=np.uint8)
    output = worker(checkpoint, scale=2.0)(RewardBatch(images=images, prompts=PROMPTS))
    expected = reference_scores(checkpoint, images, PROMPTS)
    np.testing.assert_allclose(output.scores["image_reward"], 2.0 * expected, atol=2e-5)
    assert np.isnan(output.scores["image_reward"][2]) and np.isfinite(expected[[0, 1, 3]]).all()
    # The tiny random model still tells images and prompts apart.
    assert np.ptp(expected[[0, 1, 3]]) > 1e-3


def test_batch_size_does_not_change_scores(checkpoint: Path) -> None:
    images = np.random.default_rng(6).integers(0, 256, (4, 40, 40, 3), dtype=np.uint8)
    one = worker(checkpoint, batch_size=1).raw_scores(images, PROMPTS)
    three = worker(checkpoint, batch_size=3).raw_scores(images, PROMPTS)
    np.testing.assert_allclose(one, three, atol=1e-6)


def test_registry_builds_it_and_bad_checkpoints_fail_clearly(checkpoint: Path, tmp_path: Path) -> None:
    built = build_worker("image_reward", {"model": str(checkpoint), "tokenizer": str(checkpoint / "tokenizer"), "vision_heads": VISION_HEADS})
    assert built.components == ("image_reward",)
    state = torch.load(checkpoint / "ImageReward.pt", weights_only=True)
    vision, text, head = convert_blip_state(state)
    assert "encoder.layers.1.self_attn.projection.weight" in vision and "encoder.layer.0.crossattention.self.key.weight" in text
    with pytest.raises(ValueError, match=r"does not know: \['blip.visual_encoder.blocks.0.attn.extra.weight'\]"):
        convert_blip_state({**state, "blip.visual_encoder.blocks.0.attn.extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="no mlp.layers weights"):
        convert_blip_state({k: v for k, v in state.items() if not k.startswith("mlp.")})
    with pytest.raises(FileNotFoundError, match="must hold ImageReward.pt"):
        ImageReward(str(tmp_path), tokenizer=str(checkpoint / "tokenizer"))
    with pytest.raises(ValueError, match="heads do not divide"):
        worker_heads = ImageReward(str(checkpoint), tokenizer=str(checkpoint / "tokenizer"), vision_heads=3)
        del worker_heads
