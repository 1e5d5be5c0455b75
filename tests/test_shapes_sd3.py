"""The demo's pretrained shapes SD3: its text path, its pretraining script, the committed weights,
and the demo config end to end (shortened)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline

from models.shapes import scenes as shapes
from models.shapes.pretrain import (
    SPLIT_SEED,
    TEXT_MAX_LENGTH,
    build_clip_tokenizer,
    build_t5_tokenizer,
    caption_words,
    pretrain,
)
from conftest import ROOT, run_cli

COMMITTED = ROOT / "models" / "pretrained" / "shapes-sd3"


def _word_tokens(tokenizer, caption: str) -> list[int]:
    ids = tokenizer(caption, padding="max_length", max_length=TEXT_MAX_LENGTH, truncation=False).input_ids
    assert len(ids) == TEXT_MAX_LENGTH, f"{caption!r} does not fit in {TEXT_MAX_LENGTH} tokens"
    return [i for i in ids if i not in tokenizer.all_special_ids]


@pytest.mark.parametrize("load", [False, True], ids=["built", "committed"])
def test_every_caption_word_is_one_token(load):
    """Word-level text: each caption word is a single known token in all three tokenizers, every
    caption fits the pretraining length, also for the tokenizers saved with the weights."""
    if load:
        pipe = StableDiffusion3Pipeline.from_pretrained(COMMITTED)
        tokenizers = [pipe.tokenizer, pipe.tokenizer_2, pipe.tokenizer_3]
    else:
        words = caption_words()
        tokenizers = [build_clip_tokenizer(words), build_t5_tokenizer(words)]
    for tokenizer in tokenizers:
        for caption in shapes.all_captions():
            assert len(_word_tokens(tokenizer, caption)) == len(caption.split()), (type(tokenizer).__name__, caption)
        # Distinct words get distinct tokens.
        singles = {word: tuple(_word_tokens(tokenizer, word)) for word in caption_words()}
        assert len(set(singles.values())) == len(singles)


def test_prompt_files_are_the_split():
    """The demo's prompt files are exactly the pretraining split: held-out content never trained on."""
    train, held_out = shapes.split_prompts(SPLIT_SEED)
    folder = ROOT / "configs" / "prompts"
    assert (folder / "shapes_train.txt").read_text().splitlines() == train
    assert (folder / "shapes_held_out.txt").read_text().splitlines() == held_out
    assert not set(train) & set(held_out)
    # The demo's lists: every kind equally often, drawn from the right side of the split only.
    for name, source, per_kind in (("shapes_train_balanced.txt", train, 64), ("shapes_eval.txt", held_out, 16)):
        lines = (folder / name).read_text().splitlines()
        assert lines == shapes.balanced_prompts(source, per_kind)
        assert set(lines) <= set(source)
        kinds = [shapes.caption_to_spec(line).kind for line in lines]
        assert all(kinds.count(kind) == per_kind for kind in shapes.KINDS)


def test_pretraining_script_writes_a_loadable_pipeline(tmp_path):
    """A few steps of the real pretraining code: the pipeline it writes loads with from_pretrained,
    samples images, and the log records the losses and the VAE check."""
    result = pretrain(tmp_path / "model", steps=4, vae_steps=4, pool_size=64, eval_seeds=0)
    log = json.loads((tmp_path / "model" / "pretrain_log.json").read_text())
    assert log["steps"] == 4 and [r["step"] for r in log["log"] if r["stage"] == "transformer"] == [0, 3]
    assert all(math.isfinite(r.get("loss_ema", r.get("mse"))) for r in log["log"])
    assert log["vae_reconstruction_held_out"]["renders"] == 1.0
    assert result["params"]["transformer"] > 1e6
    pipe = StableDiffusion3Pipeline.from_pretrained(tmp_path / "model", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    vae = pipe.vae.config
    assert vae.latent_channels == 4 and pipe.vae_scale_factor == 4
    assert vae.scaling_factor != 1.5305 and vae.shift_factor is not None  # measured on the data
    image = pipe("a red circle", num_inference_steps=2, height=64, width=64,
                 max_sequence_length=TEXT_MAX_LENGTH, output_type="np").images
    assert image.shape == (1, 64, 64, 3)


def test_pretraining_continues_from_a_saved_pipeline(tmp_path):
    """--init continues a saved pipeline: its VAE is kept as it was, the transformer trains
    further, and the log keeps the earlier run's record."""
    from safetensors.torch import load_file

    pretrain(tmp_path / "first", steps=3, vae_steps=3, pool_size=64, eval_seeds=0)
    result = pretrain(tmp_path / "second", steps=2, pool_size=999, eval_seeds=0, init=tmp_path / "first", lr=1e-3)
    assert result["init"] == str(tmp_path / "first") and result["earlier"]["steps"] == 3 and result["lr"] == 1e-3
    assert result["pool_size"] == 64  # the first run's scenes
    assert result["vae_steps"] == 0 and not any(r["stage"] == "vae" for r in result["log"])
    first, second = (load_file(tmp_path / name / "vae" / "diffusion_pytorch_model.safetensors") for name in ("first", "second"))
    assert all(torch.equal(first[k], second[k]) for k in first)
    first, second = (load_file(tmp_path / name / "transformer" / "diffusion_pytorch_model.safetensors") for name in ("first", "second"))
    assert any(not torch.equal(first[k], second[k]) for k in first)
    with pytest.raises(FileNotFoundError, match="pretrain_log.json"):
        pretrain(tmp_path / "third", steps=1, pool_size=64, eval_seeds=0, init=tmp_path / "missing")


def test_committed_model_draws_the_shapes_domain():
    """The committed weights are a trained model, not noise: through the same SD3 adapter and
    rollout code as the demo, single objects and counts of seen captions are mostly right."""
    from models.sd3 import SD3Policy
    from rewards.base import RewardBatch
    from rewards.shapes_geneval import ShapesGenEval
    from models.config import ModelConfig
    from rl.rollout import SDESettings, rollout

    prompts = ["a red circle", "a blue square", "a green triangle", "a yellow circle",
               "two red squares", "a blue triangle", "a yellow square", "a green circle"]
    policy = SD3Policy(ModelConfig(pretrained=str(COMMITTED), dtype="fp32", max_sequence_length=TEXT_MAX_LENGTH), needs_reference=False)
    cond = policy.encode(prompts)
    ids = torch.arange(len(prompts))
    with torch.no_grad():
        batch = rollout(policy, cond, ids, ids, ids, seed=0, epoch=0, num_steps=10, guidance_scale=4.5,
                        size=64, batch_size=8, sde=SDESettings("flow_sde", 0.7), sde_steps=[])
    strict = ShapesGenEval()(RewardBatch(images=batch.images.numpy(), prompts=prompts)).scores["strict"]
    assert np.mean(strict) >= 0.5, strict


def test_demo_config_end_to_end_shortened(tmp_path):
    """configs/demo.yaml (the Base-and-Bonus run of the demo sweep) as shipped, shortened: held-out
    scores are logged before training and at the end and printed as changes, and before_after.png
    (also in the offline W&B run) frames each image pass or fail as the checker, run again on the
    picture's own pixels, judges it."""
    from PIL import Image

    from rewards.base import RewardBatch
    from rewards.shapes_geneval import ShapesGenEval
    from rl.pictures import FAIL, PASS, Row, labelled_grid

    run_dir = tmp_path / "demo"
    result = run_cli([
        "configs/demo.yaml", f"run_dir={run_dir}", "num_epochs=2", "sample.num_groups=2", "sample.group_size=4",
        "sample.batch_size=8", "train.batch_size=4", "eval.num_prompts=6", "eval.samples_per_prompt=2", "eval.batch_size=8",
    ])
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = {row["epoch"]: row for row in rows if "eval/shapes_geneval/strict" in row}
    assert sorted(evals) == [0, 2]
    for row in evals.values():
        assert 0.0 <= row["eval/shapes_geneval/strict"] <= row["eval/shapes_geneval/partial"] <= 1.0
    assert rows[1]["reward/jpeg_compressibility/is_monitor"] == 0.0 and rows[1]["reward/shapes_geneval/partial/is_monitor"] == 1.0
    before, after = evals[0]["eval/shapes_geneval/strict"], evals[2]["eval/shapes_geneval/strict"]
    assert f"eval/shapes_geneval/strict: {before:.4f} -> {after:.4f}" in result.stdout

    picture = np.asarray(Image.open(run_dir / "before_after.png").convert("RGB"))
    captions = json.loads((run_dir / "images" / "eval_shown.json").read_text())["captions"]
    eval_lines = [line for line in (ROOT / "configs" / "prompts" / "shapes_eval.txt").read_text().splitlines() if line.strip()]
    assert captions == list(dict.fromkeys(eval_lines[:6]))  # 6 prompts: each distinct one is shown, once
    # Where each image sits depends only on the captions and the image size: lay out blanks to find them.
    blank = np.zeros((len(captions), 64, 64, 3), np.uint8)
    marks = np.zeros(len(captions))
    _, boxes = labelled_grid([Row("a", blank, marks), Row("b", blank, marks)], captions, title="t", pass_name="p")
    checker = ShapesGenEval()
    for row_boxes in boxes:
        shown = np.stack([picture[top:bottom:2, left:right:2] for left, top, right, bottom in row_boxes])
        strict = checker(RewardBatch(images=shown, prompts=captions)).scores["strict"]
        frames = [tuple(picture[top - 1, left - 1]) for left, top, _, _ in row_boxes]
        assert frames == [PASS if s == 1 else FAIL for s in strict], (frames, strict)
    assert list(Path(run_dir / "wandb").rglob("before_after*.png")), "grid not logged to W&B"
