"""ONNX post-pass on the exporter's model (onnx_ir): store INT8 Linear weights pre-transposed.

The exporter writes ``Linear(x, W)`` with a quantized weight as
``DequantizeLinear(W_q [O, K], axis=0) -> Transpose(perm=[1, 0]) -> MatMul``. The Transpose between the
DequantizeLinear and the MatMul breaks the DQ -> MatMul unit that runtimes fuse into an integer kernel, so
ONNX Runtime constant-folds DQ -> Transpose into an FP32 weight instead: on a w8a8 SDXL UNet (2.7 GB of
INT8 weights) session creation peaked at +19 GB and kept +8.6 GB (benchmarks/ort_session_memory.py).
Storing ``W_q^T [K, O]`` with ``axis=1`` (the scale and zero point are unchanged) removes the Transpose;
the graph computes the same values.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

__all__ = ["fold_weight_transposes"]

_DEFAULT_DOMAINS = ("", "ai.onnx")


def _is_swap_transpose(node: ir.Node) -> bool:
    perm = node.attributes.get("perm")
    return (node.op_type == "Transpose" and node.domain in _DEFAULT_DOMAINS
            and perm is not None and list(perm.as_ints()) == [1, 0])


def _foldable_dequantize(node: ir.Node | None) -> bool:
    """A non-blocked DequantizeLinear of a 2-D initializer that nothing else reads."""
    if node is None or node.op_type != "DequantizeLinear" or node.domain not in _DEFAULT_DOMAINS:
        return False
    block = node.attributes.get("block_size")
    if block is not None and block.as_int() != 0:
        return False  # blocked (INT4) weights: passes.int4.pack_int4_initializers folds those
    weight, output = node.inputs[0], node.outputs[0]
    return (weight is not None and weight.is_initializer() and weight.const_value is not None
            and len(weight.const_value.shape) == 2 and len(weight.uses()) == 1
            and len(output.uses()) == 1 and not output.is_graph_output())


def fold_weight_transposes(model: ir.Model) -> int:
    """In place: every ``DequantizeLinear(W 2-D initializer) -> Transpose(perm=[1, 0])`` becomes
    ``DequantizeLinear(W^T)`` with the quantization axis swapped. Returns how many were folded."""
    graph = model.graph
    folded = 0
    for transpose in list(graph):
        if not _is_swap_transpose(transpose) or transpose.outputs[0].is_graph_output():
            continue
        dequantize = transpose.inputs[0].producer() if transpose.inputs[0] is not None else None
        if not _foldable_dequantize(dequantize):
            continue
        assert dequantize is not None
        weight = dequantize.inputs[0]
        assert weight is not None and weight.const_value is not None
        scale = dequantize.inputs[1]
        per_axis = scale is not None and scale.shape is not None and len(scale.shape) == 1
        transposed = np.ascontiguousarray(weight.const_value.numpy().T)
        weight.const_value = ir.Tensor(transposed, name=weight.name)
        weight.shape = ir.Shape(transposed.shape)
        if per_axis:  # axis 0 (output channels) of W is axis 1 of W^T, and the other way round
            axis = dequantize.attributes.get("axis")
            old = axis.as_int() if axis is not None else 1
            dequantize.attributes["axis"] = ir.AttrInt64("axis", 1 if old in (0, -2) else 0)
        dequantize.outputs[0].shape = transpose.outputs[0].shape
        transpose.outputs[0].replace_all_uses_with(dequantize.outputs[0])
        graph.remove(transpose, safe=True)
        folded += 1
    return folded
