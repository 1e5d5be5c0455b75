"""Write the small synthetic editing set used by configs/tiny_edit_cpu.yaml and the tests:
64x64 scenes of soft colour fields and a few rectangles, each paired with an instruction the
`edit_color` reward can check (brighter, darker, more red / green / blue).

    python launch/make_tiny_edits.py [OUT_DIR]    (default configs/data/tiny_edits)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

INSTRUCTIONS = ("make the image brighter", "make it darker", "add more red", "make it greener", "give it more blue")


def scene(rng: np.random.Generator, size: int = 64) -> np.ndarray:
    corners = rng.uniform(50, 170, size=(2, 2, 3))
    image = np.asarray(Image.fromarray(corners.astype(np.uint8)).resize((size, size), Image.Resampling.BILINEAR), dtype=np.float64)
    for _ in range(rng.integers(1, 4)):
        top, left = rng.integers(0, size - 16, size=2)
        height, width = rng.integers(8, 24, size=2)
        image[top : top + height, left : left + width] = rng.uniform(30, 220, size=3)
    return image.clip(0, 255).astype(np.uint8)


def main(out_dir: Path, train: int = 24, held_out: int = 8) -> None:
    rng = np.random.default_rng(0)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    for split, count, offset in (("train", train, 0), ("eval", held_out, train)):
        lines = []
        for i in range(offset, offset + count):
            name = f"images/scene_{i:03d}.png"
            Image.fromarray(scene(rng)).save(out_dir / name)
            lines.append(json.dumps({"image": name, "instruction": INSTRUCTIONS[i % len(INSTRUCTIONS)]}))
        (out_dir / f"{split}.jsonl").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "configs" / "data" / "tiny_edits")
