"""The model-adapter contract. An adapter knows, for one family of diffusers UNets, the engine's input
names and shapes, which axes are dynamic, how to call the UNet with positional tensors (what
torch.export captures), and which layers stay in float by default."""

from __future__ import annotations

import fnmatch
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

# Engine interface (fixed, see README): inputs in this order where the model takes them.
SAMPLE, TIMESTEP = "sample", "timestep"
ENCODER_HIDDEN_STATES, TEXT_EMBEDS, TIME_IDS = "encoder_hidden_states", "text_embeds", "time_ids"
NOISE_PRED = "noise_pred"
COMP_STATE, COMP_STATE_OUT = "comp_state", "comp_state_out"
# The folded compensation head is the module "head" of the engine graph (compensation/fold.py): its tables become
# initializers named "head.scale", "head.bias", ..., which is how the check finds the head (check/head.py).
HEAD_PREFIX = "head."


@dataclass(frozen=True)
class TensorSpec:
    """One engine input: ``shape`` holds ints, or strings for dynamic axes ("batch")."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str = "float32"

    def concrete(self, batch: int) -> tuple[int, ...]:
        return tuple(batch if dim == "batch" else int(dim) for dim in self.shape)


class UNetAdapter(ABC):
    """Adapter for one diffusers UNet family. Registered explicitly in :mod:`qdc_export.load.plugins`."""

    name: str
    # ModelOpt's diffusers skip list: layers whose quantization hurts most for least gain.
    default_float_layers: tuple[str, ...] = (
        "conv_in",
        "conv_out",
        "time_embedding.*",
        "*time_emb_proj",
        "add_embedding.*",
        "*conv_shortcut",
        "conv_norm_out",
        "norm_out",
    )

    @abstractmethod
    def matches(self, unet: torch.nn.Module) -> bool: ...

    @abstractmethod
    def condition_specs(self, unet: torch.nn.Module) -> list[TensorSpec]:
        """Conditioning inputs after ``sample`` and ``timestep`` (empty for unconditional models)."""

    @abstractmethod
    def wrap(self, unet: torch.nn.Module) -> torch.nn.Module:
        """A module whose forward takes the engine inputs positionally and returns ``noise_pred``."""

    def input_specs(self, unet: torch.nn.Module) -> list[TensorSpec]:
        cfg = unet.config
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        return [
            TensorSpec(SAMPLE, ("batch", cfg.in_channels, size, size)),
            TensorSpec(TIMESTEP, ("batch",)),
            *self.condition_specs(unet),
        ]

    def output_spec(self, unet: torch.nn.Module) -> TensorSpec:
        cfg = unet.config
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        return TensorSpec(NOISE_PRED, ("batch", cfg.out_channels, size, size))

    def example_inputs(self, unet: torch.nn.Module, batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, ...]:
        gen = torch.Generator().manual_seed(seed)
        tensors = []
        for spec in self.input_specs(unet):
            shape = spec.concrete(batch)
            if spec.name == TIMESTEP:
                tensors.append(torch.full(shape, 500.0))
            else:
                tensors.append(torch.randn(shape, generator=gen))
        return tuple(tensors)


def layer_is_float(layer: str, *, float_globs: tuple[str, ...], include: tuple[str, ...]) -> bool:
    """A layer stays float if it matches a float glob and no include glob (include wins)."""
    if any(fnmatch.fnmatchcase(layer, g) for g in include):
        return False
    return any(fnmatch.fnmatchcase(layer, g) for g in float_globs)
