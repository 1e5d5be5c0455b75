"""The policy protocol every model adapter implements. The rollout engine and the trainer see
only this; everything model-specific (text encoders, latent packing, source-image conditioning)
stays in the adapter."""

from __future__ import annotations

import contextlib
import copy
import importlib
from pathlib import Path
from typing import Iterator, Protocol, Sequence

import numpy as np
import torch


ImageSize = "int | tuple[int, int]"
"""An image size in pixels: (height, width), or one int for a square image."""


def image_size(size: "int | Sequence[int]") -> tuple[int, int]:
    """(height, width) of an image size given as one int (square) or a (height, width) pair."""
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    height, width = size
    return int(height), int(width)


class Conditioning(Protocol):
    """Encoded prompts (and source images) of P unique inputs, kept once per prompt."""

    def take(self, index: torch.Tensor) -> "Conditioning":
        """Rows `index` ([B] long) of every tensor: one row per sample of a batch."""
        ...


class Policy(Protocol):
    transformer: torch.nn.Module
    """The trained network; the trainer may replace it with its DDP / DeepSpeed wrapper."""
    network: torch.nn.Module
    """The same network, never wrapped: for adapters, saving and reference mode."""

    def encode(self, prompts: Sequence[str], source_images: Sequence | None = None) -> Conditioning:
        """Encode unique prompts (no gradient); row i belongs to prompts[i]."""
        ...

    def sigmas(self, num_steps: int, size: "ImageSize") -> torch.Tensor:
        """The num_steps + 1 sigmas from 1 to 0 this model samples with at this image size
        (models with resolution-dependent shifting, like FLUX.1 and Qwen-Image, need the size)."""
        ...

    def initial_noise(self, generators: Sequence[torch.Generator], size: "ImageSize", cond: Conditioning) -> torch.Tensor:
        """[B, ...] float32 starting latents of images of `size`, one generator per sample, in the
        adapter's grid form: a shape that alone tells the image size (packed-token families keep
        [B, C, h, w] and pack inside velocity), so no other method needs the size."""
        ...

    def velocity(self, latents: torch.Tensor, sigma: torch.Tensor, cond: Conditioning, guidance_scale: float) -> torch.Tensor:
        """Guided velocity prediction, float32, same shape as latents; sigma is [B]."""
        ...

    def decode(self, latents: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """[B, H, W, 3] uint8 images on the CPU."""
        ...

    def trainable_parameters(self) -> list[torch.nn.Parameter]: ...

    def reference(self) -> contextlib.AbstractContextManager:
        """Within this context the network acts as the frozen base model."""
        ...

    def trainable_state_dict(self) -> dict[str, torch.Tensor]: ...

    def save_trainable(self, directory: str, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write the trainable weights in the format the model's pipeline loads (LoRA: load_lora_weights)."""
        ...

    def load_trainable(self, directory: str) -> None: ...


def lora_layers(network: torch.nn.Module) -> list[torch.nn.Module]:
    """The network's peft tuner layers (each LoRA-wrapped linear), in module order."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [module for module in network.modules() if isinstance(module, BaseTunerLayer)]


@contextlib.contextmanager
def lora_disabled(network: torch.nn.Module, layers: list[torch.nn.Module] | None = None) -> Iterator[None]:
    """Reference policy of a LoRA-adapted diffusers model: the same weights, adapters off.

    For forward passes without gradients (GRPO's KL, NFT's and AWM's reference): only the flag
    each peft tuner layer's forward reads (`disable_adapters`) is switched, on the layers found
    once by the caller. peft's `enable_adapters` also resets the adapters' requires_grad and
    re-selects the active adapter on every call, and diffusers' `disable_adapters()` walks every
    module and reads peft's package metadata: GRPO's KL and NFT switch several times a step."""
    layers = lora_layers(network) if layers is None else layers
    if layers and not hasattr(layers[0], "_disable_adapters"):
        raise RuntimeError("this peft version keeps no _disable_adapters flag on its tuner layers; pin peft to a version that does")
    previous = [layer._disable_adapters for layer in layers]
    # A plain instance attribute: written to the instance dict directly, past nn.Module's
    # __setattr__ (which checks for parameters, buffers and modules on every write).
    for layer in layers:
        layer.__dict__["_disable_adapters"] = True
    try:
        yield
    finally:
        for layer, value in zip(layers, previous):
            layer.__dict__["_disable_adapters"] = value


def draw_noise(
    shape: Sequence[int],
    generator: torch.Generator | Sequence[torch.Generator] | None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Standard normal noise; with a list of generators each sample row uses its own."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
        rows = [torch.randn(tuple(shape[1:]), generator=g, dtype=torch.float32, device=g.device) for g in generator]
        return torch.stack(rows).to(device)
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32, device=device)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FULL_WEIGHTS_FILE = "transformer.safetensors"


class DiffusersPolicy:
    """What every diffusers-based adapter shares: LoRA or full fine-tuning of `pipe.transformer`,
    the reference policy, autocast, and saving the trainable weights in the pipeline's own format.
    A subclass names its pipeline classes, calls `_load_pipeline`, makes its own checks, then
    calls `_setup_training`."""

    pipe: "object"
    config: "object"
    device: torch.device
    compute_dtype: torch.dtype
    pipeline_classes: "tuple[type, ...]" = ()
    adapter_name: str = ""
    example_checkpoint: str = ""

    def _load_pipeline(self, config, device: torch.device | str, **extras) -> "object":
        """Load `config.pretrained` through `DiffusionPipeline.from_pretrained` (the path a user
        takes with a real checkpoint), check it is one of `pipeline_classes`, freeze every
        network in it on `device`, and set `config`, `device`, `compute_dtype`. `extras` replace
        components that would otherwise load as declared."""
        from diffusers import DiffusionPipeline

        self.config = config
        self.device = torch.device(device)
        self.compute_dtype = DTYPES[config.dtype]
        # Frozen parts load in the compute dtype; a fully trained transformer stays fp32 (master
        # weights) and runs under autocast (`_setup_training`).
        pipe = DiffusionPipeline.from_pretrained(config.pretrained, revision=config.revision, dtype=self.compute_dtype, **extras)
        if not isinstance(pipe, self.pipeline_classes):
            needed = " or ".join(cls.__name__ for cls in self.pipeline_classes)
            raise ValueError(
                f"{config.pretrained} holds a {type(pipe).__name__}; the {self.adapter_name} adapter needs a "
                f"{needed} checkpoint: {self._wrong_pipeline_hint(pipe)}"
            )
        pipe.set_progress_bar_config(disable=True)
        for module in pipe.components.values():
            if isinstance(module, torch.nn.Module):
                module.requires_grad_(False).eval().to(self.device)
        return pipe

    def _wrong_pipeline_hint(self, pipe) -> str:
        """The fix to print when `pipe` is not this adapter's pipeline: the adapter that takes it,
        where one does."""
        from models import ADAPTERS, adapter_class

        for name in ADAPTERS:
            if name != self.adapter_name and type(pipe) in getattr(adapter_class(name), "pipeline_classes", ()):
                return f"use model.adapter={name}"
        return f"point model.pretrained at one (e.g. {self.example_checkpoint})"

    def _setup_training(self, needs_reference: bool) -> None:
        from diffusers.training_utils import cast_training_params
        from peft import LoraConfig

        config = self.config
        self.network = self.pipe.transformer
        self._reference_copy = None
        if config.use_lora:
            self.network.add_adapter(
                LoraConfig(
                    r=config.lora.rank,
                    lora_alpha=config.lora.alpha,
                    lora_dropout=config.lora.dropout,
                    init_lora_weights="gaussian",
                    # A string is one regular expression (peft full-matches it); a list holds names.
                    target_modules=config.lora.target_modules if isinstance(config.lora.target_modules, str) else list(config.lora.target_modules),
                )
            )
            # Adapters train in fp32 even when the frozen base runs in bf16 (stable Adam updates).
            cast_training_params(self.network, dtype=torch.float32)
            self._lora_layers = lora_layers(self.network)  # switched off for the reference: found once
        else:
            # Fully trained weights stay fp32 (master weights) and run under autocast.
            self.network.to(torch.float32)
            if needs_reference:
                self._reference_copy = copy.deepcopy(self.network).requires_grad_(False)
                self._reference_copy.to(self.compute_dtype)
            self.network.requires_grad_(True)
        if config.gradient_checkpointing:
            self.network.enable_gradient_checkpointing()
        self.transformer = self.network
        # Found once: the trainer asks for them several times a step (weight swaps, checks).
        self._trainable = [p for p in self.network.parameters() if p.requires_grad]

    def _autocast(self):
        enabled = self.compute_dtype != torch.float32
        return torch.autocast(self.device.type, dtype=self.compute_dtype, enabled=enabled)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return list(self._trainable)

    @contextlib.contextmanager
    def reference(self) -> Iterator[torch.nn.Module]:
        if self.config.use_lora:
            with lora_disabled(self.network, self._lora_layers):
                yield self.transformer
        else:
            if self._reference_copy is None:
                raise RuntimeError(f"full fine-tuning without a reference copy: build {type(self).__name__} with needs_reference=True")
            yield self._reference_copy

    def trainable_state_dict(self, full_state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """LoRA weights (peft names) or the full transformer; `full_state_dict` is a gathered
        state dict (ZeRO-3) to take them from instead of the local module."""
        from peft.utils import get_peft_model_state_dict

        if self.config.use_lora:
            return get_peft_model_state_dict(self.network, state_dict=full_state_dict)
        return full_state_dict if full_state_dict is not None else self.network.state_dict()

    def save_trainable(self, directory: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """LoRA in the format `pipe.load_lora_weights` reads, or the full transformer weights."""
        from safetensors.torch import save_file

        state_dict = state_dict if state_dict is not None else self.trainable_state_dict()
        state_dict = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
        if self.config.use_lora:
            # The adapter metadata carries lora_alpha: without it load_lora_weights assumes
            # alpha == rank and a LoRA trained with alpha != rank loads at the wrong strength.
            type(self.pipe).save_lora_weights(
                directory, transformer_lora_layers=state_dict,
                transformer_lora_adapter_metadata=self.network.peft_config["default"].to_dict(),
            )
        else:
            save_file(state_dict, str(Path(directory) / FULL_WEIGHTS_FILE))

    def load_trainable(self, directory: str | Path) -> None:
        from diffusers.training_utils import cast_training_params
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        if self.config.use_lora:
            lora = type(self.pipe).lora_state_dict(str(directory))
            prefix = "transformer."
            lora = {k[len(prefix):]: v for k, v in lora.items() if k.startswith(prefix)}
            result = set_peft_model_state_dict(self.network, lora, adapter_name="default")
            if getattr(result, "unexpected_keys", None):
                raise ValueError(f"LoRA checkpoint in {directory} does not match the adapter config: unexpected keys {result.unexpected_keys[:5]}")
            cast_training_params(self.network, dtype=torch.float32)
        else:
            self.network.load_state_dict(load_file(str(Path(directory) / FULL_WEIGHTS_FILE)))


class PackedLatents:
    """Latents packed 2x2 into tokens (FLUX.1, Qwen-Image): image sides are multiples of the VAE's
    downsampling times 2, and an image of h x w pixels has (h / m) x (w / m) tokens of 4 x the
    VAE's latent channels (m = `_multiple`). The rollout and the trainer hold the latents UNPACKED,
    [B, C, 2 rows, 2 cols], so their shape tells the image size; the adapter packs them into
    [B, rows * cols, 4C] tokens for its transformer and unpacks the prediction. For
    DiffusersPolicy subclasses (uses self.pipe, self.network)."""

    @property
    def _multiple(self) -> int:
        """Image sides must be multiples of this: VAE downsampling times the 2x2 latent packing."""
        return self.pipe.vae_scale_factor * 2

    @property
    def _latent_channels(self) -> int:
        return self.network.config.in_channels // 4

    def _grid(self, size: "ImageSize") -> tuple[int, int]:
        """(rows, cols) of the packed token grid of an image of `size` pixels."""
        height, width = image_size(size)
        if height % self._multiple or width % self._multiple:
            raise ValueError(
                f"image size {height}x{width} (height x width): each side must be a multiple of "
                f"{self._multiple} for this model's VAE ({type(self).__name__}); set sample.resolution / eval.resolution"
            )
        return height // self._multiple, width // self._multiple

    @staticmethod
    def _pack(latents: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """[B, C, 2 rows, 2 cols] latents as [B, rows * cols, 4C] tokens (each token a 2x2 patch,
        channel-major, the diffusers pipelines' layout) and the grid (rows, cols)."""
        batch, channels, height, width = latents.shape
        rows, cols = height // 2, width // 2
        tokens = latents.reshape(batch, channels, rows, 2, cols, 2).permute(0, 2, 4, 1, 3, 5)
        return tokens.reshape(batch, rows * cols, channels * 4), (rows, cols)

    @staticmethod
    def _unpack(tokens: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        """The inverse of _pack: [B, rows * cols, 4C] tokens as [B, C, 2 rows, 2 cols] latents."""
        batch, _, features = tokens.shape
        latents = tokens.reshape(batch, rows, cols, features // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return latents.reshape(batch, features // 4, rows * 2, cols * 2)

    def _source_image(self, image):
        """A source image (uint8 [H, W, 3] array, sides multiples of _multiple) as a PIL image."""
        from PIL import Image

        array = np.asarray(image)
        if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
            raise ValueError(f"source images must be uint8 [H, W, 3] arrays, got {array.dtype} {array.shape}")
        height, width = array.shape[:2]
        if height % self._multiple or width % self._multiple:
            raise ValueError(
                f"source image of {width}x{height} px: sides must be multiples of {self._multiple}; "
                "resize source images to the training resolution"
            )
        return Image.fromarray(array)

    @property
    def _pipeline_module(self):
        """The module of the pipeline's class: its own schedule helpers (calculate_shift, ...)."""
        return importlib.import_module(type(self.pipe).__module__)

    def _initial_sigmas(self, num_steps: int):
        """The sigmas the stock pipeline hands its scheduler before shifting: linspace(1, 1/N, N)."""
        return np.linspace(1.0, 1 / num_steps, num_steps)

    def _mu(self, tokens: int, num_steps: int) -> float:
        """The shift parameter of the dynamic shift for an image of `tokens` packed tokens (the
        noisy image's only; condition tokens do not count): calculate_shift, linear in the token
        count between the scheduler config's two anchors, as FLUX.1 and Qwen-Image compute it."""
        settings = self.pipe.scheduler.config
        return self._pipeline_module.calculate_shift(
            tokens,
            settings.get("base_image_seq_len", 256),
            settings.get("max_image_seq_len", 4096),
            settings.get("base_shift", 0.5),
            settings.get("max_shift", 1.15),
        )

    def sigmas(self, num_steps: int, size: "ImageSize") -> torch.Tensor:
        """The pipeline scheduler's own schedule at this image size: the stock initial sigmas
        shifted with mu from the image's token count (bigger images shift more where the
        scheduler shifts dynamically), then the terminal 0, through the pipeline module's own
        retrieve_timesteps."""
        rows, cols = self._grid(size)
        scheduler = copy.deepcopy(self.pipe.scheduler)
        self._pipeline_module.retrieve_timesteps(
            scheduler, num_steps, "cpu", sigmas=self._initial_sigmas(num_steps), mu=self._mu(rows * cols, num_steps)
        )
        return scheduler.sigmas.to(torch.float32)

    def initial_noise(self, generators: Sequence[torch.Generator], size: "ImageSize", cond=None) -> torch.Tensor:
        """[B, C, 2 rows, 2 cols] float32 noise (unpacked); each sample's from its own generator.
        Packed, it is the stock pipelines' prepare_latents noise for the same generator."""
        rows, cols = self._grid(size)
        return draw_noise((len(generators), self._latent_channels, 2 * rows, 2 * cols), list(generators), device=self.device)
