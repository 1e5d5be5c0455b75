"""Scores papers report, computed from CLIP embeddings.

- CLIPScore (Hessel et al. 2021, arXiv 2104.08718): w * max(cos(text, image), 0) with w = 2.5,
  on OpenAI's CLIP ViT-L/14 by default (the paper used ViT-B/32; torchmetrics and flow_grpo use
  ViT-L/14). A reference-free measure of how well the image shows the prompt.
- ICT and HP (Ba et al. 2025, arXiv 2507.19002; release github.com/BarretBa/ICTHP): ICT is the
  plain cosine of a fine-tuned CLIP ViT-H-14's text and image embeddings; HP the sigmoid of an MLP
  (the aesthetic predictor's layout, 1024 wide) on a second fine-tuned CLIP's projected image
  embedding, not normalised (as the release scores it). The release ships state dicts to load
  over laion/CLIP-ViT-H-14-laion2B-s32B-b79K: ICT/pytorch_model.bin,
  HP/hp_backbone/pytorch_model.bin and HP/hp_scorer/mlp_pytorch_model.bin.
- LAION aesthetic predictor v2 (improved-aesthetic-predictor, "sac+logos+ava1-l14-linearMSE"): a
  five-layer MLP, without activations, on the L2-normalised CLIP ViT-L/14 image embedding,
  regressing the 1-10 human aesthetic rating. No text.

All are easy to game alone (CLIPScore and ICT reward the prompt's words written into the image;
aesthetics rewards saturated, smooth pictures): use them as monitors, or inside a Base-and-Bonus
mix.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from transformers import AutoImageProcessor, AutoProcessor, CLIPConfig

from rewards.base import RewardBatch, RewardOutput
from rewards.images import (
    check_batch_size,
    clip_image_features,
    clip_max_text_tokens,
    clip_text_features,
    load_clip,
    read_state_dict,
    score_prompted_pairs,
    to_pil,
    torch_dtype,
)

ICTHP_BASE = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # the CLIP both ICTHP models are fine-tuned from
AESTHETIC_HEAD_URL = "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/sac%2Blogos%2Bava1-l14-linearMSE.pth"
# The released heads' layout: nn.Sequential indices of the Linear layers (the others are dropout).
MLP_LINEARS = (0, 2, 4, 6, 7)


class CLIPScore:
    """Reward = scale * w * max(cos(text embedding, image embedding), 0), one per (image, prompt).

    Args:
        model: CLIPModel checkpoint (hub id or local directory) with its processor.
        weight: w, 2.5 in the paper (100 in torchmetrics' variant).
        clamp: max(cos, 0) as the paper (False: the plain cosine, as ICT).
        scale: Multiplies the score.
        device, dtype, batch_size: Where and how the model runs (scores in float32).
        name: The component name in RewardOutput.scores.
        weights: a fine-tuned state dict loaded over `model` (see load_clip), e.g. ICT's.

    A sample without a prompt (empty or None) scores NaN: missing, never 0.
    """

    def __init__(
        self,
        model: str | os.PathLike[str] = "openai/clip-vit-large-patch14",
        *,
        weight: float = 2.5,
        clamp: bool = True,
        scale: float = 1.0,
        device: str = "cpu",
        dtype: str = "fp32",
        batch_size: int = 16,
        name: str = "clipscore",
        weights: str | os.PathLike[str] | None = None,
    ):
        if weight <= 0:
            raise ValueError(f"clipscore weight must be > 0, got {weight}")
        self.device = torch.device(device)
        self.batch_size = check_batch_size(batch_size)
        self.weight, self.scale, self.clamp = weight, scale, clamp
        self.model = load_clip(model, self.device, torch_dtype(dtype), weights)
        self.processor = AutoProcessor.from_pretrained(model)
        self.max_text_tokens = clip_max_text_tokens(self.model, self.processor)
        self.components = (name,)

    @torch.inference_mode()
    def cosines(self, images: np.ndarray, prompts: list[str | None]) -> np.ndarray:
        """cos(text, image) of each pair: [B] float64, NaN where the prompt is missing."""

        def cosine(pil_images: list, texts: list[str]) -> torch.Tensor:
            image_embeds = clip_image_features(self.model, self.processor, pil_images, self.device)
            text_embeds = clip_text_features(self.model, self.processor, texts, self.device, self.max_text_tokens)
            return (text_embeds * image_embeds).sum(dim=-1)

        return score_prompted_pairs(images, prompts, self.batch_size, cosine, "CLIPScore")

    def __call__(self, batch: RewardBatch) -> RewardOutput:
        cosines = self.cosines(batch.images, list(batch.prompts))
        scores = self.scale * self.weight * (np.maximum(cosines, 0.0) if self.clamp else cosines)  # NaN stays NaN
        finite = cosines[np.isfinite(cosines)]
        extras = {"cosine_mean": float(finite.mean())} if len(finite) else {}
        return RewardOutput(scores={self.components[0]: scores}, extras=extras)


def load_mlp_head(path: str | os.PathLike[str], feature_size: int, *, what: str, missing_hint: str) -> torch.nn.Sequential:
    """An MLP head in improved-aesthetic-predictor's layout (see mlp_head) from a .pth read with
    weights_only=True (no pickled code runs) or a .safetensors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} head {path} not found; {missing_hint}")
    return mlp_head(read_state_dict(path, f"{what} head"), feature_size, what=f"{what} head {path}")


def mlp_head(state: dict[str, torch.Tensor], feature_size: int, *, what: str) -> torch.nn.Sequential:
    """An MLP head in improved-aesthetic-predictor's layout (an nn.Sequential `layers` whose
    Linear layers sit at 0, 2, 4, 6, 7, dropout between, no activations) from its tensors. Keys
    may carry a prefix before `layers.` (`mlp.layers.0.weight`, as a head saved inside its model
    is); the widths are read from the tensors, and the input width is checked against the
    embedding it reads before any other weights load."""
    state = {key[key.find("layers.") :] if "layers." in key else key: value for key, value in state.items()}
    expected = {f"layers.{i}.{kind}" for i in MLP_LINEARS for kind in ("weight", "bias")}
    if set(state) != expected:
        raise ValueError(f"{what} must hold {sorted(expected)} (improved-aesthetic-predictor's layout); it holds {sorted(state)}")
    width = state["layers.0.weight"].shape[1]
    if width != feature_size:
        raise ValueError(f"{what} takes {width}-wide embeddings but the model's are {feature_size}-wide")
    layers = []
    for index in range(max(MLP_LINEARS) + 1):
        if index in MLP_LINEARS:
            out_features, in_features = state[f"layers.{index}.weight"].shape
            layers.append(torch.nn.Linear(in_features, out_features))
        else:
            layers.append(torch.nn.Dropout(0.0))  # dropout in training only: identity here
    head = torch.nn.Sequential(*layers)
    head.load_state_dict({key.removeprefix("layers."): value.float() for key, value in state.items()})
    return head.eval().requires_grad_(False)


class _CLIPImageHead:
    """A score from an MLP head on the CLIP image embedding (L2-normalised where `normalize`; no text)."""

    what = "MLP"
    missing_hint = ""

    def __init__(self, clip, head, *, scale: float, device: str, dtype: str, batch_size: int, name: str, sigmoid: bool,
                 normalize: bool, weights: str | os.PathLike[str] | None = None):
        self.device = torch.device(device)
        self.batch_size = check_batch_size(batch_size)
        self.scale, self.sigmoid, self.normalize = scale, sigmoid, normalize
        self.head = load_mlp_head(head, CLIPConfig.from_pretrained(clip).projection_dim, what=self.what, missing_hint=self.missing_hint).to(self.device)
        self.model = load_clip(clip, self.device, torch_dtype(dtype), weights)
        self.processor = AutoImageProcessor.from_pretrained(clip)
        self.components = (name,)

    @torch.inference_mode()
    def ratings(self, images: np.ndarray) -> np.ndarray:
        """The head's output per image (through a sigmoid where the score is a probability): [B] float64."""
        pil_images = to_pil(images)
        ratings = [
            self.head(clip_image_features(self.model, self.processor, pil_images[start : start + self.batch_size], self.device, normalize=self.normalize))[:, 0]
            for start in range(0, len(pil_images), self.batch_size)
        ]
        out = torch.cat(ratings) if ratings else torch.zeros(0)
        return (torch.sigmoid(out) if self.sigmoid else out).cpu().numpy().astype(np.float64)

    def __call__(self, batch: RewardBatch) -> RewardOutput:
        ratings = self.ratings(batch.images)
        extras = {"rating_mean": float(ratings.mean())} if len(ratings) else {}
        return RewardOutput(scores={self.components[0]: self.scale * ratings}, extras=extras)


class LaionAesthetic(_CLIPImageHead):
    """Reward = scale * the LAION aesthetic predictor's rating (about 1 to 10) of each image.

    Args:
        clip: CLIPModel checkpoint whose image embedding the head reads (ViT-L/14, 768 wide).
        head: Path of sac+logos+ava1-l14-linearMSE.pth (or the same tensors as safetensors).
        scale: Multiplies the rating (flow_grpo trains on rating / 10).
        device, dtype, batch_size: Where and how CLIP runs (the head runs in float32).
        name: The component name in RewardOutput.scores.
    """

    what = "aesthetic"
    missing_hint = f"download sac+logos+ava1-l14-linearMSE.pth from {AESTHETIC_HEAD_URL} and pass its path as head"

    def __init__(
        self,
        clip: str | os.PathLike[str] = "openai/clip-vit-large-patch14",
        *,
        head: str | os.PathLike[str] = "sac+logos+ava1-l14-linearMSE.pth",
        scale: float = 1.0,
        device: str = "cpu",
        dtype: str = "fp32",
        batch_size: int = 16,
        name: str = "aesthetic",
    ):
        super().__init__(clip, head, scale=scale, device=device, dtype=dtype, batch_size=batch_size, name=name, sigmoid=False, normalize=True)


class HPScore(_CLIPImageHead):
    """HP, the High-Preference score of ICT/HP (Ba et al. 2025, arXiv 2507.19002; code BarretBa/ICTHP):
    sigmoid of an MLP head, in the aesthetic predictor's layout (its first layer as wide as the
    embedding), on the projected image embedding of a fine-tuned CLIP ViT-H-14 (1024 wide), not
    normalised: the release trains and scores the head on get_image_features as it comes. No text.

    Args:
        clip: the base CLIPModel checkpoint (transformers layout): laion/CLIP-ViT-H-14-laion2B-s32B-b79K,
            or an HP backbone saved whole.
        backbone: the release's HP/hp_backbone/pytorch_model.bin, loaded over `clip` (weights_only=True).
        head: the release's HP/hp_scorer/mlp_pytorch_model.bin (or safetensors); keys may be
            prefixed (`mlp.layers.0.weight`).
        scale, device, dtype, batch_size, name: as the other CLIP workers'.
    """

    what = "HP"
    missing_hint = "pass the HP MLP's weights from the ICTHP release (github.com/BarretBa/ICTHP), HP/hp_scorer/mlp_pytorch_model.bin, as head"

    def __init__(
        self,
        clip: str | os.PathLike[str] = ICTHP_BASE,
        *,
        head: str | os.PathLike[str],
        backbone: str | os.PathLike[str] | None = None,
        scale: float = 1.0,
        device: str = "cpu",
        dtype: str = "fp32",
        batch_size: int = 16,
        name: str = "hp",
    ):
        super().__init__(clip, head, scale=scale, device=device, dtype=dtype, batch_size=batch_size, name=name,
                         sigmoid=True, normalize=False, weights=backbone)


def ict_score(
    model: str | os.PathLike[str] = ICTHP_BASE,
    *,
    weights: str | os.PathLike[str] | None = None,
    scale: float = 1.0,
    device: str = "cpu",
    dtype: str = "fp32",
    batch_size: int = 16,
    name: str = "ict",
) -> "CLIPScore":
    """ICT, the Image-Contained-Text score of ICT/HP (Ba et al. 2025, arXiv 2507.19002): the cosine
    of a fine-tuned CLIP ViT-H-14's text and image embeddings, unclamped, times `scale`. `model` is
    the base CLIPModel (laion/CLIP-ViT-H-14-laion2B-s32B-b79K) and `weights` the release's
    ICT/pytorch_model.bin loaded over it (or `model` an ICT CLIPModel saved whole, weights None).
    NaN without a prompt."""
    return CLIPScore(model, weight=1.0, clamp=False, scale=scale, device=device, dtype=dtype, batch_size=batch_size, name=name, weights=weights)
