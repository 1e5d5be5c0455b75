"""Policy adapters by name. Add a model family: write models/<family>.py with a class that
implements models.base.Policy, and register a loader for it here."""

from __future__ import annotations

from typing import Callable


def _sd3(*args, **kwargs):
    from models.sd3 import SD3Policy

    return SD3Policy(*args, **kwargs)


# Loaders import lazily so that reading a config never imports diffusers.
ADAPTERS: dict[str, Callable] = {
    "sd3": _sd3,
}


def build_policy(config, device, *, needs_reference: bool = True):
    if config.adapter not in ADAPTERS:
        raise KeyError(f"unknown model adapter {config.adapter!r}; known adapters: {', '.join(sorted(ADAPTERS))}")
    return ADAPTERS[config.adapter](config, device, needs_reference=needs_reference)
