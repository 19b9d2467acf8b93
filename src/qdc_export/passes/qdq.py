"""Insert observers, then materialize Q/DQ: thin wrappers over torchao PT2E that report honestly."""

from __future__ import annotations

import torch.fx
from torchao.quantization.pt2e import ObserverBase
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

from .annotate import QuantizationPlan, TensorRTStyleQuantizer
from .base import PassResult, count_targets, require

_Q = "quantized_decomposed.quantize_per_tensor.default"


def _observer_nodes(gm: torch.fx.GraphModule) -> int:
    return sum(1 for n in gm.graph.nodes
               if n.op == "call_module" and isinstance(gm.get_submodule(n.target), ObserverBase))


def insert_observers(gm: torch.fx.GraphModule, plan: QuantizationPlan,
                     quantizer: TensorRTStyleQuantizer | None = None) -> tuple[PassResult, TensorRTStyleQuantizer]:
    """Needs: an exported (pre-decomposition) graph. Guarantees: an observer per annotated input (and output, with
    the CPU form's quantizer). ``quantizer``: default the TensorRT-style one for ``plan``."""
    quantizer = quantizer or TensorRTStyleQuantizer(plan)
    before = _observer_nodes(gm)
    prepared = prepare_pt2e(gm, quantizer)
    observers = _observer_nodes(prepared) - before
    details = {"observers": observers, "quantized_layers": list(quantizer.quantized_layers),
               "float_layers": list(quantizer.float_layers)}
    return PassResult(prepared, observers > 0, details), quantizer


def materialize_qdq(prepared: torch.fx.GraphModule) -> PassResult:
    """Needs: calibrated observers. Guarantees: quantize/dequantize ops, INT8 weights folded."""
    converted = convert_pt2e(prepared, fold_quantize=True)
    counts = count_targets(converted)
    left = _observer_nodes(converted)
    require(left == 0, "materialize_qdq", f"{left} observer modules remain after convert")
    q_count = counts.get(_Q, 0)
    return PassResult(converted, q_count > 0, {"quantize_nodes": q_count})
