"""``qdc-export inspect``: per-layer precision, Q/DQ counts, inputs/outputs and size by precision of an
ONNX model (or of a build folder's model.onnx), from the graph alone."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto

from qdc_export.check.folder import load_onnx_checked
from qdc_export.engines.trt_rules import summarize_quantization

_COMPUTE_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
_DTYPE_NAMES = {v: k.lower() for k, v in TensorProto.DataType.items()}


def _value_info(vi: onnx.ValueInfoProto) -> dict[str, Any]:
    t = vi.type.tensor_type
    dims = [d.dim_param or d.dim_value for d in t.shape.dim]
    return {"name": vi.name, "dtype": _DTYPE_NAMES.get(t.elem_type, str(t.elem_type)), "shape": dims}


def _initializer_bytes(init: onnx.TensorProto) -> int:
    count = int(np.prod(init.dims)) if init.dims else 1
    bits = {TensorProto.INT4: 4, TensorProto.UINT4: 4, TensorProto.INT8: 8, TensorProto.UINT8: 8,
            TensorProto.FLOAT16: 16, TensorProto.BFLOAT16: 16, TensorProto.FLOAT: 32,
            TensorProto.INT64: 64, TensorProto.DOUBLE: 64, TensorProto.INT32: 32}.get(init.data_type, 32)
    return (count * bits + 7) // 8


def layer_precisions(model: onnx.ModelProto) -> list[dict[str, str]]:
    """For each Conv/MatMul/Gemm: weight precision (type behind its DequantizeLinear, or float) and
    whether its activation input is quantized (fed by a DequantizeLinear of a non-constant)."""
    inits = {i.name: i for i in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}

    def trace(name: str) -> tuple[str, bool]:
        node = producers.get(name)
        while node is not None and node.op_type in ("Transpose", "Reshape", "Identity", "Cast"):
            name = node.input[0]
            node = producers.get(name)
        if node is not None and node.op_type == "DequantizeLinear":
            src = node.input[0]
            const = src in inits
            dtype = _DTYPE_NAMES.get(inits[src].data_type, "?") if const else "quantized"
            if not const:
                q = producers.get(src)
                if q is not None and q.op_type == "QuantizeLinear" and len(q.input) > 2 and q.input[2] in inits:
                    dtype = _DTYPE_NAMES.get(inits[q.input[2]].data_type, "?")
                elif q is not None and q.op_type == "QuantizeLinear":  # no zero point: opset-21 output_dtype
                    out_dtype = next((a.i for a in q.attribute if a.name == "output_dtype"), 0)
                    dtype = _DTYPE_NAMES.get(out_dtype, "uint8") if out_dtype else "uint8"
            return dtype, const
        if name in inits:
            return _DTYPE_NAMES.get(inits[name].data_type, "?"), True
        return "float", False

    layers = []
    for node in model.graph.node:
        if node.op_type not in _COMPUTE_OPS or len(node.input) < 2:
            continue
        a_dtype, a_const = trace(node.input[0])
        w_dtype, w_const = trace(node.input[1])
        if a_const and not w_const:  # MatMul(W, x) orientation
            a_dtype, w_dtype = w_dtype, a_dtype
        layers.append({"node": node.name, "op": node.op_type, "weight": w_dtype,
                       "activation": a_dtype if a_dtype != "float" else "float"})
    return layers


def inspect_model(target: Path) -> dict[str, Any]:
    target = Path(target)
    path = target / "model.onnx" if target.is_dir() else target
    model = load_onnx_checked(path)
    layers = layer_precisions(model)
    by_precision: Counter[str] = Counter()
    for init in model.graph.initializer:
        by_precision[_DTYPE_NAMES.get(init.data_type, "?")] += _initializer_bytes(init)
    return {
        "path": str(path),
        "opset": {o.domain or "ai.onnx": o.version for o in model.opset_import},
        "inputs": [_value_info(i) for i in model.graph.input],
        "outputs": [_value_info(o) for o in model.graph.output],
        "quantization": summarize_quantization(model),
        "layers": layers,
        "layer_precision_counts": dict(Counter(f"w:{l['weight']} a:{l['activation']}" for l in layers)),
        "weight_bytes_by_dtype": dict(by_precision),
        "op_counts": dict(Counter(n.op_type for n in model.graph.node).most_common()),
    }


def format_inspection(info: dict[str, Any], verbose: bool = False) -> str:
    lines = [f"model: {info['path']}  opset: {info['opset']}"]
    for kind in ("inputs", "outputs"):
        for vi in info[kind]:
            lines.append(f"  {kind[:-1]:6s} {vi['name']:24s} {vi['dtype']:8s} {vi['shape']}")
    q = info["quantization"]
    lines.append(f"Q/DQ: {q['num_qdq_nodes']} nodes; QuantizeLinear {q['quantize_linear']}; "
                 f"DequantizeLinear {q['dequantize_linear']}; granularity {q['granularity']}")
    lines.append("layers by precision: " + ", ".join(f"{k}: {v}" for k, v in sorted(info["layer_precision_counts"].items())))
    lines.append("weights by dtype: " + ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in sorted(info["weight_bytes_by_dtype"].items())))
    if verbose:
        for layer in info["layers"]:
            lines.append(f"  {layer['op']:8s} w={layer['weight']:6s} a={layer['activation']:6s} {layer['node']}")
    return "\n".join(lines)
