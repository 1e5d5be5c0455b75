"""Tiny random-weight reward models with real architectures, built fully offline.

The reward workers load their models with transformers' ``from_pretrained``; with no model hub
here, tests point them at the directories built below instead. The classes, configs, processors
and therefore the code paths are the real ones (CLIPModel for PickScore and CLIP probes, an
AutoModelForImageClassification for artifact detectors); only the sizes are shrunk and the
weights are random, so scores are meaningless but exactly reproducible.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence

import torch
from safetensors.torch import save_file
from transformers import (
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPProcessor,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessorPil,
)

from models.tiny import _build_clip_tokenizer

__all__ = ["build_tiny_clip", "build_tiny_clip_probe", "build_tiny_image_classifier"]

_HIDDEN = 32
_IMAGE_SIZE = 32
_PATCH_SIZE = 8
# One token per byte (no merges), so 32 positions hold prompts of about 30 characters: long
# enough for distinct test prompts, short enough that truncation is easy to exercise.
_TEXT_MAX_LENGTH = 32


def _tower(**extra: int) -> dict[str, int]:
    return dict(
        hidden_size=_HIDDEN, intermediate_size=2 * _HIDDEN, num_hidden_layers=2, num_attention_heads=4, **extra
    )


def build_tiny_clip(save_dir: str | os.PathLike[str], *, seed: int = 0, projection_dim: int = 16) -> pathlib.Path:
    """Save a tiny CLIPModel and its CLIPProcessor to save_dir.

    Both ``CLIPModel.from_pretrained(save_dir)`` and ``AutoProcessor.from_pretrained(save_dir)``
    load the result offline. Images are resized and centre-cropped to 32 px (real CLIP: 224 px);
    the tokenizer is byte-level with a 32-token limit (real CLIP: 77).

    Args:
        save_dir: Target directory (created if missing; existing files are overwritten).
        seed: Seed of the random initialisation; equal seeds give identical weights.
        projection_dim: Width of the shared text/image embedding (the CLIP feature size).

    Returns:
        The path of the saved model.
    """
    tokenizer = _build_clip_tokenizer(_TEXT_MAX_LENGTH)
    config = CLIPConfig(
        # CLIPTextTransformer pools at the first eos_token_id position, so the config ids must
        # agree with the tokenizer or pooling silently reads the wrong token.
        text_config=_tower(
            vocab_size=len(tokenizer),
            max_position_embeddings=_TEXT_MAX_LENGTH,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=_tower(image_size=_IMAGE_SIZE, patch_size=_PATCH_SIZE),
        projection_dim=projection_dim,
    )
    # The PIL backend: the default CLIPImageProcessor wants torchvision, which is not installed.
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": _IMAGE_SIZE}, crop_size={"height": _IMAGE_SIZE, "width": _IMAGE_SIZE}
    )
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    # Forked so that building from a test or a script leaves the caller's global RNG untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    save_path = pathlib.Path(save_dir)
    save_path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(save_path)
    processor.save_pretrained(save_path)
    return save_path


def build_tiny_image_classifier(
    save_dir: str | os.PathLike[str], *, seed: int = 0, labels: Sequence[str] = ("artificial", "human")
) -> pathlib.Path:
    """Save a tiny ViTForImageClassification and its image processor to save_dir.

    Loads with ``AutoModelForImageClassification`` / ``AutoImageProcessor`` offline, like an
    "artificial vs human" detector such as Organika/sdxl-detector (a Swin there; the loading and
    label code paths are the same). Label i of ``labels`` gets class index i.

    Returns:
        The path of the saved model.
    """
    if len(set(labels)) != len(labels) or len(labels) < 2:
        raise ValueError(f"labels must be at least two distinct names, got {list(labels)}")
    config = ViTConfig(
        **_tower(image_size=_IMAGE_SIZE, patch_size=_PATCH_SIZE),
        id2label=dict(enumerate(labels)),
        label2id={label: index for index, label in enumerate(labels)},
    )
    image_processor = ViTImageProcessorPil(size={"height": _IMAGE_SIZE, "width": _IMAGE_SIZE})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ViTForImageClassification(config)
        # The default init (std 0.02) leaves every logit near 0 and each p near 1/num_labels; a
        # wider head spreads the probabilities over (0, 1), as a trained detector's are.
        torch.nn.init.normal_(model.classifier.weight, std=1.0)
    save_path = pathlib.Path(save_dir)
    save_path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(save_path)
    image_processor.save_pretrained(save_path)
    return save_path


def build_tiny_clip_probe(
    path: str | os.PathLike[str], *, clip_dir: str | os.PathLike[str], seed: int = 0
) -> pathlib.Path:
    """Save a random linear fake-image head for the CLIP at clip_dir as a safetensors file.

    The file holds ``weight`` [1, D] and ``bias`` [1], D being the CLIP's projection_dim (its
    image feature size): the layout of UniversalFakeDetect's ``fc`` layer. The weights are
    scaled up so that p(fake) spreads over (0, 1) on unit-norm features instead of sitting
    near 0.5.

    Returns:
        The path of the saved file.
    """
    feature_size = CLIPConfig.from_pretrained(clip_dir).projection_dim
    generator = torch.Generator().manual_seed(seed)
    head = {
        "weight": 4.0 * torch.randn(1, feature_size, generator=generator),
        "bias": torch.randn(1, generator=generator),
    }
    save_path = pathlib.Path(path)
    save_path.parent.mkdir(parents=True, exist_ok=True)
    save_file(head, str(save_path))
    return save_path
