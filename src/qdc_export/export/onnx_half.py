"""ONNX post-pass (onnx_ir) for half-precision networks: Q/DQ scales in the network's float type.

In opset 21 a QuantizeLinear's scale has the type of its input and a DequantizeLinear's output has the
type of its scale; TensorRT's IDequantizeLayer works the same way (output type = scale type). The
exporter, given a graph whose dequantize ops produce FP16 (:mod:`qdc_export.quantize.half`), writes
``DequantizeLinear(FP32 scale) -> Cast(to=FP16)`` and ``QuantizeLinear(FP16 x, FP32 scale)`` (which
fails ONNX's type check). This pass stores those scales in the half type instead and drops the Cast,
so every DQ feeds its Conv / MatMul directly with the network's type, the unit TensorRT fuses.
The scale values were already rounded to the half type in the PyTorch graph, so nothing changes
numerically.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

__all__ = ["retype_qdq_scales"]

_DEFAULT_DOMAINS = ("", "ai.onnx")
_NUMPY = {ir.DataType.FLOAT16: np.float16, ir.DataType.FLOAT: np.float32}


def _constant_of(value: ir.Value | None) -> ir.Value | None:
    """The value holding a constant scale: an initializer / Constant output, or the input of a Cast of
    one (the exporter casts per-channel scales to FP32 before the DQ)."""
    if value is None:
        return None
    if value.const_value is not None:
        return value
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and "value" in producer.attributes:
        return value
    if producer is not None and producer.op_type == "Cast" and producer.inputs[0] is not None:
        return _constant_of(producer.inputs[0])
    return None


def _to_dtype(graph: ir.Graph, node: ir.Node, index: int, dtype: ir.DataType) -> bool:
    """Give input ``index`` of ``node`` a private constant of ``dtype``; False when it is not constant."""
    source = _constant_of(node.inputs[index])
    if source is None:
        return False
    if source.const_value is not None:
        array = source.const_value.numpy()
    else:
        producer = source.producer()
        assert producer is not None
        array = producer.attributes["value"].as_tensor().numpy()
    if dtype == ir.DataType.BFLOAT16:
        import ml_dtypes  # onnx_ir's bfloat16 arrays

        typed = np.asarray(array, dtype=np.float32).astype(ml_dtypes.bfloat16)
    else:
        typed = np.asarray(array, dtype=_NUMPY[dtype])
    name = f"{node.name}_scale_{dtype.name.lower()}"
    converted = ir.Value(name=name, shape=ir.Shape(typed.shape), type=ir.TensorType(dtype),
                         const_value=ir.Tensor(typed, name=name))
    graph.register_initializer(converted)
    node.replace_input_with(index, converted)
    return True


def retype_qdq_scales(model: ir.Model, dtype: ir.DataType) -> dict[str, int]:
    """In place: QuantizeLinear scales of ``dtype`` inputs become ``dtype``; every
    ``DequantizeLinear -> Cast(to=dtype)`` becomes a DequantizeLinear with a ``dtype`` scale.
    Returns counts; ``dequantize_left_fp32`` counts DQs still producing FP32 (should be 0)."""
    graph = model.graph
    counts = {"quantize_retyped": 0, "dequantize_retyped": 0, "dequantize_left_fp32": 0}
    for node in list(graph):
        if node.domain not in _DEFAULT_DOMAINS:
            continue
        if node.op_type == "QuantizeLinear":
            x = node.inputs[0]
            if x is not None and x.dtype == dtype and node.inputs[1] is not None and node.inputs[1].dtype != dtype:
                counts["quantize_retyped"] += _to_dtype(graph, node, 1, dtype)
        elif node.op_type == "DequantizeLinear":
            output = node.outputs[0]
            uses = list(output.uses())
            casts = [u.node for u in uses if u.node.op_type == "Cast"
                     and u.node.attributes.get("to") is not None and u.node.attributes["to"].as_int() == dtype]
            if not casts or len(casts) != len(uses) or output.is_graph_output():
                counts["dequantize_left_fp32"] += output.dtype != dtype
                continue
            if not _to_dtype(graph, node, 1, dtype):
                counts["dequantize_left_fp32"] += 1
                continue
            output.dtype = dtype
            for cast in casts:
                cast.outputs[0].replace_all_uses_with(output, replace_graph_outputs=True)
                graph.remove(cast, safe=True)
            counts["dequantize_retyped"] += 1
    for name, value in list(graph.initializers.items()):  # the FP32 scales replaced above
        if not value.uses() and not value.is_graph_output():
            del graph.initializers[name]
    return counts
