"""CLIPScore and the LAION aesthetic predictor on a tiny random-weight CLIP loaded from a local
path. Every expected value comes from CLIPModel's own forward (its normalised text_embeds and
image_embeds) and plain matrix products, never from the worker under test."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoProcessor, CLIPModel

from models.fixtures.reward_models import build_tiny_clip
from rewards import build_worker
from rewards.base import RewardBatch
from rewards.clip_scores import CLIPScore, LaionAesthetic

PROMPTS = ["a red cat", "a dog on a mat", "two birds", "city at night", "a bowl of fruit", "snowy hill", "blue car"]

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("clip") / "clip", projection_dim=24)


def images(count: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, 48)[None, None, :, None] * rng.uniform(0, 255, (count, 1, 1, 3))
    return (0.5 * ramp + 0.5 * rng.uniform(0, 255, (count, 40, 48, 3))).astype(np.uint8)


def embeddings(clip_dir, pictures: np.ndarray, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """CLIPModel's own normalised (text_embeds, image_embeds), float64."""
    model = CLIPModel.from_pretrained(clip_dir).eval()
    processor = AutoProcessor.from_pretrained(clip_dir)
    inputs = processor(text=prompts, images=list(pictures), padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs)
    return out.text_embeds.double().numpy(), out.image_embeds.double().numpy()


def test_clipscore_is_w_times_the_clamped_cosine_of_clips_own_embeddings(clip):
    pictures = images(7)
    text, image = embeddings(clip, pictures, PROMPTS)
    cosines = (text * image).sum(axis=1)
    out = CLIPScore(clip, weight=2.5, scale=0.5)(RewardBatch(images=pictures, prompts=PROMPTS))
    np.testing.assert_allclose(out.scores["clipscore"], 0.5 * 2.5 * np.maximum(cosines, 0), rtol=1e-4, atol=1e-6)
    # The clamp matters here: random weights give negative cosines too.
    assert (cosines < 0).any() and (cosines > 0).any()
    assert out.extras["cosine_mean"] == pytest.approx(cosines.mean(), rel=1e-4, abs=1e-6)


def test_clipscore_pairs_each_image_with_its_own_prompt_at_any_batch_size(clip):
    pictures = images(7, seed=1)
    whole = CLIPScore(clip, batch_size=16).cosines(pictures, PROMPTS)
    one_by_one = CLIPScore(clip, batch_size=1).cosines(pictures, PROMPTS)
    np.testing.assert_allclose(one_by_one, whole, rtol=1e-5, atol=1e-6)
    text, image = embeddings(clip, pictures, PROMPTS)
    swapped = CLIPScore(clip).cosines(pictures, PROMPTS[::-1])
    np.testing.assert_allclose(swapped, (text[::-1] * image).sum(axis=1), rtol=1e-4, atol=1e-6)


def test_clipscore_without_a_prompt_is_missing_not_zero(clip):
    pictures = images(4, seed=2)
    prompts = ["a red cat", "", None, "two birds"]
    out = build_worker("clipscore", {"model": str(clip)})(RewardBatch(images=pictures, prompts=prompts))
    scores = out.scores["clipscore"]
    assert np.isnan(scores[[1, 2]]).all() and np.isfinite(scores[[0, 3]]).all()
    text, image = embeddings(clip, pictures[[0, 3]], ["a red cat", "two birds"])
    np.testing.assert_allclose(scores[[0, 3]], 2.5 * np.maximum((text * image).sum(axis=1), 0), rtol=1e-4, atol=1e-6)


def save_head(path, width: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random head in improved-aesthetic-predictor's layout (Linear layers at 0, 2, 4, 6, 7 of
    an nn.Sequential named `layers`), saved as the released .pth is: a plain state dict."""
    generator = torch.Generator().manual_seed(seed)
    widths = [width, 1024, 128, 64, 16, 1]
    state = {}
    for index, (a, b) in zip((0, 2, 4, 6, 7), zip(widths, widths[1:])):
        state[f"layers.{index}.weight"] = torch.randn(b, a, generator=generator) / a**0.5
        state[f"layers.{index}.bias"] = torch.randn(b, generator=generator) * 0.1
    torch.save(state, path)
    return state


def test_aesthetic_rating_is_the_released_mlp_on_the_normalised_image_embedding(clip, tmp_path):
    state = save_head(tmp_path / "head.pth", width=24)
    pictures = images(5, seed=3)
    _, image = embeddings(clip, pictures, ["x"] * 5)
    expected = image
    for index in (0, 2, 4, 6, 7):  # no activations between the layers, as released
        expected = expected @ state[f"layers.{index}.weight"].double().numpy().T + state[f"layers.{index}.bias"].double().numpy()
    worker = build_worker("aesthetic", {"clip": str(clip), "head": str(tmp_path / "head.pth"), "scale": 0.1, "batch_size": 2})
    out = worker(RewardBatch(images=pictures, prompts=[""] * 5))
    np.testing.assert_allclose(out.scores["aesthetic"], 0.1 * expected[:, 0], rtol=1e-4, atol=1e-6)
    whole = LaionAesthetic(clip, head=tmp_path / "head.pth", batch_size=16).ratings(pictures)
    np.testing.assert_allclose(whole, expected[:, 0], rtol=1e-4, atol=1e-6)


def test_aesthetic_head_is_checked_before_clip_loads(clip, tmp_path):
    save_head(tmp_path / "wide.pth", width=768)
    with pytest.raises(ValueError, match="768-wide embeddings but the model's are 24-wide"):
        LaionAesthetic(clip, head=tmp_path / "wide.pth")
    with pytest.raises(FileNotFoundError, match="improved-aesthetic-predictor"):
        LaionAesthetic(clip, head=tmp_path / "absent.pth")
    torch.save({"weight": torch.zeros(1, 24)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="layers.0.weight"):
        LaionAesthetic(clip, head=tmp_path / "other.pth")


def test_aesthetic_head_loads_without_running_pickled_code(clip, tmp_path):
    """A .pth that carries an object (what a malicious checkpoint would) is refused by
    weights_only=True instead of being unpickled."""

    class Payload:
        def __reduce__(self):
            return (print, ("pickled code ran",))

    torch.save({"layers.0.weight": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(Exception, match="[Ww]eights only load failed|weights_only"):
        LaionAesthetic(clip, head=tmp_path / "evil.pth")


def test_ict_is_the_plain_cosine_and_missing_without_a_prompt(clip):
    pictures = images(5, seed=8)
    prompts = ["a red cat", "two birds", "", "city at night", "snowy hill"]
    out = build_worker("ict", {"model": str(clip), "scale": 2.0})(RewardBatch(images=pictures, prompts=prompts))
    present = [0, 1, 3, 4]
    text, image = embeddings(clip, pictures[present], [prompts[i] for i in present])
    cosines = (text * image).sum(axis=1)
    assert (cosines < 0).any()  # unclamped, unlike CLIPScore
    np.testing.assert_allclose(out.scores["ict"][present], 2.0 * cosines, rtol=1e-4, atol=1e-6)
    assert np.isnan(out.scores["ict"][2])


def fine_tuned(clip_dir, path, seed: int) -> dict[str, torch.Tensor]:
    """A "fine-tune" of the tiny CLIP saved as a release's pytorch_model.bin: every weight moved."""
    generator = torch.Generator().manual_seed(seed)
    state = {key: value + 0.05 * torch.randn(value.shape, generator=generator) if value.is_floating_point() else value
             for key, value in CLIPModel.from_pretrained(clip_dir).state_dict().items()}
    torch.save(state, path)
    return state


def raw_image_embeddings(clip_dir, state: dict[str, torch.Tensor], pictures: np.ndarray) -> np.ndarray:
    """The projected image embedding as get_image_features returns it, not normalised: [B, D]."""
    model = CLIPModel.from_pretrained(clip_dir).eval()
    model.load_state_dict(state)
    pixels = AutoProcessor.from_pretrained(clip_dir)(images=list(pictures), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        pooled = model.vision_model(pixel_values=pixels).pooler_output
        return model.visual_projection(pooled).double().numpy()


def test_ict_loads_the_released_state_dict_over_its_base(clip, tmp_path):
    state = fine_tuned(clip, tmp_path / "pytorch_model.bin", seed=4)
    pictures = images(3, seed=10)
    prompts = ["a red cat", "two birds", "city at night"]
    out = build_worker("ict", {"model": str(clip), "weights": str(tmp_path / "pytorch_model.bin")})(RewardBatch(images=pictures, prompts=prompts))
    model = CLIPModel.from_pretrained(clip).eval()
    model.load_state_dict(state)
    inputs = AutoProcessor.from_pretrained(clip)(text=prompts, images=list(pictures), padding=True, return_tensors="pt")
    with torch.no_grad():
        both = model(**inputs)
    cosines = (both.text_embeds * both.image_embeds).sum(-1).double().numpy()
    np.testing.assert_allclose(out.scores["ict"], cosines, rtol=1e-4, atol=1e-6)
    base = build_worker("ict", {"model": str(clip)}).cosines(pictures, prompts)
    assert np.abs(base - cosines).max() > 1e-3  # the fine-tune is what scores
    torch.save({"text_projection.weight": state["text_projection.weight"]}, tmp_path / "partial.bin")
    with pytest.raises(ValueError, match="do not fit the CLIPModel"):
        build_worker("ict", {"model": str(clip), "weights": str(tmp_path / "partial.bin")})


def test_hp_is_the_sigmoid_of_the_mlp_on_the_raw_image_embedding_of_its_backbone(clip, tmp_path):
    """The release's HP: a backbone state dict over the base CLIP and the scorer MLP on its
    projected image embedding as it comes (not normalised), keys as saved inside the model."""
    generator = torch.Generator().manual_seed(3)
    widths = [24, 24, 128, 64, 16, 1]
    head = {}
    for index, (a, b) in zip((0, 2, 4, 6, 7), zip(widths, widths[1:])):
        head[f"mlp.layers.{index}.weight"] = torch.randn(b, a, generator=generator) / a**0.5
        head[f"mlp.layers.{index}.bias"] = torch.randn(b, generator=generator) * 0.1
    torch.save(head, tmp_path / "mlp_pytorch_model.bin")
    backbone = fine_tuned(clip, tmp_path / "pytorch_model.bin", seed=5)
    pictures = images(5, seed=9)
    logits = raw_image_embeddings(clip, backbone, pictures)
    assert np.abs(np.linalg.norm(logits, axis=1) - 1).max() > 0.1  # not unit vectors: normalising would change the score
    for index in (0, 2, 4, 6, 7):
        logits = logits @ head[f"mlp.layers.{index}.weight"].double().numpy().T + head[f"mlp.layers.{index}.bias"].double().numpy()
    params = {"clip": str(clip), "backbone": str(tmp_path / "pytorch_model.bin"), "head": str(tmp_path / "mlp_pytorch_model.bin"), "batch_size": 2}
    out = build_worker("hp", params)(RewardBatch(images=pictures, prompts=[""] * 5))
    np.testing.assert_allclose(out.scores["hp"], 1 / (1 + np.exp(-logits[:, 0])), rtol=1e-4, atol=1e-6)
