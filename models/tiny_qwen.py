"""A tiny random-weight Qwen-Image-Edit pipeline with the real architectures, built offline.

The configs follow diffusers' own QwenImageEditPipeline tests (2-layer QwenImageTransformer2DModel,
a 3-level AutoencoderKLQwenImage, a 2-layer Qwen2.5-VL text encoder with a 2-layer vision tower);
the tokenizer is a byte-level Qwen2Tokenizer with Qwen's special tokens, so no file is downloaded.
Saved with save_pretrained, it loads with `QwenImageEditPipeline.from_pretrained(dir)` once
models.qwen_image_edit (which defines its torchvision-free processor) is imported.

CLI::

    python -m models.tiny_qwen OUT_DIR [--seed N]
"""

from __future__ import annotations

import argparse
import re
import os
import pathlib
from collections import Counter
from collections.abc import Sequence

import torch
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImageEditPipeline,
    QwenImageTransformer2DModel,
)
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from models.qwen_image_edit import ImageOnlyQwen2VLProcessor
from models.tiny import byte_alphabet, ensure_built

__all__ = ["build_tiny_qwen_image_edit", "ensure_tiny_qwen_image_edit", "main"]

# Qwen2's special tokens in their real order (151643...); here they follow the 256 byte tokens.
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]

# Qwen2-VL's chat template (images and videos as vision-pad placeholders).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# The Plus pipeline's per-image prefix inside the user turn.
_PLUS_IMAGE_PROMPT = "Picture 1: <|vision_start|><|image_pad|><|vision_end|>"
_TEXT_HIDDEN = 16  # Qwen2.5-VL hidden size = the transformer's joint_attention_dim
_Z_DIM = 4  # VAE latent channels; packed 2x2 they make the transformer's 16 input channels
# The first four channels of the real Qwen-Image VAE's latent statistics, so latent
# (de)normalisation runs with realistic values instead of mean 0 / std 1.
_LATENTS_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075]
_LATENTS_STD = [2.8184, 1.4541, 2.3275, 2.6558]
# The real Qwen-Image scheduler config (scheduler/scheduler_config.json of Qwen/Qwen-Image-Edit):
# exponential dynamic shifting between 256 and 8192 image tokens, stretched to end at 0.02.
_SCHEDULER_CONFIG = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "invert_sigmas": False,
    "max_image_seq_len": 8192,
    "max_shift": 0.9,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": 0.02,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}


def _template_pieces(tokenizer: Qwen2Tokenizer) -> list[str]:
    """The pre-tokenized words (in the byte-level alphabet) of the pipelines' prompt templates,
    special tokens left out."""
    # The template is set in the pipeline's __init__, not on the class: read it from an instance
    # without components, so the tiny tokenizer follows diffusers if the template ever changes.
    edit_template = QwenImageEditPipeline(None, None, None, None, None, None).prompt_template_encode
    pieces = []
    for template in (edit_template, _PLUS_IMAGE_PROMPT):
        for part in re.split("(" + "|".join(re.escape(token) for token in SPECIAL_TOKENS) + ")", template.replace("{}", "")):
            if part and part not in SPECIAL_TOKENS:
                pieces += [piece for piece, _ in tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str(part)]
    return pieces


def _learn_merges(pieces: list[str]) -> list[tuple[str, str]]:
    """Byte-pair merges learned greedily on `pieces` (most frequent adjacent pair first, ties by
    first occurrence) until every piece is one token. BPE encoding replays them in this order, so
    each piece then encodes to exactly one token."""
    words = [list(piece) for piece in pieces]
    merges: list[tuple[str, str]] = []
    while True:
        counts: Counter[tuple[str, str]] = Counter(pair for word in words for pair in zip(word, word[1:]))
        if not counts:
            return merges
        first, second = max(counts, key=counts.__getitem__)
        merges.append((first, second))
        for i, word in enumerate(words):
            merged, j = [], 0
            while j < len(word):
                if j + 1 < len(word) and word[j] == first and word[j + 1] == second:
                    merged.append(first + second)
                    j += 2
                else:
                    merged.append(word[j])
                    j += 1
            words[i] = merged


def _build_tokenizer() -> Qwen2Tokenizer:
    """Byte-level Qwen2 tokenizer with Qwen's special tokens, whose merges make each word of the
    pipelines' prompt templates one token, as in the real vocabulary.

    Why the merges: the pipelines drop the first 64 tokens of the encoded template (the system
    prompt, 64 tokens in the real tokenizer). With one token per byte the kept embeddings would be
    ~270 tokens of system prompt that every instruction shares, drowning the instruction (and
    making instruction and negative prompt nearly identical); with word merges exactly the system
    prompt is dropped, as with the real model. Instructions themselves stay mostly byte-level.
    """
    alphabet = byte_alphabet()
    plain = Qwen2Tokenizer(vocab={piece: idx for idx, piece in enumerate(alphabet)}, merges=[], unk_token=None, bos_token=None, eos_token=None, pad_token=None)
    merges = _learn_merges(_template_pieces(plain))
    pieces = alphabet + list(dict.fromkeys(first + second for first, second in merges))
    vocab = {piece: idx for idx, piece in enumerate(pieces + SPECIAL_TOKENS)}
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS,
        model_max_length=32768,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _build_text_encoder(tokenizer: Qwen2Tokenizer) -> Qwen2_5_VLForConditionalGeneration:
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config={
            "hidden_size": _TEXT_HIDDEN,
            "intermediate_size": 16,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            # transformers 5 names it rope_parameters; mrope_section sums to head_dim / 2 = 4.
            "rope_parameters": {"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 1000000.0},
            "vocab_size": len(tokenizer),
            # Qwen2.5-VL's ids: <|endoftext|> is both bos and pad, <|im_end|> ends a turn.
            "bos_token_id": ids("<|endoftext|>"),
            "pad_token_id": ids("<|endoftext|>"),
            "eos_token_id": ids("<|im_end|>"),
        },
        vision_config={
            "depth": 2,
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_heads": 2,
            "out_hidden_size": _TEXT_HIDDEN,
        },
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    return Qwen2_5_VLForConditionalGeneration(config)


def _build_pipeline(seed: int) -> QwenImageEditPipeline:
    tokenizer = _build_tokenizer()
    # Reseeded per component so each one's weights depend only on the seed, not on build order.
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=4 * _Z_DIM,
        out_channels=_Z_DIM,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=3,
        joint_attention_dim=_TEXT_HIDDEN,
        guidance_embeds=False,
        axes_dims_rope=(8, 4, 4),
    )
    torch.manual_seed(seed)
    # Two spatial downsamplings (x4); the time axis is never downsampled for single frames.
    vae = AutoencoderKLQwenImage(
        base_dim=_Z_DIM * 6,
        z_dim=_Z_DIM,
        dim_mult=[1, 2, 4],
        num_res_blocks=1,
        temperal_downsample=[False, True],
        latents_mean=_LATENTS_MEAN,
        latents_std=_LATENTS_STD,
    )
    torch.manual_seed(seed)
    text_encoder = _build_text_encoder(tokenizer)
    processor = ImageOnlyQwen2VLProcessor(
        image_processor=Qwen2VLImageProcessorPil(), tokenizer=tokenizer, chat_template=CHAT_TEMPLATE
    )
    return QwenImageEditPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**_SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        processor=processor,
        transformer=transformer,
    )


def build_tiny_qwen_image_edit(save_dir: str | os.PathLike[str], *, seed: int = 0) -> pathlib.Path:
    """Build a tiny random-weight QwenImageEditPipeline and save it with save_pretrained to save_dir.

    Equal seeds give identical weights. Images must be square multiples of 8 px (x4 VAE, 2x2
    packing); 64 px is 64 image tokens.
    """
    save_path = pathlib.Path(save_dir)
    # Forked so that building (lazily from a test or a training script) leaves the caller's
    # global RNG stream untouched.
    with torch.random.fork_rng(devices=[]):
        pipe = _build_pipeline(seed)
    save_path.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(save_path)
    return save_path


def ensure_tiny_qwen_image_edit(save_dir: str | os.PathLike[str], **kwargs: int) -> pathlib.Path:
    """Build the tiny Qwen-Image-Edit pipeline into save_dir unless it is already there (see
    models.tiny.ensure_built: atomic, safe for concurrent callers)."""
    return ensure_built(save_dir, build_tiny_qwen_image_edit, **kwargs)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m models.tiny_qwen", description="Build a tiny random-weight QwenImageEditPipeline offline."
    )
    parser.add_argument("out_dir", type=pathlib.Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(build_tiny_qwen_image_edit(args.out_dir, seed=args.seed))


if __name__ == "__main__":
    main()
