"""Fake-image detectors as rewards: reward = 1 - p(fake), in [0, 1].

Two families (REFERENCE.md section 5):

- ArtifactDetector: an image classifier with an "artificial vs human" head, loaded with
  transformers' AutoModelForImageClassification (e.g. Organika/sdxl-detector); p(fake) is the
  softmax probability of the fake label.
- ClipProbeDetector: a linear probe on frozen CLIP image features (UniversalFakeDetect, Ojha et
  al. 2023); p(fake) = sigmoid(w . f + b).

A detector alone is easy to fool: use it as a regulariser or a multiplicative gate, and monitor the
policy with a held-out detector it is not trained on.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification, CLIPConfig

from rewards.base import RewardBatch, RewardOutput
from rewards.images import check_batch_size, clip_image_features, load_clip, to_pil, torch_dtype


def _detector_output(name: str, p_fake: np.ndarray) -> RewardOutput:
    # Mean p(fake) is logged so a run shows whether the policy is drifting towards "detected".
    extras = {"p_fake_mean": float(p_fake.mean())} if len(p_fake) else {}
    return RewardOutput(scores={name: 1.0 - p_fake}, extras=extras)


class ArtifactDetector:
    """Reward = 1 - p(fake_label) from an image classifier's softmax.

    Args:
        model: AutoModelForImageClassification checkpoint (hub id or local directory) with an
            image processor saved alongside.
        fake_label: The entry of the model's id2label that means "generated"; an unknown label
            raises ValueError listing the model's labels.
        device: Where the model runs.
        dtype: Model weights' dtype ("fp32", "bf16", "fp16"); the softmax is taken in float32.
        batch_size: Images per forward pass, to bound memory.
        name: The component name in RewardOutput.scores.
    """

    def __init__(
        self,
        model: str | os.PathLike[str] = "Organika/sdxl-detector",
        *,
        fake_label: str = "artificial",
        device: str = "cpu",
        dtype: str = "fp32",
        batch_size: int = 16,
        name: str = "artifact",
    ):
        self.device = torch.device(device)
        self.batch_size = check_batch_size(batch_size)
        # The label is checked on the config, before any weights load, so a typo fails fast.
        labels = AutoConfig.from_pretrained(model).id2label
        indices = [int(index) for index, label in labels.items() if label == fake_label]
        if not indices:
            listed = ", ".join(repr(labels[index]) for index in sorted(labels, key=int))
            raise ValueError(f"detector {model}: no label {fake_label!r}; its labels are {listed}; pass one of them as fake_label")
        self.fake_index = indices[0]
        self.model = AutoModelForImageClassification.from_pretrained(model, dtype=torch_dtype(dtype))
        self.model.to(self.device).eval().requires_grad_(False)
        self.processor = AutoImageProcessor.from_pretrained(model)
        self.components = (name,)

    @torch.inference_mode()
    def p_fake(self, images: np.ndarray) -> np.ndarray:
        """p(fake_label) per image: [B] float64."""
        pil_images = to_pil(images)
        probabilities = []
        for start in range(0, len(pil_images), self.batch_size):
            pixel_values = self.processor(images=pil_images[start : start + self.batch_size], return_tensors="pt")["pixel_values"]
            logits = self.model(pixel_values=pixel_values.to(self.device, self.model.dtype)).logits
            # Softmax in float32: in bf16 a probability near 1 rounds in steps of ~0.004.
            probabilities.append(torch.softmax(logits.float(), dim=-1)[:, self.fake_index])
        if not probabilities:
            return np.zeros(0, dtype=np.float64)
        return torch.cat(probabilities).cpu().numpy().astype(np.float64)

    def __call__(self, batch: RewardBatch) -> RewardOutput:
        return _detector_output(self.components[0], self.p_fake(batch.images))


class ClipProbeDetector:
    """Reward = 1 - p(fake), p(fake) = sigmoid(w . f + b) on CLIP image features f.

    The head is a safetensors file with ``weight`` [1, D] and ``bias`` [1], D the CLIP's
    projection_dim (768 for ViT-L/14): the single logit is the fake logit, positive meaning
    "generated", as in UniversalFakeDetect's ``fc`` layer (label 1 = fake, BCE with logits).
    f is the projected image embedding (CLIP's ``encode_image`` / ``get_image_features``).

    Args:
        clip: CLIPModel checkpoint (hub id or local directory) with its processor.
        head: Path of the safetensors head.
        normalize_features: L2-normalise f before the head (the default). UniversalFakeDetect's
            released ``fc_weights.pth`` was trained on unnormalised ``encode_image`` outputs: set
            False for that head (converted to safetensors).
        device: Where the model runs.
        dtype: CLIP weights' dtype ("fp32", "bf16", "fp16"); the head runs in float32.
        batch_size: Images per forward pass, to bound memory.
        name: The component name in RewardOutput.scores.
    """

    def __init__(
        self,
        clip: str | os.PathLike[str] = "openai/clip-vit-large-patch14",
        *,
        head: str | os.PathLike[str],
        normalize_features: bool = True,
        device: str = "cpu",
        dtype: str = "fp32",
        batch_size: int = 16,
        name: str = "clip_probe",
    ):
        self.device = torch.device(device)
        self.batch_size = check_batch_size(batch_size)
        self.normalize_features = normalize_features
        self.weight, self.bias = self._load_head(Path(head), CLIPConfig.from_pretrained(clip).projection_dim)
        self.weight, self.bias = self.weight.to(self.device), self.bias.to(self.device)
        self.model = load_clip(clip, self.device, torch_dtype(dtype))
        self.processor = AutoImageProcessor.from_pretrained(clip)
        self.components = (name,)

    @staticmethod
    def _load_head(path: Path, feature_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """weight [D] and bias [] in float32, checked against the CLIP feature size D before
        any CLIP weights load."""
        if not path.is_file():
            raise FileNotFoundError(f"CLIP probe head {path} not found; pass the path of a safetensors file with 'weight' and 'bias'")
        tensors = load_file(str(path))
        if set(tensors) != {"weight", "bias"}:
            raise ValueError(f"CLIP probe head {path} must hold exactly 'weight' and 'bias', it holds {sorted(tensors)}")
        weight, bias = tensors["weight"], tensors["bias"]
        if tuple(weight.shape) != (1, feature_size) or bias.numel() != 1:
            raise ValueError(
                f"CLIP probe head {path} has weight {tuple(weight.shape)} and bias {tuple(bias.shape)}, but the CLIP "
                f"image features have size {feature_size}: expected weight (1, {feature_size}) and bias (1,)"
            )
        return weight[0].float(), bias.reshape(()).float()

    @torch.inference_mode()
    def p_fake(self, images: np.ndarray) -> np.ndarray:
        """sigmoid(w . f + b) per image: [B] float64."""
        pil_images = to_pil(images)
        probabilities = []
        for start in range(0, len(pil_images), self.batch_size):
            features = clip_image_features(
                self.model, self.processor, pil_images[start : start + self.batch_size], self.device,
                normalize=self.normalize_features,
            )
            probabilities.append(torch.sigmoid(features @ self.weight + self.bias))
        if not probabilities:
            return np.zeros(0, dtype=np.float64)
        return torch.cat(probabilities).cpu().numpy().astype(np.float64)

    def __call__(self, batch: RewardBatch) -> RewardOutput:
        return _detector_output(self.components[0], self.p_fake(batch.images))
