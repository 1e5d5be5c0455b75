"""Pictures that explain themselves: each image where its box says, framed green when it passes and
red when it fails, a grey frame for an image the check could not score, and text drawn for the
labels and captions."""

from __future__ import annotations

import numpy as np
import pytest

from models.shapes.scenes import BACKGROUND, render, sample_scene
from rl.pictures import FAIL, PASS, UNKNOWN, Row, labelled_grid, verdicts


def scenes(count: int, seed: int):
    rng = np.random.default_rng(seed)
    drawn = [sample_scene(rng) for _ in range(count)]
    return np.stack([render(s) for s in drawn]), [s.caption for s in drawn]


def test_each_image_sits_in_its_box_framed_by_its_verdict():
    images, captions = scenes(10, seed=0)
    blank = np.full_like(images, BACKGROUND, dtype=np.uint8)
    # Ground truth from the generator: a render of the caption's own scene is right, a blank canvas is not.
    rows = [Row("renders", images, np.ones(10)), Row("blank canvases", blank, np.zeros(10)),
            Row("half scored", images, np.array([1.0, np.nan] * 5)), Row("no marks", images)]
    picture, boxes = labelled_grid(rows, captions, title="test", pass_name="strict", columns=4, scale=2)
    pixels = np.asarray(picture)
    assert len(boxes) == 4 and all(len(b) == 10 for b in boxes)
    expected_frames = [[PASS] * 10, [FAIL] * 10, [PASS, UNKNOWN] * 5, [None] * 10]
    for r, row in enumerate(rows):
        for c, (left, top, right, bottom) in enumerate(boxes[r]):
            inside = pixels[top:bottom, left:right]
            assert inside.shape == (128, 128, 3)
            np.testing.assert_array_equal(inside[::2, ::2], row.images[c])  # nearest-neighbour x2
            frame = tuple(pixels[top - 1, left - 1])
            assert frame == (expected_frames[r][c] or (255, 255, 255)), (r, c, frame)
    # 10 prompts in columns of 4: three blocks of rows, the last with two columns.
    tops = sorted({box[1] for box in boxes[0]})
    assert len(tops) == 3 and len({box[0] for box in boxes[0]}) == 4
    # Labels and captions are drawn: dark ink left of the images and above the first row.
    first_left = min(box[0] for box in boxes[0])
    assert (pixels[:, : first_left - 4] < 100).all(axis=2).sum() > 200
    assert (pixels[tops[0] - 14 : tops[0] - 4, first_left:] < 100).all(axis=2).sum() > 50


def test_verdicts_read_scores_as_pass_fail_or_not_scored():
    assert verdicts(np.array([1.0, 0.0, np.nan, 0.5, 0.49]), 5) == ["pass", "fail", "not scored", "pass", "fail"]
    assert verdicts(None, 3) == [None, None, None]


def test_rows_must_match_the_captions():
    images, captions = scenes(3, seed=1)
    with pytest.raises(ValueError, match="one image per caption"):
        labelled_grid([Row("a", images[:2])], captions)
