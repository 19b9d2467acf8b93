"""Read-only views of an ONNX ``ModelProto`` for the TensorRT rule checks (no TensorRT, no GPU):
every node with a display name (subgraphs included), the constants and producers of every tensor, and
what a Q/DQ node quantizes (type, granularity, weight or activation)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

STANDARD_DOMAINS = frozenset({"", "ai.onnx"})
TP = onnx.TensorProto


@dataclasses.dataclass(frozen=True)
class Scope:
    """What is known about tensors while walking one model (subgraphs share the outer scope)."""

    constants: dict[str, onnx.TensorProto]
    producers: dict[str, onnx.NodeProto]
    initializer_names: frozenset[str]


def constant_tensor(node: onnx.NodeProto) -> onnx.TensorProto | None:
    """The value of a ``Constant`` node as a TensorProto (None for sparse or unknown forms)."""
    for attribute in node.attribute:
        if attribute.name == "value":
            tensor: onnx.TensorProto = attribute.t
            return tensor
        if attribute.name in ("value_float", "value_int", "value_floats", "value_ints"):
            value: Any = onnx.helper.get_attribute_value(attribute)
            dtype = np.float32 if "float" in attribute.name else np.int64
            return numpy_helper.from_array(np.asarray(value, dtype=dtype))
    return None


def walk(graph: onnx.GraphProto, prefix: str = "") -> Iterator[tuple[str, onnx.NodeProto]]:
    """Every node of ``graph`` and of its subgraphs, with a display name."""
    for index, node in enumerate(graph.node):
        name = prefix + (node.name or f"<{node.op_type}#{index}>")
        yield name, node
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from walk(attribute.g, f"{name}/{attribute.name}:")
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                for k, sub in enumerate(attribute.graphs):
                    yield from walk(sub, f"{name}/{attribute.name}[{k}]:")


def all_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from all_graphs(attribute.g)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                for sub in attribute.graphs:
                    yield from all_graphs(sub)


def build_scope(model: onnx.ModelProto) -> Scope:
    constants: dict[str, onnx.TensorProto] = {}
    producers: dict[str, onnx.NodeProto] = {}
    initializer_names: set[str] = set()
    for graph in all_graphs(model.graph):
        for init in graph.initializer:
            constants[init.name] = init
            initializer_names.add(init.name)
        for node in graph.node:
            for out in node.output:
                if out:
                    producers[out] = node
            if node.op_type == "Constant" and node.domain in STANDARD_DOMAINS and node.output:
                tensor = constant_tensor(node)
                if tensor is not None:
                    constants[node.output[0]] = tensor
    return Scope(constants, producers, frozenset(initializer_names))


def node_input(node: onnx.NodeProto, index: int) -> str:
    return node.input[index] if len(node.input) > index else ""


def attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for attribute in node.attribute:
        if attribute.name == name:
            return onnx.helper.get_attribute_value(attribute)
    return default


def array_of(tensor: onnx.TensorProto) -> np.ndarray | None:
    """Values of a constant; None when they cannot be read (e.g. external data not loaded)."""
    try:
        return numpy_helper.to_array(tensor)
    except Exception:  # noqa: BLE001 - unreadable data only disables value checks
        return None


def is_weight(name: str, scope: Scope) -> bool:
    """A constant, or the QuantizeLinear of a constant (the fake-quant weight pattern Q(W) -> DQ)."""
    if name in scope.constants:
        return True
    producer = scope.producers.get(name)
    return (
        producer is not None
        and producer.op_type == "QuantizeLinear"
        and node_input(producer, 0) in scope.constants
    )


def quantized_type(node: onnx.NodeProto, scope: Scope) -> int | None:
    """The low-precision element type a Q/DQ node works with (None when it cannot be told)."""
    zero_point = scope.constants.get(node_input(node, 2))
    if node.op_type == "QuantizeLinear":
        output_dtype = int(attr(node, "output_dtype", 0))
        if output_dtype:
            return output_dtype
        if zero_point is not None:
            return int(zero_point.data_type)
        if node_input(node, 2):
            return None  # a non-constant zero point: R1 reports it
        return TP.UINT8  # ONNX default without a zero point
    data = scope.constants.get(node_input(node, 0))
    if data is not None:
        return int(data.data_type)
    if zero_point is not None:
        return int(zero_point.data_type)
    producer = scope.producers.get(node_input(node, 0))
    if producer is not None and producer.op_type == "QuantizeLinear":
        return quantized_type(producer, scope)
    return None


def type_name(dtype: int) -> str:
    return str(onnx.TensorProto.DataType.Name(dtype)).lower()


def granularity(node: onnx.NodeProto, scale: np.ndarray | None) -> str:
    """'block', 'per_channel', 'per_tensor' or 'unknown' (scale not a readable constant)."""
    if int(attr(node, "block_size", 0)) > 0:
        return "block"
    if scale is None:
        return "unknown"
    return "per_tensor" if scale.size == 1 else "per_channel"
