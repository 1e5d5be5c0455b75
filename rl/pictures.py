"""Pictures that explain themselves: grids of evaluation images with a label on every row (the base
model, then each run), the prompt over every column, and each image framed pass (green) or fail
(red) by a verifiable reward, with the word written under it, so the picture reads without the
README. Used for a run's before_after.png and a sweep's comparison.png."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PASS, FAIL, UNKNOWN = (20, 140, 50), (200, 30, 30), (140, 140, 140)
INK, PAPER = (20, 20, 20), (255, 255, 255)


@dataclass
class Row:
    label: str
    images: np.ndarray  # [N, H, W, 3] uint8, one per column
    passes: np.ndarray | None = None  # [N]: 1 pass, 0 fail, NaN not scored; None: no marks


def _font(size: int):
    return ImageFont.load_default(size=size)


def _wrap(text: str, font, width: int) -> list[str]:
    """Greedy word wrap to `width` pixels (a word longer than a line stays whole)."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split():
            trial = f"{line} {word}".strip()
            if line and font.getlength(trial) > width:
                lines.append(line)
                line = word
            else:
                line = trial
        lines.append(line)
    return lines


def verdicts(passes: np.ndarray | None, count: int) -> list[str | None]:
    """'pass' / 'fail' / 'not scored' per image; None everywhere when there are no marks."""
    if passes is None:
        return [None] * count
    return ["not scored" if not np.isfinite(p) else "pass" if p >= 0.5 else "fail" for p in np.asarray(passes, dtype=float)]


def labelled_grid(rows: list[Row], captions: list[str], *, title: str = "", pass_name: str | None = None,
                  columns: int = 8, scale: int = 2) -> tuple[Image.Image, list[list[tuple[int, int, int, int]]]]:
    """Rows of images under their column captions, in blocks of `columns` prompts; each row's label
    on its left (with how many of its images pass, when marked); `title` and a legend on top.
    Returns the picture and, per row and column, the (left, top, right, bottom) box of the image
    inside its frame (images are scaled up `scale` times, nearest neighbour)."""
    count = len(captions)
    if any(len(row.images) != count for row in rows):
        raise ValueError("every row needs one image per caption")
    height, width = rows[0].images.shape[1] * scale, rows[0].images.shape[2] * scale
    frame, gap, label_width = 3, 6, 170
    cell = width + 2 * frame
    text, small = _font(12), _font(11)
    line_height = 14
    columns = max(1, min(columns, count))
    blocks = math.ceil(count / columns)
    caption_lines = [_wrap(c, small, cell) for c in captions]
    marked = any(row.passes is not None for row in rows)
    mark_height = line_height if marked else 0
    row_height = height + 2 * frame + mark_height + gap

    header = [title] if title else []
    if marked:
        header.append(f"frame and word under each image: green = passes {pass_name or 'the check'}, red = fails")
    header_height = line_height * len(header) + (gap if header else 0)
    block_caption_heights = [line_height * max(len(caption_lines[i]) for i in range(b * columns, min(count, (b + 1) * columns)))
                             for b in range(blocks)]
    total_height = header_height + sum(h + gap + row_height * len(rows) + gap for h in block_caption_heights) + gap
    total_width = label_width + columns * (cell + gap) + gap
    canvas = Image.new("RGB", (total_width, total_height), PAPER)
    draw = ImageDraw.Draw(canvas)
    y = gap
    for line in header:
        draw.text((gap, y), line, fill=INK, font=text)
        y += line_height
    labels = []
    for row in rows:
        label = row.label
        if row.passes is not None:
            marks = verdicts(row.passes, count)
            label += f"\n{marks.count('pass')}/{count} shown pass"
        labels.append(_wrap(label, text, label_width - gap))
    boxes: list[list[tuple[int, int, int, int]]] = [[] for _ in rows]
    for b in range(blocks):
        first, last = b * columns, min(count, (b + 1) * columns)
        for j in range(first, last):
            x = label_width + (j - first) * (cell + gap)
            for k, line in enumerate(caption_lines[j]):
                draw.text((x, y + k * line_height), line, fill=INK, font=small)
        y += block_caption_heights[b] + gap
        for r, (row, label) in enumerate(zip(rows, labels)):
            for k, line in enumerate(label):
                draw.text((gap, y + k * line_height), line, fill=INK, font=text)
            marks = verdicts(row.passes, count)
            for j in range(first, last):
                x = label_width + (j - first) * (cell + gap)
                mark = marks[j]
                colour = PAPER if mark is None else PASS if mark == "pass" else FAIL if mark == "fail" else UNKNOWN
                draw.rectangle([x, y, x + cell - 1, y + height + 2 * frame - 1], fill=colour)
                image = Image.fromarray(np.asarray(row.images[j], dtype=np.uint8)).resize((width, height), Image.NEAREST)
                canvas.paste(image, (x + frame, y + frame))
                boxes[r].append((x + frame, y + frame, x + frame + width, y + frame + height))
                if mark is not None:
                    draw.text((x, y + height + 2 * frame), mark, fill=colour, font=small)
            y += row_height
        y += gap
    return canvas, boxes
