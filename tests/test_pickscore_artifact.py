"""PickScore and the fake-image detectors on tiny random-weight models loaded from local paths.

Every expected value comes from the raw transformers model (CLIPModel's logits_per_image, a
classifier's logits, CLIP image features), never from the worker under test.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoImageProcessor, AutoModelForImageClassification, AutoProcessor, CLIPModel

from models.fixtures.reward_models import build_tiny_clip, build_tiny_clip_probe, build_tiny_image_classifier
from rewards.artifact import ArtifactDetector, ClipProbeDetector
from rewards.base import RewardBatch
from rewards.pickscore import PickScore

PROMPTS = ["a red cat", "a dog on a mat", "two birds", "city at night", "a bowl of fruit", "snowy hill", "blue car"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-rewards")
    clip = build_tiny_clip(root / "clip")
    return {
        "clip": clip,
        "classifier": build_tiny_image_classifier(root / "classifier"),
        "probe": build_tiny_clip_probe(root / "probe.safetensors", clip_dir=clip),
    }


def make_images(count: int, seed: int = 0, height: int = 40, width: int = 48) -> np.ndarray:
    """[count, H, W, 3] uint8: a random mix of a colour gradient and noise per image, so images
    (and therefore scores) differ; not square, so the processors' resize and crop run."""
    rng = np.random.default_rng(seed)
    colours = rng.uniform(0, 255, (count, 1, 1, 3))
    ramp = np.linspace(0.0, 1.0, width)[None, None, :, None] * colours
    noise = rng.uniform(0, 255, (count, height, width, 3))
    mix = rng.uniform(0, 1, (count, 1, 1, 1))
    return (mix * ramp + (1 - mix) * noise).clip(0, 255).astype(np.uint8)


def batch_of(images: np.ndarray, prompts: list[str]) -> RewardBatch:
    return RewardBatch(images=images, prompts=list(prompts))


def clip_logits(clip_dir, images: np.ndarray, prompts: list[str]) -> np.ndarray:
    """Independent PickScore matrix: CLIPModel's own logits_per_image [B_images, B_prompts],
    i.e. exp(logit_scale) * cosine of the normalised embeddings."""
    model = CLIPModel.from_pretrained(clip_dir).eval()
    processor = AutoProcessor.from_pretrained(clip_dir)
    inputs = processor(text=prompts, images=list(images), padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        return model(**inputs).logits_per_image.double().numpy()


def clip_features(clip_dir, images: np.ndarray) -> torch.Tensor:
    """Projected CLIP image embeddings straight from CLIPModel, unnormalised: [B, D]."""
    model = CLIPModel.from_pretrained(clip_dir).eval()
    pixel_values = AutoProcessor.from_pretrained(clip_dir)(images=list(images), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        vision = model.vision_model(pixel_values=pixel_values)
        return model.visual_projection(vision.pooler_output).double()


# --------------------------------------------------------------------------- tiny builders


def test_builders_are_deterministic_and_leave_the_global_rng_alone(tmp_path):
    """Equal seeds give identical weights, and building does not advance the caller's RNG."""
    state = torch.random.get_rng_state()
    first = build_tiny_clip(tmp_path / "a", seed=3)
    second = build_tiny_clip(tmp_path / "b", seed=3)
    other = build_tiny_clip(tmp_path / "c", seed=4)
    assert torch.equal(torch.random.get_rng_state(), state)
    weights = [load_file(str(path / "model.safetensors")) for path in (first, second, other)]
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])
    assert not torch.equal(weights[0]["visual_projection.weight"], weights[2]["visual_projection.weight"])


# --------------------------------------------------------------------------- PickScore


def test_pickscore_equals_clip_logits_diagonal(tiny):
    """Score i = exp(logit_scale) * cos(text_i, image_i): the diagonal of CLIP's logits_per_image."""
    images, prompts = make_images(5), PROMPTS[:5]
    out = PickScore(tiny["clip"], tiny["clip"])(batch_of(images, prompts))
    scores = out.scores["pickscore"]
    assert scores.shape == (5,) and scores.dtype == np.float64
    expected = np.diag(clip_logits(tiny["clip"], images, prompts))
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-5)
    assert np.ptp(scores) > 1e-3, "scores should differ between pairs, or the comparisons above prove little"
    assert out.extras["unscaled_mean"] == pytest.approx(expected.mean(), rel=1e-5)


def test_pickscore_scale_multiplies_the_score(tiny):
    """Flow-GRPO trains on PickScore / 26; the logged unscaled mean stays on the paper's scale."""
    images, prompts = make_images(3, seed=1), PROMPTS[:3]
    out = PickScore(tiny["clip"], tiny["clip"], scale=1 / 26)(batch_of(images, prompts))
    expected = np.diag(clip_logits(tiny["clip"], images, prompts))
    np.testing.assert_allclose(out.scores["pickscore"], expected / 26, rtol=1e-5, atol=1e-6)
    assert out.extras["unscaled_mean"] == pytest.approx(expected.mean(), rel=1e-5)


def test_pickscore_batch_size_splitting_does_not_change_scores(tiny):
    """Chunks of 3 (with a ragged last chunk and per-chunk padding) score like one batch of 7."""
    batch = batch_of(make_images(7, seed=2), PROMPTS)
    whole = PickScore(tiny["clip"], tiny["clip"], batch_size=16)(batch).scores["pickscore"]
    chunked = PickScore(tiny["clip"], tiny["clip"], batch_size=3)(batch).scores["pickscore"]
    assert chunked.shape == (7,)
    np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-5)


def test_pickscore_scores_each_image_with_its_own_prompt(tiny):
    """Shuffling the prompts gives image i the score of (image i, shuffled prompt i): entry
    [i, perm[i]] of CLIP's image x prompt logits, so no pair is mixed up."""
    images = make_images(6, seed=3)
    prompts = PROMPTS[:6]
    permutation = [3, 0, 5, 1, 2, 4]
    worker = PickScore(tiny["clip"], tiny["clip"], batch_size=4)
    scores = worker(batch_of(images, [prompts[j] for j in permutation])).scores["pickscore"]
    matrix = clip_logits(tiny["clip"], images, prompts)
    np.testing.assert_allclose(scores, matrix[np.arange(6), permutation], rtol=1e-5, atol=1e-5)
    assert not np.allclose(scores, np.diag(matrix), atol=1e-3)


def test_pickscore_truncates_long_prompts_to_the_tokenizer_limit(tiny):
    """A prompt longer than the text tower's 32 positions is scored on its first tokens, not an
    error; text past the limit does not matter, text within it does."""
    images = make_images(3, seed=4)
    head = "a small house near the sea with many windows"  # 38 byte tokens with bos and eos
    prompts = [head + " red roofs" * 20, head + " green trees" * 20, "a sheep"]
    scores = PickScore(tiny["clip"], tiny["clip"])(batch_of(images[[0, 0, 0]], prompts)).scores["pickscore"]
    assert np.isfinite(scores).all()
    assert scores[0] == pytest.approx(scores[1], abs=1e-5)
    assert abs(scores[0] - scores[2]) > 1e-3


def test_pickscore_loads_model_and_processor_from_separate_local_paths(tiny, tmp_path):
    """Like PickScore_v1 (weights) + the LAION processor: two directories, both from_pretrained."""
    weights_dir, processor_dir = tmp_path / "weights", tmp_path / "processor"
    weights_dir.mkdir()
    for file_name in ("config.json", "model.safetensors"):
        shutil.copy(tiny["clip"] / file_name, weights_dir / file_name)
    AutoProcessor.from_pretrained(tiny["clip"]).save_pretrained(processor_dir)
    images, prompts = make_images(2, seed=5), PROMPTS[:2]
    scores = PickScore(str(weights_dir), str(processor_dir))(batch_of(images, prompts)).scores["pickscore"]
    np.testing.assert_allclose(scores, np.diag(clip_logits(tiny["clip"], images, prompts)), rtol=1e-5, atol=1e-5)


def test_pickscore_bf16_scores_are_float_and_near_fp32(tiny):
    batch = batch_of(make_images(4, seed=6), PROMPTS[:4])
    reference = PickScore(tiny["clip"], tiny["clip"])(batch).scores["pickscore"]
    worker = PickScore(tiny["clip"], tiny["clip"], dtype="bf16")
    assert worker.model.dtype == torch.bfloat16
    scores = worker(batch).scores["pickscore"]
    assert scores.dtype == np.float64 and scores.shape == (4,) and np.isfinite(scores).all()
    # bf16 keeps ~3 significant digits; exp(logit_scale) is about 14 for the tiny CLIP.
    np.testing.assert_allclose(scores, reference, atol=0.3)


def test_pickscore_rejects_a_bad_dtype_and_mismatched_lengths(tiny):
    with pytest.raises(ValueError, match="fp64.*fp32, bf16, fp16"):
        PickScore(tiny["clip"], tiny["clip"], dtype="fp64")
    with pytest.raises(ValueError, match="3 images and 2 prompts"):
        PickScore(tiny["clip"], tiny["clip"])(batch_of(make_images(3), PROMPTS[:2]))


# --------------------------------------------------------------------------- ArtifactDetector


def classifier_probabilities(model_dir, images: np.ndarray) -> np.ndarray:
    """Independent softmax over the raw classifier's logits: [B, num_labels]."""
    model = AutoModelForImageClassification.from_pretrained(model_dir).eval()
    pixel_values = AutoImageProcessor.from_pretrained(model_dir)(images=list(images), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        return torch.softmax(model(pixel_values=pixel_values).logits.double(), dim=-1).numpy()


def test_artifact_reward_is_one_minus_p_fake_label(tiny):
    """Reward = 1 - softmax(logits)[label2id[fake_label]]; batch splitting changes nothing."""
    images = make_images(5, seed=7)
    probabilities = classifier_probabilities(tiny["classifier"], images)
    out = ArtifactDetector(tiny["classifier"], batch_size=2)(batch_of(images, PROMPTS[:5]))
    scores = out.scores["artifact"]
    assert scores.shape == (5,) and scores.dtype == np.float64
    np.testing.assert_allclose(scores, 1 - probabilities[:, 0], rtol=1e-5, atol=1e-6)
    assert out.extras["p_fake_mean"] == pytest.approx(probabilities[:, 0].mean(), rel=1e-5)
    # The label is found by name: "human" is index 1, the complementary reward.
    human = ArtifactDetector(tiny["classifier"], fake_label="human")(batch_of(images, PROMPTS[:5])).scores["artifact"]
    np.testing.assert_allclose(human, 1 - probabilities[:, 1], rtol=1e-5, atol=1e-6)
    assert np.abs(scores - human).max() > 1e-3


def test_artifact_unknown_fake_label_lists_the_model_labels(tiny):
    with pytest.raises(ValueError, match="'fake'.*'artificial', 'human'"):
        ArtifactDetector(tiny["classifier"], fake_label="fake")


def test_artifact_bf16_scores_are_probabilities(tiny):
    images = make_images(3, seed=8)
    worker = ArtifactDetector(tiny["classifier"], dtype="bf16")
    assert worker.model.dtype == torch.bfloat16
    scores = worker(batch_of(images, PROMPTS[:3])).scores["artifact"]
    assert scores.dtype == np.float64 and np.isfinite(scores).all()
    np.testing.assert_allclose(scores, 1 - classifier_probabilities(tiny["classifier"], images)[:, 0], atol=0.05)


# --------------------------------------------------------------------------- ClipProbeDetector


def test_clip_probe_reward_is_one_minus_sigmoid_of_the_linear_head(tiny):
    """p(fake) = sigmoid(w . f / |f| + b) on CLIP's projected image features."""
    images = make_images(5, seed=9)
    head = load_file(str(tiny["probe"]))
    weight, bias = head["weight"].double(), head["bias"].double()
    features = clip_features(tiny["clip"], images)
    unit = features / features.norm(dim=-1, keepdim=True)
    expected = 1 - torch.sigmoid(unit @ weight.T + bias)[:, 0].numpy()
    out = ClipProbeDetector(tiny["clip"], head=tiny["probe"], batch_size=2)(batch_of(images, PROMPTS[:5]))
    scores = out.scores["clip_probe"]
    assert scores.shape == (5,) and scores.dtype == np.float64
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6)
    assert np.ptp(scores) > 1e-4
    assert out.extras["p_fake_mean"] == pytest.approx(1 - expected.mean(), rel=1e-5)
    # UniversalFakeDetect's released head expects raw (unnormalised) features.
    raw = ClipProbeDetector(tiny["clip"], head=tiny["probe"], normalize_features=False)(batch_of(images, PROMPTS[:5]))
    expected_raw = 1 - torch.sigmoid(features @ weight.T + bias)[:, 0].numpy()
    np.testing.assert_allclose(raw.scores["clip_probe"], expected_raw, rtol=1e-5, atol=1e-6)


def test_clip_probe_head_of_the_wrong_size_names_both_sizes(tiny, tmp_path):
    wrong = tmp_path / "wrong.safetensors"
    save_file({"weight": torch.zeros(1, 10), "bias": torch.zeros(1)}, str(wrong))
    with pytest.raises(ValueError, match=r"weight \(1, 10\).*size 16"):
        ClipProbeDetector(tiny["clip"], head=wrong)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        ClipProbeDetector(tiny["clip"], head=tmp_path / "missing.safetensors")


def test_clip_probe_bf16_scores_are_probabilities(tiny):
    images = make_images(3, seed=10)
    batch = batch_of(images, PROMPTS[:3])
    reference = ClipProbeDetector(tiny["clip"], head=tiny["probe"])(batch).scores["clip_probe"]
    worker = ClipProbeDetector(tiny["clip"], head=tiny["probe"], dtype="bf16")
    assert worker.model.dtype == torch.bfloat16
    scores = worker(batch).scores["clip_probe"]
    assert scores.dtype == np.float64 and np.isfinite(scores).all()
    np.testing.assert_allclose(scores, reference, atol=0.05)
