"""Judge replies as judges write them, read by parse_score / parse_scores.

A corpus of replies in the forms the judges this project uses actually produce, each with the
score a person reads in it, written by hand:
- FIRM (rewards/templates/): a JSON object with reasoning and a score, in FIRM's released form a
  one-element list ({"reasoning": "...", "score": [4]}), sometimes fenced or with text around it;
- VIEScore / EditScore: {"score": [a, b], "reasoning": "..."}, one score per criterion;
- UnifiedReward: "Final Score: 4", "Alignment Score (1-5): 3.62", "Score: 4/5";
- RationalRewards and chat models: scores as strings of numbers ("4", "4.5"), \\boxed{4},
  "4 out of 5", markdown emphasis.
Replies that state no usable score must stay NaN (missing), never a number read from their
reasoning: counts ("3 cats, 2 dogs"), another scale, a list where one score was asked for.
"""

from __future__ import annotations

import math

import pytest

from rewards.judges.parse import parse_score, parse_scores

READ = [
    # FIRM: the template's JSON, the released model's one-element list, fenced, with prose around.
    ('{"reasoning": "The cube is red and sits on the table.", "score": [5]}', 5.0),
    ('{"reasoning": "Two dogs are shown but one has three legs.", "score": [3]}', 3.0),
    ('```json\n{"reasoning": "The sky is blue as asked; the clouds changed too.", "score": [4]}\n```', 4.0),
    ('Let me compare both images.\n```json\n{\n  "reasoning": "Hat added.",\n  "score": [4]\n}\n```', 4.0),
    ('{"reasoning": "Lighthouse present, night, but not an oil painting.", "score": 3}', 3.0),
    ('{"reasoning": "ok", "score": ["2"]}', 2.0),
    ('{"reasoning": "The text is gone but the sign moved.", "score": [4],}', 4.0),  # trailing comma: not JSON
    ('{"score": [2], "reasoning": "There are 3 cats and 2 dogs, but 5 cats were requested."}', 2.0),
    ('{"reasoning": "I would first say score: 1, but the hat is there after all", "score": [4]}', 4.0),
    ('{"score": [4], "reasoning": "a score: 1 would be unfair, the hat is there"}', 4.0),
    # VIEScore / EditScore read by parse_score when the list holds one score.
    ('{"score" : [4], "reasoning" : "The edit follows the instruction."}', 4.0),
    # UnifiedReward.
    ("The image shows a red cube on a wooden table. The lighting is soft.\nFinal Score: 4", 4.0),
    ("Alignment with the prompt is good, 2 of the 3 objects are correct.\nScore: 3/5", 3.0),
    ("Final Score (1-5): 4.5", 4.5),
    ("<think>The prompt asks for 3 cats; I count 3 cats and 2 dogs. Score: 3? The dogs do no harm.</think>\n"
     "<answer>Final Score: 4</answer>", 4.0),
    # RationalRewards and chat models: numeric strings, boxed, out of five, emphasis.
    ('"4"', 4.0),
    ('"4.5"', 4.5),
    ("4.5", 4.5),
    ('{"rationale": "Sharp, clean, natural colours.", "score": "4.5"}', 4.5),
    ('{"rationale": "Mostly right.", "score": "4/5"}', 4.0),
    ('{"rationale": "Mostly right.", "score": "4 out of 5"}', 4.0),
    ("Reasoning: the hat is there, the face is unchanged. Therefore the answer is \\boxed{5}.", 5.0),
    ("$\\boxed{3}$", 3.0),
    ("I would rate this image 4 out of 5.", 4.0),
    ("Overall, 2/5: the dog is missing.", 2.0),
    ("**Score:** 4", 4.0),
    ("**Final Score**: **2**", 2.0),
    ("Rating: 4.0/5.0", 4.0),
    ("Score: 4 out of 5", 4.0),
    # Reasoning that quotes other numbers around the verdict.
    ("There are 3 cats, 2 dogs and 1 bird in the image, matching 2 of 4 requested animals. Score: 4", 4.0),
    ("Score: 2. Only 3 out of 5 requested cats are visible.", 2.0),
    ("Final Score: 2, because the count is wrong (3/5).", 2.0),
    ("The prompt wants 5 apples; 4 are shown in 2 rows of 2. Final Score: 3", 3.0),
    ("I count 12 windows and 3 doors.\n\n**Rating:** 5", 5.0),
    ("At first glance score: 2; after checking the hands again, final score: 4", 4.0),
]

MISSING = [
    "",
    "The image is lovely.",
    "There are 3 cats and 2 dogs in the picture.",  # counts, no score
    "I see 4 out of 5 requested objects.",  # a count, not a score
    '{"reasoning": "I cannot see the image."}',
    '{"reasoning": "unsure", "score": []}',
    '{"reasoning": "two criteria", "score": [4, 3]}',  # two scores where one was asked for: which?
    '{"reasoning": "two criteria", "score": [4, 3],}',  # the same, malformed JSON
    '{"score": "high"}',
    '{"score": [true]}',
    '{"score": null}',
    "Score: 8/10",  # another scale
    "Score: 4 out of 10",
    "Final Score (1-10): 4",  # 4 of 10 is not 4 of 5
    "rating: 0",
    "Score: 4 ... corrected score: 9",  # the last statement is out of range: refused, not the 4
    "The score is four.",
]


@pytest.mark.parametrize(("reply", "expected"), READ)
def test_parse_score_reads_the_score_the_judge_wrote(reply: str, expected: float) -> None:
    assert parse_score(reply) == expected


@pytest.mark.parametrize("reply", MISSING)
def test_parse_score_is_missing_where_no_score_is_stated(reply: str) -> None:
    assert math.isnan(parse_score(reply))


def test_the_corpus_is_large_enough_to_mean_something() -> None:
    assert len(READ) >= 30 and len(MISSING) >= 10


SUB_SCORES = [
    # VIEScore semantic consistency (editing success, over-editing), one score per key, in order.
    ('{"score" : [4, 2], "reasoning" : "The hat was added but the background was replaced."}', ("success", "overediting"), [4.0, 2.0]),
    ('```json\n{"score": [5, 5], "reasoning": "Perfect edit."}\n```', ("success", "overediting"), [5.0, 5.0]),
    # VIEScore perceptual quality (naturalness, artifacts), scores as strings.
    ('{"score": ["3", "4.5"], "reasoning": "A little flat; no artifacts."}', ("naturalness", "artifacts"), [3.0, 4.5]),
    # FIRM quality: three named sub-scores, in the template's form and as one-element lists.
    ('{"reasoning": "x", "aesthetics": 2, "technical_quality": 5, "structure_texture": 4}', None, [2.0, 5.0, 4.0]),
    ('{"reasoning": "x", "aesthetics": [3], "technical_quality": [4], "structure_texture": ["2"]}', None, [3.0, 4.0, 2.0]),
    ('{"reasoning": "x", "score": [3, 4, 1]}', None, [3.0, 4.0, 1.0]),
    # UnifiedReward's three lines with the scale in parentheses.
    ("Alignment Score (1-5): 3.62\nCoherence Score (1-5): 4\nStyle Score (1-5): 2.5", ("alignment", "coherence", "style"), [3.62, 4.0, 2.5]),
    # A list of the wrong length is ambiguous: every key missing.
    ('{"score": [4, 3], "reasoning": "two numbers for three keys"}', None, [math.nan] * 3),
    # Another scale for one key only.
    ("Alignment Score (1-10): 4\nCoherence Score (1-5): 4\nStyle Score (1-5): 3", ("alignment", "coherence", "style"), [math.nan, 4.0, 3.0]),
    # Reasoning counts are not sub-scores.
    ("There are 3 cats. Aesthetics: 4\nTechnical quality: 3 (2 small artefacts)\nStructure/Texture: 5", None, [4.0, 3.0, 5.0]),
]


@pytest.mark.parametrize(("reply", "keys", "expected"), SUB_SCORES)
def test_parse_scores_reads_one_score_per_key(reply: str, keys: tuple[str, ...] | None, expected: list[float]) -> None:
    got = parse_scores(reply) if keys is None else parse_scores(reply, keys)
    assert len(got) == len(expected)
    for value, want in zip(got, expected):
        assert (math.isnan(value) and math.isnan(want)) or value == want, (got, expected)
