"""Run outputs on the main process: metrics.jsonl (always), W&B (online, offline or disabled),
and image grids saved as PNG. Other ranks get a NullTracker."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image


def image_grid(images: np.ndarray, columns: int = 8, pad: int = 2) -> np.ndarray:
    """Tile [N, H, W, 3] uint8 images into one [rows*(H+pad), columns*(W+pad), 3] image."""
    images = np.asarray(images)
    count, height, width, _ = images.shape
    columns = max(1, min(columns, count))
    rows = math.ceil(count / columns)
    grid = np.full((rows * (height + pad) + pad, columns * (width + pad) + pad, 3), 255, dtype=np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        top, left = pad + r * (height + pad), pad + c * (width + pad)
        grid[top : top + height, left : left + width] = image
    return grid


class NullTracker:
    def log(self, metrics: dict, epoch: int) -> None: ...
    def log_images(self, key: str, images: np.ndarray, captions: list[str], epoch: int) -> Path | None: ...
    def log_picture(self, key: str, picture, caption: str, epoch: int, filename: str) -> Path | None: ...
    def save_samples(self, epoch: int, rows: list[dict]) -> None: ...
    def save_reasoning(self, epoch: int, rows: list[dict]) -> None: ...
    def finish(self) -> None: ...


class Tracker:
    def __init__(self, run_dir: str | Path, *, mode: str, project: str, run_name: str | None, config: dict, resume_epoch: int | None,
                 group: str | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        if resume_epoch is not None:
            self._truncate_after(resume_epoch)
        elif self.metrics_path.exists():
            self.metrics_path.unlink()
        self.wandb = None
        if mode != "disabled":
            import wandb

            wandb_dir = self.run_dir / "wandb"
            wandb_dir.mkdir(exist_ok=True)
            # Keep every wandb file inside the run directory (cache, config, artifacts included).
            # wandb puts its runs in a "wandb" folder under `dir`, and its cache in a "wandb"
            # folder under the cache dir: dir=run_dir and a hidden cache give
            # run_dir/wandb/offline-run-..., never run_dir/wandb/wandb/.
            os.environ.setdefault("WANDB_DIR", str(self.run_dir))
            for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
                os.environ.setdefault(var, str(wandb_dir / ".cache"))
            # A resumed run continues the same W&B run: its id is kept beside the metrics.
            id_file = self.run_dir / "wandb_id.txt"
            run_id = id_file.read_text().strip() if (resume_epoch is not None and id_file.exists()) else None
            self.wandb = wandb.init(
                project=project, name=run_name or self.run_dir.name, dir=str(self.run_dir), mode=mode, group=group,
                config=config, id=run_id, resume="allow" if run_id else None,
            )
            id_file.write_text(self.wandb.id)

    def _truncate_after(self, epoch: int) -> None:
        """On resume, drop lines logged after the checkpoint so epochs are not listed twice."""
        if not self.metrics_path.exists():
            return
        kept = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a line torn by a kill mid-write: its epoch is logged again
            if isinstance(row, dict) and row.get("epoch", epoch + 1) <= epoch:
                kept.append(line)
        self.metrics_path.write_text("".join(line + "\n" for line in kept))

    def log(self, metrics: dict, epoch: int) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps({"epoch": epoch, **metrics}) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in metrics.items() if v is not None}, step=epoch)

    def log_images(self, key: str, images: np.ndarray, captions: list[str], epoch: int) -> Path:
        grid = image_grid(images)
        folder = self.run_dir / "images"
        folder.mkdir(exist_ok=True)
        path = folder / f"{key.replace('/', '_')}_epoch{epoch:05d}.png"
        Image.fromarray(grid).save(path)
        if self.wandb is not None:
            import wandb

            self.wandb.log({key: wandb.Image(str(path), caption=" | ".join(captions[:16]))}, step=epoch)
        return path

    def log_picture(self, key: str, picture: Image.Image, caption: str, epoch: int, filename: str) -> Path:
        """Save a labelled picture as run_dir/`filename` and log it to W&B under `key`."""
        path = self.run_dir / filename
        picture.save(path)
        if self.wandb is not None:
            import wandb

            self.wandb.log({key: wandb.Image(str(path), caption=caption)}, step=epoch)
        return path

    def save_samples(self, epoch: int, rows: list[dict]) -> None:
        folder = self.run_dir / "samples"
        folder.mkdir(exist_ok=True)
        with open(folder / f"epoch_{epoch:05d}.jsonl", "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)

    def save_reasoning(self, epoch: int, rows: list[dict]) -> None:
        """Rows of (sample_id, prompt, scores, texts, image [H, W, 3] uint8): the images as
        run_dir/reasoning/epoch_NNNNN/sample_ID.png, the rest as run_dir/reasoning/epoch_NNNNN.jsonl
        (each row naming its image), and a W&B table with one column per score and per text."""
        folder = self.run_dir / "reasoning"
        images = folder / f"epoch_{epoch:05d}"
        images.mkdir(parents=True, exist_ok=True)
        with open(folder / f"epoch_{epoch:05d}.jsonl", "w") as f:
            for row in rows:
                path = images / f"sample_{row['sample_id']}.png"
                Image.fromarray(row["image"]).save(path)
                f.write(json.dumps({"epoch": epoch, **{k: v for k, v in row.items() if k != "image"}, "image": str(path.relative_to(self.run_dir))}) + "\n")
        if self.wandb is not None and rows:
            import wandb

            scores, texts = sorted(rows[0]["scores"]), sorted(rows[0]["texts"])
            table = wandb.Table(columns=["sample_id", "image", "prompt", *scores, *[f"{name} (judge)" for name in texts]])
            for row in rows:
                table.add_data(row["sample_id"], wandb.Image(row["image"]), row["prompt"], *[row["scores"][n] for n in scores], *[row["texts"][n] for n in texts])
            self.wandb.log({"reward/reasoning": table}, step=epoch)

    def finish(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
