"""The Linear-weight Transpose fold (passes.onnx_weights): same outputs in ONNX Runtime, no Transpose left."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from qdc_export.engines.providers import create_session
from qdc_export.export.onnx_weights import fold_weight_transposes, fold_zero_point_casts


def _linear_model(per_channel: bool, weight_readers: int = 1) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = rng.integers(-127, 128, size=(6, 5), dtype=np.int8)  # [O, K]
    scale = (rng.random(6) * 0.1 + 0.01).astype(np.float32) if per_channel else np.float32(0.05)
    nodes = [
        helper.make_node("DequantizeLinear", ["w_q", "w_scale"], ["w"], axis=0),
        helper.make_node("Transpose", ["w"], ["w_t"], perm=[1, 0]),
        helper.make_node("MatMul", ["x", "w_t"], ["y"]),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 6])]
    if weight_readers > 1:  # a second reader of the stored weight: must not be folded
        nodes.append(helper.make_node("DequantizeLinear", ["w_q", "w_scale"], ["w_again"], axis=0))
        outputs.append(helper.make_tensor_value_info("w_again", TensorProto.FLOAT, [6, 5]))
    graph = helper.make_graph(
        nodes, "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 5])], outputs,
        initializer=[numpy_helper.from_array(w, "w_q"), numpy_helper.from_array(np.asarray(scale), "w_scale")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    return create_session(model, optimization="disable").run(None, {"x": x})


def _folded(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model after the pass, which must fold its one Transpose and leave a valid DQ -> MatMul."""
    ir_model = ir.from_proto(model)
    assert fold_weight_transposes(ir_model) == 1
    folded = ir.to_proto(ir_model)
    onnx.checker.check_model(folded, full_check=True)
    assert [n.op_type for n in folded.graph.node] == ["DequantizeLinear", "MatMul"]
    return folded


@pytest.mark.parametrize("per_channel", [True, False], ids=["per-channel", "per-tensor"])
def test_fold_removes_transpose_and_keeps_outputs(per_channel):
    model = _linear_model(per_channel)
    x = np.random.default_rng(1).standard_normal((2, 3, 5)).astype(np.float32)
    before = _run(model, x)
    folded = _folded(model)
    weight = next(i for i in folded.graph.initializer if i.name == "w_q")
    assert list(weight.dims) == [5, 6]
    if per_channel:
        assert helper.get_attribute_value(folded.graph.node[0].attribute[0]) == 1
    after = _run(folded, x)
    # same values into the same MatMul: exact
    np.testing.assert_array_equal(after[0], before[0])


def test_fold_transposes_a_blocked_int4_scale_with_its_weight():
    # W [O=6, K=8] in blocks of 4 along K (axis 1): scale [6, 2]; after the fold W^T [8, 6], scale [2, 6], axis 0
    rng = np.random.default_rng(3)
    w = rng.integers(-8, 8, size=(6, 8), dtype=np.int8)
    scale = (rng.random((6, 2)) * 0.1 + 0.01).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["w_q", "w_scale"], ["w"], axis=1, block_size=4),
         helper.make_node("Transpose", ["w"], ["w_t"], perm=[1, 0]),
         helper.make_node("MatMul", ["x", "w_t"], ["y"])],
        "blocked", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 6])],
        initializer=[numpy_helper.from_array(w, "w_q"), numpy_helper.from_array(scale, "w_scale")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    x = np.random.default_rng(4).standard_normal((2, 8)).astype(np.float32)
    before = _run(model, x)
    folded = _folded(model)
    dims = {i.name: list(i.dims) for i in folded.graph.initializer}
    assert dims == {"w_q": [8, 6], "w_scale": [2, 6]}
    attrs = {a.name: helper.get_attribute_value(a) for a in folded.graph.node[0].attribute}
    assert attrs == {"axis": 0, "block_size": 4}
    np.testing.assert_array_equal(_run(folded, x)[0], before[0])


def test_fold_sees_through_the_cast_of_an_fp16_network_and_rule_r11_catches_what_it_misses():
    """The FP16 network's Linear weights come out of the exporter as DQ(FP32) -> Cast(FP16) -> Transpose -> MatMul
    (16 of them in digits-uncond's W8A8 TensorRT form before this fold looked through the Cast). The fold gives
    DQ(W^T) -> Cast -> MatMul with the same outputs; left unfolded, TensorRT rule R11 names each weight."""
    from qdc_export.engines.trt_rules import check_tensorrt_compatibility as tensorrt_violations

    model = _linear_model(per_channel=True)
    model.graph.node[0].output[0] = "w32"
    model.graph.node.insert(1, helper.make_node("Cast", ["w32"], ["w"], to=TensorProto.FLOAT16))
    model.graph.node[3].input[0] = "x16"
    model.graph.node.insert(3, helper.make_node("Cast", ["x"], ["x16"], to=TensorProto.FLOAT16))
    model.graph.output[0].type.tensor_type.elem_type = TensorProto.FLOAT16
    onnx.checker.check_model(model, full_check=True)
    assert [v.rule for v in tensorrt_violations(model)].count("R11") == 1
    x = np.random.default_rng(1).standard_normal((2, 3, 5)).astype(np.float32)
    before = _run(model, x)
    ir_model = ir.from_proto(model)
    assert fold_weight_transposes(ir_model) == 1
    folded = ir.to_proto(ir_model)
    onnx.checker.check_model(folded, full_check=True)
    assert [n.op_type for n in folded.graph.node] == ["DequantizeLinear", "Cast", "Cast", "MatMul"]
    assert not any(v.rule == "R11" for v in tensorrt_violations(folded))
    # the same FP16 values in the same [K, O] layout; ONNX Runtime's FP16 MatMul over a transposed input and over
    # a stored one accumulate in different orders: within FP16 rounding of the products (|y| < 10, 2 ulp)
    after = _run(folded, x)[0]
    error = np.abs(after.astype(np.float64) - before[0].astype(np.float64))
    print(f"max {error.max():.3g} mean {error.mean():.3g} p99 {np.quantile(error, 0.99):.3g} (tolerance 2 FP16 ulp)")
    np.testing.assert_allclose(after, before[0], rtol=0, atol=2 * float(np.spacing(np.float16(8.0))))


def test_fold_leaves_shared_weights_alone():
    ir_model = ir.from_proto(_linear_model(True, weight_readers=2))
    assert fold_weight_transposes(ir_model) == 0
    assert [n.op_type for n in ir_model.graph] == ["DequantizeLinear", "Transpose", "MatMul", "DequantizeLinear"]


def test_zero_point_cast_becomes_a_constant_and_keeps_outputs():
    """A per-channel zero point computed as Cast(initializer) (what the exporter leaves for zero points over its
    folding size limit) becomes an initializer: outputs unchanged, and TensorRT's R1 rule satisfied."""
    from qdc_export.engines.trt_rules import check_tensorrt_compatibility as tensorrt_violations

    rng = np.random.default_rng(0)
    w = rng.integers(-127, 128, size=(6, 5), dtype=np.int8)
    scale = (rng.random(6) * 0.1 + 0.01).astype(np.float32)
    nodes = [helper.make_node("Cast", ["zp_int32"], ["zp"], to=TensorProto.INT8),
             helper.make_node("DequantizeLinear", ["w_q", "w_scale", "zp"], ["w"], axis=0),
             helper.make_node("MatMul", ["x", "w"], ["y"])]
    graph = helper.make_graph(
        nodes, "zp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5])],
        initializer=[numpy_helper.from_array(w, "w_q"), numpy_helper.from_array(scale, "w_scale"),
                     numpy_helper.from_array(np.zeros(6, dtype=np.int32), "zp_int32")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    assert any(v.rule == "R1" for v in tensorrt_violations(model)), "the unfolded model should break R1"
    ir_model = ir.from_proto(model)
    assert fold_zero_point_casts(ir_model) == 1
    folded = ir.to_proto(ir_model)
    onnx.checker.check_model(folded, full_check=True)
    assert [n.op_type for n in folded.graph.node] == ["DequantizeLinear", "MatMul"]
    assert not [v for v in tensorrt_violations(folded) if v.rule == "R1"]
    x = rng.standard_normal((2, 6)).astype(np.float32)
    np.testing.assert_array_equal(_run(folded, x)[0], _run(model, x)[0])
