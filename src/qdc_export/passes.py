"""The pass contract (after onnx-ir's): a pass transforms a torch.fx GraphModule, states what it needs and
guarantees, and returns a :class:`PassResult` whose ``modified`` flag is honest (computed from what it did, never
assumed). Passes do no file I/O and import neither diffusers nor TensorRT.

In place or not: a pass whose name ends in ``_`` (PyTorch's convention, e.g. ``quantize_int4_``) edits the
module it is given and returns it; any other pass leaves its input as it was. Copying a UNet's GraphModule for
every pass would double the build's memory at SD sizes, so the editing passes say so instead.

``details`` is what the manifest records of a run (counts, layer lists); ``products`` is what a pass hands to
the next stage besides the graph (recorded activations, the PT2E quantizer, the extended example inputs) and is
never recorded. :class:`PassLog` runs passes and records each run, so no stage appends records by hand.
ONNX post-passes (export.onnx_weights, export.onnx_half) are onnx-ir passes with onnx-ir's own PassResult."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch.fx

from qdc_export.errors import PassError


@dataclass
class PassResult:
    module: torch.fx.GraphModule
    modified: bool
    details: dict[str, Any] = field(default_factory=dict)
    products: dict[str, Any] = field(default_factory=dict)


class PassLog:
    """Runs passes and records ``{"name", "modified", **details}`` for each into ``records`` (the manifest's
    ``quantization.passes``), timing it as a build stage when a timer and ``stage`` are given."""

    def __init__(self, records: list[dict[str, Any]], timer: Any = None) -> None:
        self.records = records
        self.timer = timer

    def run(self, pass_fn: Callable[..., PassResult], *args: Any, stage: str | None = None,
            record: dict[str, Any] | None = None, **kwargs: Any) -> PassResult:
        """``record``: extra fields for this run's record (e.g. which layers a repeated pass covered)."""
        name = pass_fn.__name__.rstrip("_")
        timing = self.timer.stage(stage) if (self.timer is not None and stage) else contextlib.nullcontext()
        with timing:
            result = pass_fn(*args, **kwargs)
        require(isinstance(result, PassResult), name, f"returned {type(result).__name__}, not a PassResult")
        self.record(name, result.modified, **result.details, **(record or {}))
        return result

    def record(self, name: str, modified: bool, **details: Any) -> None:
        """A record for a step that is not a graph pass (e.g. recording layer inputs on trajectories)."""
        self.records.append({"name": name, "modified": modified, **details})


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
