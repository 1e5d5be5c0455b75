"""A tiny random-weight Qwen3-VL judge with the real architecture, built offline.

FIRM-Gen-8B and FIRM-Edit-8B are Qwen3-VL-8B fine-tunes; this is the same model class at toy size
(2 text layers, hidden 32; a 2-block vision tower) with a byte-level Qwen2 tokenizer that carries
Qwen's special tokens, so single characters, digits included, get their real Qwen ids ("1".."5"
are 16..20). It is saved with save_pretrained and loads with AutoModelForImageTextToText, and its
processor with AutoProcessor once rewards.firm.register_image_only_processor() has run in the
process (the processor is the torchvision-free ImageOnlyQwen3VLProcessor).

It answers at random: it is for testing the plumbing (batching, padding, score probabilities,
servers), not scores.

CLI::

    python -m models.tiny_vlm OUT_DIR [--seed N]
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import Qwen2Tokenizer, Qwen3VLConfig, Qwen3VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from rewards.firm import ImageOnlyQwen3VLProcessor
from models.tiny import byte_alphabet

__all__ = ["CHAT_TEMPLATE", "SPECIAL_TOKENS", "build_tiny_qwen3_vl", "main"]

# Qwen's special tokens in their real order (151643, ...); here they follow the 256 byte tokens.
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]

# A ChatML template with Qwen-VL's image placeholders, like Qwen3-VL's own: no default system
# turn, each image as <|vision_start|><|image_pad|><|vision_end|> where it appears in the
# message, and "<|im_start|>assistant\n" as the generation prompt.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or 'image' in part or 'image_url' in part -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'video' or 'video' in part -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in part -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

_TEXT_HIDDEN = 32
# Ten times the usual init scale (0.02): at 0.02 every image and prompt gets a near-uniform score
# distribution, equal to 1e-4 across samples, too close for a test to tell a wrong image or a
# misaligned padding from the right one; at 0.2 samples differ by about 0.05 in expected score.
_INIT_RANGE = 0.2
# Vision sizes: Qwen3-VL's own 16 px patches merged 2 x 2, so one image token covers 32 x 32 px.
# Images are held between 32 x 32 and 128 x 128 pixels: at most 16 image tokens each.
_PATCH, _MERGE = 16, 2
_MIN_PIXELS, _MAX_PIXELS = 32 * 32, 128 * 128


def _build_tokenizer() -> Qwen2Tokenizer:
    """Byte-level Qwen2 tokenizer with no merges (one token per byte) plus Qwen's special tokens.
    Qwen's pre-tokenizer splits digits and the space before them, as in the real vocabulary."""
    vocab = {piece: index for index, piece in enumerate(byte_alphabet() + SPECIAL_TOKENS)}
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS,
        model_max_length=32768,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _build_model(tokenizer: Qwen2Tokenizer) -> Qwen3VLForConditionalGeneration:
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen3VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": _TEXT_HIDDEN,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 8,
            # Multimodal RoPE: mrope_section (time, height, width) sums to head_dim / 2 = 4.
            "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [2, 1, 1], "mrope_interleaved": True},
            "max_position_embeddings": 4096,
            "pad_token_id": ids("<|endoftext|>"),
            "bos_token_id": ids("<|endoftext|>"),
            "eos_token_id": ids("<|im_end|>"),
            "initializer_range": _INIT_RANGE,
        },
        vision_config={
            "depth": 2,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_heads": 2,
            "patch_size": _PATCH,
            "spatial_merge_size": _MERGE,
            "temporal_patch_size": 2,
            "out_hidden_size": _TEXT_HIDDEN,
            # A perfect square (an 8 x 8 grid, interpolated to each image's patch grid).
            "num_position_embeddings": 64,
            # DeepStack taps; each index must name one of the `depth` vision blocks.
            "deepstack_visual_indexes": [0, 1],
            "initializer_range": _INIT_RANGE,
        },
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        initializer_range=_INIT_RANGE,
    )
    model = Qwen3VLForConditionalGeneration(config)
    model.generation_config.pad_token_id = ids("<|endoftext|>")
    model.generation_config.eos_token_id = ids("<|im_end|>")
    return model


def build_tiny_qwen3_vl(save_dir: str | Path, *, seed: int = 0) -> Path:
    """Build the tiny judge with weights drawn from `seed`, save model and processor to save_dir
    (about 400 KB), and return the directory."""
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = _build_tokenizer()
    torch.manual_seed(seed)
    model = _build_model(tokenizer)
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=_PATCH,
        temporal_patch_size=2,
        merge_size=_MERGE,
        size={"shortest_edge": _MIN_PIXELS, "longest_edge": _MAX_PIXELS},
        # Qwen3-VL normalises pixels to [-1, 1].
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    processor = ImageOnlyQwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)
    model.save_pretrained(save_dir)
    processor.save_pretrained(save_dir)
    return save_dir


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build and save a tiny random-weight Qwen3-VL judge.")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    build_tiny_qwen3_vl(args.out_dir, seed=args.seed)


if __name__ == "__main__":
    main()
