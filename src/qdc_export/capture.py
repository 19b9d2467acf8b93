"""Capture a UNet into an FX graph with torch.export (fx.symbolic_trace fails on diffusers UNets).
The batch axis is dynamic; a batch-2 example avoids torch.export's 0/1 specialization."""

from __future__ import annotations

import torch
import torch.fx

from qdc_export.load.plugins import UNetAdapter

BATCH_EXAMPLE = 2


def batch_dynamic_shapes(num_inputs: int) -> tuple[dict[int, object], ...]:
    batch = torch.export.Dim("batch")
    return tuple({0: batch} for _ in range(num_inputs))


def capture(unet: torch.nn.Module, adapter: UNetAdapter) -> tuple[torch.fx.GraphModule, tuple[torch.Tensor, ...]]:
    """Returns the captured GraphModule (positional engine inputs -> noise_pred) and its example inputs."""
    wrapper = adapter.wrap(unet).eval()
    example = adapter.example_inputs(unet, batch=BATCH_EXAMPLE)
    dims = tuple({0: torch.export.Dim.AUTO} for _ in example)
    with torch.no_grad():
        program = torch.export.export(wrapper, example, dynamic_shapes=dims, strict=False)
    return program.module(), example
