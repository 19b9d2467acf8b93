"""TensorRT explicit-quantization rules, checked on an ONNX ``ModelProto`` without TensorRT or a GPU.

TensorRT (10.x strongly typed, 11.x always) takes precision only from QuantizeLinear /
DequantizeLinear (Q/DQ) nodes and accepts a narrow dialect of them. Engine builds that break the
dialect fail late, on a GPU machine, with a parser message that names one node at a time. This
module reports every break at once, before any engine build:

    R1  zero points are zero constants (symmetric quantization only)
    R2  scales are constants, finite and strictly positive
    R3  per-channel / block quantization only on constant weights; activations are per-tensor
    R4  4-bit (INT4/UINT4) only as weight-only DequantizeLinear of constant initializers, block
        axis on one of the last two dims; 4-bit activations (W4A4) cannot be expressed
    R5  no custom-domain nodes (they would need a TensorRT plugin)
    R6  only operators the ONNX-TensorRT parser supports (see SUPPORTED_OPS)
    R7  quantized types are signed: INT8, INT4 or FP8/FP4 (no UINT8/UINT16/INT16)

Sources: ``docs/tensorrt.md`` of this project and the operator support matrix of the ONNX-TensorRT
parser (github.com/onnx/onnx-tensorrt, ``docs/operators.md``: "QuantizeLinear: y_zero_point must be
0", "DequantizeLinear: x_zero_point must be zero", Conv "Weights W must be an initializer").

Nodes inside subgraphs (If / Loop / Scan bodies) are checked too; their names are reported as
``outer_node/inner_node``.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from qdc_export.errors import TensorRTCompatibilityError

__all__ = [
    "RULES",
    "SUPPORTED_OPS",
    "Violation",
    "assert_tensorrt_compatible",
    "check_tensorrt_compatibility",
    "summarize_quantization",
]

RULES: dict[str, str] = {
    "R1": "Q/DQ zero points must be zero constants (symmetric only)",
    "R2": "Q/DQ scales must be constant, finite and > 0",
    "R3": "per-channel/block quantization only on constant weights; activations per-tensor",
    "R4": "INT4 only as weight-only DequantizeLinear of constant initializers",
    "R5": "custom-domain ops need a TensorRT plugin",
    "R6": "op not supported by the TensorRT ONNX parser",
    "R7": "quantized type must be INT8, INT4 or FP8/FP4",
}

# Standard-domain ONNX operators that the ONNX-TensorRT parser (TensorRT 10.x) imports, restricted
# to those a diffusion UNet export plausibly contains plus their close relatives. Taken from the
# parser's operator support matrix (onnx/onnx-tensorrt docs/operators.md); operators it lists as
# unsupported (e.g. QLinearConv, ConvInteger, MatMulInteger, DynamicQuantizeLinear, NonZero,
# Unique, sequence ops) are deliberately absent. Extending this set is a reviewed decision.
SUPPORTED_OPS: frozenset[str] = frozenset(
    {
        # compute-heavy layers
        "Conv", "ConvTranspose", "MatMul", "Gemm", "Einsum",
        # quantization
        "QuantizeLinear", "DequantizeLinear",
        # normalization and activations
        "GroupNormalization", "LayerNormalization", "InstanceNormalization", "BatchNormalization",
        "Softmax", "LogSoftmax", "Sigmoid", "HardSigmoid", "Tanh", "Relu", "LeakyRelu", "Elu", "Selu",
        "Gelu", "Erf", "Softplus", "Softsign", "Mish", "HardSwish", "PRelu",
        # elementwise math
        "Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Reciprocal", "Exp", "Log", "Abs", "Neg", "Sign",
        "Sin", "Cos", "Tan", "Floor", "Ceil", "Round", "Clip", "Max", "Min", "Mean", "Sum", "Mod",
        "IsNaN", "IsInf",
        # logic
        "Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Not", "And", "Or", "Xor", "Where",
        # reductions
        "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL2",
        "ReduceSumSquare", "ArgMax", "ArgMin", "CumSum", "TopK",
        # pooling and resampling
        "AveragePool", "MaxPool", "GlobalAveragePool", "GlobalMaxPool", "Resize", "Upsample",
        "DepthToSpace", "SpaceToDepth", "Pad",
        # shape and data movement
        "Concat", "Split", "Slice", "Reshape", "Transpose", "Gather", "GatherElements", "GatherND",
        "ScatterND", "ScatterElements", "Cast", "CastLike", "Unsqueeze", "Squeeze", "Flatten",
        "Shape", "Size", "ConstantOfShape", "Expand", "Tile", "Range", "Trilu", "OneHot",
        "Constant", "Identity", "Dropout",
        # control flow (bodies are checked node by node)
        "If", "Loop",
    }
)

_STANDARD_DOMAINS = frozenset({"", "ai.onnx"})
_QDQ = frozenset({"QuantizeLinear", "DequantizeLinear"})
_TP = onnx.TensorProto
_FOUR_BIT = frozenset({_TP.INT4, _TP.UINT4})
_ALLOWED_QTYPES = frozenset(
    {
        _TP.INT8,
        _TP.INT4,
        _TP.UINT4,  # reported by R4 (weight-only rules) rather than R7, see _check_qdq
        _TP.FLOAT8E4M3FN,
        getattr(_TP, "FLOAT4E2M1", _TP.FLOAT8E4M3FN),
    }
)
_MAX_NAMES_IN_MESSAGE = 5


@dataclasses.dataclass(frozen=True)
class Violation:
    """One broken rule at one node. ``rule`` is a key of :data:`RULES`."""

    rule: str
    node: str
    op_type: str
    message: str

    def __str__(self) -> str:
        return f"{self.rule} {self.node} ({self.op_type}): {self.message}"


# --------------------------------------------------------------------------------------------------
# Graph walking
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Scope:
    """What is known about tensors while walking one model (subgraphs share the outer scope)."""

    constants: dict[str, onnx.TensorProto]
    producers: dict[str, onnx.NodeProto]
    initializer_names: frozenset[str]


def _constant_tensor(node: onnx.NodeProto) -> onnx.TensorProto | None:
    """The value of a ``Constant`` node as a TensorProto (None for sparse or unknown forms)."""
    for attr in node.attribute:
        if attr.name == "value":
            tensor: onnx.TensorProto = attr.t
            return tensor
        if attr.name in ("value_float", "value_int", "value_floats", "value_ints"):
            value: Any = onnx.helper.get_attribute_value(attr)
            dtype = np.float32 if "float" in attr.name else np.int64
            return numpy_helper.from_array(np.asarray(value, dtype=dtype))
    return None


def _walk(graph: onnx.GraphProto, prefix: str = "") -> Iterator[tuple[str, onnx.NodeProto]]:
    """Every node of ``graph`` and of its subgraphs, with a display name."""
    for index, node in enumerate(graph.node):
        name = prefix + (node.name or f"<{node.op_type}#{index}>")
        yield name, node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _walk(attr.g, f"{name}/{attr.name}:")
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for k, sub in enumerate(attr.graphs):
                    yield from _walk(sub, f"{name}/{attr.name}[{k}]:")


def _all_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _all_graphs(sub)


def _build_scope(model: onnx.ModelProto) -> _Scope:
    constants: dict[str, onnx.TensorProto] = {}
    producers: dict[str, onnx.NodeProto] = {}
    initializer_names: set[str] = set()
    for graph in _all_graphs(model.graph):
        for init in graph.initializer:
            constants[init.name] = init
            initializer_names.add(init.name)
        for node in graph.node:
            for out in node.output:
                if out:
                    producers[out] = node
            if node.op_type == "Constant" and node.domain in _STANDARD_DOMAINS and node.output:
                tensor = _constant_tensor(node)
                if tensor is not None:
                    constants[node.output[0]] = tensor
    return _Scope(constants, producers, frozenset(initializer_names))


def _input(node: onnx.NodeProto, index: int) -> str:
    return node.input[index] if len(node.input) > index else ""


def _attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def _array(tensor: onnx.TensorProto) -> np.ndarray | None:
    """Values of a constant; None when they cannot be read (e.g. external data not loaded)."""
    try:
        return numpy_helper.to_array(tensor)
    except Exception:  # noqa: BLE001 - unreadable data only disables value checks
        return None


def _is_weight(name: str, scope: _Scope) -> bool:
    """A constant, or the QuantizeLinear of a constant (the fake-quant weight pattern Q(W) -> DQ)."""
    if name in scope.constants:
        return True
    producer = scope.producers.get(name)
    return (
        producer is not None
        and producer.op_type == "QuantizeLinear"
        and _input(producer, 0) in scope.constants
    )


def _quantized_type(node: onnx.NodeProto, scope: _Scope) -> int | None:
    """The low-precision element type a Q/DQ node works with (None when it cannot be told)."""
    zero_point = scope.constants.get(_input(node, 2))
    if node.op_type == "QuantizeLinear":
        output_dtype = int(_attr(node, "output_dtype", 0))
        if output_dtype:
            return output_dtype
        if zero_point is not None:
            return int(zero_point.data_type)
        if _input(node, 2):
            return None  # a non-constant zero point: R1 reports it
        return _TP.UINT8  # ONNX default without a zero point
    data = scope.constants.get(_input(node, 0))
    if data is not None:
        return int(data.data_type)
    if zero_point is not None:
        return int(zero_point.data_type)
    producer = scope.producers.get(_input(node, 0))
    if producer is not None and producer.op_type == "QuantizeLinear":
        return _quantized_type(producer, scope)
    return None


def _type_name(dtype: int) -> str:
    return str(onnx.TensorProto.DataType.Name(dtype)).lower()


def _granularity(node: onnx.NodeProto, scale: np.ndarray | None) -> str:
    """'block', 'per_channel', 'per_tensor' or 'unknown' (scale not a readable constant)."""
    if int(_attr(node, "block_size", 0)) > 0:
        return "block"
    if scale is None:
        return "unknown"
    return "per_tensor" if scale.size == 1 else "per_channel"


# --------------------------------------------------------------------------------------------------
# Rules
# --------------------------------------------------------------------------------------------------


def _check_qdq(
    name: str, node: onnx.NodeProto, scope: _Scope, allow_int4_activations: bool
) -> Iterator[Violation]:
    op = node.op_type

    def violation(rule: str, message: str) -> Violation:
        return Violation(rule=rule, node=name, op_type=op, message=message)

    data_name, scale_name, zp_name = _input(node, 0), _input(node, 1), _input(node, 2)
    weight = _is_weight(data_name, scope)

    # R1: zero point absent, or a constant that is all zeros.
    if zp_name:
        zp_tensor = scope.constants.get(zp_name)
        if zp_tensor is None:
            yield violation("R1", f"zero point {zp_name!r} is not a constant; TensorRT needs zero")
        else:
            zp = _array(zp_tensor)
            if zp is not None and np.any(zp != 0):
                yield violation("R1", f"zero point {zp_name!r} is nonzero; TensorRT is symmetric only")

    # R2: scale constant, finite, positive.
    scale: np.ndarray | None = None
    scale_tensor = scope.constants.get(scale_name)
    if scale_tensor is None:
        yield violation("R2", f"scale {scale_name!r} is computed at run time; TensorRT needs a constant")
    else:
        scale = _array(scale_tensor)
        if scale is not None:
            values = scale.astype(np.float64)
            if not np.all(np.isfinite(values)) or np.any(values <= 0):
                yield violation("R2", f"scale {scale_name!r} has non-finite or non-positive values")

    # R7 / R4: quantized type and 4-bit placement.
    qtype = _quantized_type(node, scope)
    granularity = _granularity(node, scale)
    if qtype is not None and qtype not in _ALLOWED_QTYPES:
        yield violation("R7", f"quantized type {_type_name(qtype)} is not supported; use int8")
    if qtype in _FOUR_BIT:
        if op == "QuantizeLinear" and not weight:
            if not allow_int4_activations:
                yield violation(
                    "R4",
                    f"{_type_name(qtype)} activation quantization (W4A4) cannot be expressed in "
                    "TensorRT; it needs a custom plugin or another runtime",
                )
        elif op == "QuantizeLinear":
            yield violation(
                "R4", "4-bit weights must be stored as packed int4 initializers read by DequantizeLinear"
            )
        elif data_name not in scope.constants and not allow_int4_activations:
            yield violation("R4", f"4-bit DequantizeLinear input {data_name!r} is not a constant weight")
        if qtype == _TP.UINT4:
            yield violation("R4", "uint4 is not supported; use int4 with a zero zero point")
        if granularity == "block" and data_name in scope.constants:
            rank = len(scope.constants[data_name].dims)
            axis = int(_attr(node, "axis", 1))
            axis = axis + rank if axis < 0 else axis
            if rank >= 2 and axis not in (rank - 2, rank - 1):
                yield violation("R4", f"int4 block axis {axis} must be one of the last two dims (rank {rank})")

    # R3: activations are per-tensor; block quantization only on constant weights.
    if not weight and granularity in ("per_channel", "block"):
        yield violation(
            "R3",
            f"{granularity.replace('_', '-')} quantization of activation {data_name!r}; "
            "TensorRT quantizes activations per-tensor (scalar scale)",
        )


def check_tensorrt_compatibility(
    model: onnx.ModelProto, *, allow_int4_activations: bool = False
) -> list[Violation]:
    """Every TensorRT explicit-quantization rule (R1-R7, see module doc) ``model`` breaks.

    ``allow_int4_activations`` turns off the W4A4 part of R4, for models meant for a plugin or
    another runtime. An empty list means the checks found nothing; it does not promise a build.
    """
    scope = _build_scope(model)
    violations: list[Violation] = []
    for name, node in _walk(model.graph):
        if node.domain not in _STANDARD_DOMAINS:
            violations.append(
                Violation(
                    "R5",
                    name,
                    node.op_type,
                    f"custom domain {node.domain!r}; TensorRT would need a plugin for {node.op_type}",
                )
            )
            continue
        if node.op_type not in SUPPORTED_OPS:
            violations.append(
                Violation("R6", name, node.op_type, f"{node.op_type} is not in the supported op set")
            )
            continue
        if node.op_type in _QDQ:
            violations.extend(_check_qdq(name, node, scope, allow_int4_activations))
    return violations


def _one_line(violations: list[Violation]) -> str:
    by_rule: dict[str, list[str]] = {}
    for v in violations:
        by_rule.setdefault(v.rule, [])
        if v.node not in by_rule[v.rule]:
            by_rule[v.rule].append(v.node)
    parts = []
    for rule in sorted(by_rule):
        nodes = by_rule[rule]
        shown = ", ".join(nodes[:_MAX_NAMES_IN_MESSAGE])
        more = f" (+{len(nodes) - _MAX_NAMES_IN_MESSAGE} more)" if len(nodes) > _MAX_NAMES_IN_MESSAGE else ""
        parts.append(f"{rule} {RULES[rule]}: {len(nodes)} node(s): {shown}{more}")
    text = "not TensorRT compatible: " + "; ".join(parts)
    return " ".join(text.split())  # node names with newlines must not break the one line


def assert_tensorrt_compatible(model: onnx.ModelProto, *, allow_int4_activations: bool = False) -> None:
    """Raise :class:`TensorRTCompatibilityError` (one-line message) if any rule is broken."""
    violations = check_tensorrt_compatibility(model, allow_int4_activations=allow_int4_activations)
    if violations:
        raise TensorRTCompatibilityError(_one_line(violations))


# --------------------------------------------------------------------------------------------------
# Summary (for `inspect` and reports)
# --------------------------------------------------------------------------------------------------


def summarize_quantization(model: onnx.ModelProto) -> dict[str, Any]:
    """Counts of the model's quantization, JSON-serializable.

    Keys: ``quantize_linear`` / ``dequantize_linear`` (count per quantized type name),
    ``granularity`` (per_tensor / per_channel / block / unknown counts over all Q/DQ nodes),
    ``weight_initializers`` (quantized type name -> sorted initializer names read by a
    DequantizeLinear), ``num_qdq_nodes``.
    """
    scope = _build_scope(model)
    per_op: dict[str, Counter[str]] = {"QuantizeLinear": Counter(), "DequantizeLinear": Counter()}
    granularity: Counter[str] = Counter()
    weights: dict[str, set[str]] = {}
    for _, node in _walk(model.graph):
        if node.op_type not in _QDQ or node.domain not in _STANDARD_DOMAINS:
            continue
        qtype = _quantized_type(node, scope)
        type_name = _type_name(qtype) if qtype is not None else "unknown"
        per_op[node.op_type][type_name] += 1
        scale_tensor = scope.constants.get(_input(node, 1))
        scale = _array(scale_tensor) if scale_tensor is not None else None
        granularity[_granularity(node, scale)] += 1
        data_name = _input(node, 0)
        if node.op_type == "DequantizeLinear" and data_name in scope.initializer_names:
            weights.setdefault(type_name, set()).add(data_name)
    return {
        "num_qdq_nodes": sum(sum(c.values()) for c in per_op.values()),
        "quantize_linear": dict(sorted(per_op["QuantizeLinear"].items())),
        "dequantize_linear": dict(sorted(per_op["DequantizeLinear"].items())),
        "granularity": dict(sorted(granularity.items())),
        "weight_initializers": {k: sorted(v) for k, v in sorted(weights.items())},
    }
