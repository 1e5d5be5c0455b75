"""Reading a judge's score: free replies parsed into 1..5 scores, and score distributions over
1..5 (from next-token probabilities) reduced to an expectation and a variance. Pure: numpy and
the standard library, no model and no HTTP, so the judge backends and workers share one reading.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "QUALITY_KEYS",
    "DIGITS",
    "SCORE_DIGITS",
    "SCORE_VALUES",
    "ScoreDistribution",
    "digit_probs_from_logprobs",
    "distribution_from_logprobs",
    "number_distribution",
    "score_distribution",
    "min_distribution",
    "parse_score",
    "parse_scores",
    "score_moments",
]

SCORE_VALUES = np.arange(1, 6, dtype=np.float64)  # the judges' scale, 1..5
SCORE_DIGITS = ("1", "2", "3", "4", "5")
DIGITS = tuple("0123456789")  # the tokens a score is written with, one digit at a time
# The image-quality sub-scores a FIRM-Gen quality reply holds; parse_scores reads them by default.
QUALITY_KEYS = ("aesthetics", "technical_quality", "structure_texture")


# --------------------------------------------------------------------------------------------
# Reading scores out of replies
# --------------------------------------------------------------------------------------------

_NUMBER = r"[-+]?\d+(?:\.\d+)?"
_SCORE_WORD = r"(?:final[ _]|overall[ _])?(?:score|rating)"
# A scale stated after the key, as UnifiedReward writes it: "Alignment Score (1-5): 3.62".
_SCALE = r"(?:\s*\(\s*\d+\s*(?:-|\u2013|to)\s*(?P<scale>\d+)\s*\))?"
# The number after a key's separator: '4', '"4"', '4/5', '4 out of 5', '**4**', and '[4]' (a
# one-element list, FIRM's own JSON form, read here when the JSON around it is malformed).
_STATED_NUMBER = (
    rf"""\s*\**\s*(?P<open>\[\s*)?["']?\s*(?P<value>{_NUMBER})"""
    r"""(?:\s*(?:/|\bout\s+of\b)\s*(?P<denominator>\d+))?["']?(?(open)\s*\])"""
)
# "Score: 4", "rating = 3.5", "score is 4", "Score: 4/5", '"score": "4"', "**Rating:** 4",
# "Final Score (1-5): 4".
_KEYED_SCORE = re.compile(
    rf"""\b{_SCORE_WORD}\b{_SCALE}["']?\s*\**\s*(?:[:=]|\bis\b){_STATED_NUMBER}""",
    re.IGNORECASE,
)
_BOXED_SCORE = re.compile(rf"\\boxed\{{\s*(?P<value>{_NUMBER})\s*(?:/\s*(?P<denominator>\d+))?\s*\}}")
# "4/5" or "4 out of 5" standing alone; the look-behind keeps "14/5" from reading as 4/5, and
# the look-ahead keeps a count ("3 out of 5 cats") from reading as a score.
_OUT_OF_FIVE = re.compile(
    rf"(?<![\w.])(?P<value>{_NUMBER})\s*(?:/|\bout\s+of\b)\s*5\b(?!\s*(?!(?:stars?|points?|for)\b)[a-z])",
    re.IGNORECASE,
)
_BARE_NUMBER = re.compile(rf"""^\s*[*"']*\s*({_NUMBER})\s*[*"']*\s*\.?\s*$""")
_NUMBER_STRING = re.compile(rf"^\s*({_NUMBER})\s*(?:(?:/|\bout\s+of\b)\s*(\d+))?\s*$", re.IGNORECASE)
# JSON keys that hold the verdict: "score", "rating", "final_score", "execution_score", ... and
# the criterion names FIRM-style replies use as keys.
_SCORE_KEYS_EXACT = ("score", "rating", "final_score", "overall_score", "final_rating", "overall_rating", "scores")
_SCORE_KEYS_NAMED = ("execution", "consistency", "instruction_following", "overall")
# Stems that identify the quality sub-scores in keys such as "technical quality" or "Structure/Texture".
_QUALITY_STEMS: dict[str, tuple[str, ...]] = {
    "aesthetics": ("aesthetic",),
    "technical_quality": ("technical",),
    "structure_texture": ("structure", "texture"),
}


@dataclass(frozen=True)
class _Candidate:
    position: int  # where in the reply the score was stated; the last one wins
    value: float  # NaN when stated but unusable (another scale, not a number)


def _in_scale(value: float) -> float:
    return value if 1.0 <= value <= 5.0 else math.nan


def _scaled(number: str, denominator: str | None, scale: str | None = None) -> float:
    """A stated score; "4/5" or "(1-5): 4" is 4, a score on another scale ("8/10") is unusable (NaN)."""
    if any(top is not None and int(top) != 5 for top in (denominator, scale)):
        return math.nan
    return float(number)


def _from_match(match: re.Match[str]) -> float:
    groups = match.groupdict()
    return _scaled(groups["value"], groups.get("denominator"), groups.get("scale"))


def _json_scalar(value: Any) -> float | None:
    """A JSON number or numeric string ("4", "4.5", "4/5") as a float; None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        match = _NUMBER_STRING.match(value)
        if match:
            return _scaled(match.group(1), match.group(2))
    return None


def _json_list(value: Any) -> list[float] | None:
    """A JSON list of scores ([4], ["4", 3.5]) as floats; None when it is not a list of numbers."""
    if not isinstance(value, list) or not value:
        return None
    numbers = [_json_scalar(item) for item in value]
    return None if any(number is None for number in numbers) else numbers


def _json_number(value: Any) -> float | None:
    """A JSON value as one score: a number, a numeric string, or a one-element list of either
    (FIRM's {"score": [4]}). A list of several scores is stated but not one score: NaN, so that
    parse_score refuses it rather than guess which one is meant. None for anything else."""
    numbers = _json_list(value)
    if numbers is not None:
        return numbers[0] if len(numbers) == 1 else math.nan
    return _json_scalar(value)


def _normalise_key(key: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", key.lower()).strip("_")


def _json_objects(text: str) -> list[tuple[int, int, dict]]:
    """Every top-level JSON object in the text as (start, end, object), fenced or not."""
    decoder = json.JSONDecoder()
    objects, index = [], text.find("{")
    while index != -1:
        try:
            value, end = decoder.raw_decode(text, index)
        except ValueError:
            index = text.find("{", index + 1)
            continue
        if isinstance(value, dict):
            objects.append((index, end, value))
            index = text.find("{", end)
        else:
            index = text.find("{", index + 1)
    return objects


def _walk_dicts(obj: dict) -> list[dict]:
    """The object and every object nested in it, outermost first."""
    found, pending = [], [obj]
    while pending:
        current = pending.pop(0)
        found.append(current)
        pending.extend(value for value in current.values() if isinstance(value, dict))
    return found


def _json_score(obj: dict) -> float | None:
    """The verdict held by a JSON object: an exact "score"/"rating" key first, else the last
    criterion-named key ("execution_score", "consistency", ...); None when it holds none."""
    for level in _walk_dicts(obj):
        named: float | None = None
        for key, value in level.items():
            normalised, number = _normalise_key(str(key)), _json_number(value)
            if number is None:
                continue
            if normalised in _SCORE_KEYS_EXACT:
                return number
            if normalised in _SCORE_KEYS_NAMED or normalised.endswith(("_score", "_rating")):
                named = number
        if named is not None:
            return named
    return None


def _outside(position: int, spans: list[tuple[int, int]]) -> bool:
    return not any(start <= position < end for start, end in spans)


def parse_score(text: str) -> float:
    """The 1..5 score a judge's reply states; NaN when it states none or one outside [1, 5].

    Understood: a JSON object with a "score"/"rating"/criterion key holding a number, a numeric
    string ("4.5") or a one-element list (FIRM's {"reasoning": ..., "score": [4]}), fenced in
    ```json or not, with reasoning around it; a boxed score (\\boxed{4}); "rating: 4",
    "Final Score: 4", "Score: 4/5", "Score (1-5): 4", "score = 3.5"; "4 out of 5"; and a reply
    that is just the number, quoted or not. When several scores are stated, the last one wins:
    judges reason first and conclude last. Numbers that are not stated as a score (counts in
    the reasoning: "3 cats, 2 dogs"; "3 out of 5 cats") are not read, and text inside a JSON
    object that holds a score does not count, so a score quoted in its reasoning cannot override
    it. Refused (NaN): a list of several scores ({"score": [4, 3]}: which one? parse_scores reads
    it), another scale ("8/10", "(1-10)"), out of range. A garbled reply is NaN, never 0.
    """
    if not isinstance(text, str) or not text.strip():
        return math.nan
    bare = _BARE_NUMBER.match(text)
    if bare:
        return _in_scale(float(bare.group(1)))

    candidates: list[_Candidate] = []
    scored_spans: list[tuple[int, int]] = []
    for start, end, obj in _json_objects(text):
        value = _json_score(obj)
        if value is not None:
            candidates.append(_Candidate(start, value))
            scored_spans.append((start, end))
    for pattern in (_KEYED_SCORE, _BOXED_SCORE):
        for match in pattern.finditer(text):
            if _outside(match.start(), scored_spans):
                candidates.append(_Candidate(match.start(), _from_match(match)))
    if not candidates:
        # "4 out of 5" standing alone counts only when nothing states a score by name: a
        # reasoning that says "only 3 out of 5 are visible" after "Score: 2" has not changed it.
        for match in _OUT_OF_FIVE.finditer(text):
            candidates.append(_Candidate(match.start(), float(match.group("value"))))
    if not candidates:
        return math.nan
    # The last statement wins, whichever form it took.
    return _in_scale(max(candidates, key=lambda c: c.position).value)


def _stem_pattern(stem: str) -> re.Pattern[str]:
    # The stem, up to a few more key characters ("technical quality", "structure/texture"), an
    # optional scale ("(1-5)"), a separator, the number.
    return re.compile(
        rf"""(?<![a-z]){stem}[a-z_ /&-]{{0,24}}?{_SCALE}["']?\s*\**\s*[:=]{_STATED_NUMBER}""",
        re.IGNORECASE,
    )


def _json_sub_scores(level: dict, stems: Sequence[tuple[str, ...]]) -> dict[int, float]:
    """Key index -> score held by one JSON object: by name ({"aesthetics": 4}), else, when it
    names none of the keys, by position in a score list ({"score": [4, 3]}, VIEScore's form).
    A list whose length is not the number of keys is ambiguous: NaN for every key."""
    found: dict[int, float] = {}
    for name, value in level.items():
        number = _json_number(value)
        if number is None:
            continue
        for index, key_stems in enumerate(stems):
            if any(stem in _normalise_key(str(name)) for stem in key_stems):
                found[index] = number
    if found:
        return found
    for name, value in level.items():
        numbers = _json_list(value)
        if numbers is not None and _normalise_key(str(name)) in _SCORE_KEYS_EXACT:
            if len(numbers) != len(stems):
                return dict.fromkeys(range(len(stems)), math.nan)
            return dict(enumerate(numbers))
    return found


def parse_scores(text: str, keys: Sequence[str] = QUALITY_KEYS) -> list[float]:
    """One 1..5 score per key (default: the quality sub-scores), NaN for each one the reply lacks.

    Reads JSON objects ({"aesthetics": 4, "technical_quality": 3, ...}, or one score list with a
    value per key in order: {"score": [4, 3, 5], "reasoning": ...}) and "Aesthetics: 4" or
    "Alignment Score (1-5): 4" lines; keys match by stem, so "technical quality" or
    "Structure/Texture" count too. As in parse_score, the last statement of each key wins,
    out-of-range values are NaN, and text inside a JSON object that gave a key its score does
    not count for that key.
    """
    if not isinstance(text, str) or not text.strip():
        return [math.nan] * len(keys)
    stems = [_QUALITY_STEMS.get(key, (_normalise_key(key),)) for key in keys]
    candidates: list[list[_Candidate]] = [[] for _ in keys]
    scored_spans: list[list[tuple[int, int]]] = [[] for _ in keys]
    for start, end, obj in _json_objects(text):
        for level in _walk_dicts(obj):
            for index, number in _json_sub_scores(level, stems).items():
                candidates[index].append(_Candidate(start, number))
                scored_spans[index].append((start, end))
    for index, key_stems in enumerate(stems):
        for stem in key_stems:
            for match in _stem_pattern(stem).finditer(text):
                if _outside(match.start(), scored_spans[index]):
                    candidates[index].append(_Candidate(match.start(), _from_match(match)))
    return [_in_scale(max(found, key=lambda c: c.position).value) if found else math.nan for found in candidates]


# --------------------------------------------------------------------------------------------
# Score distributions
# --------------------------------------------------------------------------------------------


@dataclass
class ScoreDistribution:
    """What one distribution-mode request returns."""

    probs: np.ndarray  # [5] over scores 1..5, summing to 1; all NaN when the judge gave no score token
    digit_mass: float  # probability on the five score tokens before renormalising (near 1 for a real judge)
    reply: str  # what the judge produced, for the log


def score_moments(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Expected score and variance of distributions over 1..5: probs [N, 5] -> ([N], [N]).
    NaN rows give NaN."""
    probs = np.asarray(probs, dtype=np.float64)
    mean = probs @ SCORE_VALUES
    variance = (probs * (SCORE_VALUES[None, :] - mean[:, None]) ** 2).sum(axis=1)
    return mean, variance


def min_distribution(distributions: Sequence[np.ndarray]) -> np.ndarray:
    """Distribution of the min of independent 1..5 scores: each [N, 5] -> [N, 5].

    The quality component is the min of three sub-scores (QMA, REFERENCE.md section 3); taking
    the distribution of the min, rather than the min of the expectations, keeps "reward =
    expectation, uncertainty = variance" true of the quantity the reward is actually made of.
    P(min >= k) is the product of the P(X_i >= k).
    """
    survival = np.ones_like(np.asarray(distributions[0], dtype=np.float64))
    for probs in distributions:
        # Column k: P(X >= k + 1), the reversed cumulative sum.
        survival = survival * np.cumsum(np.asarray(probs, dtype=np.float64)[:, ::-1], axis=1)[:, ::-1]
    return survival - np.concatenate([survival[:, 1:], np.zeros_like(survival[:, :1])], axis=1)


def digit_probs_from_logprobs(content: Sequence[dict[str, Any]]) -> np.ndarray:
    """Probabilities of the tokens "0".."9" at the score position of an OpenAI-style
    `choices[0].logprobs.content` list: [10], not renormalised (1 - their sum is the chance the
    judge writes something else there).

    Reads the first position whose chosen token is not whitespace: a server whose chat template
    trims the trailing space of a continued message makes the judge emit the space first. A
    token with surrounding whitespace counts for its digit; digits outside the returned
    top_logprobs count 0.
    """
    entry = next((item for item in content if str(item.get("token", "")).strip()), None)
    probs = np.zeros(10, dtype=np.float64)
    if entry is not None:
        logprobs: dict[str, float] = {}
        for top in entry.get("top_logprobs") or []:
            logprobs.setdefault(str(top["token"]), float(top["logprob"]))
        # The chosen token is normally among the top ones; count it once either way.
        logprobs.setdefault(str(entry["token"]), float(entry["logprob"]))
        for token, logprob in logprobs.items():
            digit = token.strip()
            if digit in DIGITS:
                probs[DIGITS.index(digit)] += math.exp(logprob)
    return probs


def score_distribution(digit_probs: np.ndarray) -> tuple[np.ndarray, float]:
    """The 1..5 distribution in ten digit probabilities: ([5] renormalised, their mass before
    renormalising); all NaN and 0 when no score token has any probability."""
    mass = np.asarray(digit_probs, dtype=np.float64)[1:6]
    total = float(mass.sum())
    if total <= 0.0:
        return np.full(5, math.nan), 0.0
    return mass / total, total


def distribution_from_logprobs(content: Sequence[dict[str, Any]]) -> tuple[np.ndarray, float]:
    """The 1..5 score distribution in an OpenAI-style logprobs content list (see
    digit_probs_from_logprobs): ([5] renormalised, their mass before renormalising); all NaN and
    0 when no score token is among the returned alternatives."""
    return score_distribution(digit_probs_from_logprobs(content))


def number_distribution(first: np.ndarray, after: dict[int, np.ndarray], low: int, high: int) -> tuple[np.ndarray, float]:
    """The distribution of a whole number in [low, high] (0 <= low < high <= 99) that a judge is
    about to write one digit token at a time.

    `first` holds the probabilities of "0".."9" as the number's first token; `after[d]`, for each
    leading digit d that starts a two-digit number in range (10 d <= high), those of the token
    after "d". Then P(d) = first[d] x (1 - sum(after[d])) (the judge stops after d: a space, a
    comma, a decimal point), P(10 d + e) = first[d] x after[d][e], and a one-digit number that
    cannot start a two-digit one in range is first[d]. Numbers outside [low, high] (the judge
    writing "27" on a 0..25 scale) are dropped and the rest renormalised. Returns ([high - low
    + 1] over low..high, the in-range mass before renormalising); all NaN and 0 when it is 0.
    """
    if not (0 <= low < high <= 99):
        raise ValueError(f"a score scale must be whole numbers 0 <= low < high <= 99, got [{low}, {high}]")
    first = np.asarray(first, dtype=np.float64)
    pmf = np.zeros(high - low + 1, dtype=np.float64)
    for digit in range(10):
        stops = first[digit]
        if digit and 10 * digit <= high:
            following = np.asarray(after[digit], dtype=np.float64)
            stops = first[digit] * max(0.0, 1.0 - float(following.sum()))
            for second in range(10):
                value = 10 * digit + second
                if low <= value <= high:
                    pmf[value - low] += first[digit] * following[second]
        if low <= digit <= high:
            pmf[digit - low] += stops
    total = float(pmf.sum())
    if total <= 0.0:
        return np.full_like(pmf, math.nan), 0.0
    return pmf / total, total
