"""TensorRT explicit-quantization rules (qdc_export.engines.trt_rules) on tiny hand-built ONNX models.

Each bad model breaks exactly one rule; the test asserts that exactly that rule fires, at the named
node. The good models also run in ONNX Runtime (CPU, basic optimizations) to prove they are valid.
"""

from __future__ import annotations

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


def int4_weight_matmul_model(*, block_axis: int = 0) -> onnx.ModelProto:
    """x[N,16] @ DQ(W int4 [16, 8], block 8 along K) -> y: INT4 weight-only, blocked."""
    rng = np.random.default_rng(1)
    w = rng.integers(-7, 8, size=(16, 8))
    scale_shape = (2, 8) if block_axis == 0 else (16, 1)
    inits = [
        onnx.helper.make_tensor("w_q", TP.INT4, (16, 8), w.flatten().tolist()),
        nh.from_array(np.full(scale_shape, 0.01, np.float32), "w_scale"),
    ]
    nodes = [
        h.make_node("DequantizeLinear", ["w_q", "w_scale"], ["w"], name="w_dequant", axis=block_axis,
                    block_size=8),
        h.make_node("MatMul", ["x", "w"], ["y"], name="matmul"),
    ]
    return _finish(
        nodes, inits,
        [h.make_tensor_value_info("x", TP.FLOAT, ["N", 16])],
        [h.make_tensor_value_info("y", TP.FLOAT, ["N", 8])],
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


def test_int4_weight_only_block_dq_passes_and_runs_in_onnxruntime():
    model = int4_weight_matmul_model()
    onnx.checker.check_model(model, full_check=True)
    assert check_tensorrt_compatibility(model) == []
    (y,) = _run_basic(model, {"x": np.ones((3, 16), np.float32)})
    assert y.shape == (3, 8)


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


def test_int4_block_axis_must_be_last_two_dims():
    model = int4_weight_matmul_model()
    model.graph.initializer[0].CopyFrom(
        onnx.helper.make_tensor("w_q", TP.INT4, (2, 16, 8), [1] * 256)
    )
    model.graph.initializer[1].CopyFrom(nh.from_array(np.full((1, 16, 8), 0.1, np.float32), "w_scale"))
    model.graph.node[0].attribute[0].i = 0  # axis 0 of a rank-3 weight
    assert _fired(check_tensorrt_compatibility(model)) == {("R4", "w_dequant")}


def test_custom_domain_op_fires_r5():
    model = qdq_conv_model()
    model.graph.node.append(h.make_node("FancyNorm", ["y"], ["z"], name="fancy", domain="com.example"))
    model.graph.output[0].name = "z"
    model.opset_import.append(h.make_opsetid("com.example", 1))
    assert _fired(check_tensorrt_compatibility(model)) == {("R5", "fancy")}


def test_unsupported_op_fires_r6():
    model = qdq_conv_model()
    model.graph.node.append(h.make_node("Hardmax", ["y"], ["z"], name="hardmax"))
    model.graph.output[0].name = "z"
    onnx.checker.check_model(model)
    assert _fired(check_tensorrt_compatibility(model)) == {("R6", "hardmax")}


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
        model.graph.node.append(h.make_node("Hardmax", ["y"], [f"z{i}"], name=f"hm\n{i}"))
    with pytest.raises(TensorRTCompatibilityError) as info:
        assert_tensorrt_compatible(model)
    message = str(info.value)
    assert isinstance(info.value, UserError)
    assert "\n" not in message
    assert "R1" in message and "x_quant" in message and "x_dequant" in message
    assert "R6" in message and "7 node(s)" in message and "(+2 more)" in message
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
