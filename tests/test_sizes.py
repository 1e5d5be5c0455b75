"""Image sizes: non-square `sample.resolution: [height, width]`, an evaluation size of its own
(`eval.resolution`), and source images cropped to the target's aspect for editing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, run_cli
from test_train import FAST, read_metrics, tiny_overrides

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def test_resolution_takes_one_side_or_height_and_width():
    from rl.config import ConfigError, load_config

    config = load_config(ROOT / "configs/tiny_cpu.yaml", ["sample.resolution=[32, 80]", "eval.resolution=[96, 48]"])
    assert list(config.sample.resolution) == [32, 80] and list(config.eval.resolution) == [96, 48]
    assert load_config(ROOT / "configs/tiny_cpu.yaml").eval.resolution is None  # unset: the sample size
    for bad in ("sample.resolution=[32, 72]", "sample.resolution=[64]", "sample.resolution=[16, 16, 16]", "eval.resolution=40"):
        key = bad.split("=")[0]
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(ROOT / "configs/tiny_cpu.yaml", [bad])


def test_image_size_reads_an_int_or_a_pair():
    from models.base import image_size

    assert image_size(64) == (64, 64)
    assert image_size([32, 80]) == (32, 80) and image_size((96, 48)) == (96, 48)


def test_source_images_are_cropped_to_the_target_aspect(tmp_path):
    """A source image becomes the largest centred crop of the target's aspect ratio, resized: a
    wide target keeps the middle band of a square image, a tall one its middle column."""
    from rl.data import load_source_image

    # A 120x120 picture: black outside, a white square in the middle third.
    array = np.zeros((120, 120, 3), dtype=np.uint8)
    array[40:80, 40:80] = 255
    path = tmp_path / "source.png"
    Image.fromarray(array).save(path)

    wide = load_source_image(path, (30, 60))  # height 30, width 60: crop 120 wide x 60 tall (rows 30..90)
    assert wide.shape == (30, 60, 3) and wide.dtype == np.uint8
    # Rows 40..80 of the original (white band) map to rows 5..25 of the crop at half scale.
    assert wide[15, 30].min() > 200 and wide[15, 5].max() < 50  # white centre, black left edge
    assert wide[2, 30].max() < 60 and wide[27, 30].max() < 60  # black above and below the square
    assert wide[7, 30].min() > 200  # original row 44: white only when the crop kept the aspect (a square crop: row 28)
    tall = load_source_image(path, (64, 32))  # crop 60 wide x 120 tall (columns 30..90)
    assert tall.shape == (64, 32, 3)
    assert tall[32, 16].min() > 200 and tall[3, 16].max() < 50 and tall[32, 1].max() < 60
    assert tall[32, 7].min() > 200  # original column 43 (a square crop: column 26, black)
    square = load_source_image(path, (48, 48))
    assert square.shape == (48, 48, 3) and square[24, 24].min() > 200 and square[2, 2].max() < 50


def _grid_shape(count: int, height: int, width: int, columns: int = 8, pad: int = 2) -> tuple[int, int, int]:
    """The logged rollout grid's shape for `count` images of height x width (rl.tracking.image_grid)."""
    columns = min(columns, count)
    rows = -(-count // columns)
    return rows * (height + pad) + pad, columns * (width + pad) + pad, 3


def test_non_square_run_samples_and_evaluates_at_its_sizes(tiny_sd3, tmp_path):
    """A tiny SD3 run with 32x64 (height x width) rollouts and 64x48 evaluation samples trains
    on-policy, logs a grid of non-square rollouts, and keeps evaluation images of the eval size."""
    run_dir = tmp_path / "wide"
    run_cli(
        ["configs/tiny_cpu.yaml", *FAST, "num_epochs=1", "sample.resolution=[32, 64]", "eval.resolution=[64, 48]",
         "log.image_every=1", "log.save_every=0"] + tiny_overrides(tiny_sd3, run_dir)
    )
    metrics = [m for m in read_metrics(run_dir) if m["epoch"] == 1]
    assert metrics and metrics[0]["train/onpolicy_ratio_err"] < 1e-5
    grid = np.asarray(Image.open(run_dir / "images" / "rollout_images_epoch00001.png"))
    assert grid.shape == _grid_shape(8, 32, 64)  # 2 groups x 4 images of 32 x 64
    for epoch in (0, 1):
        with np.load(run_dir / "images" / f"eval_epoch_{epoch:05d}.npz") as kept:
            assert kept["images"].shape[1:] == (64, 48, 3)
    assert (run_dir / "before_after.png").exists()
