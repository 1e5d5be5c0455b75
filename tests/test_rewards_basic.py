"""The weight-free rewards (JPEG), the reward mix, and the worker registry."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT
from rewards import WORKERS, build_worker, worker_factory
from rewards.base import RewardBatch
from rewards.jpeg import JpegCompressibility, jpeg_incompressibility
from rewards.mix import weighted_sum


def flat_image(value=128, size=64):
    return np.full((size, size, 3), value, dtype=np.uint8)


def noise_image(seed=0, size=64):
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def batch_of(*images):
    return RewardBatch(images=np.stack(images), prompts=[f"p{i}" for i in range(len(images))])


def pil_kilobytes(image, quality=95):
    """Independent size measurement: PIL's JPEG byte count / 1000."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=quality)
    return len(buffer.getvalue()) / 1000.0


# --------------------------------------------------------------------------- JPEG


def test_flat_image_is_more_compressible_than_noise():
    """Compressibility rewards small files: a flat image beats pure noise."""
    out = JpegCompressibility()(batch_of(flat_image(), noise_image()))
    scores = out.scores["jpeg_compressibility"]
    assert scores.shape == (2,) and scores.dtype == np.float64
    assert scores[0] > scores[1]
    assert (scores < 0).all()


def test_compressibility_value_is_minus_kilobytes_over_500():
    """DDPO / Flow-GRPO scale: reward = -(JPEG bytes at quality 95 / 1000) / 500."""
    images = [flat_image(30), noise_image(1), noise_image(2, size=32).repeat(2, 0).repeat(2, 1)]
    out = JpegCompressibility()(batch_of(*images))
    expected = [-pil_kilobytes(img) / 500 for img in images]
    np.testing.assert_allclose(out.scores["jpeg_compressibility"], expected, rtol=1e-12)
    assert out.extras["kilobytes_mean"] == pytest.approx(np.mean([pil_kilobytes(i) for i in images]))


def test_incompressibility_is_the_negation():
    """Incompressibility scores the same images with the opposite sign (noise wins)."""
    batch = batch_of(flat_image(), noise_image(3), noise_image(4))
    comp = JpegCompressibility()(batch).scores["jpeg_compressibility"]
    worker = jpeg_incompressibility()
    assert worker.components == ("jpeg_incompressibility",)
    incomp = worker(batch).scores["jpeg_incompressibility"]
    np.testing.assert_allclose(incomp, -comp, rtol=1e-12)
    assert incomp[1] > incomp[0]


def test_quality_parameter_changes_the_size_and_is_checked():
    """A lower JPEG quality makes noise smaller (more compressible); quality outside 1..100 is rejected."""
    img = noise_image(5)
    low = JpegCompressibility(quality=30)(batch_of(img)).scores["jpeg_compressibility"][0]
    high = JpegCompressibility(quality=95)(batch_of(img)).scores["jpeg_compressibility"][0]
    assert low > high
    assert low == pytest.approx(-pil_kilobytes(img, 30) / 500)
    for bad in (0, 101):
        with pytest.raises(ValueError):
            JpegCompressibility(quality=bad)


# --------------------------------------------------------------------------- mix


def test_weighted_sum_values():
    scores = {"a": np.array([1.0, 2.0, 3.0]), "b": np.array([10.0, 0.0, -10.0]), "monitor": np.array([5.0] * 3)}
    total = weighted_sum(scores, {"a": 2.0, "b": 0.5})
    np.testing.assert_allclose(total, [7.0, 4.0, 1.0])
    assert total.dtype == np.float64


def test_weighted_sum_propagates_nan_per_sample():
    """A sample missing any trained component is missing as a whole; monitors do not matter."""
    scores = {
        "a": np.array([1.0, np.nan, 3.0, 4.0]),
        "b": np.array([1.0, 1.0, np.nan, 1.0]),
        "monitor": np.array([np.nan, np.nan, np.nan, np.nan]),
    }
    total = weighted_sum(scores, {"a": 1.0, "b": 1.0})
    assert np.isnan(total).tolist() == [False, True, True, False]
    np.testing.assert_allclose(total[[0, 3]], [2.0, 5.0])


def test_weighted_sum_errors():
    """A weighted component that was never scored is an error naming it; no weights is an error."""
    with pytest.raises(KeyError, match="pickscore"):
        weighted_sum({"a": np.ones(2)}, {"a": 1.0, "pickscore": 1.0})
    with pytest.raises(ValueError):
        weighted_sum({"a": np.ones(2)}, {})


# --------------------------------------------------------------------------- registry


def test_registry_builds_known_workers():
    """Workers are built by name with params from the config; components name their scores."""
    assert {"jpeg_compressibility", "jpeg_incompressibility"} <= set(WORKERS)
    worker = build_worker("jpeg_compressibility", {"quality": 50})
    assert worker.components == ("jpeg_compressibility",)
    img = noise_image(6)
    assert worker(batch_of(img)).scores["jpeg_compressibility"][0] == pytest.approx(-pil_kilobytes(img, 50) / 500)
    assert build_worker("jpeg_incompressibility").components == ("jpeg_incompressibility",)


def test_unknown_worker_lists_known_ones():
    with pytest.raises(KeyError) as err:
        build_worker("jpeg_compresibility")
    message = str(err.value)
    assert "jpeg_compresibility" in message
    for name in WORKERS:
        assert name in message


def test_bad_worker_params_name_the_worker():
    with pytest.raises(ValueError, match="jpeg_compressibility"):
        build_worker("jpeg_compressibility", {"qualty": 90})


def test_package_exports_the_registry_without_importing_any_worker():
    """`from rewards import *` gives the registry and the worker protocol, and importing it loads no
    worker module: a config can be read (and its worker names checked) without transformers."""
    probe = (
        "import sys\n"
        "from rewards import *\n"
        "print(sorted(name for name in dir() if not name.startswith('_') and name != 'sys'))\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers') or m.startswith('rewards.')))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    exported, imported = result.stdout.splitlines()
    assert exported == "['RewardBatch', 'RewardOutput', 'RewardWorker', 'WORKERS', 'build_worker', 'worker_factory']"
    assert imported == "['rewards.base']"


def test_every_registered_worker_resolves():
    """Each "module:attribute" entry names a callable, so a misspelt entry fails here, not mid-run."""
    for name, target in WORKERS.items():
        assert callable(worker_factory(name)), f"{name}: {target}"
