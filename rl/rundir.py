"""One run per run_dir, and resume that knows what it resumes. Runs on the main process before any
model loads:

- a lock file (`run_dir/.lock`: pid and host) stops a second run in the same run_dir at once; a
  lock left by a killed run on this host is recognised as stale and taken over;
- a new run into a run_dir that holds another run's checkpoints stops unless it is a `resume=`
  or says `overwrite=true` (the earlier run's files then move to run_dir/previous/<time>/);
- `run_dir/run.json` keeps the run's id and its resolved config; resume refuses changes to keys
  that change the math or the data layout, listing them, and accepts the keys in SAFE_TO_CHANGE.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from pathlib import Path

LOCK = ".lock"
RUN_FILE = "run.json"
PREVIOUS = "previous"
# What a run writes into its run_dir (W&B keeps its own per-run folders under wandb/).
RUN_FILES = (RUN_FILE, "checkpoints", "metrics.jsonl", "eval_before.npz", "images", "before_after.png", "samples", "wandb_id.txt")
# Keys a resume may change: how long to train, where and how much to log and evaluate, how
# rewards are reached (not what they compute), memory settings, and the failure limits.
SAFE_TO_CHANGE = (
    "num_epochs", "resume", "run_dir", "overwrite", "log.*", "eval.every", "eval.batch_size",
    "model.gradient_checkpointing", "train.max_nonfinite_steps",
    "rewards.*.urls", "rewards.*.timeout_s", "rewards.*.retries", "rewards.*.batch_size",
)


class RunDirError(ValueError):
    """The run_dir cannot take this run; the message names the directory and the fix."""


def resolve_run_dir(run_dir: str) -> str:
    """`{wandb_run_id}` in run_dir becomes the W&B run id a sweep agent sets (WANDB_RUN_ID), so
    every run of a sweep gets its own run_dir."""
    if "{wandb_run_id}" not in run_dir:
        return run_dir
    run_id = os.environ.get("WANDB_RUN_ID")
    if not run_id:
        raise RunDirError(f"run_dir {run_dir!r} uses {{wandb_run_id}} but WANDB_RUN_ID is not set: launch it through `wandb agent`, or give run_dir a plain path")
    return run_dir.replace("{wandb_run_id}", run_id)


class RunLock:
    """Held for the life of the run; `release` removes the lock file."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise RunDirError(f"run_dir {run_dir} cannot be created ({err.strerror}); choose a writable run_dir") from err
        mine = json.dumps({"pid": os.getpid(), "host": socket.gethostname()})
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if not self._stale():
                    holder = self._holder()
                    raise RunDirError(
                        f"run_dir {run_dir} is in use by another run (pid {holder.get('pid')} on {holder.get('host')}, {self.path}); "
                        f"choose another run_dir, or remove {self.path} if that run is gone"
                    ) from None
                self.path.unlink(missing_ok=True)  # left by a run that was killed
                continue
            except OSError as err:
                raise RunDirError(f"run_dir {run_dir} is not writable ({err.strerror}); choose a writable run_dir") from err
            with os.fdopen(fd, "w") as f:
                f.write(mine)
            return
        raise RunDirError(f"could not take the lock {self.path}; remove it if no run is using {run_dir}")

    def _holder(self) -> dict:
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return holder if isinstance(holder, dict) else {}

    def _stale(self) -> bool:
        """A lock from this host whose process is gone (a lock from another host is never guessed stale)."""
        holder = self._holder()
        if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
            return False
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def release(self) -> None:
        if self._holder().get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)


def _flatten(data, prefix: str = "") -> dict:
    if isinstance(data, dict):
        out = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: data}


def _safe(key: str) -> bool:
    """Does a SAFE_TO_CHANGE pattern cover `key`? A final `*` covers any rest, an inner `*` one part."""
    parts = key.split(".")
    for pattern in SAFE_TO_CHANGE:
        want = pattern.split(".")
        if want[-1] == "*" and len(parts) >= len(want) and parts[: len(want) - 1] == want[:-1]:
            return True
        if len(want) == len(parts) and all(w in ("*", p) for w, p in zip(want, parts)):
            return True
    return False


def changed_keys(before: dict, after: dict) -> list[str]:
    """Dotted keys whose value differs between two config dicts and that a resume may not change."""
    old, new = _flatten(before), _flatten(after)
    return sorted(key for key in set(old) | set(new) if old.get(key, "<absent>") != new.get(key, "<absent>") and not _safe(key))


def set_aside(run_dir: Path) -> Path:
    """overwrite=true: move the earlier run's files (checkpoints, metrics, evaluation baseline,
    images) to run_dir/previous/<time>/ so that nothing of it is deleted or mixed with the new run."""
    target = run_dir / PREVIOUS / time.strftime("%Y%m%d-%H%M%S")
    while target.exists():
        target = target.with_name(target.name + "+")
    target.mkdir(parents=True)
    for name in RUN_FILES:
        if (run_dir / name).exists():
            os.rename(run_dir / name, target / name)
    return target


def holds_a_run(run_dir: Path) -> list[str]:
    """The checkpoint folders in run_dir (what a new run there could be mistaken for)."""
    return sorted(p.name for p in (run_dir / "checkpoints").glob("epoch-*") if p.is_dir())


def prepare(config_dict: dict, *, run_dir: str, resume: bool, overwrite: bool) -> tuple[str, RunLock]:
    """Lock run_dir and return this run's id: a new one, or on resume the id in run.json after
    checking that the config changes nothing it may not."""
    path = Path(run_dir)
    lock = RunLock(path)
    try:
        run_file = path / RUN_FILE
        if resume:
            if not run_file.is_file():
                return "", lock  # written by an earlier version: nothing to compare with
            try:
                saved = json.loads(run_file.read_text())
            except ValueError as err:
                raise RunDirError(f"resume: {run_file} is corrupt ({err}); it holds the run's config") from err
            changed = changed_keys(saved.get("config", {}), config_dict)
            if changed:
                raise RunDirError(
                    f"resume: the config differs from the run's in {', '.join(changed)}; these change the math or the "
                    f"data layout. Start a new run for them (resume may change: {', '.join(SAFE_TO_CHANGE)})"
                )
            return str(saved.get("run_id", "")), lock
        existing = holds_a_run(path)
        if existing and not overwrite:
            raise RunDirError(
                f"run_dir {path} holds another run's checkpoints ({', '.join(existing[-3:])}); continue it with resume={path}, "
                f"choose another run_dir, or set overwrite=true to start a new run there (the earlier run moves to {path / PREVIOUS}/)"
            )
        if existing:
            set_aside(path)
        run_id = uuid.uuid4().hex
        tmp = path / f".{RUN_FILE}.tmp"
        tmp.write_text(json.dumps({"run_id": run_id, "config": config_dict}, indent=1))
        os.replace(tmp, run_file)
        return run_id, lock
    except BaseException:
        lock.release()
        raise
