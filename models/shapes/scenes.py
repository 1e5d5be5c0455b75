"""A procedural shapes domain: small coloured circles, squares and triangles on a light background.

It exists so that a tiny text-to-image model can be pretrained and then RL-tuned against a reward
that is verifiable (rewards/shapes_geneval.py), GenEval-style, in minutes on a CPU or one GPU.

- Scenes hold 1 to 4 non-overlapping objects; `render` draws them at any size (64 px by default).
- Captions come from four templates (the four `kind`s):
    single    "a red circle"
    counting  "three blue squares"
    binding   "a red circle and a green triangle"
    relation  "a yellow square to the left of a blue circle" (also right of / above / below)
  A caption describes the whole scene: nothing is drawn that the caption does not name.
- `caption_to_spec` parses any generated caption back into clauses (counts and relations).
- `split_prompts` splits the whole caption space into disjoint train and held-out sets.

Everything is pure numpy + PIL and deterministic given the numpy Generator passed in.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Well separated in RGB and each far from the background, so a classical checker can tell them
# apart even after a VAE round trip, noise or a slight blur.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 50, 50),
    "green": (40, 160, 70),
    "blue": (50, 80, 220),
    "yellow": (230, 200, 40),
}
BACKGROUND: tuple[int, int, int] = (240, 240, 235)
KINDS: tuple[str, ...] = ("single", "counting", "binding", "relation")
RELATIONS: tuple[str, ...] = ("to the left of", "to the right of", "above", "below")
NUMBER_WORDS: dict[int, str] = {2: "two", 3: "three", 4: "four"}

CANVAS_PX = 64.0  # object coordinates and sizes are in pixels of a 64 px canvas
MARGIN_PX = 3.0  # free border around the canvas edge
GAP_PX = 3.0  # free space between the bounding circles of two objects
MIN_SIZE_PX = 10  # smaller shapes lose their shape (fill ratio) at 64 px
# Larger scenes get smaller objects so that four of them still fit without overlap.
MAX_SIZE_PX = {1: 18, 2: 18, 3: 16, 4: 14}
# Relations are drawn with a clear separation along their axis so that a checker comparing
# centroids with a small margin is never at the edge; a triangle's centroid sits size/6 below its
# box centre, at most 3 px here.
RELATION_SEPARATION_PX = 14.0
SUPERSAMPLE = 4  # anti-aliased edges, closer to what a generative model draws


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    cx: float  # box centre, px on a 64 px canvas
    cy: float  # box centre, px on a 64 px canvas, y grows downwards
    size: float  # box side, px on a 64 px canvas


@dataclass
class Scene:
    objects: list[Obj]
    caption: str
    kind: str


@dataclass(frozen=True)
class Relation:
    subject: tuple[str, str]  # (colour, shape)
    relation: str  # one of RELATIONS
    reference: tuple[str, str]  # (colour, shape)


@dataclass
class Spec:
    """What a caption asks for: exact counts per (colour, shape), and pairwise relations."""

    kind: str
    counts: dict[tuple[str, str], int]
    relations: list[Relation] = field(default_factory=list)


# ---------------------------------------------------------------- captions


def _noun(colour: str, shape: str) -> str:
    return f"a {colour} {shape}"


def _caption(kind: str, pairs: list[tuple[str, str]], relation: str | None = None) -> str:
    if kind == "single":
        return _noun(*pairs[0])
    if kind == "counting":
        colour, shape = pairs[0]
        return f"{NUMBER_WORDS[len(pairs)]} {colour} {shape}s"
    if kind == "binding":
        return f"{_noun(*pairs[0])} and {_noun(*pairs[1])}"
    if kind == "relation":
        return f"{_noun(*pairs[0])} {relation} {_noun(*pairs[1])}"
    raise ValueError(f"unknown scene kind {kind!r}; expected one of {KINDS}")


_C = "(" + "|".join(COLOURS) + ")"
_S = "(" + "|".join(SHAPES) + ")"
_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("relation", re.compile(rf"^a {_C} {_S} ({'|'.join(RELATIONS)}) a {_C} {_S}$")),
    ("binding", re.compile(rf"^a {_C} {_S} and a {_C} {_S}$")),
    ("counting", re.compile(rf"^({'|'.join(NUMBER_WORDS.values())}) {_C} {_S}s$")),
    ("single", re.compile(rf"^a {_C} {_S}$")),
)
_WORD_NUMBERS = {word: number for number, word in NUMBER_WORDS.items()}


def caption_to_spec(caption: str) -> Spec:
    """Parse a caption of one of the four templates; raise ValueError naming it otherwise."""
    text = " ".join(caption.lower().strip().rstrip(".").split())
    for kind, pattern in _PATTERNS:
        match = pattern.match(text)
        if match is None:
            continue
        groups = match.groups()
        if kind == "single":
            return Spec(kind, {(groups[0], groups[1]): 1})
        if kind == "counting":
            return Spec(kind, {(groups[1], groups[2]): _WORD_NUMBERS[groups[0]]})
        if kind == "binding":
            counts: dict[tuple[str, str], int] = {}
            for pair in ((groups[0], groups[1]), (groups[2], groups[3])):
                counts[pair] = counts.get(pair, 0) + 1
            return Spec(kind, counts)
        subject, reference = (groups[0], groups[1]), (groups[3], groups[4])
        counts = {subject: 1}
        counts[reference] = counts.get(reference, 0) + 1
        return Spec(kind, counts, [Relation(subject, groups[2], reference)])
    raise ValueError(
        f"cannot parse shapes caption {caption!r}: expected e.g. 'a red circle', 'three blue squares', "
        "'a red circle and a green triangle' or 'a yellow square to the left of a blue circle'"
    )


def all_captions() -> list[str]:
    """Every caption the generator can produce (588), in a fixed order."""
    pairs = [(colour, shape) for colour in COLOURS for shape in SHAPES]
    captions = [_caption("single", [pair]) for pair in pairs]
    captions += [_caption("counting", [pair] * n) for pair in pairs for n in NUMBER_WORDS]
    distinct = [(a, b) for a in pairs for b in pairs if a[0] != b[0]]  # two objects differ in colour
    captions += [_caption("binding", [a, b]) for a, b in distinct]
    captions += [_caption("relation", [a, b], relation) for a, b in distinct for relation in RELATIONS]
    return captions


# ---------------------------------------------------------------- scenes


def _relation_holds(subject: Obj, reference: Obj, relation: str, separation: float) -> bool:
    if relation == "to the left of":
        return subject.cx <= reference.cx - separation
    if relation == "to the right of":
        return subject.cx >= reference.cx + separation
    if relation == "above":
        return subject.cy <= reference.cy - separation
    return subject.cy >= reference.cy + separation


def _place(rng: np.random.Generator, pairs: list[tuple[str, str]], relation: str | None) -> list[Obj] | None:
    """Rejection-sample non-overlapping positions; None when this draw of sizes does not fit."""
    max_size = MAX_SIZE_PX[len(pairs)]
    sizes = rng.integers(MIN_SIZE_PX, max_size + 1, size=len(pairs)).astype(float)
    placed: list[Obj] = []
    for (colour, shape), size in zip(pairs, sizes):
        low, high = MARGIN_PX + size / 2, CANVAS_PX - MARGIN_PX - size / 2
        for _ in range(200):
            candidate = Obj(shape, colour, float(rng.uniform(low, high)), float(rng.uniform(low, high)), float(size))
            # Bounding circles (half the box diagonal) keep every shape, rotated or not, apart.
            clear = all(
                np.hypot(candidate.cx - other.cx, candidate.cy - other.cy)
                >= (candidate.size + other.size) / 2 * np.sqrt(2) + GAP_PX
                for other in placed
            )
            if clear and (relation is None or not placed or _relation_holds(candidate, placed[0], relation, RELATION_SEPARATION_PX)):
                placed.append(candidate)
                break
        else:
            return None
    if relation is not None:
        # Placement drew the reference first; the caption names the subject first.
        return [placed[1], placed[0]]
    return placed


def scene_from_caption(caption: str, rng: np.random.Generator) -> Scene:
    """A random scene that satisfies `caption` (for pretraining data on a fixed prompt set)."""
    spec = caption_to_spec(caption)
    if spec.relations:
        relation = spec.relations[0]
        pairs, relation_name = [relation.reference, relation.subject], relation.relation
    else:
        pairs = [pair for pair, count in spec.counts.items() for _ in range(count)]
        relation_name = None
    for _ in range(100):
        objects = _place(rng, pairs, relation_name)
        if objects is not None:
            return Scene(objects, caption, spec.kind)
    raise RuntimeError(f"could not place the objects of {caption!r} without overlap")


def sample_scene(rng: np.random.Generator) -> Scene:
    """A random scene; the four kinds are equally likely (relations would dominate the caption space)."""
    kind = KINDS[int(rng.integers(len(KINDS)))]
    colours, shapes = list(COLOURS), list(SHAPES)

    def pair() -> tuple[str, str]:
        return colours[int(rng.integers(len(colours)))], shapes[int(rng.integers(len(shapes)))]

    first = pair()
    if kind == "single":
        caption = _caption(kind, [first])
    elif kind == "counting":
        caption = _caption(kind, [first] * int(rng.integers(2, 5)))
    else:
        second = pair()
        while second[0] == first[0]:
            second = pair()
        relation = RELATIONS[int(rng.integers(len(RELATIONS)))] if kind == "relation" else None
        caption = _caption(kind, [first, second], relation)
    return scene_from_caption(caption, rng)


def render(scene: Scene, size: int = 64) -> np.ndarray:
    """The scene as uint8 [size, size, 3], anti-aliased by drawing at SUPERSAMPLE x and averaging."""
    scale = SUPERSAMPLE * size / CANVAS_PX
    canvas = Image.new("RGB", (SUPERSAMPLE * size, SUPERSAMPLE * size), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for obj in scene.objects:
        half = obj.size / 2 * scale
        cx, cy = obj.cx * scale, obj.cy * scale
        fill = COLOURS[obj.colour]
        if obj.shape == "circle":
            draw.ellipse([cx - half, cy - half, cx + half, cy + half], fill=fill)
        elif obj.shape == "square":
            draw.rectangle([cx - half, cy - half, cx + half, cy + half], fill=fill)
        elif obj.shape == "triangle":
            draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=fill)
        else:
            raise ValueError(f"unknown shape {obj.shape!r}; expected one of {SHAPES}")
    return np.asarray(canvas.resize((size, size), Image.Resampling.BOX), dtype=np.uint8)


# ---------------------------------------------------------------- prompt sets


def make_prompts(n: int, seed: int) -> list[str]:
    """`n` captions drawn like `sample_scene` draws them (kinds balanced, repeats allowed)."""
    rng = np.random.default_rng(seed)
    return [sample_scene(rng).caption for _ in range(n)]


def _content_key(caption: str) -> tuple:
    """Captions that say the same thing in other words share a key, so a split cannot leak them:
    'a red circle and a blue square' == 'a blue square and a red circle', and
    'A left of B' == 'B right of A' (likewise above / below)."""
    spec = caption_to_spec(caption)
    counts = tuple(sorted(spec.counts.items()))
    if not spec.relations:
        return (spec.kind, counts)
    relation = spec.relations[0]
    flipped = {"to the right of": "to the left of", "below": "above"}
    if relation.relation in flipped:
        return (spec.kind, counts, relation.reference, flipped[relation.relation], relation.subject)
    return (spec.kind, counts, relation.subject, relation.relation, relation.reference)


def split_prompts(seed: int, held_out_fraction: float = 0.15) -> tuple[list[str], list[str]]:
    """Split every caption into (train, held_out), disjoint in content, not only in wording."""
    if not 0.0 < held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction must be in (0, 1), got {held_out_fraction}")
    groups: dict[tuple, list[str]] = {}
    for caption in all_captions():
        groups.setdefault(_content_key(caption), []).append(caption)
    keys = list(groups)
    order = np.random.default_rng(seed).permutation(len(keys))
    num_held_out = max(1, int(round(held_out_fraction * len(keys))))
    held_keys = {keys[i] for i in order[:num_held_out]}
    train = [c for key in keys if key not in held_keys for c in groups[key]]
    held_out = [c for key in keys if key in held_keys for c in groups[key]]
    return train, held_out


def balanced_prompts(captions: list[str], lines_per_kind: int = 16) -> list[str]:
    """A prompt list in which every kind has `lines_per_kind` lines, cycling through that
    kind's captions in order (GenEval style: each task weighs the same in the overall score).

    Relation captions outnumber the others ~8:1 in any split of the caption space, so a plain
    list would measure little but relations. A caption listed twice is sampled with other noise.
    """
    by_kind: dict[str, list[str]] = {}
    for caption in captions:
        by_kind.setdefault(caption_to_spec(caption).kind, []).append(caption)
    lines = []
    for kind in KINDS:
        options = by_kind.get(kind, [])
        if not options:
            raise ValueError(f"no {kind!r} caption to evaluate on")
        if len(options) > lines_per_kind:  # spread the pick over the whole list
            options = [options[i * len(options) // lines_per_kind] for i in range(lines_per_kind)]
        lines += [options[i % len(options)] for i in range(lines_per_kind)]
    return lines
