"""Tiny random-weight models with real architectures, built fully offline.

There is no model hub on these machines, so tests, smoke runs and configs point at
small pipelines built here from configs alone. The architectures (and therefore the
code paths exercised in diffusers / transformers / peft) are the real ones; only the
sizes are shrunk and the weights are random.

CLI::

    python -m models.tiny sd3 OUT_DIR [--seed N] [--sample-size S] [--text-max-length L]
"""

from __future__ import annotations

import argparse
import errno
import os
import pathlib
import shutil
import tempfile
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

__all__ = ["build_tiny_sd3", "ensure_tiny_sd3", "main"]

# Widths of the tiny SD3. The pooled projection of the transformer receives the
# concatenation of both CLIP projections, hence 2 * _CLIP_PROJECTION_DIM.
_HIDDEN = 32
_CLIP_PROJECTION_DIM = 32
_POOLED_DIM = 2 * _CLIP_PROJECTION_DIM
_LATENT_CHANNELS = 16
# Real SD3 VAE latent statistics, so latent (de)normalisation code runs with realistic values.
_VAE_SCALING_FACTOR = 1.5305
_VAE_SHIFT_FACTOR = 0.0609
# Latent grid side (in patches) the transformer's fixed sin-cos table covers: 64 patches
# of 2 latent pixels at x8 VAE downsampling allows images up to 1024 px, while keeping
# the saved table (a persistent buffer) small.
_POS_EMBED_MAX_SIZE = 64


def _byte_stand_ins() -> list[tuple[int, str]]:
    """(byte, printable stand-in) pairs of GPT-2's byte-level BPE, in GPT-2's order: printable
    bytes map to themselves first, the others to code points from 256 on."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    pairs = [(byte, chr(byte)) for byte in printable]
    others = [byte for byte in range(256) if byte not in printable]
    return pairs + [(byte, chr(256 + extra)) for extra, byte in enumerate(others)]


def byte_alphabet() -> list[str]:
    """GPT-2's byte-level alphabet in its own order (printable bytes first), which is also the order
    of the first 256 entries of the Qwen2 vocabulary: single characters get their real Qwen ids."""
    return [piece for _, piece in _byte_stand_ins()]


def _bytes_to_unicode() -> list[str]:
    """The same alphabet ordered by byte value (id == byte for plain pieces), for the CLIP
    tokenizer: its pre-tokenizer is ByteLevel, so its vocabulary must be spelled in this alphabet
    for every input byte to map onto a known piece."""
    return [piece for _, piece in sorted(_byte_stand_ins())]


def _build_clip_tokenizer(model_max_length: int) -> CLIPTokenizer:
    """Byte-level CLIP tokenizer with no merges, i.e. one token per byte.

    Like real CLIP, every byte appears twice: plain, and with the "</w>" end-of-word
    suffix that BPE attaches to the last symbol of each word. Both specials come last,
    as in the real vocabulary (49406 / 49407).
    """
    alphabet = _bytes_to_unicode()
    pieces = alphabet + [piece + "</w>" for piece in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {piece: idx for idx, piece in enumerate(pieces)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)


def _build_t5_tokenizer(model_max_length: int) -> T5Tokenizer:
    """Character-level T5 (Unigram) tokenizer over printable ASCII.

    Single characters plus the "▁" word-boundary piece let the Unigram model segment any
    ASCII prompt; anything else falls back to <unk>. Word-initial pieces "▁c" fold each
    word's boundary into its first character, so prompts do not spend a token per space
    of the short text budget. Special ids follow T5 (<pad>=0, </s>=1, <unk>=2). No
    sentinel tokens: nothing here does span corruption.
    """
    chars = [chr(cp) for cp in range(ord("!"), ord("~") + 1)]
    vocab: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(char, -3.0) for char in chars]
    # Scored above "▁" + char (-5.0) so Unigram's best segmentation picks the merged piece.
    vocab += [("▁" + char, -4.0) for char in chars]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def _build_clip_text_encoder(tokenizer: CLIPTokenizer, max_positions: int) -> CLIPTextModelWithProjection:
    # CLIPTextTransformer pools at the first eos_token_id position (unless the id is the
    # legacy value 2), so the config ids must agree with the tokenizer or pooling silently
    # picks the wrong token.
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=_HIDDEN,
        intermediate_size=4 * _HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=max_positions,
        projection_dim=_CLIP_PROJECTION_DIM,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModelWithProjection(config)


def _build_t5_encoder(tokenizer: T5Tokenizer) -> T5EncoderModel:
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=_HIDDEN,
        d_kv=8,
        d_ff=4 * _HIDDEN,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        # T5 v1.1 style, as in the SD3 text_encoder_3.
        feed_forward_proj="gated-gelu",
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5EncoderModel(config)


def _build_vae() -> AutoencoderKL:
    # Four blocks give the x8 downsampling the SD3 pipeline derives from
    # len(block_out_channels); SD3's VAE has no quant convs.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=_LATENT_CHANNELS,
        norm_num_groups=4,
        scaling_factor=_VAE_SCALING_FACTOR,
        shift_factor=_VAE_SHIFT_FACTOR,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def _build_sd3_pipeline(*, sample_size: int, text_max_length: int) -> StableDiffusion3Pipeline:
    tokenizer = _build_clip_tokenizer(text_max_length)
    tokenizer_2 = _build_clip_tokenizer(text_max_length)
    tokenizer_3 = _build_t5_tokenizer(text_max_length)

    transformer = SD3Transformer2DModel(
        sample_size=sample_size,
        patch_size=2,
        in_channels=_LATENT_CHANNELS,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=_HIDDEN,
        caption_projection_dim=_HIDDEN,
        pooled_projection_dim=_POOLED_DIM,
        out_channels=_LATENT_CHANNELS,
        pos_embed_max_size=_POS_EMBED_MAX_SIZE,
    )
    text_encoder = _build_clip_text_encoder(tokenizer, text_max_length)
    text_encoder_2 = _build_clip_text_encoder(tokenizer_2, text_max_length)
    text_encoder_3 = _build_t5_encoder(tokenizer_3)
    vae = _build_vae()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)

    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
    return pipe


def _synthetic_images(batch: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """[batch, 3, size, size] images in [-1, 1]: per sample a random mix of a smooth colour field
    and per-pixel noise, so the family spans flat (compressible) to busy (incompressible)."""
    coarse = F.interpolate(torch.rand(batch, 3, 2, 2, generator=generator) * 2 - 1, size=size, mode="bilinear")
    medium = F.interpolate(torch.rand(batch, 3, 4, 4, generator=generator) * 2 - 1, size=size, mode="bilinear")
    smooth = 0.7 * coarse + 0.3 * medium
    busy = torch.rand(batch, 3, size, size, generator=generator) * 2 - 1
    mix = torch.rand(batch, 1, 1, 1, generator=generator)
    return (mix * smooth + (1 - mix) * busy).clamp(-1, 1)


def _warm_start(pipe: StableDiffusion3Pipeline, steps: int, *, latent_size: int, text_max_length: int) -> None:
    """A few seconds of pretraining on synthetic images (see _synthetic_images): the VAE as an
    autoencoder, then the transformer with the flow-matching loss on the VAE's latents,
    unconditionally (empty prompt).

    Why: a random VAE decodes every latent to nearly the same texture (its GroupNorms remove
    most of the input), so no policy can move an image reward; measured here, GRPO on a random
    tiny SD3 did not raise JPEG compressibility in 10 epochs whatever the learning rate. After
    the warm start, images follow the latents and the model's samples vary from flat to busy,
    so a reward like compressibility has something to push on, as with a real checkpoint.
    """
    generator = torch.Generator().manual_seed(1234)
    vae, transformer = pipe.vae, pipe.transformer
    image_size = latent_size * pipe.vae_scale_factor
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3)
    for _ in range(steps // 2):
        images = _synthetic_images(16, image_size, generator)
        posterior = vae.encode(images).latent_dist
        reconstruction = vae.decode(posterior.sample(generator=generator)).sample
        loss = F.mse_loss(reconstruction, images) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    vae.eval().requires_grad_(False)

    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=[""], prompt_2=None, prompt_3=None, device="cpu",
            do_classifier_free_guidance=False, max_sequence_length=text_max_length,
        )
        # A fixed pool of encoded images: encoding anew at every step would cost more than the
        # transformer steps themselves.
        pool = torch.cat([vae.encode(_synthetic_images(64, image_size, generator)).latent_dist.mean for _ in range(8)])
        pool = (pool - vae.config.shift_factor) * vae.config.scaling_factor
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=1e-3)
    transformer.train()
    batch = 64
    for _ in range(steps):
        clean = pool[torch.randint(0, pool.shape[0], (batch,), generator=generator)]
        noise = torch.randn(clean.shape, generator=generator)
        sigma = torch.rand(batch, generator=generator).view(-1, 1, 1, 1)
        noisy = (1 - sigma) * clean + sigma * noise
        velocity = transformer(
            hidden_states=noisy, encoder_hidden_states=embeds.expand(batch, -1, -1),
            pooled_projections=pooled.expand(batch, -1), timestep=sigma.flatten() * 1000, return_dict=False,
        )[0]
        loss = F.mse_loss(velocity, noise - clean)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    transformer.eval()


def build_tiny_sd3(
    save_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    sample_size: int = 8,
    text_max_length: int = 16,
    warm_start_steps: int = 0,
) -> pathlib.Path:
    """Build a tiny random-weight StableDiffusion3Pipeline and save it with save_pretrained to save_dir.

    Args:
        save_dir: Target directory (created if missing; existing files are overwritten).
        seed: Seed for every random initialisation, so equal seeds give identical weights.
        sample_size: Transformer latent sample size; the pipeline's default image side is
            sample_size * 8 pixels.
        text_max_length: model_max_length of all three tokenizers, and the CLIP position
            table size. Pass the same value as ``max_sequence_length`` when sampling.
        warm_start_steps: Flow-matching steps fitting the transformer to smooth synthetic
            latents (see _warm_start); 0 keeps it random.

    Returns:
        The path of the saved pipeline.
    """
    save_path = pathlib.Path(save_dir)
    # Forked so that building (e.g. lazily from a test or a training script) leaves the
    # caller's global RNG stream untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe = _build_sd3_pipeline(sample_size=sample_size, text_max_length=text_max_length)
        if warm_start_steps:
            _warm_start(pipe, warm_start_steps, latent_size=sample_size, text_max_length=text_max_length)
    save_path.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(save_path)
    return save_path


def ensure_built(save_dir: str | os.PathLike[str], build: Callable[..., object], **kwargs) -> pathlib.Path:
    """Run build(tmp_dir, **kwargs) only if save_dir/model_index.json does not exist yet.

    Safe for concurrent callers (several ranks or test workers): each builds into a private
    sibling directory and renames it into place atomically, so readers never see a half-written
    pipeline. The loser of a rename race discards its copy and uses the winner's. An existing
    pipeline is reused as is, whatever kwargs say.
    """
    save_path = pathlib.Path(save_dir)
    if (save_path / "model_index.json").is_file():
        return save_path

    save_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = pathlib.Path(tempfile.mkdtemp(prefix=f".{save_path.name}.tmp-", dir=save_path.parent))
    try:
        build(tmp_path, **kwargs)
        try:
            # rename(2) replaces an empty target directory but fails on a populated one,
            # which is exactly the "someone else won" case.
            os.rename(tmp_path, save_path)
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            if not (save_path / "model_index.json").is_file():
                raise FileExistsError(
                    f"{save_path} exists but holds no model_index.json; remove it to rebuild"
                ) from exc
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)
    return save_path


def ensure_tiny_sd3(save_dir: str | os.PathLike[str], **kwargs: int) -> pathlib.Path:
    """Build the tiny SD3 into save_dir unless it is already there (see ensure_built)."""
    return ensure_built(save_dir, build_tiny_sd3, **kwargs)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m models.tiny", description="Build tiny random-weight pipelines offline."
    )
    subparsers = parser.add_subparsers(dest="model", required=True)
    sd3 = subparsers.add_parser("sd3", help="tiny StableDiffusion3Pipeline")
    sd3.add_argument("out_dir", type=pathlib.Path)
    sd3.add_argument("--seed", type=int, default=0)
    sd3.add_argument("--sample-size", type=int, default=8)
    sd3.add_argument("--text-max-length", type=int, default=16)
    sd3.add_argument("--warm-start-steps", type=int, default=0, help="fit the transformer to smooth synthetic latents first")
    args = parser.parse_args(argv)

    if args.model == "sd3":
        path = build_tiny_sd3(
            args.out_dir,
            seed=args.seed,
            sample_size=args.sample_size,
            text_max_length=args.text_max_length,
            warm_start_steps=args.warm_start_steps,
        )
        print(path)


if __name__ == "__main__":
    main()
