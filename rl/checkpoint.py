"""Checkpoints, and what resume trusts.

A checkpoint folder `run_dir/checkpoints/epoch-NNNNNN/` holds:
- `trainable/`: the trainable weights in the model's own format (LoRA: what
  `pipe.load_lora_weights` reads), safetensors;
- `trainer_state.json`: epoch, optimizer steps, seed and the run's id;
- `scheduler.json` (the LR schedule's state) and, with an EMA, `ema.safetensors` + `ema.json`;
  with train.objective nft or awm's EMA regulariser, `old_policy.safetensors` (the lagged copy of
  the trainable weights: nft's sampling policy, awm's EMA);
- what accelerate saves itself: the optimizer state (`optimizer.bin`) and each rank's RNG state
  (`random_states_N.pkl`), both read back with `torch.load(weights_only=True)`, which refuses any
  pickled code; under DeepSpeed, DeepSpeed's own sharded files (read by DeepSpeed's loader, which
  unpickles: resume only DeepSpeed checkpoints you wrote).
Nothing else in a checkpoint is read: no custom pickled objects.

Written to a temporary folder and renamed, so a run killed while saving leaves the previous
checkpoint intact; `latest` names the newest and is only moved once the rename is done. Pruning
keeps this run's newest `keep` by epoch and never the one just written. Before resume uses a
checkpoint it is verified (files present, weights load and are finite); a broken one is named and
the newest intact one is used instead.
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, load

LATEST = "latest"
TRAINER_STATE = "trainer_state.json"
TRAINABLE = "trainable"
SCHEDULER_STATE = "scheduler.json"
EMA_WEIGHTS, EMA_STATE = "ema.safetensors", "ema.json"
OLD_WEIGHTS = "old_policy.safetensors"  # the lagged copy: DiffusionNFT's sampling (old) policy, AWM's EMA
OPTIMIZER_STATE = "optimizer.bin"  # accelerate's name for the first optimizer's state


class CheckpointError(RuntimeError):
    """No checkpoint of the run can be resumed from; the message names each one and why."""


def _drop_model_weights(models, weights, output_dir) -> None:
    # The adapter saves only the trainable weights in its own format; without this accelerate
    # would also write the full (frozen) transformer at every checkpoint.
    weights.clear()


def _skip_model_load(models, input_dir) -> None:
    models.clear()


def register_hooks(accelerator: Accelerator) -> None:
    accelerator.register_save_state_pre_hook(_drop_model_weights)
    accelerator.register_load_state_pre_hook(_skip_model_load)


def save_checkpoint(accelerator: Accelerator, policy, run_dir: str | Path, state: dict, keep: int, *, scheduler, ema=None,
                    old: list[torch.Tensor] | None = None) -> Path:
    """Write the checkpoint of `state["epoch"]`; `state` carries the run's id (`run_id`)."""
    from safetensors.torch import save_file

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
        (tmp / SCHEDULER_STATE).write_text(json.dumps(scheduler.state_dict()))
        if ema is not None:
            ema_state = ema.state_dict()
            shadow = ema_state.pop("shadow_params")
            save_file({str(i): p.detach().cpu().contiguous() for i, p in enumerate(shadow)}, str(tmp / EMA_WEIGHTS))
            (tmp / EMA_STATE).write_text(json.dumps(ema_state))
        if old is not None:
            save_file({str(i): p.detach().cpu().contiguous() for i, p in enumerate(old)}, str(tmp / OLD_WEIGHTS))
        (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        pointer = root / f".{LATEST}.tmp"
        pointer.write_text(name)
        os.replace(pointer, root / LATEST)
        prune(root, state.get("run_id"), keep, written=name)
    accelerator.wait_for_everyone()
    return final


def _trainer_state(path: Path) -> dict | None:
    try:
        state = json.loads((path / TRAINER_STATE).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and isinstance(state.get("epoch"), int) else None


def prune(root: Path, run_id: str | None, keep: int, *, written: str) -> None:
    """Delete this run's checkpoints beyond its newest `keep` by epoch; never `written`, never
    another run's (a run_dir reused with overwrite=true keeps the earlier run's checkpoints)."""
    ours = []
    for path in root.glob("epoch-*"):
        state = _trainer_state(path) if path.is_dir() else None
        if state is not None and state.get("run_id") == run_id:
            ours.append((state["epoch"], path))
    ours.sort()
    for _, path in ours[: max(0, len(ours) - max(keep, 1))]:
        if path.name != written:
            shutil.rmtree(path, ignore_errors=True)


def problem(path: Path, *, ema: bool, deepspeed: bool, old: bool = False) -> str | None:
    """Why the checkpoint at `path` cannot be resumed from, or None when it is intact."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_dir():
        return "missing"
    if _trainer_state(path) is None:
        return f"{TRAINER_STATE} is missing or unreadable"
    required = [SCHEDULER_STATE] + ([EMA_WEIGHTS, EMA_STATE] if ema else []) + ([OLD_WEIGHTS] if old else []) + ([] if deepspeed else [OPTIMIZER_STATE])
    missing = [name for name in required if not (path / name).is_file()]
    if missing:
        return f"missing {', '.join(missing)}"
    weights = sorted((path / TRAINABLE).glob("*.safetensors")) + ([path / EMA_WEIGHTS] if ema else []) + ([path / OLD_WEIGHTS] if old else [])
    if not any(p.parent.name == TRAINABLE for p in weights):
        return f"no weights in {TRAINABLE}/"
    for file in weights:
        try:
            tensors = load_file(str(file))
        except (SafetensorError, OSError, ValueError) as err:
            return f"{file.relative_to(path)} does not load: {err}"
        bad = [key for key, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        if bad:
            return f"{file.relative_to(path)} holds non-finite values ({bad[0]})"
    if not deepspeed and not zipfile.is_zipfile(path / OPTIMIZER_STATE):
        return f"{OPTIMIZER_STATE} is truncated or not a torch.save file"
    for file in sorted(path.glob("random_states_*.pkl")):
        # The RNG states are read with torch.load(weights_only=True), as accelerate reads them;
        # accelerate only warns when that fails, so a foreign file is caught here instead.
        try:
            load(file)
        except Exception as err:  # noqa: BLE001 - any failure means the file is not what we wrote
            return f"{file.name} is not plain tensor data, refused unread ({type(err).__name__})"
    try:
        json.loads((path / SCHEDULER_STATE).read_text())
        if ema:
            json.loads((path / EMA_STATE).read_text())
    except ValueError as err:
        return f"a JSON state file is corrupt: {err}"
    return None


def resumable_checkpoint(run_dir: str | Path, *, ema: bool, deepspeed: bool, old: bool = False) -> tuple[Path, list[str]]:
    """The checkpoint to resume from: `latest` if intact, else the newest intact one by epoch.
    Returns it and one line per broken checkpoint passed over; raises CheckpointError if none."""
    root = Path(run_dir) / "checkpoints"
    pointer = root / LATEST
    candidates = []
    if pointer.is_file():
        candidates.append(root / pointer.read_text().strip())
    by_epoch = sorted(((s["epoch"], p) for p in root.glob("epoch-*") if (s := _trainer_state(p)) is not None), reverse=True)
    candidates += [p for _, p in by_epoch if p not in candidates]
    candidates += [p for p in sorted(root.glob("epoch-*"), reverse=True) if p not in candidates]
    skipped = []
    for path in candidates:
        why = problem(path, ema=ema, deepspeed=deepspeed, old=old)
        if why is None:
            return path, skipped
        skipped.append(f"{path}: {why}")
    if not candidates:
        raise CheckpointError(f"resume: {run_dir} has no checkpoint ({root} holds no epoch-* folder); start a new run instead")
    raise CheckpointError(f"resume: no intact checkpoint in {root}:\n  " + "\n  ".join(skipped))


def latest_checkpoint(run_dir: str | Path) -> Path:
    """The checkpoint `latest` names (the newest completely written one)."""
    root = Path(run_dir) / "checkpoints"
    pointer = root / LATEST
    if not pointer.exists():
        raise FileNotFoundError(f"resume: {run_dir} has no checkpoint ({pointer} is missing); start a new run instead")
    return root / pointer.read_text().strip()


def load_checkpoint(accelerator: Accelerator, policy, run_dir: str | Path, *, scheduler, ema=None,
                    old: list[torch.Tensor] | None = None) -> tuple[dict, Path, list[str]]:
    """Restore the newest intact checkpoint: returns its trainer state, its path, and the broken
    checkpoints passed over."""
    import pickle

    from safetensors.torch import load_file

    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    path, skipped = resumable_checkpoint(run_dir, ema=ema is not None, deepspeed=deepspeed, old=old is not None)
    try:
        accelerator.load_state(str(path), **({"load_module_strict": False} if deepspeed else {}))
    except pickle.UnpicklingError as err:
        # torch.load(weights_only=True) met something other than tensors and plain data: a
        # crafted or foreign file. It is refused, never run.
        raise CheckpointError(f"resume: {path} holds a file that is not plain tensor data, refused unread: {err}") from err
    except RuntimeError as err:
        # e.g. custom_checkpoint_*.pkl files that no registered object owns: accelerate refuses
        # them before reading any.
        raise CheckpointError(f"resume: {path} holds files this trainer does not write, refused unread: {str(err).splitlines()[0]}") from err
    if not deepspeed:
        # DeepSpeed restores the trainable weights with its own module checkpoint.
        policy.load_trainable(path / TRAINABLE)
    scheduler.load_state_dict(json.loads((path / SCHEDULER_STATE).read_text()))
    if ema is not None:
        shadow = load_file(str(path / EMA_WEIGHTS))
        ema.load_state_dict({**json.loads((path / EMA_STATE).read_text()), "shadow_params": [shadow[str(i)].to(accelerator.device) for i in range(len(shadow))]})
    if old is not None:
        saved = load_file(str(path / OLD_WEIGHTS))
        if len(saved) != len(old):
            raise CheckpointError(f"resume: {path / OLD_WEIGHTS} holds {len(saved)} tensors, the policy has {len(old)} trainable ones")
        for i, tensor in enumerate(old):
            tensor.copy_(saved[str(i)].to(tensor.device))
    return _trainer_state(path), path, skipped


def _zero3(accelerator: Accelerator) -> bool:
    plugin = accelerator.state.deepspeed_plugin
    return accelerator.distributed_type == DistributedType.DEEPSPEED and plugin is not None and plugin.zero_stage == 3
