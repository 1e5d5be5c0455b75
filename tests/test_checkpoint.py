"""Checkpoints on disk (rl.checkpoint): only the newest `log.keep_checkpoints` are kept, `latest`
names the newest, and a save killed before its rename is never resumed from."""

from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import perturb_lora
from rl.checkpoint import latest_checkpoint
from test_train_schedule import make_trainer

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def test_only_the_newest_checkpoints_are_kept(tiny_sd3, tmp_path):
    trainer = make_trainer(tiny_sd3, tmp_path, "log.keep_checkpoints=2")
    for epoch in range(1, 5):
        trainer.save(epoch, global_step=10 * epoch)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["epoch-000003", "epoch-000004"]
    assert (root / "latest").read_text().strip() == "epoch-000004"
    assert latest_checkpoint(tmp_path) == root / "epoch-000004"
    assert json.loads((root / "epoch-000004" / "trainer_state.json").read_text())["global_step"] == 40


def test_a_save_killed_before_its_rename_is_never_resumed(tiny_sd3, tmp_path, monkeypatch):
    """Epoch 2's save dies after writing everything into .tmp-epoch-000002 but before the rename:
    resume continues from epoch 1 with epoch 1's weights, and the next save of epoch 2 succeeds."""
    trainer = make_trainer(tiny_sd3, tmp_path, "log.keep_checkpoints=1")
    perturb_lora(trainer.policy.network, seed=1)
    saved = {k: v.clone() for k, v in trainer.policy.trainable_state_dict().items()}
    trainer.save(1, global_step=2)
    perturb_lora(trainer.policy.network, seed=2)

    def killed(*args):
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(os, "rename", killed)
    with pytest.raises(KeyboardInterrupt):
        trainer.save(2, global_step=4)
    monkeypatch.undo()
    root = tmp_path / "checkpoints"
    assert (root / ".tmp-epoch-000002" / "trainer_state.json").exists(), "the killed save should have written its files"
    assert latest_checkpoint(tmp_path) == root / "epoch-000001"

    resumed = make_trainer(tiny_sd3, tmp_path, "log.keep_checkpoints=1", f"resume={tmp_path}")
    assert (resumed.start_epoch, resumed.start_step) == (2, 2)
    weights = resumed.policy.trainable_state_dict()
    assert all(torch.equal(weights[k], v) for k, v in saved.items())
    resumed.save(2, global_step=4)
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["epoch-000002"]
    assert latest_checkpoint(tmp_path) == root / "epoch-000002"
