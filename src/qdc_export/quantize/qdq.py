"""Insert observers, then materialize Q/DQ: thin wrappers over torchao PT2E that report honestly."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.fx
from torchao.quantization.pt2e import ObserverBase
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

from qdc_export.passes import PassLog, PassResult, count_targets, require
from qdc_export.quantize.annotate import QuantizationPlan, TensorRTStyleQuantizer
from qdc_export.quantize.annotate_cpu import cpu_form_quantizer

_Q = "quantized_decomposed.quantize_per_tensor.default"


def _observer_nodes(gm: torch.fx.GraphModule) -> int:
    return sum(1 for n in gm.graph.nodes
               if n.op == "call_module" and isinstance(gm.get_submodule(n.target), ObserverBase))


def insert_observers_(gm: torch.fx.GraphModule, plan: QuantizationPlan) -> PassResult:
    """Needs: an exported (pre-decomposition) graph. Guarantees: an observer per annotated input."""
    quantizer = cpu_form_quantizer(plan) if plan.layout == "onnxruntime-cpu" else TensorRTStyleQuantizer(plan)
    before = _observer_nodes(gm)
    prepared = prepare_pt2e(gm, quantizer)
    observers = _observer_nodes(prepared) - before
    products = {"quantizer": quantizer, "quantized_layers": list(quantizer.quantized_layers),
                "float_layers": list(quantizer.float_layers)}
    return PassResult(prepared, observers > 0, {"observers": observers}, products)


def materialize_qdq_(prepared: torch.fx.GraphModule) -> PassResult:
    """Needs: calibrated observers. Guarantees: quantize/dequantize ops, INT8 weights folded."""
    converted = convert_pt2e(prepared, fold_quantize=True)
    counts = count_targets(converted)
    left = _observer_nodes(converted)
    require(left == 0, "materialize_qdq", f"{left} observer modules remain after convert")
    q_count = counts.get(_Q, 0)
    return PassResult(converted, q_count > 0, {"quantize_nodes": q_count})


def static_int8_qdq_(gm: torch.fx.GraphModule, plan: QuantizationPlan, log: PassLog,
                     calibrate: Callable[[torch.fx.GraphModule], None], **record: Any) -> PassResult:
    """W8A8-style INT8 Q/DQ for the layers ``plan`` quantizes: observe, ``calibrate`` (runs sampler trajectories
    through the observed module), materialize. Both runs are recorded in ``log``; the result is the last one's,
    with the observed layer lists in ``products``."""
    observed = log.run(insert_observers_, gm, plan, stage="insert_observers", record=record)
    if log.timer is not None:
        with log.timer.stage("calibrate"):
            calibrate(observed.module)
    else:
        calibrate(observed.module)
    converted = log.run(materialize_qdq_, observed.module, stage="materialize_qdq")
    return PassResult(converted.module, converted.modified, converted.details,
                      {k: observed.products[k] for k in ("quantized_layers", "float_layers")})
