"""Model-family adapters for diffusers UNets, registered explicitly (no import-time discovery)."""

from __future__ import annotations

import torch

from qdc_export.errors import ModelLoadError
from qdc_export.load.plugins.base import TensorSpec, UNetAdapter, layer_is_float
from qdc_export.load.plugins.diffusers_unets import SDUNetAdapter, SDXLUNetAdapter, UNet2DAdapter

ADAPTERS: tuple[UNetAdapter, ...] = (UNet2DAdapter(), SDXLUNetAdapter(), SDUNetAdapter())


def adapter_for(unet: torch.nn.Module) -> UNetAdapter:
    for adapter in ADAPTERS:
        if adapter.matches(unet):
            return adapter
    cfg = getattr(unet, "config", {})
    detail = f"addition_embed_type={cfg.get('addition_embed_type')!r}" if hasattr(cfg, "get") else ""
    raise ModelLoadError(
        f"unsupported architecture {type(unet).__name__} {detail}".strip()
        + f"; supported: {', '.join(a.name for a in ADAPTERS)}"
    )


def adapter_by_name(name: str) -> UNetAdapter:
    for adapter in ADAPTERS:
        if adapter.name == name:
            return adapter
    raise ModelLoadError(f"unknown adapter {name!r}")


__all__ = ["ADAPTERS", "TensorSpec", "UNetAdapter", "adapter_by_name", "adapter_for", "layer_is_float"]
