"""The DINOv2 artifact probe: the reward on a tiny random-weight DINOv2 equals the head applied by
hand to Dinov2Model's own tokens, and the fit command learns a head from two folders that the
reward then uses."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoImageProcessor, Dinov2Model

from conftest import ROOT
from models.fixtures.reward_models import build_tiny_dinov2
from rewards import build_worker
from rewards.base import RewardBatch
from rewards.dino_probe import DinoArtifactProbe

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture(scope="module")
def dino(tmp_path_factory):
    return build_tiny_dinov2(tmp_path_factory.mktemp("dino") / "dino")


def images(count: int, seed: int = 0, *, smooth: float = 0.5) -> np.ndarray:
    """[count, 40, 48, 3] uint8: a colour ramp mixed with noise; `smooth` is the ramp's share."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, 48)[None, None, :, None] * rng.uniform(60, 255, (count, 1, 1, 3))
    return (smooth * ramp + (1 - smooth) * rng.uniform(0, 255, (count, 40, 48, 3))).astype(np.uint8)


def tokens(dino_dir, pictures: np.ndarray) -> torch.Tensor:
    model = Dinov2Model.from_pretrained(dino_dir).eval()
    pixels = AutoImageProcessor.from_pretrained(dino_dir)(images=list(pictures), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        return model(pixel_values=pixels).last_hidden_state.double()


@pytest.mark.parametrize("features", ["cls", "cls_mean"])
def test_reward_is_one_minus_the_heads_probability_on_dinov2s_own_tokens(dino, tmp_path, features):
    pictures = images(6, seed=2)
    hidden = tokens(dino, pictures)
    f = hidden[:, 0] if features == "cls" else torch.cat([hidden[:, 0], hidden[:, 1:].mean(dim=1)], dim=1)
    # A random head on roughly standardised features, so probabilities spread over (0, 1).
    g = torch.Generator().manual_seed(1)
    width = f.shape[1]
    head = {"mean": f.mean(dim=0).float() + 0.1 * torch.randn(width, generator=g), "std": f.std(dim=0).float() * (1 + torch.rand(width, generator=g)),
            "weight": torch.randn(1, width, generator=g) / width**0.5, "bias": 0.1 * torch.randn(1, generator=g)}
    save_file(head, str(tmp_path / "head.safetensors"), metadata={"encoder": str(dino), "features": features})
    logits = ((f - head["mean"].double()) / head["std"].double()) @ head["weight"].double().T[:, 0] + head["bias"].double()
    expected = 1 - torch.sigmoid(logits).numpy()
    worker = build_worker("dino_probe", {"head": str(tmp_path / "head.safetensors"), "batch_size": 4})
    out = worker(RewardBatch(images=pictures, prompts=[""] * 6))
    np.testing.assert_allclose(out.scores["dino_probe"], expected, rtol=1e-4, atol=1e-6)
    assert 0.05 < expected.min() and expected.max() < 0.95 and expected.std() > 0.01  # the check can fail
    one_by_one = DinoArtifactProbe(tmp_path / "head.safetensors", batch_size=1).p_artifact(pictures)
    np.testing.assert_allclose(1 - one_by_one, expected, rtol=1e-4, atol=1e-6)


def test_a_head_for_other_features_is_refused_before_scoring(dino, tmp_path):
    save_file({"mean": torch.zeros(48), "std": torch.ones(48), "weight": torch.zeros(1, 48), "bias": torch.zeros(1)},
              str(tmp_path / "wide.safetensors"), metadata={"encoder": str(dino), "features": "cls"})
    with pytest.raises(ValueError, match="48-wide features; this encoder gives 32"):
        DinoArtifactProbe(tmp_path / "wide.safetensors")
    with pytest.raises(FileNotFoundError, match="python -m rewards.dino_probe"):
        DinoArtifactProbe(tmp_path / "absent.safetensors")


def write_folder(folder, pictures: np.ndarray) -> None:
    folder.mkdir(parents=True)
    for i, picture in enumerate(pictures):
        Image.fromarray(picture).save(folder / f"{i:03d}.png")


def fit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rewards.dino_probe", *args], cwd=ROOT, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}, timeout=600)


@pytest.mark.parametrize("hidden", ["0", "16"])
def test_fit_command_learns_a_head_from_two_folders_and_the_reward_uses_it(dino, tmp_path, hidden):
    """Smooth pictures are "real", noisy ones "generated": the command reports held-out accuracy,
    writes the head with its encoder and features, and the reward ranks fresh pictures of each
    kind by it."""
    write_folder(tmp_path / "real", images(24, seed=3, smooth=0.9))
    write_folder(tmp_path / "generated", images(24, seed=4, smooth=0.2))
    out = tmp_path / "probe.safetensors"
    done = fit("--real", str(tmp_path / "real"), "--generated", str(tmp_path / "generated"), "--out", str(out),
               "--encoder", str(dino), "--hidden", hidden, "--holdout", "0.25")
    assert done.returncode == 0, done.stderr
    assert "held-out accuracy" in done.stdout and "on 12 images" in done.stdout
    with safe_open(str(out), framework="pt") as f:
        metadata = f.metadata()
    assert metadata["encoder"] == str(dino) and metadata["features"] == "cls_mean"
    assert float(metadata["held_out_accuracy"]) >= 0.9
    assert json.loads(metadata["counts"]) == {"real": 24, "generated": 24, "held_out": 12}
    worker = DinoArtifactProbe(out)
    real = worker(RewardBatch(images=images(10, seed=5, smooth=0.9), prompts=[""] * 10)).scores["dino_probe"]
    generated = worker(RewardBatch(images=images(10, seed=6, smooth=0.2), prompts=[""] * 10)).scores["dino_probe"]
    assert np.mean(real > 0.5) >= 0.9 and np.mean(generated < 0.5) >= 0.9


def test_fit_command_checks_its_inputs_before_the_encoder_loads_and_keeps_an_existing_head(tmp_path):
    write_folder(tmp_path / "real", images(3, seed=7))
    missing = fit("--real", str(tmp_path / "real"), "--generated", str(tmp_path / "none"), "--out", str(tmp_path / "h.safetensors"),
                  "--encoder", str(tmp_path / "no-encoder"))
    assert missing.returncode != 0 and f"folder {tmp_path / 'none'} does not exist" in missing.stderr
    (tmp_path / "h.safetensors").write_bytes(b"keep me")
    kept = fit("--real", str(tmp_path / "real"), "--generated", str(tmp_path / "real"), "--out", str(tmp_path / "h.safetensors"),
               "--encoder", str(tmp_path / "no-encoder"))
    assert kept.returncode != 0 and "pass --overwrite" in kept.stderr
    assert (tmp_path / "h.safetensors").read_bytes() == b"keep me"
