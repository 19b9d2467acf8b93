"""ONNX post-pass on the exporter's model (onnx_ir): store quantized Linear weights pre-transposed.

The exporter writes ``Linear(x, W)`` with a quantized weight as
``DequantizeLinear(W_q [O, K]) -> Transpose(perm=[1, 0]) -> MatMul``. The Transpose between the
DequantizeLinear and the MatMul breaks the DQ -> MatMul unit that runtimes fuse into an integer kernel
(INT4: ``MatMulNBits``), so ONNX Runtime constant-folds DQ -> Transpose into an FP32 weight instead: on a
w8a8 SDXL UNet (2.7 GB of INT8 weights) session creation peaked at +19 GB and kept +8.6 GB
(benchmarks/ort_session_memory.py). Storing ``W_q^T [K, O]`` removes the Transpose; the graph computes
the same values. Per-channel / per-tensor INT8: the scale and zero point are unchanged and the axis
swaps. Blocked INT4 (blocks along K, ``axis=1``, scale [O, K / block]): the scale is transposed too and
the blocks run along axis 0.

Zero points: the exporter writes a per-channel zero point as ``Cast(initializer)``, and its constant folding
skips inputs over 8192 elements (onnxscript's ``input_size_limit``), so on SD 1.5's wide layers six
DequantizeLinear nodes read a computed zero point, which TensorRT rejects (rule R1, engines/trt_rules.py).
:func:`fold_zero_point_casts` stores the cast initializer instead.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

__all__ = ["fold_weight_transposes", "fold_zero_point_casts"]

_DEFAULT_DOMAINS = ("", "ai.onnx")


def _is_swap_transpose(node: ir.Node) -> bool:
    perm = node.attributes.get("perm")
    return (node.op_type == "Transpose" and node.domain in _DEFAULT_DOMAINS
            and perm is not None and list(perm.as_ints()) == [1, 0])


def _is_private_2d_constant(value: ir.Value | None) -> bool:
    return (value is not None and value.is_initializer() and value.const_value is not None
            and len(value.const_value.shape) == 2 and len(value.uses()) == 1)


def _axis(node: ir.Node) -> int:
    axis = node.attributes.get("axis")
    return axis.as_int() if axis is not None else 1


def _is_blocked(node: ir.Node) -> bool:
    block = node.attributes.get("block_size")
    return block is not None and block.as_int() != 0


def _foldable_dequantize(node: ir.Node | None) -> bool:
    """A DequantizeLinear of a 2-D initializer that nothing else reads; blocked ones need their blocks
    along axis 1 and a 2-D scale (no zero point) that nothing else reads."""
    if node is None or node.op_type != "DequantizeLinear" or node.domain not in _DEFAULT_DOMAINS:
        return False
    output = node.outputs[0]
    if not _is_private_2d_constant(node.inputs[0]) or len(output.uses()) != 1 or output.is_graph_output():
        return False
    if _is_blocked(node):
        return _axis(node) in (1, -1) and len(node.inputs) == 2 and _is_private_2d_constant(node.inputs[1])
    return True


def _transpose_constant(value: ir.Value) -> None:
    assert value.const_value is not None
    transposed = np.ascontiguousarray(value.const_value.numpy().T)
    value.const_value = ir.Tensor(transposed, name=value.name)
    value.shape = ir.Shape(transposed.shape)


def _private_cast(value: ir.Value | None) -> ir.Node | None:
    """The Cast producing ``value`` when that Cast has no other reader (the exporter puts one between a weight's
    DequantizeLinear and its Transpose in an FP16 network: ``.to(float16)`` after the FP32 dequantize)."""
    node = value.producer() if value is not None else None
    if node is None or node.op_type != "Cast" or node.domain not in _DEFAULT_DOMAINS:
        return None
    return node if len(node.outputs[0].uses()) == 1 and not node.outputs[0].is_graph_output() else None


def fold_weight_transposes(model: ir.Model) -> int:
    """In place: every ``DequantizeLinear(W 2-D initializer) -> [Cast ->] Transpose(perm=[1, 0])`` becomes
    ``DequantizeLinear(W^T) [-> Cast]`` with the quantization axis swapped (and a blocked scale transposed): a
    Cast is elementwise, so it commutes with the transpose. Returns how many were folded."""
    graph = model.graph
    folded = 0
    for transpose in list(graph):
        if not _is_swap_transpose(transpose) or transpose.outputs[0].is_graph_output():
            continue
        cast = _private_cast(transpose.inputs[0])
        source = cast.inputs[0] if cast is not None else transpose.inputs[0]
        dequantize = source.producer() if source is not None else None
        if not _foldable_dequantize(dequantize):
            continue
        assert dequantize is not None and dequantize.inputs[0] is not None
        _transpose_constant(dequantize.inputs[0])
        scale = dequantize.inputs[1]
        if _is_blocked(dequantize):
            assert scale is not None
            _transpose_constant(scale)
        per_axis = scale is not None and scale.shape is not None and len(scale.shape) >= 1
        if per_axis:  # axis 0 of W is axis 1 of W^T, and the other way round
            dequantize.attributes["axis"] = ir.AttrInt64("axis", 1 if _axis(dequantize) in (0, -2) else 0)
        dequantize.outputs[0].shape = transpose.outputs[0].shape
        if cast is not None:
            cast.outputs[0].shape = transpose.outputs[0].shape
        transpose.outputs[0].replace_all_uses_with((cast or dequantize).outputs[0])
        graph.remove(transpose, safe=True)
        folded += 1
    return folded


def fold_zero_point_casts(model: ir.Model) -> int:
    """In place: every Q/DQ zero point computed as ``Cast(initializer)`` becomes an initializer of the cast
    type (the Cast and the source initializer go where nothing else reads them). Returns how many."""
    graph = model.graph
    folded = 0
    for node in list(graph):
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or node.domain not in _DEFAULT_DOMAINS:
            continue
        zero_point = node.inputs[2] if len(node.inputs) > 2 else None
        cast = zero_point.producer() if zero_point is not None else None
        if cast is None or cast.op_type != "Cast" or cast.domain not in _DEFAULT_DOMAINS:
            continue
        source = cast.inputs[0]
        if source is None or not source.is_initializer() or source.const_value is None:
            continue
        dtype = ir.DataType(cast.attributes["to"].as_int())
        array = source.const_value.numpy().astype(dtype.numpy())
        name = f"{source.name}_as_{dtype.name.lower()}"
        if name not in graph.initializers:
            graph.register_initializer(ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(dtype),
                                                const_value=ir.Tensor(array, name=name)))
        node.replace_input_with(2, graph.initializers[name])
        if not cast.outputs[0].uses() and not cast.outputs[0].is_graph_output():
            graph.remove(cast, safe=True)
            if not source.uses() and source.name is not None:
                graph.initializers.pop(source.name)
        folded += 1
    return folded
