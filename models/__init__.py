"""Policy adapters by name. Add a model family: write models/<family>.py with a class that
implements models.base.Policy, and register "module:Class" here. Classes are imported only when
used, so reading a config never imports diffusers."""

from __future__ import annotations

import importlib

ADAPTERS: dict[str, str] = {
    "sd3": "models.sd3:SD3Policy",
    "qwen_image": "models.qwen_image:QwenImagePolicy",
    "qwen_image_edit": "models.qwen_image_edit:QwenImageEditPolicy",
    "flux": "models.flux:FluxPolicy",
    "flux_kontext": "models.flux_kontext:FluxKontextPolicy",
    "flux2_klein": "models.flux2:Flux2KleinPolicy",
    "z_image": "models.z_image:ZImagePolicy",
}


def adapter_class(name: str) -> type:
    if name not in ADAPTERS:
        raise KeyError(f"unknown model adapter {name!r}; known adapters: {', '.join(sorted(ADAPTERS))}")
    module, cls = ADAPTERS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def build_policy(config, device, *, needs_reference: bool = True):
    return adapter_class(config.adapter)(config, device, needs_reference=needs_reference)
