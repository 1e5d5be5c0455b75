"""Rubric judges (UnifiedReward, VIEScore, EditScore presets and rubric files): reading the scores
each reply format states, score distributions over multi-digit scales, the components' arithmetic,
and the workers on both backends with the tiny random-weight Qwen3-VL judge.

Expected values are computed here independently: scores by hand from the reply text, number
distributions by enumerating every digit string on the scale, components by enumerating every
combination of sub-scores, and token probabilities from the tiny judge loaded the plain way one
unpadded sequence at a time. The openai backend runs against the real HTTP test server
(tests/firm_server.py); its scripted replies stand in for a judge that writes scores (the tiny
model writes noise), while every score probability still comes from the model.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from judge_support import JudgeServer, Reference, launch_judge_server, load_reference, wait_until_up
from models.fixtures.vlm_judge import build_tiny_qwen2_5_vl, build_tiny_qwen3_vl
from rewards import WORKERS, build_worker
from rewards.base import RewardBatch
from rewards.judges.backends import JudgeRequest, TransformersJudge
from rewards.judges.parse import number_distribution, score_distribution
from rewards.judges.rubric import Discrete, load_rubric, read_slots, reduce_discrete
from rewards.vlm_judge import RubricJudge

PROMPTS = ["a red cube on a table", "two dogs", "a lighthouse at night"]
INSTRUCTIONS = ["make the sky blue", "add a hat"]


# ---------------------------------------------------------------- reading replies


@pytest.mark.parametrize(
    ("preset", "question", "reply", "expected"),
    [
        ("viescore", "SC", '{\n"score" : [7],\n"reasoning" : "The cube is red."\n}', [7.0]),
        ("viescore", "SC", '```json\n{"score": ["10"], "reasoning": "all there"}\n```', [10.0]),
        ("viescore", "SC", '{"score": 6, "reasoning": "a plain number for a one-score question"}', [6.0]),
        ("viescore", "PQ", '{"score": [8, 3], "reasoning": "warped hands"}', [8.0, 3.0]),
        ("viescore", "PQ", '{"score": [8.5, 3], "reasoning": "decimals are read"}', [8.5, 3.0]),
        ("viescore", "PQ", '{"score": [11, 3], "reasoning": "11 is off the 0..10 scale"}', [math.nan, 3.0]),
        ("viescore", "PQ", '{"score": [8], "reasoning": "one score where two are asked: ambiguous"}', [math.nan, math.nan]),
        ("viescore", "PQ", '{"score": [8, "bad"], "reasoning": "not a number"}', [math.nan, math.nan]),
        ("viescore", "PQ", "The image looks natural.", [math.nan, math.nan]),
        ("viescore", "PQ", "", [math.nan, math.nan]),
        # EditScore reasons first: the last list is the verdict.
        ("editscore", "SC", '{"reasoning": "first I thought \\"score\\": [3, 4] but", "score": [20, 12]}', [20.0, 12.0]),
        ("editscore", "SC", '{"reasoning": "perfect edit", "score": [25, 0]}', [25.0, 0.0]),
        ("editscore", "PQ", '{"reasoning": "x", "score": [26, 10]}', [math.nan, 10.0]),
        ("unified_reward", "assessment", "red cube (object): 1\ntable (object): 1\nFinal Score: 4", [4.0]),
        ("unified_reward", "assessment", "cube (object): 1\nFinal Score (1-5): 3.5", [3.5]),
        ("unified_reward", "assessment", "**Final Score:** 5", [5.0]),
        ("unified_reward", "assessment", "Final Score: 2\nOn reflection... Final Score: 3", [3.0]),
        ("unified_reward", "assessment", "Final Score (1-10): 8", [math.nan]),
        ("unified_reward", "assessment", "Final Score: 7", [math.nan]),
        ("unified_reward", "assessment", "cube (object): 1\ntable (object): 0", [math.nan]),
    ],
)
def test_read_slots_reads_each_reply_format(preset: str, question: str, reply: str, expected: list[float]) -> None:
    readings = read_slots(reply, load_rubric(preset), question)
    np.testing.assert_array_equal([reading.value for reading in readings], expected)
    for reading in readings:
        if reading.start >= 0 and math.isfinite(reading.value):
            # The distribution mode prefills the reply up to here: the number must start here.
            assert reply[reading.start :].startswith(f"{reading.value:g}".split(".")[0])


# ---------------------------------------------------------------- distributions


def enumerate_numbers(first: np.ndarray, after: dict[int, np.ndarray], low: int, high: int) -> np.ndarray:
    """P(the judge writes n) for n in low..high, from every digit string the judge could write:
    a digit then a stop, or (when 10 d <= high) a digit, a digit and a stop after that."""
    outcomes: dict[str, float] = {}
    for d in range(10):
        if d and 10 * d <= high:
            outcomes[str(d)] = first[d] * (1.0 - after[d].sum())
            for e in range(10):
                outcomes[f"{d}{e}"] = first[d] * after[d][e]
        else:
            outcomes[str(d)] = first[d]
    pmf = np.array([outcomes.get(str(n), 0.0) for n in range(low, high + 1)])
    return pmf / pmf.sum()


@pytest.mark.parametrize(("low", "high"), [(0, 10), (0, 25), (1, 5), (3, 40)])
def test_number_distribution_matches_enumerating_digit_strings(low: int, high: int) -> None:
    rng = np.random.default_rng(high)
    raw = rng.dirichlet(np.ones(12))
    first = raw[:10]  # two more outcomes: the judge writes something else
    after = {d: rng.dirichlet(np.ones(11))[:10] for d in range(1, 10) if 10 * d <= high}
    pmf, mass = number_distribution(first, after, low, high)
    np.testing.assert_allclose(pmf, enumerate_numbers(first, after, low, high), atol=1e-12)
    assert 0 < mass <= first.sum() + 1e-12


def test_number_distribution_limits() -> None:
    first = np.array([0.0, 0.1, 0.2, 0.3, 0.1, 0.2, 0.0, 0.0, 0.0, 0.0])
    # On 1..5 every score is one digit: the FIRM judges' renormalised digits.
    np.testing.assert_allclose(number_distribution(first, {}, 1, 5)[0], score_distribution(first)[0])
    # A judge that never continues "1" with a digit puts nothing on 10.
    pmf, _ = number_distribution(first, {1: np.zeros(10)}, 0, 10)
    np.testing.assert_allclose(pmf, np.append(first, 0.0) / first.sum())
    # One that always does puts all of "1" on 10..19, and only 10 is on the scale.
    always_ten = np.eye(10)[0]
    pmf, mass = number_distribution(first, {1: always_ten}, 0, 10)
    assert pmf[1] == 0 and math.isclose(pmf[10], 0.1 / first.sum()) and math.isclose(mass, first.sum())
    # No digit at all: undefined, never 0.
    pmf, mass = number_distribution(np.zeros(10), {1: np.zeros(10)}, 0, 10)
    assert np.isnan(pmf).all() and mass == 0.0
    with pytest.raises(ValueError, match="0 <= low < high <= 99"):
        number_distribution(first, {}, 0, 100)


def test_components_match_enumerating_every_combination() -> None:
    """overall = sqrt(min(a, b) x min(c, d)) for independent 0..10 scores, enumerated outright."""
    rng = np.random.default_rng(3)
    values = np.arange(11, dtype=np.float64)
    parts = [rng.dirichlet(np.ones(11) * 0.5) for _ in range(4)]
    sc = reduce_discrete("min", [Discrete(values, parts[0]), Discrete(values, parts[1])])
    pq = reduce_discrete("min", [Discrete(values, parts[2]), Discrete(values, parts[3])])
    overall = reduce_discrete("geometric_mean", [sc, pq])
    mean = second = 0.0
    for a, b, c, d in itertools.product(range(11), repeat=4):
        p = parts[0][a] * parts[1][b] * parts[2][c] * parts[3][d]
        value = math.sqrt(min(a, b) * min(c, d))
        mean += p * value
        second += p * value * value
    got_mean, got_var = overall.moments()
    assert math.isclose(got_mean, mean, rel_tol=1e-9) and math.isclose(got_var, second - mean * mean, rel_tol=1e-9)
    assert math.isclose(reduce_discrete("mean", [sc, pq]).moments()[0], sc.moments()[0] / 2 + pq.moments()[0] / 2, rel_tol=1e-12)
    undefined = Discrete(values, np.full(11, np.nan))
    assert math.isnan(reduce_discrete("min", [sc, undefined]).moments()[0])


# ---------------------------------------------------------------- rubric files


RUBRIC = """\
name: mine
source: a test
model: unused
task: generation
reply: labeled
scale: [1, 5]
questions:
  look:
    images: [generated]
    text: "Grade the image for {prompt}. End with 'Verdict: <1-5>' and 'Style: <1-5>'."
    scores:
      - {name: verdict, label: Verdict}
      - {name: style, label: Style}
components:
  score: {reduce: mean, of: [verdict, style]}
"""


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("{prompt}", "{instruction}"), r"may use \{prompt\}, found \{instruction\}"),
        (("{prompt}", "the prompt"), r"no question's text uses \{prompt\}"),
        (("[generated]", "[source]"), "a generation rubric shows"),
        (("{name: style, label: Style}", "{name: style}"), "a labeled reply needs a label"),
        (("of: [verdict, style]", "of: [verdict, colour]"), "neither a score nor an earlier component"),
        (("reduce: mean", "reduce: median"), "components.score.reduce"),
        (("scale: [1, 5]", "scale: [1, 100]"), "0 <= low < high <= 99"),
        (("source: a test", "source: a test\nseed: 3"), "seed: Extra inputs are not permitted"),
    ],
)
def test_bad_rubric_files_fail_naming_the_file_and_the_fault(tmp_path: Path, change: tuple[str, str], message: str) -> None:
    path = tmp_path / "rubric.yaml"
    path.write_text(RUBRIC.replace(*change))
    with pytest.raises(ValueError, match=message) as raised:
        load_rubric(path)
    assert str(path) in str(raised.value)


def test_unknown_rubric_lists_the_presets() -> None:
    with pytest.raises(FileNotFoundError, match="editscore, unified_reward, viescore, viescore_edit"):
        load_rubric("vie_score")


def test_presets_are_registered_with_their_components() -> None:
    for preset in ("unified_reward", "viescore", "viescore_edit", "editscore"):
        assert preset in WORKERS
        rubric = load_rubric(preset)
        assert rubric.name == preset and rubric.source and rubric.model
    assert list(load_rubric("viescore").components) == ["SC", "PQ", "overall"]
    assert load_rubric("editscore").report(25.0) == 10.0 and load_rubric("editscore").scale == (0, 25)


# ---------------------------------------------------------------- the tiny judge


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory) -> Path:
    return build_tiny_qwen3_vl(tmp_path_factory.mktemp("judge") / "tiny-qwen3-vl", seed=0)


@pytest.fixture(scope="module")
def reference(judge_dir: Path) -> Reference:
    return load_reference(judge_dir)


@pytest.fixture(scope="module")
def gen_batch() -> RewardBatch:
    images = np.random.default_rng(1).integers(0, 256, (3, 40, 56, 3), dtype=np.uint8)
    return RewardBatch(images=images, prompts=list(PROMPTS))


@pytest.fixture(scope="module")
def edit_batch() -> RewardBatch:
    rng = np.random.default_rng(2)
    edited = rng.integers(0, 256, (2, 48, 48, 3), dtype=np.uint8)
    sources = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in ((48, 48, 3), (40, 64, 3))]
    return RewardBatch(images=edited, prompts=[""] * 2, source_images=sources, instructions=list(INSTRUCTIONS))


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen2_5_vl"])
def test_transformers_digit_probabilities_match_the_model_whatever_the_batch(judge_dir, reference, gen_batch, family, tmp_path) -> None:
    """The distribution mode's prefills are replies cut at a score: each row's digit
    probabilities equal the model's own for that sequence, left padded in batches of any size.
    Qwen2.5-VL is the family of the UnifiedReward, EditScore and VIEScore defaults."""
    if family == "qwen2_5_vl":
        judge_dir = build_tiny_qwen2_5_vl(tmp_path / "tiny-qwen2.5-vl", seed=1)
        reference = load_reference(judge_dir)
        assert type(reference.model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    prefills = ['{"score": [', '{"score" : [7, ', "cube (object): 1\nFinal Score: ", '{"reasoning": "ok", "score": [2']
    images = [gen_batch.images[i % 3] for i in range(len(prefills))]
    requests = [JudgeRequest((Image.fromarray(image),), f"Grade it for {PROMPTS[i % 3]}", prefill) for i, (image, prefill) in enumerate(zip(images, prefills))]
    expected = np.stack([reference.digit_probs(list(r.images), r.text, r.prefill) for r in requests])
    for batch_size in (1, 3):
        backend = TransformersJudge(str(judge_dir), dtype="fp32", batch_size=batch_size)
        got = np.stack([d.probs for d in backend.digit_distributions(requests)])
        np.testing.assert_allclose(got, expected, atol=1e-5)


def test_transformers_rubric_judge_keeps_replies_without_scores_as_nan(judge_dir, reference, gen_batch, caplog) -> None:
    """The random tiny judge writes noise: every component NaN and counted, the replies kept."""
    worker = build_worker("unified_reward", {"model": str(judge_dir), "dtype": "fp32", "batch_size": 2, "max_new_tokens": 6})
    assert worker.scoring == "generate" and worker.components == ("score",)
    with caplog.at_level("WARNING"):
        output = worker(gen_batch)
    assert np.isnan(output.scores["score"]).all() and output.extras["score/parse_failures"] == 3
    text = load_rubric("unified_reward").questions["assessment"].text
    expected = [reference.reply([Image.fromarray(image)], text.format(prompt=prompt), 6) for image, prompt in zip(gen_batch.images, PROMPTS)]
    assert output.texts["score"] == expected
    assert "no score in the judge's reply" in caplog.text


# ---------------------------------------------------------------- openai backend, scripted replies


@pytest.fixture(scope="module")
def server(judge_dir, tmp_path_factory) -> Iterator[JudgeServer]:
    started = launch_judge_server(judge_dir, tmp_path_factory.mktemp("judge-server"))
    try:
        wait_until_up(started)
        yield started
    finally:
        started.stop()


def openai_judge(server: JudgeServer, preset: str, vocab: int, **params) -> RubricJudge:
    settings = {"backend": "openai", "base_url": server.base_url, "api_model": "tiny-judge", "backoff_s": 0.01, "top_logprobs": vocab}
    return build_worker(preset, {**settings, **params})


def expected_slot(reference: Reference, images: list, text: str, reply: str, stated: str, scale: tuple[int, int]) -> np.ndarray:
    """The pmf of one stated score: the reply cut where `stated` begins, the model's digit
    probabilities there, and after each digit that can start a two-digit score."""
    cut = reply[: reply.index(stated)]
    low, high = scale
    first = reference.digit_probs(images, text, cut)
    after = {d: reference.digit_probs(images, text, cut + str(d)) for d in range(1, 10) if 10 * d <= high}
    return enumerate_numbers(first, after, low, high)


def moments_of(values: np.ndarray, pmf: np.ndarray) -> tuple[float, float]:
    mean = float((values * pmf).sum())
    return mean, float((pmf * (values - mean) ** 2).sum())


def test_viescore_over_http_reads_scripted_replies_and_their_distributions(server, reference, gen_batch) -> None:
    vocab = len(reference.processor.tokenizer)
    sc_replies = {PROMPTS[0]: '{"score": [7], "reasoning": "red cube, no table"}', PROMPTS[1]: '{\n"score" : [10],\n"reasoning" : "two dogs"\n}',
                  PROMPTS[2]: "I cannot judge this image."}
    pq_reply = '{"score" : [8, 5], "reasoning": "slight warping"}'
    server.control(script={**sc_replies, "naturalness": pq_reply})
    try:
        output = openai_judge(server, "viescore", vocab)(gen_batch)
        np.testing.assert_array_equal(output.scores["SC"], [7.0, 10.0, math.nan])
        np.testing.assert_array_equal(output.scores["PQ"], [5.0, 5.0, 5.0])
        np.testing.assert_allclose(output.scores["overall"], [math.sqrt(35.0), math.sqrt(50.0), math.nan])
        assert (output.extras["SC/parse_failures"], output.extras["PQ/parse_failures"], output.extras["overall/parse_failures"]) == (1, 0, 1)
        assert output.texts["SC"][0] == sc_replies[PROMPTS[0]] and output.texts["overall"][0] == f"{sc_replies[PROMPTS[0]]} | {pq_reply}"
        assert output.extras["naturalness_mean"] == 8.0 and not output.uncertainty

        output = openai_judge(server, "viescore", vocab, scoring="distribution", concurrency=4)(gen_batch)
    finally:
        server.control(script={})
    rubric = load_rubric("viescore")
    values = np.arange(11, dtype=np.float64)
    for i in range(2):
        image = [Image.fromarray(gen_batch.images[i])]
        sc_text = rubric.questions["SC"].text.format(prompt=PROMPTS[i])
        pq_text = rubric.questions["PQ"].text.format()
        stated = "7]" if i == 0 else "10]"
        sc = expected_slot(reference, image, sc_text, sc_replies[PROMPTS[i]], stated, (0, 10))
        nat = expected_slot(reference, image, pq_text, pq_reply, "8, 5]", (0, 10))
        art = expected_slot(reference, image, pq_text, pq_reply, "5]", (0, 10))
        pq = {}
        for a, b in itertools.product(range(11), repeat=2):
            pq[min(a, b)] = pq.get(min(a, b), 0.0) + nat[a] * art[b]
        pq_pmf = np.array([pq.get(v, 0.0) for v in range(11)])
        overall: dict[float, float] = {}
        for s, q in itertools.product(range(11), repeat=2):
            overall[math.sqrt(s * q)] = overall.get(math.sqrt(s * q), 0.0) + sc[s] * pq_pmf[q]
        overall_values = np.array(list(overall))
        for component, (mean, variance) in (("SC", moments_of(values, sc)), ("PQ", moments_of(values, pq_pmf)),
                                            ("overall", moments_of(overall_values, np.array(list(overall.values()))))):
            assert math.isclose(output.scores[component][i], mean, rel_tol=1e-5), component
            assert math.isclose(output.uncertainty[component][i], variance, rel_tol=1e-4, abs_tol=1e-8), component
    assert math.isnan(output.scores["SC"][2]) and math.isnan(output.scores["overall"][2]) and math.isfinite(output.scores["PQ"][2])
    assert output.extras["SC/parse_failures"] == 1 and 0 < output.extras["SC/digit_mass_mean"] <= 1


def test_editscore_over_http_shows_source_then_edit_and_reports_on_0_to_10(server, reference, edit_batch) -> None:
    vocab = len(reference.processor.tokenizer)
    sc_reply = '{"reasoning": "the sky is blue now", "score": [20, 12]}'
    pq_reply = '{"reasoning": "clean", "score": [25, 10]}'
    server.control(script={INSTRUCTIONS[0]: sc_reply, INSTRUCTIONS[1]: "no verdict", "naturalness": pq_reply})
    try:
        output = openai_judge(server, "editscore", vocab)(edit_batch)
        np.testing.assert_allclose(output.scores["SC"], [12 / 2.5, math.nan])
        np.testing.assert_allclose(output.scores["PQ"], [4.0, 4.0])
        np.testing.assert_allclose(output.scores["overall"], [math.sqrt(4.8 * 4.0), math.nan])

        output = openai_judge(server, "editscore", vocab, scoring="distribution")(edit_batch)
    finally:
        server.control(script={})
    rubric = load_rubric("editscore")
    source, edited = Image.fromarray(np.asarray(edit_batch.source_images[0])), Image.fromarray(edit_batch.images[0])
    sc_text = rubric.questions["SC"].text.format(instruction=INSTRUCTIONS[0])
    success = expected_slot(reference, [source, edited], sc_text, sc_reply, "20, 12]", (0, 25))
    consistency = expected_slot(reference, [source, edited], sc_text, sc_reply, "12]", (0, 25))
    sc: dict[int, float] = {}
    for a, b in itertools.product(range(26), repeat=2):
        sc[min(a, b)] = sc.get(min(a, b), 0.0) + success[a] * consistency[b]
    mean, variance = moments_of(np.arange(26) / 2.5, np.array([sc.get(v, 0.0) for v in range(26)]))
    assert math.isclose(output.scores["SC"][0], mean, rel_tol=1e-5)
    assert math.isclose(output.uncertainty["SC"][0], variance, rel_tol=1e-4, abs_tol=1e-8)
    # Swapping the images changes what the judge sees, so the order is checked, not assumed.
    swapped = expected_slot(reference, [edited, source], sc_text, sc_reply, "20, 12]", (0, 25))
    assert not np.allclose(swapped, success, atol=1e-4)
    assert math.isnan(output.scores["SC"][1])


def test_editing_rubric_on_a_generation_batch_fails_clearly(server, gen_batch) -> None:
    worker = openai_judge(server, "viescore_edit", 32)
    with pytest.raises(ValueError, match="editing rubric needs the batch's source_images and instructions"):
        worker(gen_batch)


def test_vlm_judge_takes_a_rubric_file_and_an_api_key_from_the_environment(server, gen_batch, tmp_path, monkeypatch) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text(RUBRIC)
    server.control(script={"Grade the image": "Verdict: 4\nStyle: 2"})
    monkeypatch.setenv("TEST_JUDGE_KEY", "sk-test-123")
    try:
        worker = openai_judge(server, "vlm_judge", 32, rubric=str(path), api_key_env="TEST_JUDGE_KEY")
        output = worker(gen_batch)
    finally:
        server.control(script={})
    assert worker.name == "mine" and worker.components == ("score",)
    np.testing.assert_array_equal(output.scores["score"], [3.0, 3.0, 3.0])
    assert server.stats()["last_authorization"] == "Bearer sk-test-123"
    with pytest.raises(ValueError, match="api_key_env names NO_SUCH_KEY_VAR, which is not set"):
        openai_judge(server, "vlm_judge", 32, rubric=str(path), api_key_env="NO_SUCH_KEY_VAR")
    with pytest.raises(ValueError, match="'viescore'.*'rubric'"):
        openai_judge(server, "viescore", 32, rubric=str(path))
