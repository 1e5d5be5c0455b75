"""A small pretrained SD3 for the shapes domain (models/shapes/scenes.py): the embedded demo's model.

Same classes as Stable Diffusion 3.5 (StableDiffusion3Pipeline with SD3Transformer2DModel, an
AutoencoderKL, two CLIP text encoders and a T5 encoder, FlowMatchEulerDiscreteScheduler), shrunk
to what a 2-core CPU trains in about half an hour:

- VAE: x4 downsampling to 4 latent channels (64 px images -> 16 x 16 x 4 latents).
- Text: word-level tokenizers over the caption vocabulary (12 tokens), small CLIP and T5 encoders
  trained jointly with the transformer. `TEXT_MAX_LENGTH` is also what sampling must pass as
  max_sequence_length (configs: model.max_sequence_length); the pipeline default of 256 pads T5
  far beyond anything the model saw.
- Transformer: 6 joint blocks, 4 heads x 32, RMS qk-norm, patch 2 (64 image tokens).

Pretraining only ever sees the *training* captions of `shapes.split_prompts(SPLIT_SEED)`; the
held-out captions (whole content combinations, see split_prompts) measure generalisation.

CLI (writes a diffusers pipeline directory, loadable with from_pretrained, plus pretrain_log.json)::

    python -m models.shapes.pretrain OUT_DIR [--steps 3300] [--vae-steps 800] [--seed 0]
    python -m models.shapes.pretrain OUT_DIR --init DIR --steps 2000 [--lr 4e-4]   # continue DIR's training

With --init, the VAE, tokenizers and weights come from DIR (a directory this script wrote) and only
the transformer and the text encoders train further, on the scenes DIR was trained on (--seed then
seeds only this stage's batches and noise); the log keeps DIR's log under "earlier".
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import time
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from tqdm.auto import tqdm
from transformers import (
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from models.shapes import scenes as shapes
from models.shapes.checker import ShapesChecker

__all__ = ["TEXT_MAX_LENGTH", "SPLIT_SEED", "build_pipeline", "pretrain", "evaluate", "main"]

TEXT_MAX_LENGTH = 12  # the longest caption is 10 words, + start and end tokens
SPLIT_SEED = 0  # shapes.split_prompts seed of the train / held-out captions
IMAGE_SIZE = 64
_CLIP_HIDDEN = 64  # two CLIPs side by side fill the T5 width, as in SD3 (2 x 768 <= 4096)
_T5_HIDDEN = 128
_LATENT_CHANNELS = 4


def caption_words() -> list[str]:
    """Every word of every caption, sorted."""
    return sorted({word for caption in shapes.all_captions() for word in caption.split()})


# ---------------------------------------------------------------- text


def _learn_bpe_merges(words: Sequence[str]) -> list[tuple[str, str]]:
    """Byte-pair merges learned on `words` (CLIP style: the last letter carries "</w>") until every
    word is a single symbol. Applying learned merges in order reproduces the learned segmentation,
    so each of these words comes out as one token; ties break alphabetically, for a stable order."""
    segmented = [list(word[:-1]) + [word[-1] + "</w>"] for word in words]
    merges: list[tuple[str, str]] = []
    while any(len(symbols) > 1 for symbols in segmented):
        counts: dict[tuple[str, str], int] = {}
        for symbols in segmented:
            for pair in zip(symbols, symbols[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        for symbols in segmented:
            i = 0
            while i < len(symbols) - 1:
                if (symbols[i], symbols[i + 1]) == best:
                    symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
                i += 1
    return merges


def build_clip_tokenizer(words: Sequence[str], max_length: int = TEXT_MAX_LENGTH) -> CLIPTokenizer:
    """A CLIP BPE tokenizer whose merges (learned on the caption words) make each word one token.

    Single letters (with and without CLIP's end-of-word marker) stay in the vocabulary, so an
    unknown word is spelled out in pieces instead of failing.
    """
    merges = _learn_bpe_merges(words)
    pieces = [letter for letter in "abcdefghijklmnopqrstuvwxyz"] + [letter + "</w>" for letter in "abcdefghijklmnopqrstuvwxyz"]
    pieces += [left + right for left, right in merges]
    pieces += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {piece: i for i, piece in enumerate(dict.fromkeys(pieces))}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def build_t5_tokenizer(words: Sequence[str], max_length: int = TEXT_MAX_LENGTH) -> T5Tokenizer:
    """A Unigram T5 tokenizer: whole caption words score far above their letters, so each word is
    one token; letters remain as a fallback for anything else."""
    vocab: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab += [(letter, -3.0) for letter in letters] + [("▁" + letter, -4.0) for letter in letters]
    vocab += [("▁" + word, -1.0) for word in words if len(word) > 1]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=max_length)


def _clip_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModelWithProjection:
    return CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=_CLIP_HIDDEN, intermediate_size=2 * _CLIP_HIDDEN,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=TEXT_MAX_LENGTH,
        projection_dim=_CLIP_HIDDEN, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))


def _t5_encoder(tokenizer: T5Tokenizer) -> T5EncoderModel:
    return T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=_T5_HIDDEN, d_kv=32, d_ff=2 * _T5_HIDDEN, num_layers=2,
        num_heads=4, relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", dropout_rate=0.0,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    ))


# ---------------------------------------------------------------- pipeline


def build_pipeline(seed: int = 0) -> StableDiffusion3Pipeline:
    """The untrained pipeline (random weights; the VAE's latent statistics are placeholders)."""
    torch.manual_seed(seed)
    words = caption_words()
    tokenizer, tokenizer_2 = build_clip_tokenizer(words), build_clip_tokenizer(words)
    tokenizer_3 = build_t5_tokenizer(words)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32), layers_per_block=1, latent_channels=_LATENT_CHANNELS,
        norm_num_groups=8, mid_block_add_attention=False, use_quant_conv=False, use_post_quant_conv=False,
    )
    transformer = SD3Transformer2DModel(
        sample_size=IMAGE_SIZE // 4, patch_size=2, in_channels=_LATENT_CHANNELS, num_layers=6,
        attention_head_dim=32, num_attention_heads=4, joint_attention_dim=_T5_HIDDEN,
        caption_projection_dim=128, pooled_projection_dim=2 * _CLIP_HIDDEN,
        out_channels=_LATENT_CHANNELS, pos_embed_max_size=16, qk_norm="rms_norm",
    )
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0), vae=vae,
        text_encoder=_clip_encoder(tokenizer), tokenizer=tokenizer,
        text_encoder_2=_clip_encoder(tokenizer_2), tokenizer_2=tokenizer_2,
        text_encoder_3=_t5_encoder(tokenizer_3), tokenizer_3=tokenizer_3,
    )


class _TextIds:
    """Token ids of a fixed caption list for all three tokenizers, computed once."""

    def __init__(self, pipe: StableDiffusion3Pipeline, captions: Sequence[str]):
        def ids(tokenizer):
            return tokenizer(list(captions), padding="max_length", max_length=TEXT_MAX_LENGTH,
                             truncation=True, return_tensors="pt").input_ids

        self.clip, self.clip_2, self.t5 = ids(pipe.tokenizer), ids(pipe.tokenizer_2), ids(pipe.tokenizer_3)


def encode_ids(pipe: StableDiffusion3Pipeline, clip: torch.Tensor, clip_2: torch.Tensor, t5: torch.Tensor):
    """What `pipe.encode_prompt` computes, from token ids and with gradients (joint training)."""
    hidden, pooled = [], []
    for encoder, ids in ((pipe.text_encoder, clip), (pipe.text_encoder_2, clip_2)):
        out = encoder(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])  # the penultimate layer, as encode_prompt with clip_skip None
        pooled.append(out[0])
    clip_embeds = torch.cat(hidden, dim=-1)
    t5_embeds = pipe.text_encoder_3(t5)[0]
    clip_embeds = F.pad(clip_embeds, (0, t5_embeds.shape[-1] - clip_embeds.shape[-1]))
    return torch.cat([clip_embeds, t5_embeds], dim=-2), torch.cat(pooled, dim=-1)


# ---------------------------------------------------------------- data


def _training_captions() -> dict[str, list[str]]:
    train, _ = shapes.split_prompts(SPLIT_SEED)
    by_kind: dict[str, list[str]] = {}
    for caption in train:
        by_kind.setdefault(shapes.caption_to_spec(caption).kind, []).append(caption)
    return by_kind


def render_pool(size: int, seed: int) -> tuple[list[str], torch.Tensor]:
    """`size` rendered training scenes (kinds equally likely) as captions and [N, 3, 64, 64] in [-1, 1]."""
    rng = np.random.default_rng(seed)
    by_kind = _training_captions()
    kinds = sorted(by_kind)
    captions, images = [], np.empty((size, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for i in tqdm(range(size), desc="render scenes", leave=False):
        options = by_kind[kinds[int(rng.integers(len(kinds)))]]
        caption = options[int(rng.integers(len(options)))]
        images[i] = shapes.render(shapes.scene_from_caption(caption, rng), IMAGE_SIZE)
        captions.append(caption)
    tensor = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return captions, tensor


# ---------------------------------------------------------------- training


def _cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_vae(vae: AutoencoderKL, images: torch.Tensor, steps: int, generator: torch.Generator, log: list) -> None:
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _cosine(s, steps, 50))
    vae.train()
    bar = tqdm(range(steps), desc="vae")
    for step in bar:
        batch = images[torch.randint(0, len(images), (16,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample(generator=generator)).sample
        mse = F.mse_loss(reconstruction, batch)
        loss = mse + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            bar.set_postfix(mse=f"{mse.item():.5f}")
            log.append({"stage": "vae", "step": step, "mse": mse.item()})
    vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    """Posterior means of all images, normalised with statistics written into the VAE config."""
    latents = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in images.split(256)])
    shift, scale = latents.mean().item(), 1.0 / latents.std().item()
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    return (latents - shift) * scale


def train_flow(
    pipe: StableDiffusion3Pipeline, captions: list[str], latents: torch.Tensor, steps: int,
    generator: torch.Generator, log: list, *, batch: int = 64, lr: float = 8e-4,
    caption_dropout: float = 0.1, ema_decay: float = 0.999,
) -> None:
    """Rectified-flow training of the transformer and the three text encoders together; leaves
    the EMA weights in the pipeline."""
    unique = sorted(set(captions))
    ids = _TextIds(pipe, unique + [""])
    index_of = {caption: i for i, caption in enumerate(unique)}
    caption_index = torch.tensor([index_of[c] for c in captions])
    empty = len(unique)

    modules = [pipe.transformer, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3]
    params = [p for module in modules for p in module.parameters()]
    for module in modules:
        module.train().requires_grad_(True)
    ema = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _cosine(s, steps, 200))
    bar = tqdm(range(steps), desc="transformer")
    running = None
    for step in bar:
        pick = torch.randint(0, len(latents), (batch,), generator=generator)
        text = caption_index[pick]
        text = torch.where(torch.rand(batch, generator=generator) < caption_dropout, empty, text)
        embeds, pooled = encode_ids(pipe, ids.clip[text], ids.clip_2[text], ids.t5[text])
        clean = latents[pick]
        noise = torch.randn(clean.shape, generator=generator)
        sigma = torch.sigmoid(torch.randn(batch, generator=generator))  # logit-normal, as SD3
        s = sigma.view(-1, 1, 1, 1)
        velocity = pipe.transformer(
            hidden_states=(1 - s) * clean + s * noise, encoder_hidden_states=embeds,
            pooled_projections=pooled, timestep=sigma * 1000.0, return_dict=False,
        )[0]
        loss = F.mse_loss(velocity, noise - clean)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1.0 - min(ema_decay, (1 + step) / (10 + step)))
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 100 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{running:.4f}")
            log.append({"stage": "transformer", "step": step, "loss_ema": running})
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    for module in modules:
        module.eval().requires_grad_(False)


@torch.no_grad()
def evaluate(
    pipe: StableDiffusion3Pipeline, prompts: Sequence[str], seeds_per_prompt: int = 4, *,
    num_steps: int = 10, guidance_scale: float = 4.5, batch: int = 32,
) -> dict[str, float]:
    """Strict / partial shapes_geneval accuracy of `pipe(...)` samples (the diffusers sampler)."""
    scorer = ShapesChecker()
    jobs = [(prompt, seed) for seed in range(seeds_per_prompt) for prompt in prompts]
    strict, partial = [], []
    for start in tqdm(range(0, len(jobs), batch), desc="evaluate", leave=False):
        chunk = jobs[start:start + batch]
        images = pipe(
            prompt=[p for p, _ in chunk], num_inference_steps=num_steps, guidance_scale=guidance_scale,
            height=IMAGE_SIZE, width=IMAGE_SIZE, max_sequence_length=TEXT_MAX_LENGTH, output_type="np",
            generator=[torch.Generator().manual_seed(10_000 + s) for _, s in chunk],
        ).images
        chunk_strict, chunk_partial = scorer.score((images * 255).round().astype(np.uint8), [p for p, _ in chunk])
        strict += chunk_strict.tolist()
        partial += chunk_partial.tolist()
    return {"strict": float(np.mean(strict)), "partial": float(np.mean(partial)), "images": len(strict)}


@torch.no_grad()
def reconstruction_accuracy(vae: AutoencoderKL, captions: Sequence[str], seed: int) -> dict[str, float]:
    """shapes_geneval strict accuracy of renders of `captions` and of their VAE round trips."""
    rng = np.random.default_rng(seed + 1)
    renders = np.stack([shapes.render(shapes.scene_from_caption(c, rng), IMAGE_SIZE) for c in captions])
    images = torch.from_numpy(renders).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    decoded = vae.decode(vae.encode(images).latent_dist.mean).sample
    decoded = ((decoded / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    scorer = ShapesChecker()
    return {
        "renders": float(scorer.score(renders, list(captions))[0].mean()),
        "reconstructions": float(scorer.score(decoded, list(captions))[0].mean()),
    }


def pretrain(
    out_dir: str | pathlib.Path, *, steps: int = 3300, vae_steps: int = 800, pool_size: int = 20_000,
    seed: int = 0, eval_seeds: int = 4, save_dtype: torch.dtype = torch.float16,
    init: str | pathlib.Path | None = None, lr: float = 8e-4,
) -> dict:
    """Build (or, with `init`, load a pipeline this function saved), train and save the pipeline;
    returns the log written to OUT/pretrain_log.json."""
    out = pathlib.Path(out_dir)
    # A continued run draws other batches and noise than the run it continues (same --seed).
    generator = torch.Generator().manual_seed(seed if init is None else seed + 1000)
    log: list[dict] = []
    earlier: dict | None = None
    started = time.perf_counter()
    if init is None:
        pipe = build_pipeline(seed)
    else:
        init = pathlib.Path(init)
        if not (init / "pretrain_log.json").is_file():
            raise FileNotFoundError(f"--init {init}: no pretrain_log.json there; pass a directory this script wrote")
        earlier = json.loads((init / "pretrain_log.json").read_text())
        pool_size = earlier["pool_size"]  # the scenes DIR was trained on, whatever --pool-size says
        pipe = StableDiffusion3Pipeline.from_pretrained(init, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    captions, images = render_pool(pool_size, seed if earlier is None else earlier["seed"])
    rendered = time.perf_counter()
    if init is None:
        train_vae(pipe.vae, images, vae_steps, generator, log)
    else:
        vae_steps = 0
    latents = encode_latents(pipe.vae, images)
    vae_done = time.perf_counter()
    _, held_out = shapes.split_prompts(SPLIT_SEED)
    reconstruction = reconstruction_accuracy(pipe.vae, held_out, seed)

    # The hand-written text path must equal the pipeline's own before anything is trained on it.
    probe = ["a red circle", "two blue squares", ""]
    ids = _TextIds(pipe, probe)
    with torch.no_grad():
        mine = encode_ids(pipe, ids.clip, ids.clip_2, ids.t5)
        theirs = pipe.encode_prompt(prompt=probe, prompt_2=None, prompt_3=None, device="cpu",
                                    do_classifier_free_guidance=False, max_sequence_length=TEXT_MAX_LENGTH)
    if not (torch.allclose(mine[0], theirs[0], atol=1e-5) and torch.allclose(mine[1], theirs[2], atol=1e-5)):
        raise RuntimeError("encode_ids no longer matches StableDiffusion3Pipeline.encode_prompt; update it")

    train_flow(pipe, captions, latents, steps, generator, log, lr=lr)
    flow_done = time.perf_counter()

    pipe.to(save_dtype)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out)
    # Score what was saved, loaded back the way users load it.
    loaded = StableDiffusion3Pipeline.from_pretrained(out, dtype=torch.float32)
    loaded.set_progress_bar_config(disable=True)
    train_captions = [c for kind in _training_captions().values() for c in kind]
    rng = np.random.default_rng(seed)
    seen = [train_captions[i] for i in rng.choice(len(train_captions), size=len(held_out), replace=False)]
    evaluations = {}
    if eval_seeds:
        evaluations = {"eval_held_out": evaluate(loaded, held_out, eval_seeds), "eval_train_captions": evaluate(loaded, seen, eval_seeds)}
    result = {
        "steps": steps, "vae_steps": vae_steps, "pool_size": pool_size, "seed": seed, "lr": lr,
        **({"init": str(init), "earlier": earlier} if earlier is not None else {}),
        "params": {name: sum(p.numel() for p in getattr(loaded, name).parameters())
                   for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")},
        "seconds": {"render": rendered - started, "vae": vae_done - rendered, "transformer": flow_done - vae_done},
        "vae_reconstruction_held_out": reconstruction,
        **evaluations,
        "log": log,
    }
    (out / "pretrain_log.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m models.shapes.pretrain", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=pathlib.Path)
    parser.add_argument("--steps", type=int, default=3300, help="transformer + text-encoder steps (batch 64)")
    parser.add_argument("--vae-steps", type=int, default=800, help="VAE steps (batch 16)")
    parser.add_argument("--pool-size", type=int, default=20_000, help="rendered training scenes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-seeds", type=int, default=4, help="samples per prompt in the final evaluation (0: none)")
    parser.add_argument("--init", type=pathlib.Path, default=None, help="continue training a pipeline this script wrote (keeps its VAE)")
    parser.add_argument("--lr", type=float, default=8e-4, help="peak learning rate of the transformer and text encoders (cosine decay)")
    args = parser.parse_args(argv)
    result = pretrain(args.out_dir, steps=args.steps, vae_steps=args.vae_steps, pool_size=args.pool_size,
                      seed=args.seed, eval_seeds=args.eval_seeds, init=args.init, lr=args.lr)
    summary = {k: v for k, v in result.items() if k not in ("log", "earlier")}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
