"""Checkpoints: accelerate's state (optimizer, LR schedule, EMA, RNG of every rank), the
trainable weights in the model's own format (LoRA: what `pipe.load_lora_weights` reads), and the
trainer state (epoch, optimizer steps). Written to a temporary folder and renamed, so a run killed
while saving leaves the previous checkpoint intact."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import DistributedType

LATEST = "latest"
TRAINER_STATE = "trainer_state.json"
TRAINABLE = "trainable"


def _drop_model_weights(models, weights, output_dir) -> None:
    # The adapter saves only the trainable weights in its own format; without this accelerate
    # would also write the full (frozen) transformer at every checkpoint.
    weights.clear()


def _skip_model_load(models, input_dir) -> None:
    models.clear()


def register_hooks(accelerator: Accelerator) -> None:
    accelerator.register_save_state_pre_hook(_drop_model_weights)
    accelerator.register_load_state_pre_hook(_skip_model_load)


def save_checkpoint(accelerator: Accelerator, policy, run_dir: str | Path, state: dict, keep: int) -> Path:
    root = Path(run_dir) / "checkpoints"
    name = f"epoch-{state['epoch']:06d}"
    tmp, final = root / f".tmp-{name}", root / name
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), **({"exclude_frozen_parameters": True} if deepspeed else {}))
    # Under ZeRO-3 the weights are partitioned: every rank takes part in gathering them.
    full = accelerator.get_state_dict(policy.transformer) if _zero3(accelerator) else None
    trainable = policy.trainable_state_dict(full)
    # Every rank writes its own files (RNG states, DeepSpeed shards) into tmp: the folder is
    # renamed only once all of them are done, or a slow rank writes into a folder that is gone.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / TRAINABLE).mkdir()
        policy.save_trainable(tmp / TRAINABLE, trainable)
        (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        pointer = root / f".{LATEST}.tmp"
        pointer.write_text(name)
        os.replace(pointer, root / LATEST)
        done = sorted(p for p in root.glob("epoch-*") if p.is_dir())
        for old in done[: max(0, len(done) - keep)]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def latest_checkpoint(run_dir: str | Path) -> Path:
    root = Path(run_dir) / "checkpoints"
    pointer = root / LATEST
    if not pointer.exists():
        raise FileNotFoundError(f"resume: {run_dir} has no checkpoint ({pointer} is missing); start a new run instead")
    return root / pointer.read_text().strip()


def load_checkpoint(accelerator: Accelerator, policy, run_dir: str | Path) -> dict:
    """Restore everything saved by save_checkpoint; returns the trainer state."""
    path = latest_checkpoint(run_dir)
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    accelerator.load_state(str(path), **({"load_module_strict": False} if deepspeed else {}))
    if not deepspeed:
        # DeepSpeed restores the trainable weights with its own module checkpoint.
        policy.load_trainable(path / TRAINABLE)
    return json.loads((path / TRAINER_STATE).read_text())


def _zero3(accelerator: Accelerator) -> bool:
    plugin = accelerator.state.deepspeed_plugin
    return accelerator.distributed_type == DistributedType.DEEPSPEED and plugin is not None and plugin.zero_stage == 3
