"""Rubrics: a judge preset as a file. A rubric names the questions put to a vision-language
judge (their images and text), the scores each reply states, the scale they are on, and how the
reported components are made of them (VIEScore's overall is the geometric mean of SC and PQ, each
the min of its scores). Pure: reading rubric files, reading scores out of replies, and the
arithmetic of score distributions; no model and no HTTP.

A rubric file is YAML (read with the safe loader: nothing in it executes)::

    name: viescore
    source: "VIEScore (Ku et al., ACL 2024), arXiv 2312.14867"
    model: Qwen/Qwen2.5-VL-7B-Instruct     # the default judge checkpoint
    task: generation                       # the text field is {prompt}; editing: {instruction}
    reply: json_list                       # '"score": [7, 4]' (or labeled: "Final Score: 4")
    scale: [0, 10]                         # what the judge writes
    report_scale: [0, 10]                  # what the worker reports (optional, default scale)
    questions:
      SC:
        images: [generated]                # editing: source and/or edited, in the order shown
        text: "... {prompt} ..."           # a str.format template: literal braces doubled
        scores: [{name: prompt_following}] # labeled replies give each a label: "Final Score"
    components:
      SC: {reduce: min, of: [prompt_following]}
      overall: {reduce: geometric_mean, of: [SC, PQ]}
"""

from __future__ import annotations

import itertools
import math
import os
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

__all__ = [
    "Discrete",
    "Rubric",
    "SlotReading",
    "check_template",
    "load_rubric",
    "read_slots",
    "reduce_discrete",
    "reduce_values",
]

RUBRIC_DIR = Path(__file__).resolve().parent.parent / "templates"
_TASK_FIELDS = {"generation": ("prompt",), "editing": ("instruction",)}
_TASK_IMAGES = {"generation": {"generated"}, "editing": {"source", "edited"}}


def template_fields(text: str, where: str) -> set[str]:
    """The str.format fields a template uses; a malformed template fails naming `where`."""
    try:
        return {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}
    except ValueError as err:
        raise ValueError(f"{where} is not a valid str.format template ({err}); double literal braces: {{{{ }}}}") from err


def _fields_text(fields: Sequence[str]) -> str:
    return ", ".join("{" + field + "}" for field in sorted(fields)) or "no fields"


def check_template(text: str, fields: Sequence[str], where: str) -> None:
    """Raise unless `text` is a str.format template using exactly `fields`: a rubric that
    omitted the prompt would grade every image against nothing."""
    used = template_fields(text, where)
    if used != set(fields):
        raise ValueError(f"{where} must use {_fields_text(fields)}, found {_fields_text(used)}; double literal braces: {{{{ }}}}")


# --------------------------------------------------------------------------------------------
# The rubric file
# --------------------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Slot(_Strict):
    """One score a reply states."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z][A-Za-z0-9_]*$")]
    label: str | None = None
    """labeled replies: the words before the number ("Final Score" reads "Final Score: 4")."""


class Question(_Strict):
    """One request per sample: its images in order, its text, the scores its reply states."""

    images: Annotated[list[Literal["generated", "source", "edited"]], Field(min_length=1)]
    text: str
    scores: Annotated[list[Slot], Field(min_length=1)]


class Component(_Strict):
    """A reported score: `reduce` over scores or earlier components."""

    reduce: Literal["min", "mean", "geometric_mean"]
    of: Annotated[list[str], Field(min_length=1)]


class Rubric(_Strict):
    name: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$")]
    source: str
    """The paper or code the rubric follows."""
    model: str
    """The default judge checkpoint."""
    task: Literal["generation", "editing"]
    reply: Literal["json_list", "labeled"]
    scale: tuple[int, int]
    report_scale: tuple[float, float] | None = None
    questions: Annotated[dict[str, Question], Field(min_length=1)]
    components: Annotated[dict[str, Component], Field(min_length=1)]

    @model_validator(mode="after")
    def _consistent(self) -> Rubric:
        low, high = self.scale
        if not (0 <= low < high <= 99):
            raise ValueError(f"scale must be whole numbers 0 <= low < high <= 99, got {list(self.scale)}")
        if self.report_scale is not None and not self.report_scale[0] < self.report_scale[1]:
            raise ValueError(f"report_scale must be [low, high] with low < high, got {list(self.report_scale)}")
        if self.report_scale is not None and self.report_scale[0] < 0 and any(c.reduce == "geometric_mean" for c in self.components.values()):
            raise ValueError("a geometric_mean needs a report_scale that is not negative")
        known: set[str] = set()
        fields = set(_TASK_FIELDS[self.task])
        used: set[str] = set()
        for question_name, question in self.questions.items():
            stray = set(question.images) - _TASK_IMAGES[self.task]
            if stray:
                raise ValueError(f"question {question_name}: a {self.task} rubric shows {sorted(_TASK_IMAGES[self.task])} images, not {sorted(stray)}")
            question_fields = template_fields(question.text, f"question {question_name}'s text")
            if not question_fields <= fields:
                raise ValueError(f"question {question_name}'s text may use {_fields_text(fields)}, found {_fields_text(question_fields)}; "
                                 "double literal braces: {{ }}")
            used |= question_fields
            for slot in question.scores:
                if slot.name in known:
                    raise ValueError(f"score {slot.name!r} is named twice")
                if self.reply == "labeled" and not slot.label:
                    raise ValueError(f"question {question_name}, score {slot.name}: a labeled reply needs a label (the words before the number)")
                known.add(slot.name)
        if used != fields:
            raise ValueError(f"no question's text uses {_fields_text(fields)}: the judge would grade against nothing")
        for component_name, component in self.components.items():
            unknown = [name for name in component.of if name not in known]
            if unknown:
                raise ValueError(f"component {component_name}: {unknown} is neither a score nor an earlier component")
            if component_name in known:
                raise ValueError(f"component {component_name!r} has the name of a score or an earlier component")
            known.add(component_name)
        return self

    @property
    def slots(self) -> list[str]:
        return [slot.name for question in self.questions.values() for slot in question.scores]

    def report(self, value: float | np.ndarray) -> float | np.ndarray:
        """A value on the judge's scale moved linearly onto the report scale."""
        if self.report_scale is None:
            return value
        (low, high), (to_low, to_high) = self.scale, self.report_scale
        return to_low + (value - low) * (to_high - to_low) / (high - low)


def load_rubric(rubric: str | os.PathLike[str]) -> Rubric:
    """A preset by name (rewards/templates/<name>.yaml) or a rubric file; a bad file fails
    naming the file and the field."""
    text = str(rubric)
    presets = sorted(path.stem for path in RUBRIC_DIR.glob("*.yaml"))
    path = RUBRIC_DIR / f"{text}.yaml" if re.fullmatch(r"[a-z][a-z0-9_]*", text) else Path(text)
    if not path.is_file():
        raise FileNotFoundError(f"rubric {text!r} is neither a preset ({', '.join(presets)}) nor a file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ValueError(f"rubric {path} is not valid YAML: {err}") from err
    try:
        return Rubric.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "(top level)"
        raise ValueError(f"rubric {path}: {where}: {first['msg']}") from err


# --------------------------------------------------------------------------------------------
# Reading the scores a reply states
# --------------------------------------------------------------------------------------------

_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")
# '"score": [7, 4]', "'score' : ['7', '4']", 'score: [7]' (the list a VIEScore-style reply holds)
_SCORE_LIST = re.compile(r"""["']?\bscores?["']?\s*:\s*\[(?P<items>[^\[\]]*)\]""", re.IGNORECASE)
# '"score": 7' for a one-score question
_SCORE_SCALAR = re.compile(r"""["']?\bscores?["']?\s*:\s*["']?(?P<value>[-+]?\d+(?:\.\d+)?)""", re.IGNORECASE)
# A stated scale after a label: "Final Score (1-5): 4"
_STATED_SCALE = r"(?:\s*\(\s*(?P<low>\d+)\s*(?:-|\u2013|to)\s*(?P<high>\d+)\s*\))?"


@dataclass(frozen=True)
class SlotReading:
    value: float  # on the judge's scale; NaN when the reply states none, or one off the scale
    start: int  # where its first digit is in the reply; -1 when it states none


_MISSING = SlotReading(math.nan, -1)


def _on_scale(value: float, start: int, scale: tuple[int, int]) -> SlotReading:
    return SlotReading(value if scale[0] <= value <= scale[1] else math.nan, start)


def _json_list_slots(reply: str, count: int, scale: tuple[int, int]) -> list[SlotReading]:
    """The last score list in the reply, one number per slot in order. A list with another
    number of entries, or with an entry that is not a number, is ambiguous: every slot NaN."""
    lists = list(_SCORE_LIST.finditer(reply))
    if not lists:
        scalars = list(_SCORE_SCALAR.finditer(reply)) if count == 1 else []
        if not scalars:
            return [_MISSING] * count
        match = scalars[-1]
        return [_on_scale(float(match.group("value")), match.start("value"), scale)]
    match = lists[-1]
    items = match.group("items").split(",") if match.group("items").strip() else []
    readings = []
    offset = match.start("items")
    for item in items:
        number = _NUMBER.fullmatch(item.strip().strip("\"'").strip())
        if number is None:
            return [_MISSING] * count
        start = offset + item.index(number.group(0))
        readings.append(_on_scale(float(number.group(0)), start, scale))
        offset += len(item) + 1
    return readings if len(readings) == count else [_MISSING] * count


def _labeled_slot(reply: str, label: str, scale: tuple[int, int]) -> SlotReading:
    """The number after the last "<label>:" (or "<label> (1-5):", "**<label>:** 4"); a stated
    scale other than the rubric's makes it unusable."""
    pattern = re.compile(
        rf"(?<![A-Za-z]){re.escape(label)}{_STATED_SCALE}\s*\**\s*[:=]\s*\**\s*[\"']?(?P<value>[-+]?\d+(?:\.\d+)?)",
        re.IGNORECASE,
    )
    matches = list(pattern.finditer(reply))
    if not matches:
        return _MISSING
    match = matches[-1]
    if match.group("high") is not None and (int(match.group("low")), int(match.group("high"))) != tuple(scale):
        return SlotReading(math.nan, match.start("value"))
    return _on_scale(float(match.group("value")), match.start("value"), scale)


def read_slots(reply: str, rubric: Rubric, question: str) -> list[SlotReading]:
    """The scores one reply to `question` states, in the order of its slots; NaN (never 0) for
    each one it does not state or states off the scale. The last statement wins: judges that
    reason first conclude last."""
    slots = rubric.questions[question].scores
    if not isinstance(reply, str) or not reply.strip():
        return [_MISSING] * len(slots)
    if rubric.reply == "json_list":
        return _json_list_slots(reply, len(slots), rubric.scale)
    return [_labeled_slot(reply, slot.label or slot.name, rubric.scale) for slot in slots]


# --------------------------------------------------------------------------------------------
# Combining scores, as numbers and as distributions
# --------------------------------------------------------------------------------------------


def _reduce(kind: str, values: np.ndarray, axis: int) -> np.ndarray:
    if kind == "min":
        return values.min(axis=axis)  # NaN propagates: a missing score leaves the min undefined
    if kind == "mean":
        return values.mean(axis=axis)
    return np.prod(values, axis=axis) ** (1.0 / values.shape[axis])  # geometric mean; scores are not negative


def reduce_values(kind: str, values: Sequence[float]) -> float:
    """min, mean or geometric mean of scores; NaN when any is NaN."""
    array = np.asarray(values, dtype=np.float64)
    if np.isnan(array).any():
        return math.nan
    return float(_reduce(kind, array[None, :], axis=1)[0])


@dataclass(frozen=True)
class Discrete:
    """A score distribution: probabilities over distinct values; NaN probabilities = no score."""

    values: np.ndarray
    probs: np.ndarray

    @property
    def defined(self) -> bool:
        return bool(np.isfinite(self.probs).all())

    def moments(self) -> tuple[float, float]:
        if not self.defined:
            return math.nan, math.nan
        mean = float(self.probs @ self.values)
        return mean, float(self.probs @ (self.values - mean) ** 2)


def reduce_discrete(kind: str, parts: Sequence[Discrete]) -> Discrete:
    """The distribution of min / mean / geometric mean of independent scores, by enumerating
    every combination of their values (a handful of scores on scales of at most 100 values)."""
    if not all(part.defined for part in parts):
        return Discrete(np.array([0.0]), np.array([math.nan]))
    values = np.array(list(itertools.product(*(part.values for part in parts))), dtype=np.float64)
    probs = np.prod(np.array(list(itertools.product(*(part.probs for part in parts))), dtype=np.float64), axis=1)
    combined = _reduce(kind, values, axis=1)
    unique, inverse = np.unique(combined, return_inverse=True)
    return Discrete(unique, np.bincount(inverse.ravel(), weights=probs, minlength=len(unique)))
