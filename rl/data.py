"""Prompt files, editing data (JSONL rows of source image + instruction) and the per-epoch draw.
The draw is deterministic in (seed, epoch), so the data position of a run is its epoch number
and resuming needs nothing else."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image


class DataError(ValueError):
    """A prompt or edit file is missing or malformed; the message names the file and line."""


def read_prompts(path: str | Path) -> list[str]:
    """Non-empty lines of a text file, stripped."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"prompt file {path} does not exist; set data.train_prompts / data.eval_prompts")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"prompt file {path} is not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise DataError(f"prompt file {path} holds no prompts (one per line expected)")
    return prompts


def draw_prompt_indices(num_prompts: int, num_groups: int, *, seed: int, epoch: int) -> list[int]:
    """num_groups prompt indices for one epoch: walks shuffled passes over the prompt list, so
    every prompt is used once before any is used twice."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    stream: list[int] = []
    # A pass is shuffled independently; drawn per epoch, never carried across epochs.
    while len(stream) < num_groups:
        stream += torch.randperm(num_prompts, generator=generator).tolist()
    return stream[:num_groups]


@dataclass
class EditRow:
    image: Path  # the source image
    instruction: str
    metadata: dict


def read_edits(path: str | Path) -> list[EditRow]:
    """Rows `{"image": path, "instruction": str, ...}` of a JSONL file, image paths relative to
    the file. Every row is checked (JSON, keys, the image opens, a non-empty instruction) and the
    first bad one is reported with its line number, before any model loads."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"edit file {path} does not exist; set data.train_edits / data.eval_edits")
    rows = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"edit file {path} is not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: not valid JSON ({err.msg}); each line must be one JSON object") from err
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object with \"image\" and \"instruction\"")
        image, instruction = record.get("image"), record.get("instruction")
        if not isinstance(image, str) or not image:
            raise DataError(f"{where}: missing \"image\" (a path relative to {path.parent})")
        if not isinstance(instruction, str) or not instruction.strip():
            raise DataError(f"{where}: empty or missing \"instruction\"")
        image_path = Path(image) if Path(image).is_absolute() else path.parent / image
        if not image_path.is_file():
            raise DataError(f"{where}: image {image_path} does not exist")
        try:
            with Image.open(image_path) as opened:
                opened.verify()
        except (OSError, SyntaxError) as err:
            raise DataError(f"{where}: image {image_path} cannot be read as an image ({err})") from err
        metadata = {k: v for k, v in record.items() if k not in ("image", "instruction")}
        rows.append(EditRow(image_path, instruction.strip(), metadata))
    if not rows:
        raise DataError(f"edit file {path} holds no rows")
    return rows


def load_source_image(path: Path, size: tuple[int, int]) -> np.ndarray:
    """The source image as uint8 [height, width, 3] for size = (height, width): the largest
    centred crop of the target's aspect ratio, resized."""
    height, width = size
    with Image.open(path) as opened:
        image = opened.convert("RGB")
    # The crop keeps the target's aspect: as wide as the image allows, or as tall.
    crop_width = min(image.width, round(image.height * width / height))
    crop_height = min(image.height, round(image.width * height / width))
    left, top = (image.width - crop_width) // 2, (image.height - crop_height) // 2
    image = image.crop((left, top, left + crop_width, top + crop_height)).resize((width, height), Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.uint8)


@dataclass
class Item:
    """One group's input: a prompt, or an editing instruction with its source image."""

    text: str
    source: Path | None = None


def read_items(prompts: str | None = None, edits: str | None = None) -> list[Item]:
    if edits:
        return [Item(row.instruction, row.image) for row in read_edits(edits)]
    return [Item(text) for text in read_prompts(prompts)]
