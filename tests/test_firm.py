"""FIRM judge workers: reply parsing, rubric templates, score distributions, and both backends on a
tiny random-weight Qwen3-VL saved and loaded the way a user loads FIRM-Gen-8B / FIRM-Edit-8B.

Expected values are computed here independently of the workers: one unpadded sequence at a time,
full-vocabulary logits, digit ids looked up in the vocabulary, the min of the quality sub-scores by
enumerating all 125 outcomes. The openai backend runs against a real HTTP server
(tests/firm_server.py) in a subprocess that runs the same tiny model.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT
from judge_support import JudgeServer, Reference, launch_judge_server, load_reference, wait_until_up
from models.fixtures.vlm_judge import build_tiny_qwen3_vl
from rewards import build_worker
from rewards.base import RewardBatch
from rewards.firm import FirmEdit, FirmGen, JudgeSettings
from rewards.images import fit_image
from rewards.judges.parse import distribution_from_logprobs, min_distribution, parse_score, parse_scores, score_moments

TEMPLATES = ROOT / "rewards" / "templates"
PROMPTS = ["a red cube on a table", "two dogs", "a lighthouse at night, oil painting"]
INSTRUCTIONS = ["make the sky blue", "add a hat", "remove the text from the sign"]
QUALITY_KEYS = ["aesthetics", "technical_quality", "structure_texture"]


# ---------------------------------------------------------------- parse_score / parse_scores


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ('```json\n{"reasoning": "The cube is red and on a table.", "score": 4}\n```', 4.0),
        ('The cat is missing, so the prompt is only partly met.\n{"reasoning": "no cat", "score": 2}', 2.0),
        ('{"reasoning": "fine", "score": "5"}', 5.0),
        ('{"execution": 3}', 3.0),
        ('{"consistency_score": 2, "reasoning": "the background changed"}', 2.0),
        ('{"result": {"rating": 4}}', 4.0),
        ("After weighing everything, the answer is \\boxed{4}.", 4.0),
        ("rating: 4", 4.0),
        ("**Rating:** 5", 5.0),
        ("Score: 4/5", 4.0),
        ("score = 3.5", 3.5),
        ("The score is 2 because the dog has five legs.", 2.0),
        ("I would give it 3 out of 5.", 3.0),
        ("4", 4.0),
        (" 1.\n", 1.0),
        # A score quoted inside the JSON's reasoning does not override the JSON's own score.
        ('{"score": 4, "reasoning": "a score: 1 would be unfair here"}', 4.0),
    ],
)
def test_parse_score_reads_each_reply_style(reply: str, expected: float) -> None:
    assert parse_score(reply) == expected


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("At first glance: score: 2. Looking closer at the hands, final score: 4", 4.0),
        ('{"reasoning": "ok", "score": 3}\nOn reflection, rating: 5', 5.0),
        ("\\boxed{2} ... no wait, \\boxed{5}", 5.0),
        ('Rating: 1\n```json\n{"reasoning": "better than I said", "score": 3}\n```', 3.0),
    ],
)
def test_parse_score_prefers_the_last_explicit_score(reply: str, expected: float) -> None:
    assert parse_score(reply) == expected


@pytest.mark.parametrize(
    "reply",
    [
        "", "   ", "\x8f(8d(8d(8", "The image is lovely.", "0", "6", "-3", "score: 0", "Score: 6",
        "score: -1", "rating: 8/10", '{"score": 7}', '{"score": null}', '{"score": "high"}',
        '{"reasoning": "no score given"}', "Score: 4 ... corrected score: 9",
    ],
)
def test_parse_score_is_nan_when_no_valid_score(reply: str) -> None:
    # NaN, never 0: a 0 would be trained on as the worst possible image.
    assert math.isnan(parse_score(reply))


def test_parse_scores_reads_quality_sub_scores() -> None:
    fenced = 'Sharp but dull.\n```json\n{"reasoning": "x", "aesthetics": 2, "technical_quality": 5, "structure_texture": 4}\n```'
    assert parse_scores(fenced) == [2.0, 5.0, 4.0]
    assert parse_scores("Aesthetics: 4\nTechnical quality: 3\nStructure/Texture: 2") == [4.0, 3.0, 2.0]
    assert parse_scores('{"aesthetics": 1, "technical_quality": 2, "structure_texture": 3} then aesthetics: 5') == [5.0, 2.0, 3.0]
    missing = parse_scores('{"aesthetics": 4, "structure_texture": 9}')
    assert missing[0] == 4.0 and math.isnan(missing[1]) and math.isnan(missing[2])
    assert all(math.isnan(value) for value in parse_scores("no idea"))
    assert all(math.isnan(value) for value in parse_scores(""))


# ---------------------------------------------------------------- distributions, images, templates


def test_score_moments_and_min_distribution_match_enumeration() -> None:
    rng = np.random.default_rng(0)
    subs = [rng.dirichlet(np.ones(5), size=4) for _ in range(3)]  # 3 sub-scores x [4, 5]
    mean, variance = score_moments(subs[0])
    values = np.arange(1, 6)
    np.testing.assert_allclose(mean, subs[0] @ values)
    np.testing.assert_allclose(variance, subs[0] @ values**2 - (subs[0] @ values) ** 2)
    expected = np.zeros((4, 5))
    for a, b, c in itertools.product(range(5), repeat=3):
        expected[:, min(a, b, c)] += subs[0][:, a] * subs[1][:, b] * subs[2][:, c]
    np.testing.assert_allclose(min_distribution(subs), expected, atol=1e-12)


def test_distribution_from_logprobs_renormalises_the_score_tokens() -> None:
    content = [
        # The first chosen token is whitespace (a server that trimmed the prefill's trailing
        # space): the distribution is read at the next position.
        {"token": " ", "logprob": -0.1, "top_logprobs": [{"token": " ", "logprob": -0.1}, {"token": "1", "logprob": -3.0}]},
        {
            "token": "4",
            "logprob": math.log(0.5),
            "top_logprobs": [
                {"token": "4", "logprob": math.log(0.5)},
                {"token": " 4", "logprob": math.log(0.1)},
                {"token": "2", "logprob": math.log(0.2)},
                {"token": "x", "logprob": math.log(0.15)},
            ],
        },
    ]
    probs, mass = distribution_from_logprobs(content)
    np.testing.assert_allclose(probs, [0.0, 0.2 / 0.8, 0.0, 0.6 / 0.8, 0.0])
    assert mass == pytest.approx(0.8)
    no_digit, no_mass = distribution_from_logprobs([{"token": "x", "logprob": -0.1, "top_logprobs": [{"token": "y", "logprob": -2.0}]}])
    assert np.isnan(no_digit).all() and no_mass == 0.0


def test_fit_image_caps_the_longest_side_and_keeps_the_aspect() -> None:
    wide = np.random.default_rng(0).integers(0, 256, (60, 100, 3), dtype=np.uint8)
    assert fit_image(wide, 50).size == (50, 30)
    assert fit_image(wide.transpose(1, 0, 2), 50).size == (30, 50)
    small = fit_image(wide, 512)
    assert small.size == (100, 60) and np.array_equal(np.asarray(small), wide)


def test_default_templates_ask_for_the_rubric_in_json() -> None:
    instruction = (TEMPLATES / "firm_gen_instruction.txt").read_text()
    assert "{prompt}" in instruction and '"score"' in instruction.format(prompt="p")
    quality = (TEMPLATES / "firm_gen_quality.txt").read_text().format()
    assert all(f'"{key}"' in quality for key in QUALITY_KEYS)
    for name in ("firm_edit_execution.txt", "firm_edit_consistency.txt"):
        text = (TEMPLATES / name).read_text()
        formatted = text.format(instruction="add a hat")
        assert '"add a hat"' in formatted and '"score"' in formatted and "first image is the source" in formatted


def test_bad_template_overrides_fail_naming_the_file(tmp_path: Path) -> None:
    no_prompt = tmp_path / "no_prompt.txt"
    no_prompt.write_text('Rate the image. {{"score": <1-5>}}')
    with pytest.raises(ValueError, match="no_prompt.txt.*must use \\{prompt\\}"):
        FirmGen("unused", instruction_template=no_prompt)
    stray = tmp_path / "stray.txt"
    stray.write_text('Prompt: {prompt}. Reply {"score": 3}')  # undoubled JSON braces
    with pytest.raises(ValueError, match="stray.txt"):
        FirmGen("unused", instruction_template=stray)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        FirmEdit("unused", consistency_template=tmp_path / "missing.txt")


# ---------------------------------------------------------------- the tiny judge and a reference


def moments(probs: np.ndarray) -> tuple[float, float]:
    values = np.arange(1, 6)
    mean = float(sum(p * v for p, v in zip(probs, values)))
    return mean, float(sum(p * (v - mean) ** 2 for p, v in zip(probs, values)))


def expected_min(sub_probs: list[np.ndarray]) -> tuple[float, float]:
    """Mean and variance of min(a, t, s) for independent sub-scores, by enumeration."""
    pmf = np.zeros(5)
    for a, b, c in itertools.product(range(5), repeat=3):
        pmf[min(a, b, c)] += sub_probs[0][a] * sub_probs[1][b] * sub_probs[2][c]
    return moments(pmf)


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory) -> Path:
    return build_tiny_qwen3_vl(tmp_path_factory.mktemp("judge") / "tiny-qwen3-vl", seed=0)


@pytest.fixture(scope="module")
def reference(judge_dir: Path) -> Reference:
    reference = load_reference(judge_dir)
    # Without the registration AutoProcessor would build the stock processor, which needs torchvision.
    assert type(reference.processor).__name__ == "ImageOnlyQwen3VLProcessor"
    return reference


@pytest.fixture(scope="module")
def gen_batch() -> RewardBatch:
    images = np.random.default_rng(1).integers(0, 256, (3, 40, 56, 3), dtype=np.uint8)
    return RewardBatch(images=images, prompts=list(PROMPTS))


@pytest.fixture(scope="module")
def edit_batch() -> RewardBatch:
    rng = np.random.default_rng(2)
    edited = rng.integers(0, 256, (3, 48, 48, 3), dtype=np.uint8)
    # Source images of different sizes give different numbers of image tokens per row: padding.
    sources = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in ((48, 48, 3), (40, 64, 3), (64, 40, 3))]
    return RewardBatch(images=edited, prompts=[""] * 3, source_images=sources, instructions=list(INSTRUCTIONS))


def pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray(image)


def gen_expectations(reference: Reference, batch: RewardBatch, instruction_template: str, top: int | None = None):
    """Per sample: (instruction mean, variance), (quality mean, variance), sub-score means."""
    quality_template = (TEMPLATES / "firm_gen_quality.txt").read_text().format()
    rows = []
    for image, prompt in zip(batch.images, batch.prompts):
        instruction = moments(reference.score_probs([pil(image)], instruction_template.format(prompt=prompt), '{"score": ', top))
        subs = [reference.score_probs([pil(image)], quality_template, f'{{"{key}": ', top) for key in QUALITY_KEYS]
        rows.append((instruction, expected_min(subs), [moments(p)[0] for p in subs]))
    return rows


def edit_expectations(reference: Reference, batch: RewardBatch, *, swap: bool = False, top: int | None = None):
    """Per component: [B] (mean, variance) with the source image first (or swapped)."""
    expected = {}
    for component in ("execution", "consistency"):
        template = (TEMPLATES / f"firm_edit_{component}.txt").read_text()
        rows = []
        for source, edited, instruction in zip(batch.source_images, batch.images, batch.instructions):
            images = [pil(edited), pil(source)] if swap else [pil(source), pil(edited)]
            rows.append(moments(reference.score_probs(images, template.format(instruction=instruction), '{"score": ', top)))
        expected[component] = np.array(rows)
    return expected


# ---------------------------------------------------------------- transformers backend


def test_firm_gen_distribution_matches_the_models_score_token_probabilities(judge_dir, reference, gen_batch) -> None:
    # batch_size 2 over 12 requests of different lengths: chunked and left padded.
    worker = FirmGen(str(judge_dir), JudgeSettings(dtype="fp32", batch_size=2))
    assert worker.components == ("instruction", "quality")
    output = worker(gen_batch)
    expected = gen_expectations(reference, gen_batch, (TEMPLATES / "firm_gen_instruction.txt").read_text())

    for component, column in (("instruction", 0), ("quality", 1)):
        scores, variance = output.scores[component], output.uncertainty[component]
        assert scores.shape == (3,) and variance.shape == (3,)
        assert np.all((scores >= 1) & (scores <= 5)) and np.all(variance >= 0)
        np.testing.assert_allclose(scores, [row[column][0] for row in expected], atol=1e-5)
        np.testing.assert_allclose(variance, [row[column][1] for row in expected], atol=1e-5)
        assert output.extras[f"{component}/parse_failures"] == 0
    for k, key in enumerate(QUALITY_KEYS):
        assert output.extras[f"quality/{key}_mean"] == pytest.approx(np.mean([row[2][k] for row in expected]), abs=1e-5)
    # Samples differ by more than the tolerance, so a mixed-up image or prompt would fail above.
    assert np.ptp(output.scores["instruction"]) > 1e-3


def test_template_override_changes_what_the_judge_is_asked(judge_dir, reference, gen_batch, tmp_path) -> None:
    custom = tmp_path / "strict.txt"
    custom.write_text('Is this exactly "{prompt}"? Answer as JSON: {{"score": <1-5>}}')
    worker = FirmGen(str(judge_dir), JudgeSettings(dtype="fp32"), instruction_template=custom)
    output = worker(gen_batch)
    expected = gen_expectations(reference, gen_batch, custom.read_text())
    np.testing.assert_allclose(output.scores["instruction"], [row[0][0] for row in expected], atol=1e-5)
    default = gen_expectations(reference, gen_batch, (TEMPLATES / "firm_gen_instruction.txt").read_text())
    assert not np.allclose(output.scores["instruction"], [row[0][0] for row in default], atol=1e-4)


def test_firm_edit_distribution_shows_the_source_image_first(judge_dir, reference, edit_batch) -> None:
    worker = FirmEdit(str(judge_dir), JudgeSettings(dtype="fp32", batch_size=4))
    assert worker.components == ("execution", "consistency")
    output = worker(edit_batch)
    expected = edit_expectations(reference, edit_batch)
    swapped = edit_expectations(reference, edit_batch, swap=True)
    for component in worker.components:
        scores = output.scores[component]
        assert scores.shape == (3,) and np.all((scores >= 1) & (scores <= 5))
        np.testing.assert_allclose(scores, expected[component][:, 0], atol=1e-5)
        np.testing.assert_allclose(output.uncertainty[component], expected[component][:, 1], atol=1e-5)
        assert not np.allclose(scores, swapped[component][:, 0], atol=1e-4)
        assert output.extras[f"{component}/parse_failures"] == 0


def test_generate_mode_parses_replies_and_counts_failures(judge_dir, reference, gen_batch, caplog) -> None:
    worker = FirmGen(str(judge_dir), JudgeSettings(dtype="fp32", scoring="generate", max_new_tokens=8, batch_size=3))
    with caplog.at_level(logging.WARNING, logger="rewards.firm"):
        output = worker(gen_batch)
    template = (TEMPLATES / "firm_gen_instruction.txt").read_text()
    replies = [
        reference.reply([pil(image)], template.format(prompt=prompt), 8) for image, prompt in zip(gen_batch.images, gen_batch.prompts)
    ]
    expected = np.array([parse_score(reply) for reply in replies])
    np.testing.assert_array_equal(output.scores["instruction"], expected)  # NaN where NaN
    assert output.texts["instruction"] == replies  # what the judge wrote, kept for the reasoning table
    assert len(output.texts["quality"]) == len(replies)
    scores = output.scores["instruction"]
    assert np.all(np.isnan(scores) | ((scores >= 1) & (scores <= 5)))
    # The random judge writes no score: each reply is a counted failure, not a 0.
    failures = int(np.isnan(expected).sum())
    assert failures > 0 and output.extras["instruction/parse_failures"] == failures
    assert output.extras["quality/parse_failures"] == int(np.isnan(output.scores["quality"]).sum()) > 0
    assert output.uncertainty == {}
    # The warning names the component and shows the reply.
    unparsed = replies[int(np.flatnonzero(np.isnan(expected))[0])]
    assert any(
        "firm_gen/instruction" in record.getMessage() and repr(unparsed)[1:-1] in record.getMessage() for record in caplog.records
    )


def test_firm_edit_rejects_batches_without_source_images_or_instructions(judge_dir, edit_batch) -> None:
    worker = FirmEdit(str(judge_dir), JudgeSettings(dtype="fp32"))
    no_sources = RewardBatch(images=edit_batch.images, prompts=list(PROMPTS), instructions=list(INSTRUCTIONS))
    with pytest.raises(ValueError, match="source_images"):
        worker(no_sources)
    no_instructions = RewardBatch(images=edit_batch.images, prompts=list(PROMPTS), source_images=edit_batch.source_images)
    with pytest.raises(ValueError, match="instructions"):
        worker(no_instructions)


def test_contradictory_or_incomplete_settings_raise(judge_dir) -> None:
    with pytest.raises(ValueError, match="base_url"):
        FirmGen(str(judge_dir), JudgeSettings(backend="openai"))
    with pytest.raises(ValueError, match="use_logprobs"):
        FirmGen(str(judge_dir), JudgeSettings(scoring="distribution", use_logprobs=False))
    assert FirmGen(str(judge_dir), JudgeSettings(dtype="fp32", use_logprobs=False)).scoring == "generate"


def test_registry_builds_firm_workers_from_flat_params(judge_dir) -> None:
    """A config's params mix JudgeSettings fields with the worker's own arguments; a misspelt key
    fails naming the worker and the key, before any model loads."""
    params = {"model": str(judge_dir), "dtype": "fp32", "batch_size": 2, "max_image_side": 64, "name": "judge"}
    worker = build_worker("firm_edit", params)
    assert isinstance(worker, FirmEdit) and worker.name == "judge" and worker.max_image_side == 64
    assert worker.backend.batch_size == 2 and worker.backend.model.dtype == torch.float32
    with pytest.raises(ValueError, match="'firm_gen'.*'batchsize'"):
        build_worker("firm_gen", {"model": "unused", "batchsize": 2})


# ---------------------------------------------------------------- openai backend over real HTTP


@dataclass
class Servers:
    main: JudgeServer
    doomed: JudgeServer  # killed by the retry test


@pytest.fixture(scope="module")
def servers(judge_dir, tmp_path_factory) -> Iterator[Servers]:
    log_dir = tmp_path_factory.mktemp("judge-server")
    # Both start at once: the start-up (imports, model load) overlaps.
    started = Servers(launch_judge_server(judge_dir, log_dir), launch_judge_server(judge_dir, log_dir))
    try:
        wait_until_up(started.main)
        wait_until_up(started.doomed)
        yield started
    finally:
        started.main.stop()
        started.doomed.stop()


@pytest.fixture
def server(servers: Servers) -> Iterator[JudgeServer]:
    servers.main.control(mode="model", fail_next=0)
    yield servers.main
    servers.main.control(mode="model", fail_next=0)


def openai_worker(cls, server: JudgeServer, **kwargs):
    """The worker built from flat params, as a run config's rewards.<name>.params builds it."""
    params = {"backend": "openai", "base_url": server.base_url, "api_model": "tiny-judge", "backoff_s": 0.01, **kwargs}
    return cls.from_params(model="VisionXLab/FIRM-unused", **params)


def test_openai_logprobs_match_the_model(server, reference, judge_dir, gen_batch, edit_batch) -> None:
    vocab = len(reference.processor.tokenizer)
    # The reference reads position 0 after the prefill; the worker skips a whitespace token
    # there, so check that the judge's first token is not one.
    first = reference.log_probs([pil(gen_batch.images[0])], "x", '{"score": ').argmax()
    assert reference.processor.tokenizer.decode([int(first)]).strip(), "precondition: first token is whitespace"

    # With every token's logprob returned, the openai path must equal the in-process one.
    output = openai_worker(FirmGen, server, top_logprobs=vocab, concurrency=4)(gen_batch)
    expected = gen_expectations(reference, gen_batch, (TEMPLATES / "firm_gen_instruction.txt").read_text())
    for component, column in (("instruction", 0), ("quality", 1)):
        np.testing.assert_allclose(output.scores[component], [row[column][0] for row in expected], atol=1e-5)
        np.testing.assert_allclose(output.uncertainty[component], [row[column][1] for row in expected], atol=1e-5)
        assert output.extras[f"{component}/parse_failures"] == 0

    edit_output = openai_worker(FirmEdit, server, top_logprobs=vocab)(edit_batch)
    edit_expected = edit_expectations(reference, edit_batch)
    for component in ("execution", "consistency"):
        np.testing.assert_allclose(edit_output.scores[component], edit_expected[component][:, 0], atol=1e-5)


def test_openai_top20_counts_only_the_returned_score_tokens(server, reference, edit_batch) -> None:
    # vLLM returns at most 20 alternatives: digits outside them count 0, and a position with
    # no digit among them is a missing score (NaN), counted.
    output = openai_worker(FirmEdit, server, top_logprobs=20)(edit_batch)
    expected = edit_expectations(reference, edit_batch, top=20)
    for component in ("execution", "consistency"):
        np.testing.assert_allclose(output.scores[component], expected[component][:, 0], atol=1e-5)
        assert output.extras[f"{component}/parse_failures"] == int(np.isnan(expected[component][:, 0]).sum())


def test_openai_garbage_replies_are_nan_counted_and_logged(server, gen_batch, edit_batch, caplog) -> None:
    server.control(mode="garbage")
    with caplog.at_level(logging.WARNING, logger="rewards.firm"):
        generated = openai_worker(FirmEdit, server, scoring="generate")(edit_batch)
    for component in ("execution", "consistency"):
        assert np.isnan(generated.scores[component]).all()
        assert generated.extras[f"{component}/parse_failures"] == 3
    messages = [record.getMessage() for record in caplog.records]
    assert any("firm_edit/execution" in message and "I would rather not say." in message for message in messages)

    distribution = openai_worker(FirmGen, server)(gen_batch)
    for component in ("instruction", "quality"):
        assert np.isnan(distribution.scores[component]).all()
        assert distribution.extras[f"{component}/parse_failures"] == 3


def test_openai_sends_capped_images_with_bounded_concurrency(server, gen_batch) -> None:
    # 12 requests (instruction + 3 quality sub-scores per image), 2 in flight at most.
    server.control(reset_stats=True)
    before = server.chat_requests()
    output = openai_worker(FirmGen, server, concurrency=2, max_image_side=32)(gen_batch)
    stats = httpx.get(server.root + "/stats", timeout=5.0).json()
    assert stats["chat_requests"] - before == 12
    assert stats["max_in_flight"] == 2  # bounded, and actually used
    assert stats["max_image_side"] <= 32
    assert np.isfinite(output.scores["instruction"]).all()


def test_openai_retries_transient_errors_then_names_the_endpoint(servers, server, edit_batch) -> None:
    single = RewardBatch(
        images=edit_batch.images[:1], prompts=[""], source_images=edit_batch.source_images[:1], instructions=INSTRUCTIONS[:1]
    )
    # Two 503s, three attempts per request: the call succeeds, with two extra requests.
    server.control(fail_next=2)
    before = server.chat_requests()
    output = openai_worker(FirmEdit, server, retries=3, concurrency=1)(single)
    assert np.isfinite(output.scores["execution"]).all() and np.isfinite(output.scores["consistency"]).all()
    assert server.chat_requests() - before == 2 + 2

    # A server that keeps failing: bounded attempts, then an error naming the endpoint.
    server.control(fail_next=100)
    before = server.chat_requests()
    with pytest.raises(RuntimeError, match=f"{server.base_url}/chat/completions failed after 2 attempts"):
        openai_worker(FirmEdit, server, retries=2, concurrency=1)(single)
    assert server.chat_requests() - before == 2

    # A killed server: connection refused on every attempt.
    doomed = servers.doomed
    worker = openai_worker(FirmEdit, doomed, retries=2)
    assert np.isfinite(worker(single).scores["execution"]).all()
    doomed.stop()
    with pytest.raises(RuntimeError, match=f"{doomed.base_url}/chat/completions failed after 2 attempts.*Connect"):
        worker(single)
