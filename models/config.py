"""The model section of a run config: which adapter, which checkpoint, LoRA. Read by the adapters;
composed into the run config by rl.config (one docstring per field, shown in the README's reference)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal, Optional, Union

from pydantic import Field


@dataclass
class LoraSettings:
    rank: Annotated[int, Field(ge=1)] = 32
    """LoRA rank r (Flow-GRPO SD3.5: 32)."""
    alpha: Annotated[int, Field(ge=1)] = 64
    """LoRA alpha; the update is scaled by alpha / rank."""
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    """LoRA dropout. Keep 0: dropout would make the first inner step off-policy."""
    target_modules: Union[list[str], str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    """Modules that get adapters (peft's target_modules): a list of names, each matching a module's name or its last dotted parts, or one regular expression a module's full name must match (for modules a suffix cannot single out)."""


@dataclass
class ModelConfig:
    adapter: str = "sd3"
    """Policy adapter (models.ADAPTERS): sd3 (Stable Diffusion 3 / 3.5), qwen_image, qwen_image_edit, flux (FLUX.1 [dev]), flux_kontext (FLUX.1 Kontext), flux2_klein (FLUX.2 [klein]), z_image (Z-Image / Z-Image-Turbo)."""
    pretrained: str = "stabilityai/stable-diffusion-3.5-medium"
    """Hub id or local directory of the diffusers pipeline, loaded with from_pretrained."""
    revision: Optional[str] = None
    """Hub revision of `pretrained`."""
    build_tiny_if_missing: bool = False
    """Build a tiny pipeline (models.fixtures) at `pretrained` when that directory does not exist (CPU tests and tiny configs)."""
    tiny_warm_start_steps: Annotated[int, Field(ge=0)] = 400
    """When building a tiny pipeline: flow-matching steps fitting its transformer to smooth synthetic latents (0 = random weights)."""
    dtype: Literal["fp32", "bf16", "fp16"] = "bf16"
    """Dtype of the frozen weights and of autocast; log-prob math is always fp32."""
    use_lora: bool = True
    """Train LoRA adapters (true) or the full transformer (false)."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """LoRA settings (used when use_lora is true)."""
    gradient_checkpointing: bool = False
    """Recompute transformer activations in the backward pass to save memory."""
    max_sequence_length: Annotated[int, Field(ge=1)] = 256
    """Prompt length in tokens, as the family's pipeline reads its max_sequence_length (must match what the model was trained with). Qwen-Image-Edit ignores it, as its pipelines do."""
