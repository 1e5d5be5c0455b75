"""The shapes domain and its verifiable reward, checked against the generator's own scene objects
(ground truth that does not come from the checker under test)."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest

from models.shapes.scenes import (
    COLOURS,
    NUMBER_WORDS,
    all_captions,
    caption_to_spec,
    make_prompts,
    render,
    sample_scene,
    split_prompts,
)
from rewards.base import RewardBatch
from models.shapes.checker import detect
from rewards.shapes_geneval import ShapesGenEval

NUM_SCENES = 300


@pytest.fixture(scope="module")
def scenes():
    rng = np.random.default_rng(1234)
    return [sample_scene(rng) for _ in range(NUM_SCENES)]


@pytest.fixture(scope="module")
def images(scenes):
    return np.stack([render(scene) for scene in scenes])


def score(images: np.ndarray, prompts: list[str]):
    return ShapesGenEval()(RewardBatch(images=images, prompts=prompts))


def box_blur(images: np.ndarray) -> np.ndarray:
    padded = np.pad(images.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    height, width = images.shape[1:3]
    total = sum(padded[:, i : i + height, j : j + width] for i in range(3) for j in range(3))
    return np.round(total / 9).astype(np.uint8)


def test_generator_covers_all_kinds_and_object_counts(scenes):
    kinds = Counter(scene.kind for scene in scenes)
    assert set(kinds) == {"single", "counting", "binding", "relation"}
    assert min(kinds.values()) >= NUM_SCENES // 8
    assert {len(scene.objects) for scene in scenes} == {1, 2, 3, 4}
    for scene in scenes:
        for obj in scene.objects:
            assert 10 <= obj.size <= 18
            assert obj.size / 2 <= obj.cx <= 64 - obj.size / 2 and obj.size / 2 <= obj.cy <= 64 - obj.size / 2


def test_detections_match_the_scene_objects(scenes, images):
    # Checked against the generator's objects, not through the reward: colours, shapes and where.
    for scene, image in list(zip(scenes, images))[:100]:
        detections = detect(image)
        assert Counter((d.colour, d.shape) for d in detections) == Counter((o.colour, o.shape) for o in scene.objects), scene.caption
        for obj in scene.objects:
            nearest = min(np.hypot(d.x - obj.cx, d.y - obj.cy) for d in detections if (d.colour, d.shape) == (obj.colour, obj.shape))
            assert nearest < obj.size / 4  # a triangle's centroid sits size/6 below its box centre


def test_own_renders_score_correct(scenes, images):
    out = score(images, [scene.caption for scene in scenes])
    assert out.scores["strict"].mean() >= 0.98
    assert out.scores["partial"].mean() >= 0.99
    assert out.extras["unparsed_count"] == 0.0


def test_caption_of_another_scene_scores_low(scenes, images):
    rng = np.random.default_rng(7)
    content = [Counter((o.colour, o.shape) for o in scene.objects) for scene in scenes]
    images_used, prompts = [], []
    for i in range(NUM_SCENES):
        j = int(rng.integers(NUM_SCENES))
        if content[j] != content[i]:  # a different set of objects, by the generator's facts
            images_used.append(images[i])
            prompts.append(scenes[j].caption)
    assert len(prompts) > 200
    out = score(np.stack(images_used), prompts)
    assert out.scores["strict"].mean() <= 0.1
    assert out.scores["partial"].mean() < 0.5


def _wrong(images, scenes, edit):
    """Score each scene whose caption `edit` changes against the edited caption."""
    pairs = [(image, edit(scene)) for image, scene in zip(images, scenes)]
    pairs = [(image, caption) for image, caption in pairs if caption is not None]
    assert len(pairs) >= 20
    return score(np.stack([p[0] for p in pairs]), [p[1] for p in pairs])


def test_wrong_colour_scores_zero(scenes, images):
    def recolour(scene):
        present = {o.colour for o in scene.objects}
        absent = next(c for c in COLOURS if c not in present)
        first = scene.objects[0].colour
        return re.sub(rf"\b{first}\b", absent, scene.caption, count=1)

    out = _wrong(images, scenes, recolour)
    assert np.all(out.scores["strict"] == 0.0)
    assert np.all(out.scores["partial"] < 1.0)


def test_wrong_count_scores_zero(scenes, images):
    def recount(scene):
        if scene.kind != "counting":
            return None
        true_word = NUMBER_WORDS[len(scene.objects)]
        other = NUMBER_WORDS[2 if len(scene.objects) != 2 else 3]
        return scene.caption.replace(true_word, other, 1)

    out = _wrong(images, scenes, recount)
    assert np.all(out.scores["strict"] == 0.0)
    assert np.all(out.scores["partial"] < 1.0)


def test_swapped_relation_scores_zero(scenes, images):
    swaps = {"to the left of": "to the right of", "to the right of": "to the left of", "above": "below", "below": "above"}

    def swap(scene):
        if scene.kind != "relation":
            return None
        relation = next(r for r in swaps if f" {r} " in scene.caption)
        return scene.caption.replace(f" {relation} ", f" {swaps[relation]} ")

    out = _wrong(images, scenes, swap)
    assert np.all(out.scores["strict"] == 0.0)
    assert np.all(out.scores["partial"] < 1.0)
    assert np.all(out.scores["partial"] > 0.0)  # the objects themselves are right


def test_robust_to_noise_and_blur(scenes, images):
    prompts = [scene.caption for scene in scenes]
    noise = np.random.default_rng(3).normal(0.0, 8.0, images.shape)
    noisy = np.clip(images + noise, 0, 255).astype(np.uint8)
    assert score(noisy, prompts).scores["strict"].mean() >= 0.95
    assert score(box_blur(images), prompts).scores["strict"].mean() >= 0.95


def test_unparseable_prompt_is_missing_not_zero(images):
    prompts = ["a red circle", "a purple hexagon", "", "two red circle", "a cat on a mat"]
    out = score(images[: len(prompts)], prompts)
    assert not np.isnan(out.scores["strict"][0])
    assert np.all(np.isnan(out.scores["strict"][1:])) and np.all(np.isnan(out.scores["partial"][1:]))
    assert out.extras["unparsed_count"] == 4.0
    with pytest.raises(ValueError, match="purple hexagon"):
        caption_to_spec("a purple hexagon")


def test_caption_to_spec_round_trips_generated_captions(scenes):
    for scene in scenes:
        spec = caption_to_spec(scene.caption)
        assert spec.kind == scene.kind
        assert Counter(spec.counts) == Counter((o.colour, o.shape) for o in scene.objects)
        if scene.kind == "relation":
            (relation,) = spec.relations
            subject, reference = scene.objects  # the generator lists the subject first
            assert (relation.subject, relation.reference) == ((subject.colour, subject.shape), (reference.colour, reference.shape))
            dx, dy = subject.cx - reference.cx, subject.cy - reference.cy
            expected = {"to the left of": dx < 0, "to the right of": dx > 0, "above": dy < 0, "below": dy > 0}
            assert expected[relation.relation]
        else:
            assert spec.relations == []
    captions = all_captions()
    assert len(captions) == len(set(captions)) == 12 + 36 + 108 + 432
    for caption in captions:
        caption_to_spec(caption)


def test_determinism():
    first = [sample_scene(np.random.default_rng(5)) for _ in range(3)]
    second = [sample_scene(np.random.default_rng(5)) for _ in range(3)]
    assert first == second
    assert np.array_equal(render(first[0]), render(second[0]))
    assert make_prompts(50, seed=9) == make_prompts(50, seed=9)
    assert make_prompts(50, seed=9) != make_prompts(50, seed=10)
    image = render(first[0])
    batch = RewardBatch(images=np.stack([image, image]), prompts=[first[0].caption] * 2)
    assert np.array_equal(ShapesGenEval()(batch).scores["partial"], ShapesGenEval()(batch).scores["partial"])


def test_held_out_split_is_disjoint_in_content():
    train, held_out = split_prompts(seed=0)
    assert set(train).isdisjoint(held_out)
    assert set(train) | set(held_out) == set(all_captions())
    assert 0.05 < len(held_out) / len(all_captions()) < 0.3
    held = set(held_out)
    flips = {"to the left of": "to the right of", "to the right of": "to the left of", "above": "below", "below": "above"}
    for caption in all_captions():
        # The same content in other words must land on the same side.
        binding = re.fullmatch(r"(a \w+ \w+) and (a \w+ \w+)", caption)
        if binding:
            assert (caption in held) == (f"{binding[2]} and {binding[1]}" in held)
        for relation, flipped in flips.items():
            match = re.fullmatch(rf"(a \w+ \w+) {relation} (a \w+ \w+)", caption)
            if match:
                assert (caption in held) == (f"{match[2]} {flipped} {match[1]}" in held)
    assert split_prompts(seed=0) == (train, held_out)
    assert split_prompts(seed=1)[1] != held_out
