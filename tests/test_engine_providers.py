"""ONNX Runtime session helpers (qdc_export.engines.providers): opset-21 Q/DQ quirks on CPU."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as TP
from onnx import helper as h
from onnx import numpy_helper as nh

from qdc_export.engines.providers import create_session, make_session_options
from qdc_export.errors import UserError

TOL = 1e-6  # "all" vs "basic" on the same INT8 Q/DQ graph: same kernels after the fix, so ~exact


def int8_qdq_conv_model() -> onnx.ModelProto:
    """x -> Q/DQ (int8 per-tensor, opset-21 ``output_dtype`` set as torch's exporter does)
    -> Conv(W: int8 per-channel DQ). Without the quirk fix this fails at ORT_ENABLE_ALL."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    w_scale = (np.abs(w).reshape(4, -1).max(axis=1) / 127).astype(np.float32)
    w_q = np.clip(np.round(w / w_scale[:, None, None, None]), -127, 127).astype(np.int8)
    inits = [
        nh.from_array(w_q, "w_q"),
        nh.from_array(w_scale, "w_scale"),
        nh.from_array(np.zeros(4, np.int8), "w_zp"),
        nh.from_array(np.array(0.05, np.float32), "x_scale"),
        nh.from_array(np.array(0, np.int8), "x_zp"),
        nh.from_array(rng.standard_normal(4).astype(np.float32), "b"),
    ]
    nodes = [
        h.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["x_q"], name="x_quant",
                    output_dtype=TP.INT8),
        h.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zp"], ["x_dq"], name="x_dequant"),
        h.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w_dq"], name="w_dequant", axis=0),
        h.make_node("Conv", ["x_dq", "w_dq", "b"], ["y"], name="conv", pads=[1, 1, 1, 1]),
    ]
    graph = h.make_graph(
        nodes, "g",
        [h.make_tensor_value_info("x", TP.FLOAT, ["N", 3, 8, 8])],
        [h.make_tensor_value_info("y", TP.FLOAT, ["N", 4, 8, 8])],
        inits,
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return model


def int4_block_matmul_model() -> onnx.ModelProto:
    """x[N,64] @ DQ(W int4 [64,32], block 32 along K): fuses to MatMulNBits at ORT_ENABLE_ALL."""
    rng = np.random.default_rng(3)
    inits = [
        h.make_tensor("w_q", TP.INT4, (64, 32), rng.integers(-7, 8, size=64 * 32).tolist()),
        nh.from_array(rng.uniform(0.01, 0.02, (2, 32)).astype(np.float32), "w_scale"),
    ]
    nodes = [
        h.make_node("DequantizeLinear", ["w_q", "w_scale"], ["w"], name="w_dequant", axis=0, block_size=32),
        h.make_node("MatMul", ["x", "w"], ["y"], name="matmul"),
    ]
    graph = h.make_graph(
        nodes, "g",
        [h.make_tensor_value_info("x", TP.FLOAT, ["N", 64])],
        [h.make_tensor_value_info("y", TP.FLOAT, ["N", 32])],
        inits,
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def _errors(a: np.ndarray, b: np.ndarray) -> str:
    d = np.abs(a.astype(np.float64) - b.astype(np.float64))
    return f"max={d.max():.3g} mean={d.mean():.3g} p99={np.quantile(d, 0.99):.3g}"


def test_plain_onnxruntime_fails_at_all_so_the_quirk_is_real():
    """Guards the test below: if this starts passing, onnxruntime fixed the bug upstream."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    with pytest.raises(Exception, match="output_dtype"):
        ort.InferenceSession(int8_qdq_conv_model().SerializeToString(), so, providers=["CPUExecutionProvider"])


def test_int8_qdq_runs_at_all_and_matches_basic(tmp_path):
    model = int8_qdq_conv_model()
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    x = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)
    (y_all,) = create_session(path, provider="cpu", optimization="all").run(None, {"x": x})
    (y_basic,) = create_session(model, provider="cpu", optimization="basic").run(None, {"x": x})
    assert np.allclose(y_all, y_basic, rtol=0, atol=TOL), _errors(y_all, y_basic)


def test_session_options_alone_carry_the_fix():
    model = int8_qdq_conv_model()
    options, providers = make_session_options(model, provider="cpu")
    assert providers == ["CPUExecutionProvider"]
    sess = ort.InferenceSession(model.SerializeToString(), options, providers=providers)
    assert sess.run(None, {"x": np.zeros((1, 3, 8, 8), np.float32)})[0].shape == (1, 4, 8, 8)


def test_int4_matmulnbits_stays_exact_at_all():
    model = int4_block_matmul_model()
    x = np.random.default_rng(4).standard_normal((4, 64)).astype(np.float32)
    (y_all,) = create_session(model, optimization="all").run(None, {"x": x})
    (y_basic,) = create_session(model, optimization="basic").run(None, {"x": x})
    # Without session.qdq_matmulnbits_accuracy_level the fused kernel is off by ~1e-2 here.
    assert np.allclose(y_all, y_basic, rtol=0, atol=1e-5), _errors(y_all, y_basic)


def test_unavailable_provider_is_a_one_line_user_error():
    if "TensorrtExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime build has the TensorRT execution provider")
    with pytest.raises(UserError) as info:
        make_session_options(None, provider="tensorrt")
    message = str(info.value)
    assert "\n" not in message
    assert "tensorrt" in message and "CPUExecutionProvider" in message


def test_unknown_provider_and_level_are_user_errors():
    with pytest.raises(UserError, match="unknown provider"):
        make_session_options(None, provider="directml")
    with pytest.raises(UserError, match="unknown optimization"):
        make_session_options(None, provider="cpu", optimization="max")  # type: ignore[arg-type]


def test_missing_model_path_is_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        create_session(tmp_path / "absent.onnx")


# ------------------------------------------------------------------ TensorRT module, pure parts
# (qdc_export.engines.tensorrt imports without TensorRT; its build/run paths are in tests/gpu.)

from qdc_export.engines.tensorrt import (  # noqa: E402
    TensorRTBuildConfig,
    build_engine,
    profiles_from_build_options,
    tensorrt_available,
)
from qdc_export.engines.tensorrt_runtime import TensorRTEngine  # noqa: E402
from qdc_export.errors import TensorRTCompatibilityError  # noqa: E402


def test_profiles_from_build_options_expands_symbols():
    profiles = profiles_from_build_options(
        {
            "sample": ("batch", 4, "height", "width"),
            "timestep": ("batch",),
            "encoder_hidden_states": ("batch", "tokens", 768),
        },
        batch_range=(1, 2, 4),
        hw_range=(32, 64, 128),
        extra_dims={"tokens": (77, 77, 154)},
    )
    assert profiles == {
        "sample": ((1, 4, 32, 32), (2, 4, 64, 64), (4, 4, 128, 128)),
        "timestep": ((1,), (2,), (4,)),
        "encoder_hidden_states": ((1, 77, 768), (2, 77, 768), (4, 154, 768)),
    }
    config = TensorRTBuildConfig(shapes=profiles, builder_optimization_level=4, workspace_bytes=1 << 30)
    assert TensorRTBuildConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    ("specs", "batch", "hw", "match"),
    [
        ({"x": ("batch", "depth")}, (1, 1, 1), (8, 8, 8), "unknown dimension symbol 'depth'"),
        ({"x": ("batch",)}, (2, 1, 4), (8, 8, 8), "0 < min <= opt <= max"),
        ({"x": ("batch",)}, (0, 1, 4), (8, 8, 8), "0 < min <= opt <= max"),
    ],
)
def test_profiles_from_build_options_rejects_bad_options(specs, batch, hw, match):
    with pytest.raises(UserError, match=match):
        profiles_from_build_options(specs, batch, hw)


def test_build_config_is_validated_and_frozen():
    with pytest.raises(UserError, match="rank"):
        TensorRTBuildConfig(shapes={"x": ((1, 3), (1, 3, 8), (1, 3, 8))})
    with pytest.raises(UserError, match="min <= opt <= max"):
        TensorRTBuildConfig(shapes={"x": ((2, 3), (1, 3), (4, 3))})
    with pytest.raises(UserError, match="builder_optimization_level"):
        TensorRTBuildConfig(shapes={"x": ((1,), (1,), (1,))}, builder_optimization_level=6)
    config = TensorRTBuildConfig(shapes={"x": ([1, 3], [2, 3], [4, 3])})  # lists are normalized
    assert config.shapes["x"] == ((1, 3), (2, 3), (4, 3))
    with pytest.raises(AttributeError):
        config.builder_optimization_level = 5  # type: ignore[misc]


def test_tensorrt_paths_fail_cleanly_without_tensorrt(tmp_path):
    available, reason = tensorrt_available()
    if available:
        pytest.skip(f"TensorRT is usable here ({reason}); tests/gpu covers it")
    assert reason
    config = TensorRTBuildConfig(shapes={"x": ((1, 3, 8, 8),) * 3})
    path = tmp_path / "m.onnx"
    onnx.save(int8_qdq_conv_model(), path)
    with pytest.raises(UserError) as info:
        build_engine(path, config, tmp_path / "m.plan")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "m.plan").exists()
    with pytest.raises(UserError):
        TensorRTEngine(tmp_path / "m.plan").activate()


def test_build_engine_checks_rules_before_needing_tensorrt(tmp_path):
    model = int8_qdq_conv_model()
    model.graph.initializer[4].CopyFrom(nh.from_array(np.array(3, np.int8), "x_zp"))  # asymmetric
    path = tmp_path / "bad.onnx"
    onnx.save(model, path)
    config = TensorRTBuildConfig(shapes={"x": ((1, 3, 8, 8),) * 3})
    with pytest.raises(TensorRTCompatibilityError, match="R1"):
        build_engine(path, config, tmp_path / "bad.plan")
