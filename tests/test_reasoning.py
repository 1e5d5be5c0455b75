"""Judge reasoning a person can read: a run with a judge component writes, for the first samples
of an epoch, each one's image, prompt, every component's score and what the judge wrote, as JSONL
beside the metrics and as a W&B table."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, run_cli
from models.fixtures.vlm_judge import build_tiny_qwen3_vl
from rewards.jpeg import jpeg_kilobytes


@pytest.mark.slow
def test_a_run_with_a_judge_writes_the_reasoning_table_and_jsonl(tiny_sd3, tmp_path):
    judge = build_tiny_qwen3_vl(tmp_path / "judge", seed=0)
    run_dir = tmp_path / "run"
    run_cli([
        "configs/tiny_cpu.yaml", f"run_dir={run_dir}", f"model.pretrained={tiny_sd3}", "model.max_sequence_length=32",
        "num_epochs=1", "sample.num_groups=2", "train.num_minibatches=2", "data.eval_prompts=null",
        "rewards.firm_gen.role=monitor", f"rewards.firm_gen.params.model={judge}", "rewards.firm_gen.params.dtype=fp32",
        "rewards.firm_gen.params.scoring=generate", "rewards.firm_gen.params.max_new_tokens=6",
        "log.reasoning_samples=4", "log.wandb_mode=offline", "log.save_every=0", "log.image_every=0", "log.progress=false",
    ], env={"WANDB_SILENT": "true"})
    rows = [json.loads(line) for line in (run_dir / "reasoning" / "epoch_00001.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and len({row["sample_id"] for row in rows}) == 4
    prompts = (ROOT / "configs" / "prompts" / "simple.txt").read_text().splitlines()
    for row in rows:
        assert row["epoch"] == 1 and row["prompt"] in prompts
        assert set(row["scores"]) == {"jpeg_compressibility", "jpeg_incompressibility", "firm_gen/instruction", "firm_gen/quality"}
        assert set(row["texts"]) == {"firm_gen/instruction", "firm_gen/quality"}
        assert all(isinstance(text, str) and text for text in row["texts"].values())
        # The image beside the row is the sample that was scored: its JPEG size is the row's score.
        image = np.asarray(Image.open(run_dir / row["image"]))
        assert row["scores"]["jpeg_compressibility"] == pytest.approx(-jpeg_kilobytes(image) / 500, rel=1e-9)
    # The same rows went to W&B as a table (offline: in the run's .wandb file).
    logged = b"".join(path.read_bytes() for path in (run_dir / "wandb").rglob("*.wandb"))
    assert b"reward/reasoning" in logged
