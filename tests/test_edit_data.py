"""Editing data files: every bad row is reported with its line number before any model loads."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT
from rl.data import DataError, load_source_image, read_edits


@pytest.fixture
def edit_dir(tmp_path):
    (tmp_path / "img").mkdir()
    Image.fromarray(np.full((40, 60, 3), 128, dtype=np.uint8)).save(tmp_path / "img" / "a.png")
    (tmp_path / "img" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    return tmp_path


def write_rows(path, rows):
    path.write_text("\n".join(rows) + "\n")
    return path


def test_valid_rows_resolve_paths_relative_to_the_file(edit_dir):
    rows = read_edits(write_rows(edit_dir / "ok.jsonl", [json.dumps({"image": "img/a.png", "instruction": " brighten ", "id": 7})]))
    assert rows[0].image == edit_dir / "img" / "a.png"
    assert rows[0].instruction == "brighten" and rows[0].metadata == {"id": 7}


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"image": "img/a.png", "instruction": "x"', "not valid JSON"),
        ('{"instruction": "make it red"}', 'missing "image"'),
        ('{"image": "img/missing.png", "instruction": "x"}', "does not exist"),
        ('{"image": "img/broken.png", "instruction": "x"}', "cannot be read"),
        ('{"image": "img/a.png", "instruction": "   "}', "instruction"),
        ('["img/a.png", "x"]', "JSON object"),
    ],
)
def test_bad_row_is_reported_with_its_line_number(edit_dir, bad_line, message):
    good = json.dumps({"image": "img/a.png", "instruction": "brighter"})
    path = write_rows(edit_dir / "bad.jsonl", [good, "", good, bad_line])
    with pytest.raises(DataError, match=rf"bad\.jsonl:4: .*{message}"):
        read_edits(path)


def test_source_image_is_centre_cropped_and_resized(edit_dir):
    image = load_source_image(edit_dir / "img" / "a.png", (32, 32))
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8


def test_cli_reports_a_malformed_line_before_any_model_loads(edit_dir, tmp_path):
    bad = write_rows(edit_dir / "train.jsonl", [json.dumps({"image": "img/a.png", "instruction": "ok"}), "{oops"])
    model_dir = tmp_path / "never-built"
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "rl.train", str(ROOT / "configs" / "tiny_edit_cpu.yaml"), f"data.train_edits={bad}",
         f"model.pretrained={model_dir}", f"run_dir={tmp_path / 'run'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "train.jsonl:2" in result.stderr and "not valid JSON" in result.stderr
    assert not model_dir.exists(), "a model was built before the data was checked"
    assert time.monotonic() - start < 30
