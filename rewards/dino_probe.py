"""An artifact detector you fit yourself: a small head on a frozen DINOv2 encoder's features.

Self-supervised encoders see what a generator gets wrong without being told (DINO features
transfer well to fake-image and artifact detection), so a linear probe fitted on a few hundred
images of your own model's failures is a useful detector, and a monitor the policy never trains
against. Reward = 1 - p(artifact), in [0, 1].

Fit a head on two folders (real or good images; generated or artifact images), report its
held-out accuracy and write it as safetensors:

    python -m rewards.dino_probe --real data/real --generated data/artifacts --out probes/mine.safetensors

The features are DINOv2's linear-probe recipe: the final CLS token, and by default the mean of
the patch tokens beside it. They are standardised with the training set's mean and std (kept in
the file), then a logistic regression (or, with --hidden, one ReLU hidden layer) gives the logit
of "artifact". The file's metadata names the encoder and the feature kind, so the reward reads
them back as fitted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from rewards.artifact import _detector_output
from rewards.base import RewardBatch, RewardOutput
from rewards.images import check_batch_size, to_pil, torch_dtype

FEATURES = ("cls", "cls_mean")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
DEFAULT_ENCODER = "facebook/dinov2-base"


class DinoFeatures:
    """Frozen DINOv2 features of images: the CLS token, or the CLS token and the mean patch token."""

    def __init__(self, encoder: str | os.PathLike[str], features: str = "cls_mean", *, device: str = "cpu", dtype: str = "fp32", batch_size: int = 16):
        from transformers import AutoImageProcessor, AutoModel

        if features not in FEATURES:
            raise ValueError(f"DINO features must be one of {FEATURES}, got {features!r}")
        self.features, self.device, self.batch_size = features, torch.device(device), check_batch_size(batch_size)
        self.model = AutoModel.from_pretrained(encoder, dtype=torch_dtype(dtype)).to(self.device).eval().requires_grad_(False)
        self.processor = AutoImageProcessor.from_pretrained(encoder)
        # DINOv2 with registers puts its register tokens between the CLS and the patch tokens.
        self.registers = int(getattr(self.model.config, "num_register_tokens", 0) or 0)

    @torch.inference_mode()
    def __call__(self, images, *, progress: bool = False) -> torch.Tensor:
        """[N, D] (cls) or [N, 2D] (cls_mean) float32 features of N images (uint8 arrays or PIL)."""
        from tqdm import tqdm

        pil = to_pil(images) if isinstance(images, np.ndarray) else list(images)
        out = []
        for start in tqdm(range(0, len(pil), self.batch_size), desc="DINO features", disable=not progress, leave=False):
            pixels = self.processor(images=pil[start : start + self.batch_size], return_tensors="pt")["pixel_values"]
            # The final layer-normed tokens: CLS first, then the patches (and registers, if any).
            hidden = self.model(pixel_values=pixels.to(self.device, self.model.dtype)).last_hidden_state.float()
            cls, patches = hidden[:, 0], hidden[:, 1 + self.registers :]
            out.append(cls if self.features == "cls" else torch.cat([cls, patches.mean(dim=1)], dim=-1))
        return torch.cat(out) if out else torch.zeros(0, 0)


def head_logits(head: dict[str, torch.Tensor], features: torch.Tensor) -> torch.Tensor:
    """The artifact logit [N] of standardised features: linear, or one ReLU hidden layer."""
    x = (features - head["mean"]) / head["std"]
    if "hidden.weight" in head:
        x = torch.relu(x @ head["hidden.weight"].T + head["hidden.bias"])
    return (x @ head["weight"].T + head["bias"])[:, 0]


def load_head(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A fitted head's tensors and metadata (encoder, features, held-out accuracy, ...)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"DINO probe head {path} not found; fit one with python -m rewards.dino_probe --real DIR --generated DIR --out {path}")
    with safe_open(str(path), framework="pt") as f:
        tensors = {key: f.get_tensor(key).float() for key in f.keys()}
        metadata = f.metadata() or {}
    needed = {"mean", "std", "weight", "bias"}
    if not needed <= set(tensors) or metadata.get("features") not in FEATURES:
        raise ValueError(f"{path} is not a DINO probe head (needs tensors {sorted(needed)} and metadata features in {FEATURES}); fit one with python -m rewards.dino_probe")
    return tensors, metadata


class DinoArtifactProbe:
    """Reward = 1 - sigmoid(head(DINOv2 features)), the head fitted by `python -m rewards.dino_probe`.

    Args:
        head: Path of the fitted head (safetensors).
        encoder: DINOv2 checkpoint; unset: the one the head was fitted on (its metadata). A
            different one must give features of the same width.
        device, dtype, batch_size: Where and how the encoder runs (the head runs in float32).
        name: The component name in RewardOutput.scores.
    """

    def __init__(
        self,
        head: str | os.PathLike[str],
        *,
        encoder: str | os.PathLike[str] | None = None,
        device: str = "cpu",
        dtype: str = "fp32",
        batch_size: int = 16,
        name: str = "dino_probe",
    ):
        self.head, metadata = load_head(head)
        self.encoder = DinoFeatures(encoder or metadata.get("encoder", DEFAULT_ENCODER), metadata["features"], device=device, dtype=dtype, batch_size=batch_size)
        width = self.encoder.model.config.hidden_size * (1 if metadata["features"] == "cls" else 2)
        if self.head["mean"].numel() != width:
            raise ValueError(f"DINO probe head {head} was fitted on {self.head['mean'].numel()}-wide features; this encoder gives {width}")
        self.head = {key: value.to(self.encoder.device) for key, value in self.head.items()}
        self.components = (name,)

    def p_artifact(self, images: np.ndarray) -> np.ndarray:
        """p(artifact) per image: [B] float64."""
        if len(images) == 0:
            return np.zeros(0)
        return torch.sigmoid(head_logits(self.head, self.encoder(images))).cpu().numpy().astype(np.float64)

    def __call__(self, batch: RewardBatch) -> RewardOutput:
        return _detector_output(self.components[0], self.p_artifact(batch.images))


# ------------------------------------------------------------------ fitting


def image_files(folder: str | os.PathLike[str]) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise SystemExit(f"dino_probe: folder {folder} does not exist")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(files) < 2:
        raise SystemExit(f"dino_probe: {folder} holds {len(files)} images ({', '.join(sorted(IMAGE_SUFFIXES))}); it needs at least 2")
    return files


def split(count: int, holdout: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded (train, held-out) split of range(count), at least one of each."""
    order = torch.randperm(count, generator=generator)
    held = min(max(1, round(holdout * count)), count - 1)
    return order[held:], order[:held]


def fit_head(features: torch.Tensor, labels: torch.Tensor, *, hidden: int = 0, weight_decay: float = 1e-3, seed: int = 0, steps: int = 500) -> dict[str, torch.Tensor]:
    """A head whose logit predicts labels (1 = artifact) from features, by L2-regularised
    logistic regression (L-BFGS, float64) or, with hidden > 0, one ReLU hidden layer (Adam)."""
    x, y = features.double(), labels.double()
    mean, std = x.mean(dim=0), x.std(dim=0).clamp_min(1e-6)
    z = (x - mean) / std
    generator = torch.Generator().manual_seed(seed)
    width = hidden or z.shape[1]
    params = {
        "weight": torch.zeros(1, width, dtype=torch.float64, requires_grad=True),
        "bias": torch.zeros(1, dtype=torch.float64, requires_grad=True),
    }
    if hidden:
        params["hidden.weight"] = (torch.randn(hidden, z.shape[1], generator=generator, dtype=torch.float64) / z.shape[1] ** 0.5).requires_grad_()
        params["hidden.bias"] = torch.zeros(hidden, dtype=torch.float64, requires_grad=True)
    head = {"mean": mean, "std": std}

    def loss() -> torch.Tensor:
        logits = head_logits({**head, **params}, x)
        penalty = sum(p.square().sum() for key, p in params.items() if key.endswith("weight"))
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, y) + weight_decay * penalty

    if hidden:
        optimizer = torch.optim.Adam(params.values(), lr=1e-2)
        for _ in range(steps):
            optimizer.zero_grad()
            loss().backward()
            optimizer.step()
    else:
        optimizer = torch.optim.LBFGS(params.values(), max_iter=steps, line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            value = loss()
            value.backward()
            return value

        optimizer.step(closure)
    return {key: value.detach().float() for key, value in {**head, **params}.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fit a DINOv2 artifact probe on two image folders and write it as safetensors.")
    parser.add_argument("--real", required=True, help="folder of real or good images (label 0)")
    parser.add_argument("--generated", required=True, help="folder of generated or artifact images (label 1)")
    parser.add_argument("--out", required=True, help="the head's path (.safetensors); an existing file is kept unless --overwrite")
    parser.add_argument("--encoder", default=DEFAULT_ENCODER, help=f"DINOv2 checkpoint (default {DEFAULT_ENCODER})")
    parser.add_argument("--features", default="cls_mean", choices=FEATURES, help="cls, or cls and the mean patch token (default)")
    parser.add_argument("--hidden", type=int, default=0, help="width of one ReLU hidden layer; 0 (default): a linear probe")
    parser.add_argument("--weight-decay", type=float, default=1e-3, help="L2 penalty on the head's weights")
    parser.add_argument("--holdout", type=float, default=0.2, help="share of each folder held out to measure accuracy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise SystemExit(f"dino_probe: --out {out} must end in .safetensors")
    if out.exists() and not args.overwrite:
        raise SystemExit(f"dino_probe: {out} exists; pass --overwrite to replace it, or another --out")
    if not 0 < args.holdout < 1 or args.hidden < 0:
        raise SystemExit("dino_probe: --holdout must be in (0, 1) and --hidden >= 0")
    folders = {0: image_files(args.real), 1: image_files(args.generated)}  # checked before the encoder loads

    from PIL import Image

    encoder = DinoFeatures(args.encoder, args.features, device=args.device, dtype=args.dtype, batch_size=args.batch_size)
    generator = torch.Generator().manual_seed(args.seed)
    parts = {"train": ([], []), "held_out": ([], [])}
    for label, files in folders.items():
        features = encoder([Image.open(path).convert("RGB") for path in files], progress=True).cpu()
        train, held = split(len(files), args.holdout, generator)
        for name, index in (("train", train), ("held_out", held)):
            parts[name][0].append(features[index])
            parts[name][1].append(torch.full((len(index),), float(label)))
    (x_train, y_train), (x_held, y_held) = ((torch.cat(f), torch.cat(y)) for f, y in parts.values())
    head = fit_head(x_train, y_train, hidden=args.hidden, weight_decay=args.weight_decay, seed=args.seed)
    accuracy = {
        name: float(((head_logits(head, x) > 0).float() == y).float().mean())
        for name, (x, y) in (("train", (x_train, y_train)), ("held_out", (x_held, y_held)))
    }
    metadata = {
        "encoder": str(args.encoder), "features": args.features, "hidden": str(args.hidden),
        "held_out_accuracy": f"{accuracy['held_out']:.4f}", "train_accuracy": f"{accuracy['train']:.4f}",
        "real": str(args.real), "generated": str(args.generated),
        "counts": json.dumps({"real": len(folders[0]), "generated": len(folders[1]), "held_out": len(y_held)}),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({key: value.contiguous() for key, value in head.items()}, str(out), metadata=metadata)
    print(
        f"dino_probe: {len(folders[0])} real, {len(folders[1])} generated images; held-out accuracy {accuracy['held_out']:.3f} "
        f"on {len(y_held)} images (train {accuracy['train']:.3f}); wrote {out}"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
