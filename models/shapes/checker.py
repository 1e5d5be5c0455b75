"""The shapes domain's classical checker (GenEval-style, verifiable): does an image show what its
caption says? Image analysis only; no detector, no scipy or OpenCV. rewards/shapes_geneval.py
makes it a reward worker; the pretraining script evaluates with it.

For each image:
1. Background: the per-channel median colour (objects cover well under half of a scene), so a
   slightly tinted background from a generative model still reads as background.
2. Colour segmentation: each pixel is modelled as a blend `alpha * colour + (1 - alpha) * background`
   of one of the four reference colours. The colour whose blend line passes closest to the pixel
   wins; alpha says how much of the pixel it covers. Blending with the background (anti-aliasing,
   blur, VAE smoothing) therefore never flips a pixel to another colour, as nearest-colour
   matching does (half red on near-white is closer to yellow than to red).
   alpha < background_threshold -> background; a pixel far from every line -> "other" colour.
3. Connected components (4-connected, same colour), by min-label propagation with pointer jumping
   in numpy; components under min_area pixels are dropped as specks.
4. Shape by which corners of its bounding box are covered: all four (square), the bottom two
   (apex-up triangle) or none (circle); an elongated, sparse or upside-down one is no known shape.
5. Centroids for relations, compared with a small margin.

Clauses of a caption (models.shapes.scenes.caption_to_spec): one per requested (colour, shape) with its
exact count, one per relation (both objects present and the relation holds on centroids), and one
that nothing else is drawn (a caption describes the whole scene; without it a model could hedge by
drawing every shape).
strict = 1.0 if every clause holds else 0.0; partial = the fraction of clauses that hold.
A prompt that does not parse gives NaN for both (missing, never 0), counted in extras.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from models.shapes.scenes import COLOURS, Relation, Spec, caption_to_spec

COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
REFERENCE_COLOURS = np.array([COLOURS[name] for name in COLOUR_NAMES], dtype=np.float64)  # [4, 3]
OTHER = len(COLOUR_NAMES)  # class index of a foreground pixel that matches no reference colour
# Corner occupancy cut: measured circle corners <= 0.25 full, square and triangle-base corners >= 0.5.
CORNER_CUT = 0.375


@dataclass(frozen=True)
class Detection:
    colour: str | None  # None: foreground that matches no reference colour
    shape: str | None  # None: not recognisably a circle, square or triangle
    x: float  # centroid, px
    y: float  # centroid, px, y grows downwards
    area: int  # px


def classify_pixels(image: np.ndarray, background_threshold: float, colour_tolerance: float) -> np.ndarray:
    """[H, W] int: -1 background, 0..3 a reference colour, OTHER an unrecognised foreground colour."""
    pixels = image.astype(np.float64)
    background = np.median(pixels.reshape(-1, 3), axis=0)
    offsets = pixels - background  # [H, W, 3]
    directions = REFERENCE_COLOURS - background  # [4, 3]
    squared_lengths = (directions**2).sum(axis=1)  # [4]
    projections = offsets @ directions.T  # [H, W, 4]
    alphas = np.clip(projections / squared_lengths, 0.0, 1.0)  # [H, W, 4]
    # |offset - alpha * direction|^2 expanded, so no [H, W, 4, 3] array is built (speed).
    offset_sq = (offsets**2).sum(axis=-1, keepdims=True)  # [H, W, 1]
    residual_sq = offset_sq - 2.0 * alphas * projections + alphas**2 * squared_lengths  # [H, W, 4]
    best = residual_sq.argmin(axis=-1)
    best_alpha = np.take_along_axis(alphas, best[..., None], axis=-1)[..., 0]
    matched = np.take_along_axis(residual_sq, best[..., None], axis=-1)[..., 0] <= colour_tolerance**2
    classes = np.where(matched, best, OTHER)
    # A pixel far from every blend line but also far from the background is still foreground.
    far_from_background = offset_sq[..., 0] > colour_tolerance**2
    foreground = np.where(matched, best_alpha >= background_threshold, far_from_background)
    return np.where(foreground, classes, -1)


def label_components(classes: np.ndarray) -> np.ndarray:
    """[H, W] int component labels (-1 background) of 4-connected regions of equal class.

    Written by hand because the project depends on neither scipy nor OpenCV. Each pixel starts
    with its own flat index as label and repeatedly takes the smallest label of its same-class
    neighbours; labels only decrease and label[p] <= p, so label[label[p]] (pointer jumping) is
    a label of the same component and shortens the number of rounds to about log(diameter).
    """
    height, width = classes.shape
    foreground = classes >= 0
    sentinel = height * width
    labels = np.where(foreground, np.arange(height * width).reshape(height, width), sentinel)
    link_right = foreground[:, :-1] & (classes[:, :-1] == classes[:, 1:])  # [H, W-1]
    link_down = foreground[:-1, :] & (classes[:-1, :] == classes[1:, :])  # [H-1, W]
    while True:
        updated = labels.copy()
        pair_min = np.where(link_right, np.minimum(labels[:, :-1], labels[:, 1:]), sentinel)
        updated[:, :-1] = np.minimum(updated[:, :-1], pair_min)
        updated[:, 1:] = np.minimum(updated[:, 1:], pair_min)
        pair_min = np.where(link_down, np.minimum(labels[:-1, :], labels[1:, :]), sentinel)
        updated[:-1, :] = np.minimum(updated[:-1, :], pair_min)
        updated[1:, :] = np.minimum(updated[1:, :], pair_min)
        flat = updated.reshape(-1)
        inside = flat < sentinel
        flat[inside] = flat[flat[inside]]
        if np.array_equal(updated, labels):
            return np.where(foreground, labels, -1)
        labels = updated


def classify_shape(mask: np.ndarray) -> str | None:
    """Circle, square, triangle or None, from a component's boolean mask (its bounding-box crop).

    By corner occupancy: with the box mapped to [-1, 1]^2, the corners |u| + |v| > 1.4 lie wholly
    outside the inscribed circle, inside a square, and for an apex-up triangle only the bottom two
    are (partly) covered. Measured on 64 px renders, clean, with noise (std 8) and 3x3 blur: circle
    corners <= 0.25 full, square >= 0.5, triangle top 0 and bottom >= 0.5; the cut sits between.
    A fill-ratio rule (pi/4 against 1.0) was tried first and failed: one noisy edge column of a
    10 px square, or a blurred small triangle, moves the fill ratio across the cut."""
    height, width = mask.shape
    # Every shape of the domain has a square bounding box; a stretched or sparse one is none of them.
    if not 0.6 <= width / height <= 1.0 / 0.6 or mask.mean() < 0.35:
        return None
    rows, cols = np.mgrid[0:height, 0:width]
    u = (cols - (width - 1) / 2) / (width / 2)
    v = (rows - (height - 1) / 2) / (height / 2)  # grows downwards
    corners = np.abs(u) + np.abs(v) > 1.4
    top_full = mask[corners & (v < 0)].mean() > CORNER_CUT
    bottom_full = mask[corners & (v > 0)].mean() > CORNER_CUT
    if top_full and bottom_full:
        return "square"
    if bottom_full:
        return "triangle"
    if top_full:
        return None  # an upside-down triangle: not a shape of the domain
    return "circle"


def detect(image: np.ndarray, background_threshold: float = 0.5, min_area: int = 20, colour_tolerance: float = 60.0) -> list[Detection]:
    """The objects in one uint8 [H, W, 3] image."""
    classes = classify_pixels(image, background_threshold, colour_tolerance)
    labels = label_components(classes)
    ids, inverse, areas = np.unique(labels.reshape(-1), return_inverse=True, return_counts=True)
    ys, xs = np.divmod(np.arange(labels.size), labels.shape[1])
    detections = []
    for index, (label, area) in enumerate(zip(ids, areas)):
        if label < 0 or area < min_area:
            continue
        members = inverse == index
        x, y = xs[members], ys[members]
        crop = np.zeros((y.max() - y.min() + 1, x.max() - x.min() + 1), dtype=bool)
        crop[y - y.min(), x - x.min()] = True
        class_index = int(classes.reshape(-1)[label])
        detections.append(
            Detection(
                colour=COLOUR_NAMES[class_index] if class_index < OTHER else None,
                shape=classify_shape(crop),
                x=float(x.mean()),
                y=float(y.mean()),
                area=int(area),
            )
        )
    return detections


def relation_holds(relation: Relation, detections: list[Detection], margin_px: float) -> bool:
    """True when some detected subject and some detected reference stand in the relation."""
    subjects = [d for d in detections if (d.colour, d.shape) == relation.subject]
    references = [d for d in detections if (d.colour, d.shape) == relation.reference]
    for s in subjects:
        for r in references:
            if s is r:
                continue
            if relation.relation == "to the left of" and s.x < r.x - margin_px:
                return True
            if relation.relation == "to the right of" and s.x > r.x + margin_px:
                return True
            if relation.relation == "above" and s.y < r.y - margin_px:
                return True
            if relation.relation == "below" and s.y > r.y + margin_px:
                return True
    return False


class ShapesChecker:
    """Scores images against shapes captions: strict and partial, both in [0, 1], NaN for a caption that does not parse."""

    def __init__(
        self,
        background_threshold: float = 0.5,
        min_area: int = 20,
        colour_tolerance: float = 60.0,
        relation_margin_px: float = 2.0,
    ):
        if not 0.0 < background_threshold < 1.0:
            raise ValueError(f"background_threshold is a colour coverage in (0, 1), got {background_threshold}")
        if min_area < 1 or colour_tolerance <= 0 or relation_margin_px < 0:
            raise ValueError("min_area must be >= 1, colour_tolerance > 0 and relation_margin_px >= 0")
        self.background_threshold = background_threshold
        self.min_area = min_area  # px at the scored resolution; the smallest shape at 64 px covers ~50
        self.colour_tolerance = colour_tolerance  # RGB distance from a colour's blend line
        self.relation_margin_px = relation_margin_px  # at 64 px, scaled with the image width

    def clause_results(self, image: np.ndarray, spec: Spec) -> list[bool]:
        """One bool per clause of the spec (models.shapes.scenes.caption_to_spec)."""
        detections = detect(image, self.background_threshold, self.min_area, self.colour_tolerance)
        found = Counter((d.colour, d.shape) for d in detections)
        results = [found[pair] == count for pair, count in spec.counts.items()]
        margin = self.relation_margin_px * image.shape[1] / 64.0
        results += [relation_holds(relation, detections, margin) for relation in spec.relations]
        results.append(len(detections) == sum(spec.counts.values()))  # nothing unrequested drawn
        return results

    def score(self, images: np.ndarray, captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(strict, partial), each [B]: 1.0 if every clause holds else 0.0, and the fraction that hold."""
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"shapes_geneval scores RGB images [B, H, W, 3], got shape {images.shape}")
        strict = np.full(len(images), np.nan)
        partial = np.full(len(images), np.nan)
        for i, (image, caption) in enumerate(zip(images, captions)):
            try:
                spec = caption_to_spec(caption)
            except ValueError:
                continue  # not a shapes caption: missing (NaN)
            results = self.clause_results(image, spec)
            strict[i] = float(all(results))
            partial[i] = float(np.mean(results))
        return strict, partial
