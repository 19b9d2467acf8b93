"""The pass contract (after onnx-ir's): a pass is a pure transform of a torch.fx GraphModule, states what
it needs and guarantees, and returns a :class:`PassResult` whose ``modified`` flag is honest (computed
from what it did, never assumed). Passes do no file I/O and import neither diffusers nor TensorRT."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.fx

from qdc_export.errors import PassError


@dataclass
class PassResult:
    module: torch.fx.GraphModule
    modified: bool
    details: dict[str, Any] = field(default_factory=dict)


def require(condition: bool, pass_name: str, message: str) -> None:
    if not condition:
        raise PassError(f"{pass_name}: {message}")


def count_targets(gm: torch.fx.GraphModule) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function":
            key = str(node.target)
            counts[key] = counts.get(key, 0) + 1
    return counts
