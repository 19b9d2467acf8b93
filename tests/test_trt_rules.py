"""TensorRT explicit-quantization rules (qdc_export.engines.trt_rules) on tiny hand-built ONNX models.

Each bad model breaks exactly one rule; the test asserts that exactly that rule fires, at the named
node. The good models also run in ONNX Runtime (CPU, basic optimizations) to prove they are valid.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as TP
from onnx import helper as h
from onnx import numpy_helper as nh

from qdc_export.engines.trt_rules import (
    RULES,
    Violation,
    assert_tensorrt_compatible,
    check_tensorrt_compatibility,
    summarize_quantization,
)
from qdc_export.errors import TensorRTCompatibilityError, UserError

ROOT = Path(__file__).resolve().parents[1]

OPSET = 21


def _finish(nodes, inits, inputs, outputs, *, extra_opsets=()) -> onnx.ModelProto:
    graph = h.make_graph(nodes, "g", inputs, outputs, inits)
    opsets = [h.make_opsetid("", OPSET), *[h.make_opsetid(d, 1) for d in extra_opsets]]
    model = h.make_model(graph, opset_imports=opsets)
    model.ir_version = 10
    return model


def qdq_conv_model(
    *,
    x_zp: int = 0,
    x_zp_type: int = TP.INT8,
    x_scale: float | list[float] = 0.05,
    w_scale_sign: float = 1.0,
    dynamic_x_scale: bool = False,
) -> onnx.ModelProto:
    """x -> Q/DQ (per-tensor int8) -> Conv(W: int8 per-channel DQ) -> y, TensorRT style.

    The keyword arguments break it one rule at a time."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    w_scale = (np.abs(w).reshape(4, -1).max(axis=1) / 127).astype(np.float32)
    w_q = np.clip(np.round(w / w_scale[:, None, None, None]), -127, 127).astype(np.int8)
    x_scale_arr = np.asarray(x_scale, dtype=np.float32)
    x_zp_arr = np.full(x_scale_arr.shape, x_zp, dtype=onnx.helper.tensor_dtype_to_np_dtype(x_zp_type))
    inits = [
        nh.from_array(w_q, "w_q"),
        nh.from_array((w_scale * w_scale_sign).astype(np.float32), "w_scale"),
        nh.from_array(np.zeros(4, np.int8), "w_zp"),
        onnx.helper.make_tensor("x_zp", x_zp_type, x_zp_arr.shape, x_zp_arr.flatten().tolist()),
        nh.from_array(rng.standard_normal(4).astype(np.float32), "b"),
    ]
    inputs = [h.make_tensor_value_info("x", TP.FLOAT, ["N", 3, 8, 8])]
    nodes = []
    if dynamic_x_scale:  # scale computed at run time from a graph input
        inputs.append(h.make_tensor_value_info("s", TP.FLOAT, []))
        nodes.append(h.make_node("Abs", ["s"], ["x_scale"], name="scale_abs"))
    else:
        inits.append(nh.from_array(x_scale_arr, "x_scale"))
    axis = {"axis": 1} if x_scale_arr.ndim == 1 else {}
    nodes += [
        h.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["x_q"], name="x_quant", **axis),
        h.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zp"], ["x_dq"], name="x_dequant", **axis),
        h.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w_dq"], name="w_dequant", axis=0),
        h.make_node("Conv", ["x_dq", "w_dq", "b"], ["y"], name="conv", pads=[1, 1, 1, 1]),
    ]
    outputs = [h.make_tensor_value_info("y", TP.FLOAT, ["N", 4, 8, 8])]
    return _finish(nodes, inits, inputs, outputs)


def int4_weight_matmul_model(*, k: int = 128, n: int = 16, block: int = 64,
                             scale_type: int = TP.FLOAT16) -> onnx.ModelProto:
    """x[N, K] @ DQ(W int4 [K, n], blocks of ``block`` along K, FP16 scales) -> y: TensorRT's documented
    INT4 weight-only GEMM (2-D weight and scale, block on one of the two axes, block dividing it)."""
    rng = np.random.default_rng(1)
    w = rng.integers(-8, 8, size=(k, n))
    blocks = -(-k // block)
    float_type = scale_type
    inits = [
        onnx.helper.make_tensor("w_q", TP.INT4, (k, n), w.flatten().tolist()),
        onnx.helper.make_tensor("w_scale", scale_type, (blocks, n), [0.01] * (blocks * n)),
    ]
    nodes = [
        h.make_node("DequantizeLinear", ["w_q", "w_scale"], ["w"], name="w_dequant", axis=0, block_size=block),
        h.make_node("MatMul", ["x", "w"], ["y"], name="matmul"),
    ]
    return _finish(
        nodes, inits,
        [h.make_tensor_value_info("x", float_type, ["N", k])],
        [h.make_tensor_value_info("y", float_type, ["N", n])],
    )


def _run_basic(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _fired(violations: list[Violation]) -> set[tuple[str, str]]:
    return {(v.rule, v.node) for v in violations}


# ------------------------------------------------------------------------------------- good models


def test_trt_style_qdq_conv_passes_and_runs_in_onnxruntime():
    model = qdq_conv_model()
    onnx.checker.check_model(model, full_check=True)
    assert check_tensorrt_compatibility(model) == []
    assert_tensorrt_compatible(model)  # does not raise
    x = np.random.default_rng(2).standard_normal((2, 3, 8, 8)).astype(np.float32)
    (y,) = _run_basic(model, {"x": x})
    assert y.shape == (2, 4, 8, 8) and np.all(np.isfinite(y))


@pytest.mark.parametrize("block", [64, 128])
def test_int4_weight_only_block_dq_passes_and_runs_in_onnxruntime(block):
    model = int4_weight_matmul_model(k=256, block=block)
    onnx.checker.check_model(model, full_check=True)
    assert check_tensorrt_compatibility(model) == []
    (y,) = _run_basic(model, {"x": np.ones((3, 256), np.float16)})
    assert y.shape == (3, 16) and y.dtype == np.float16  # the DQ's output type is its scale's (FP16)


# -------------------------------------------------------------------------------- one rule broken


@pytest.mark.parametrize(
    ("kwargs", "rule", "nodes"),
    [
        ({"x_zp": 3}, "R1", {"x_quant", "x_dequant"}),
        ({"w_scale_sign": -1.0}, "R2", {"w_dequant"}),
        ({"dynamic_x_scale": True}, "R2", {"x_quant", "x_dequant"}),
        ({"x_scale": [0.05, 0.04, 0.03]}, "R3", {"x_quant", "x_dequant"}),
    ],
    ids=["nonzero-zero-point", "negative-scale", "non-constant-scale", "per-channel-activation"],
)
def test_each_qdq_rule_fires_alone(kwargs, rule, nodes):
    model = qdq_conv_model(**kwargs)
    onnx.checker.check_model(model)
    assert _fired(check_tensorrt_compatibility(model)) == {(rule, n) for n in nodes}


def test_int4_activation_quantize_is_w4a4_violation():
    model = qdq_conv_model(x_zp_type=TP.INT4)
    onnx.checker.check_model(model)
    violations = check_tensorrt_compatibility(model)
    assert {v.rule for v in violations} == {"R4"}
    (quant,) = [v for v in violations if v.node == "x_quant"]
    assert "W4A4" in quant.message and "plugin" in quant.message
    # The escape hatch for plugin/other-runtime targets silences it.
    assert check_tensorrt_compatibility(model, allow_int4_activations=True) == []


def test_int4_rank3_block_weight_fires_r9():
    """TensorRT's block quantization takes a 2-D weight and a 2-D scale (Dequantize operator docs)."""
    model = int4_weight_matmul_model()
    model.graph.initializer[0].CopyFrom(onnx.helper.make_tensor("w_q", TP.INT4, (2, 128, 16), [1] * 4096))
    model.graph.initializer[1].CopyFrom(nh.from_array(np.full((2, 2, 16), 0.1, np.float16), "w_scale"))
    model.graph.node[0].attribute[0].i = 1  # blocks along K of each [128, 16] slice
    violations = check_tensorrt_compatibility(model)
    assert _fired(violations) == {("R9", "w_dequant")}
    assert any("rank 3" in v.message for v in violations)


@pytest.mark.parametrize(("k", "block", "words"), [(128, 8, "block size 8"), (96, 64, "ragged"),
                                                  (192, 128, "ragged"), (128, 32, "block size 32")],
                         ids=["block-8", "ragged-64", "ragged-128", "block-32"])
def test_int4_block_size_must_be_64_or_128_and_divide_k(k, block, words):
    model = int4_weight_matmul_model(k=k, block=block)
    onnx.checker.check_model(model)
    violations = check_tensorrt_compatibility(model)
    assert _fired(violations) == {("R9", "w_dequant")}
    assert any(words in v.message for v in violations), [str(v) for v in violations]


def test_int4_weight_feeding_a_convolution_fires_r8():
    """The export's old form DQ(INT4) -> Reshape -> Conv: TensorRT runs INT4 only in GEMMs."""
    rng = np.random.default_rng(3)
    inits = [
        onnx.helper.make_tensor("w_q", TP.INT4, (8, 64 * 9), rng.integers(-8, 8, 8 * 576).tolist()),
        nh.from_array(np.full((8, 9), 0.01, np.float32), "w_scale"),
        nh.from_array(np.array([8, 64, 3, 3], np.int64), "w_shape"),
    ]
    nodes = [
        h.make_node("DequantizeLinear", ["w_q", "w_scale"], ["w2d"], name="w_dequant", axis=1, block_size=64),
        h.make_node("Reshape", ["w2d", "w_shape"], ["w"], name="w_reshape"),
        h.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1]),
    ]
    model = _finish(nodes, inits, [h.make_tensor_value_info("x", TP.FLOAT, ["N", 64, 8, 8])],
                    [h.make_tensor_value_info("y", TP.FLOAT, ["N", 8, 8, 8])])
    onnx.checker.check_model(model, full_check=True)
    assert _fired(check_tensorrt_compatibility(model)) == {("R8", "w_dequant")}


def test_int8_block_quantization_fires_r9():
    """Block scales are for INT4 only (Dequantize operator docs); INT8 weights are per-channel."""
    model = int4_weight_matmul_model()
    model.graph.initializer[0].CopyFrom(nh.from_array(np.ones((128, 16), np.int8), "w_q"))
    violations = check_tensorrt_compatibility(model)
    assert _fired(violations) == {("R9", "w_dequant")}
    assert "int4 only" in violations[0].message.lower()


def test_dequantize_followed_by_cast_fires_r10():
    """DQ(FP32 scale) -> Cast(FP16): the DQ's output type is its scale's; the Cast sits between DQ and GEMM."""
    model = int4_weight_matmul_model(scale_type=TP.FLOAT)
    model.graph.node[0].output[0] = "w32"
    model.graph.node.insert(1, h.make_node("Cast", ["w32"], ["w"], name="w_cast", to=TP.FLOAT16))
    model.graph.input[0].type.tensor_type.elem_type = TP.FLOAT16
    model.graph.output[0].type.tensor_type.elem_type = TP.FLOAT16
    onnx.checker.check_model(model, full_check=True)
    assert _fired(check_tensorrt_compatibility(model)) == {("R8", "w_dequant"), ("R10", "w_dequant")}
    assert check_tensorrt_compatibility(int4_weight_matmul_model()) == []  # FP16 scale: DQ feeds MatMul


def test_custom_domain_op_fires_r5():
    model = qdq_conv_model()
    model.graph.node.append(h.make_node("FancyNorm", ["y"], ["z"], name="fancy", domain="com.example"))
    model.graph.output[0].name = "z"
    model.opset_import.append(h.make_opsetid("com.example", 1))
    assert _fired(check_tensorrt_compatibility(model)) == {("R5", "fancy")}


def test_unsupported_op_fires_r6_and_supported_hardmax_does_not():
    """MatMulInteger is 'N' in onnx-tensorrt's operators.md; Hardmax is 'Y' (parser 9.2 on)."""
    model = qdq_conv_model()
    model.graph.node.append(h.make_node("Hardmax", ["y"], ["z"], name="hardmax"))
    model.graph.output[0].name = "z"
    onnx.checker.check_model(model)
    assert check_tensorrt_compatibility(model) == []
    model.graph.node.append(h.make_node("MatMulInteger", ["a", "b"], ["c"], name="matmul_integer"))
    assert _fired(check_tensorrt_compatibility(model)) == {("R6", "matmul_integer")}


def _single_op_model(op: str, opset: int, inputs: int = 1, **attrs) -> onnx.ModelProto:
    names = [f"i{k}" for k in range(inputs)]
    graph = h.make_graph([h.make_node(op, names, ["y"], name=op.lower(), **attrs)], "g",
                         [h.make_tensor_value_info(n, TP.FLOAT16, None) for n in names],
                         [h.make_tensor_value_info("y", TP.FLOAT16, None)])
    return h.make_model(graph, opset_imports=[h.make_opsetid("", opset)])


@pytest.mark.parametrize(("op", "opset", "inputs", "attrs", "first_ok"), [
    ("GroupNormalization", 21, 3, {"num_groups": 2}, "10.9"),   # Changelog 10.9: opset 21 GroupNorm
    ("Attention", 23, 3, {}, "10.14"),                          # Changelog 10.14
    ("RMSNormalization", 23, 2, {}, "10.15"),                   # Changelog 10.15
], ids=["groupnorm-21", "attention", "rmsnorm"])
def test_ops_need_the_tensorrt_version_that_added_them(op, opset, inputs, attrs, first_ok):
    model = _single_op_model(op, opset, inputs, **attrs)
    major, minor = (int(p) for p in first_ok.split("."))
    before = f"{major}.{minor - 1}"
    violations = check_tensorrt_compatibility(model, version=before)
    assert _fired(violations) == {("R6", op.lower())} and first_ok in violations[0].message
    assert check_tensorrt_compatibility(model, version=first_ok) == []
    assert check_tensorrt_compatibility(model, version="11.4") == []


def test_opset18_groupnorm_passes_before_10_9():
    assert check_tensorrt_compatibility(_single_op_model("GroupNormalization", 18, 3, num_groups=2),
                                        version="10.8") == []


def test_default_version_is_the_oldest_the_tensorrt_requirement_allows():
    from packaging.requirements import Requirement

    from qdc_export.engines.trt_rules import OLDEST_SUPPORTED, TENSORRT_REQUIREMENT

    assert f">={OLDEST_SUPPORTED}" in str(Requirement(TENSORRT_REQUIREMENT).specifier).replace(" ", "")


@pytest.mark.parametrize("text", ["ten", "9.3", "10", ""])
def test_bad_trt_version_is_a_user_error(text):
    from qdc_export.engines.trt_rules import parse_version

    with pytest.raises(UserError, match="trt-version"):
        parse_version(text)


def test_nodes_in_subgraphs_are_checked():
    body = h.make_graph(
        [h.make_node("Unique", ["y"], ["u"], name="inner_unique")],
        "then", [], [h.make_tensor_value_info("u", TP.FLOAT, None)],
    )
    other = h.make_graph(
        [h.make_node("Identity", ["y"], ["v"], name="inner_identity")],
        "else", [], [h.make_tensor_value_info("v", TP.FLOAT, None)],
    )
    model = qdq_conv_model()
    model.graph.initializer.append(nh.from_array(np.array(True), "cond"))
    model.graph.node.append(
        h.make_node("If", ["cond"], ["z"], name="branch", then_branch=body, else_branch=other)
    )
    model.graph.output[0].name = "z"
    assert _fired(check_tensorrt_compatibility(model)) == {("R6", "branch/then_branch:inner_unique")}


def test_uint8_quantization_fires_r7():
    model = qdq_conv_model(x_zp_type=TP.UINT8)
    assert _fired(check_tensorrt_compatibility(model)) == {("R7", "x_quant"), ("R7", "x_dequant")}


# --------------------------------------------------------------------------------------- messages


def test_error_is_one_line_user_error_naming_rule_and_nodes():
    model = qdq_conv_model(x_zp=3)
    for i in range(7):  # more offenders than the message shows
        model.graph.node.append(h.make_node("MatMulInteger", ["y", "y"], [f"z{i}"], name=f"hm\n{i}"))
    with pytest.raises(TensorRTCompatibilityError) as info:
        assert_tensorrt_compatible(model)
    message = str(info.value)
    assert isinstance(info.value, UserError)
    assert "\n" not in message
    assert "R1" in message and "x_quant" in message and "x_dequant" in message
    assert "R6" in message and "7 node(s)" in message and "(+2 more)" in message
    assert "TensorRT 10.12" in message
    assert set(RULES) >= {"R1", "R2", "R3", "R4", "R5", "R6"}


# ---------------------------------------------------------------------------------------- summary


def test_summarize_quantization_counts():
    summary = summarize_quantization(qdq_conv_model())
    assert summary["num_qdq_nodes"] == 3
    assert summary["quantize_linear"] == {"int8": 1}
    assert summary["dequantize_linear"] == {"int8": 2}
    assert summary["granularity"] == {"per_channel": 1, "per_tensor": 2}
    assert summary["weight_initializers"] == {"int8": ["w_q"]}

    summary4 = summarize_quantization(int4_weight_matmul_model())
    assert summary4["granularity"] == {"block": 1}
    assert summary4["weight_initializers"] == {"int4": ["w_q"]}
