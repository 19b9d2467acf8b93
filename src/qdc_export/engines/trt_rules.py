"""TensorRT's explicit-quantization and parser rules, checked on an ONNX ``ModelProto`` without TensorRT
or a GPU, for a given TensorRT version.

TensorRT (10.x strongly typed, 11.x always) takes precision only from QuantizeLinear / DequantizeLinear
(Q/DQ) nodes and accepts a narrow dialect of them. Builds that break it fail late, on a GPU machine, one
parser message at a time, or build silently in float. This module reports every break at once. Each rule
names its source and the TensorRT version that introduced it or lifted it (:data:`RULES`); docs/tensorrt.md
lists them with the documentation's own words.

    R1  zero points are zero constants (symmetric only)
    R2  scales are build-time constants, finite and > 0
    R3  per-channel / block scales only on constant weights; activations per-tensor
    R4  4-bit only as weight-only DequantizeLinear of constant INT4 initializers (no W4A4, no UINT4)
    R5  no custom-domain nodes (a TensorRT plugin would be needed)
    R6  only operators the ONNX parser of that version imports (:data:`OPS_SINCE`, opset-21
        GroupNormalization from 10.9, Attention from 10.14, RMSNormalization from 10.15)
    R7  quantized types INT8, INT4, FP8, FP4 (FP4 from 10.8)
    R8  INT4 only feeds a GEMM: the DequantizeLinear's output goes to MatMul / Gemm (not Conv, not a Reshape)
    R9  block quantization: INT4 only, 2-D weight, 2-D scale, block axis one of the two dims, block size
        64 or 128 dividing that axis (no ragged last block)
    R10 a DequantizeLinear's output type is its scale's type: a DQ followed by a Cast (FP32 scale, FP16
        network) leaves a Cast between the DQ and its consumer, so the pair does not fuse
    R11 a weight's DequantizeLinear feeds its layer, not a Transpose (directly or through a Cast): TensorRT
        fuses DQ into the weight input of the Conv / MatMul it feeds; a transposed weight is a separate float
        tensor, and ONNX Runtime constant-folds DQ -> Transpose to FP32 (store the weight pre-transposed)

Nodes inside subgraphs (If / Loop / Scan bodies) are checked too, named ``outer_node/inner_node``.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import onnx

from qdc_export.engines.onnx_graph import (
    STANDARD_DOMAINS,
    TP,
    Scope,
    array_of,
    attr,
    build_scope,
    granularity,
    is_weight,
    node_input,
    quantized_type,
    type_name,
    walk,
)
from qdc_export.errors import TensorRTCompatibilityError, UserError

__all__ = [
    "OLDEST_SUPPORTED",
    "OPS_SINCE",
    "RULES",
    "Violation",
    "assert_tensorrt_compatible",
    "check_tensorrt_compatibility",
    "parse_version",
    "summarize_quantization",
]

Version = tuple[int, int]

# The TensorRT the GPU path is written for: installed as its own step from NVIDIA's index (docs/tensorrt.md,
# "Runtime pieces"; not a wheel on the Python package index, so not in the [gpu] extra). Rules are checked against
# its oldest release unless --trt-version says otherwise. The code targets the 10.x API (tensorrt-stubs 10.13).
TENSORRT_REQUIREMENT = "tensorrt-cu12>=10.12,<11"
OLDEST_SUPPORTED = "10.12"
_MIN_CHECKABLE: Version = (10, 0)  # first release with INT4 and strongly typed networks; older: not modelled

_OPERATORS_MD = "onnx-tensorrt docs/operators.md"
_CHANGELOG = "onnx-tensorrt docs/Changelog.md"
_QTYPES_GUIDE = "TensorRT developer guide, Working with Quantized Types"
_DQ_OPERATOR = "TensorRT operator docs, Dequantize (IDequantizeLayer)"


@dataclasses.dataclass(frozen=True)
class Rule:
    text: str
    source: str
    since: Version = _MIN_CHECKABLE  # the rule's subject is supported from this version on


RULES: dict[str, Rule] = {
    "R1": Rule("Q/DQ zero points must be zero constants (symmetric only)", f"{_OPERATORS_MD}: Q/DQ restrictions"),
    "R2": Rule("Q/DQ scales must be constant, finite and > 0", f"{_DQ_OPERATOR}: scale is a build-time constant"),
    "R3": Rule("per-channel/block quantization only on constant weights; activations per-tensor", _QTYPES_GUIDE),
    "R4": Rule("INT4 only as weight-only DequantizeLinear of constant INT4 initializers",
               f"{_CHANGELOG} 10.0 (INT4 added); {_QTYPES_GUIDE}", (10, 0)),
    "R5": Rule("custom-domain ops need a TensorRT plugin", f"{_OPERATORS_MD}"),
    "R6": Rule("op not imported by this TensorRT version's ONNX parser", f"{_OPERATORS_MD}; {_CHANGELOG}"),
    "R7": Rule("quantized type must be INT8, INT4, FP8 or FP4 (FP4 from 10.8)", f"{_CHANGELOG} 10.8", (10, 8)),
    "R8": Rule("INT4 weights only for GEMM layers (DequantizeLinear -> MatMul/Gemm)", _QTYPES_GUIDE),
    "R9": Rule("block quantization: INT4, 2-D weight and scale, block 64/128 dividing one of the two axes",
               f"{_DQ_OPERATOR}; {_QTYPES_GUIDE}"),
    "R10": Rule("DequantizeLinear output type comes from its scale: store the scale in the consumer's type, "
                "no Cast after the DQ", f"{_DQ_OPERATOR}: output type T3 = scale type"),
    "R11": Rule("a weight's DequantizeLinear feeds its layer directly: no Transpose after it (store the weight "
                "pre-transposed)", f"{_QTYPES_GUIDE}, Q/DQ layer placement"),
}

# Standard-domain ops the ONNX-TensorRT parser imports ("Y" in onnx-tensorrt docs/operators.md, TRT 10.1),
# with the version that added each one to that list when it is later than 10.0 (Changelog.md).
_OPS_10_1 = frozenset(
    "Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast CastLike "
    "Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DeformConv DepthToSpace "
    "DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements "
    "GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample "
    "GroupNormalization GRU HardSigmoid HardSwish Hardmax Identity If ImageScaler InstanceNormalization IsInf "
    "IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool "
    "MatMul Max MaxPool Mean MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot "
    "Or Pad ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform "
    "RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean "
    "ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence RNN RoiAlign Round "
    "ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice "
    "Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK "
    "Transpose Trilu Unsqueeze Upsample Where Xor".split()
)
OPS_SINCE: dict[str, Version] = {
    **{op: (10, 0) for op in _OPS_10_1},
    "BlackmanWindow": (10, 4), "HammingWindow": (10, 4), "HannWindow": (10, 4),  # Changelog 10.4
    "STFT": (10, 5),  # Changelog 10.5 (real-valued)
    "Attention": (10, 14),  # Changelog 10.14
    "RMSNormalization": (10, 15), "RotaryEmbedding": (10, 15), "TensorScatter": (10, 15),  # Changelog 10.15
}
# Operators whose newer opset version needs a newer parser: (op, first opset of the version) -> TensorRT.
OPSET_VERSION_SINCE: dict[tuple[str, int], Version] = {
    ("GroupNormalization", 21): (10, 9),  # Changelog 10.9: "Added support for opset 21 GroupNorm"
}
INT4_BLOCK_SIZES = (64, 128)
_GEMM = frozenset({"MatMul", "Gemm"})
_QDQ = frozenset({"QuantizeLinear", "DequantizeLinear"})
_FOUR_BIT = frozenset({TP.INT4, TP.UINT4})
_FP4 = getattr(TP, "FLOAT4E2M1", None)
_ALLOWED_QTYPES = frozenset({TP.INT8, TP.INT4, TP.UINT4, TP.FLOAT8E4M3FN} | ({_FP4} if _FP4 else set()))
_MAX_NAMES_IN_MESSAGE = 5


def parse_version(text: str) -> Version:
    """'10.12' or '10.12.0.36' -> (10, 12); a UserError for anything else or a version below 10.0."""
    match = re.fullmatch(r"(\d+)\.(\d+)(\.\d+)*", text.strip())
    if match is None:
        raise UserError(f"--trt-version must look like 10.12, got {text!r}")
    version = (int(match.group(1)), int(match.group(2)))
    if version < _MIN_CHECKABLE:
        raise UserError(f"--trt-version {text}: rules are modelled from TensorRT 10.0 on (explicit quantization "
                        "with INT4 and strongly typed networks)")
    return version


@dataclasses.dataclass(frozen=True)
class Violation:
    """One broken rule at one node. ``rule`` is a key of :data:`RULES`."""

    rule: str
    node: str
    op_type: str
    message: str

    def __str__(self) -> str:
        return f"{self.rule} {self.node} ({self.op_type}): {self.message}"


def _fmt(version: Version) -> str:
    return f"{version[0]}.{version[1]}"


def _consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    users: dict[str, list[onnx.NodeProto]] = {}
    for _, node in walk(model.graph):
        for name in node.input:
            if name:
                users.setdefault(name, []).append(node)
    return users


def _opset(model: onnx.ModelProto) -> int:
    return next((int(o.version) for o in model.opset_import if o.domain in STANDARD_DOMAINS), 0)


def _check_block(node: onnx.NodeProto, scope: Scope, qtype: int | None) -> Iterator[str]:
    """R9 for a DequantizeLinear with block_size (messages only)."""
    block = int(attr(node, "block_size", 0))
    if qtype not in _FOUR_BIT:
        yield f"block quantization of {type_name(qtype) if qtype else 'unknown'} data; TensorRT blocks INT4 only"
    data = scope.constants.get(node_input(node, 0))
    scale = scope.constants.get(node_input(node, 1))
    if data is None:
        return  # R4 reports a non-constant INT4 input
    dims = list(data.dims)
    if len(dims) != 2:
        yield f"block-quantized weight has rank {len(dims)}; TensorRT needs a 2-D weight"
        return
    axis = int(attr(node, "axis", 1))
    axis = axis + 2 if axis < 0 else axis
    if scale is not None and len(scale.dims) != 2:
        yield f"block scale has rank {len(scale.dims)}; TensorRT needs a 2-D scale"
    if block not in INT4_BLOCK_SIZES:
        yield f"block size {block}; TensorRT's INT4 block sizes are {' or '.join(map(str, INT4_BLOCK_SIZES))}"
    if axis in (0, 1) and dims[axis] % block:
        yield f"block size {block} does not divide axis {axis} ({dims[axis]}): a ragged last block"


def _check_qdq(name: str, node: onnx.NodeProto, scope: Scope, users: dict[str, list[onnx.NodeProto]],
               allow_int4_activations: bool, version: Version) -> Iterator[Violation]:
    op = node.op_type

    def violation(rule: str, message: str) -> Violation:
        return Violation(rule=rule, node=name, op_type=op, message=message)

    data_name, scale_name, zp_name = node_input(node, 0), node_input(node, 1), node_input(node, 2)
    weight = is_weight(data_name, scope)
    if zp_name:  # R1
        zp_tensor = scope.constants.get(zp_name)
        if zp_tensor is None:
            yield violation("R1", f"zero point {zp_name!r} is not a constant; TensorRT needs zero")
        else:
            zp = array_of(zp_tensor)
            if zp is not None and np.any(zp != 0):
                yield violation("R1", f"zero point {zp_name!r} is nonzero; TensorRT is symmetric only")
    scale: np.ndarray | None = None  # R2
    scale_tensor = scope.constants.get(scale_name)
    if scale_tensor is None:
        yield violation("R2", f"scale {scale_name!r} is computed at run time; TensorRT needs a constant")
    else:
        scale = array_of(scale_tensor)
        if scale is not None:
            values = scale.astype(np.float64)
            if not np.all(np.isfinite(values)) or np.any(values <= 0):
                yield violation("R2", f"scale {scale_name!r} has non-finite or non-positive values")
    qtype = quantized_type(node, scope)  # R7
    kind = granularity(node, scale)
    if qtype is not None and qtype not in _ALLOWED_QTYPES:
        yield violation("R7", f"quantized type {type_name(qtype)} is not supported; use int8")
    elif qtype == _FP4 and version < RULES["R7"].since:
        yield violation("R7", f"float4e2m1 needs TensorRT >= {_fmt(RULES['R7'].since)} (checking {_fmt(version)})")
    if qtype in _FOUR_BIT:  # R4
        if op == "QuantizeLinear" and not weight:
            if not allow_int4_activations:
                yield violation("R4", f"{type_name(qtype)} activation quantization (W4A4) cannot be expressed in "
                                      "TensorRT; it needs a custom plugin or another runtime")
        elif op == "QuantizeLinear":
            yield violation("R4", "4-bit weights must be stored as packed int4 initializers read by DequantizeLinear")
        elif data_name not in scope.constants and not allow_int4_activations:
            yield violation("R4", f"4-bit DequantizeLinear input {data_name!r} is not a constant weight")
        if qtype == TP.UINT4:
            yield violation("R4", "uint4 is not supported; use int4 with a zero zero point")
        if op == "DequantizeLinear" and data_name in scope.constants:  # R8: weight-only INT4 feeds a GEMM
            bad = sorted({u.op_type for u in users.get(node.output[0], [])} - _GEMM)
            if bad:
                yield violation("R8", f"int4 weight feeds {', '.join(bad)}; TensorRT runs INT4 only in MatMul/Gemm")
    if kind == "block" and op == "DequantizeLinear" and (weight or qtype not in _FOUR_BIT):
        for message in _check_block(node, scope, qtype):  # R9
            yield violation("R9", message)
    if not weight and kind in ("per_channel", "block"):  # R3
        yield violation("R3", f"{kind.replace('_', '-')} quantization of activation {data_name!r}; "
                              "TensorRT quantizes activations per-tensor (scalar scale)")
    if op == "DequantizeLinear":  # R10
        outs = users.get(node.output[0], []) if node.output else []
        if outs and all(u.op_type == "Cast" for u in outs):
            yield violation("R10", "DequantizeLinear feeds only a Cast: store its scale in the target type instead")
        if weight:  # R11: through at most one Cast
            after = [w for u in outs for w in (users.get(u.output[0], []) if u.op_type == "Cast" else [u])]
            if any(u.op_type == "Transpose" for u in after):
                yield violation("R11", f"weight {data_name!r} is transposed after its DequantizeLinear; store it "
                                       "pre-transposed so the DQ feeds the layer")


def check_tensorrt_compatibility(model: onnx.ModelProto, *, allow_int4_activations: bool = False,
                                 version: str = OLDEST_SUPPORTED) -> list[Violation]:
    """Every rule of :data:`RULES` that ``model`` breaks for TensorRT ``version`` ("10.12", ...).

    ``allow_int4_activations`` turns off the W4A4 part of R4, for models meant for a plugin or another
    runtime. An empty list means the checks found nothing; it does not promise a build.
    """
    checked = parse_version(version)
    scope = build_scope(model)
    users = _consumers(model)
    opset = _opset(model)
    violations: list[Violation] = []
    for name, node in walk(model.graph):
        if node.domain not in STANDARD_DOMAINS:
            violations.append(Violation("R5", name, node.op_type,
                                        f"custom domain {node.domain!r}; TensorRT would need a plugin for "
                                        f"{node.op_type}"))
            continue
        since = OPS_SINCE.get(node.op_type)
        if since is None:
            violations.append(Violation("R6", name, node.op_type,
                                        f"{node.op_type} is not imported by TensorRT's ONNX parser"))
            continue
        if checked < since:
            violations.append(Violation("R6", name, node.op_type,
                                        f"{node.op_type} needs TensorRT >= {_fmt(since)} (checking {_fmt(checked)})"))
            continue
        for (op, first_opset), needed in OPSET_VERSION_SINCE.items():
            if node.op_type == op and opset >= first_opset and checked < needed:
                violations.append(Violation("R6", name, node.op_type,
                                            f"opset-{first_opset} {op} needs TensorRT >= {_fmt(needed)} "
                                            f"(checking {_fmt(checked)})"))
        if node.op_type in _QDQ:
            violations.extend(_check_qdq(name, node, scope, users, allow_int4_activations, checked))
    return violations


def _one_line(violations: list[Violation], version: str) -> str:
    by_rule: dict[str, list[str]] = {}
    for v in violations:
        by_rule.setdefault(v.rule, [])
        if v.node not in by_rule[v.rule]:
            by_rule[v.rule].append(v.node)
    parts = []
    for rule in sorted(by_rule, key=lambda r: int(r[1:])):
        nodes = by_rule[rule]
        shown = ", ".join(nodes[:_MAX_NAMES_IN_MESSAGE])
        more = f" (+{len(nodes) - _MAX_NAMES_IN_MESSAGE} more)" if len(nodes) > _MAX_NAMES_IN_MESSAGE else ""
        first = next(v for v in violations if v.rule == rule)
        parts.append(f"{rule} {RULES[rule].text}: {len(nodes)} node(s): {shown}{more} [{first.message}]")
    text = f"not TensorRT {version} compatible: " + "; ".join(parts)
    return " ".join(text.split())  # node names with newlines must not break the one line


def assert_tensorrt_compatible(model: onnx.ModelProto, *, allow_int4_activations: bool = False,
                               version: str = OLDEST_SUPPORTED) -> None:
    """Raise :class:`TensorRTCompatibilityError` (one-line message) if any rule is broken."""
    violations = check_tensorrt_compatibility(model, allow_int4_activations=allow_int4_activations,
                                              version=version)
    if violations:
        raise TensorRTCompatibilityError(_one_line(violations, version))


def summarize_quantization(model: onnx.ModelProto) -> dict[str, Any]:
    """Counts of the model's quantization, JSON-serializable.

    Keys: ``quantize_linear`` / ``dequantize_linear`` (count per quantized type name),
    ``granularity`` (per_tensor / per_channel / block / unknown counts over all Q/DQ nodes),
    ``weight_initializers`` (quantized type name -> sorted initializer names read by a
    DequantizeLinear), ``num_qdq_nodes``.
    """
    scope = build_scope(model)
    per_op: dict[str, Counter[str]] = {"QuantizeLinear": Counter(), "DequantizeLinear": Counter()}
    kinds: Counter[str] = Counter()
    weights: dict[str, set[str]] = {}
    for _, node in walk(model.graph):
        if node.op_type not in _QDQ or node.domain not in STANDARD_DOMAINS:
            continue
        qtype = quantized_type(node, scope)
        qname = type_name(qtype) if qtype is not None else "unknown"
        per_op[node.op_type][qname] += 1
        scale_tensor = scope.constants.get(node_input(node, 1))
        scale = array_of(scale_tensor) if scale_tensor is not None else None
        kinds[granularity(node, scale)] += 1
        data_name = node_input(node, 0)
        if node.op_type == "DequantizeLinear" and data_name in scope.initializer_names:
            weights.setdefault(qname, set()).add(data_name)
    return {
        "num_qdq_nodes": sum(sum(c.values()) for c in per_op.values()),
        "quantize_linear": dict(sorted(per_op["QuantizeLinear"].items())),
        "dequantize_linear": dict(sorted(per_op["DequantizeLinear"].items())),
        "granularity": dict(sorted(kinds.items())),
        "weight_initializers": {k: sorted(v) for k, v in sorted(weights.items())},
    }
