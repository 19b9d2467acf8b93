"""TensorRT engine build and run (qdc_export.engines.tensorrt) against ONNX Runtime on CPU.

Needs TensorRT and a CUDA device; skipped with the reason otherwise (never reported as run).
Quantized graphs are not bit-exact across runtimes (docs/probe-notes.md, Parity), so the
TensorRT-vs-ONNX-Runtime checks use SNR thresholds, not elementwise tolerances.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto as TP
from onnx import helper as h
from onnx import numpy_helper as nh

from qdc_export.engines.tensorrt import (
    TensorRTBuildConfig,
    build_engine,
    profiles_from_build_options,
    tensorrt_available,
)
from qdc_export.engines.tensorrt_runtime import TensorRTEngine
from qdc_export.engines.trt_rules import check_tensorrt_compatibility
from qdc_export.errors import UserError

_AVAILABLE, _REASON = tensorrt_available()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not _AVAILABLE, reason=f"needs TensorRT and CUDA: {_REASON}"),
]

SNR_DB_MIN = 30.0  # same INT8 Q/DQ graph on two runtimes; rounding flips only


def qdq_conv_model() -> onnx.ModelProto:
    """x -> Q/DQ (int8 per-tensor) -> Conv(W: int8 per-channel DQ) -> y (TensorRT style)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    w_scale = (np.abs(w).reshape(8, -1).max(axis=1) / 127).astype(np.float32)
    w_q = np.clip(np.round(w / w_scale[:, None, None, None]), -127, 127).astype(np.int8)
    inits = [
        nh.from_array(w_q, "w_q"),
        nh.from_array(w_scale, "w_scale"),
        nh.from_array(np.zeros(8, np.int8), "w_zp"),
        nh.from_array(np.array(4.0 / 127, np.float32), "x_scale"),
        nh.from_array(np.array(0, np.int8), "x_zp"),
        nh.from_array(rng.standard_normal(8).astype(np.float32), "b"),
    ]
    nodes = [
        h.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["x_q"], name="x_quant"),
        h.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zp"], ["x_dq"], name="x_dequant"),
        h.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w_dq"], name="w_dequant", axis=0),
        h.make_node("Conv", ["x_dq", "w_dq", "b"], ["y"], name="conv", pads=[1, 1, 1, 1]),
    ]
    graph = h.make_graph(
        nodes, "g",
        [h.make_tensor_value_info("x", TP.FLOAT, ["N", 3, "H", "W"])],
        [h.make_tensor_value_info("y", TP.FLOAT, ["N", 8, "H", "W"])],
        inits,
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    assert check_tensorrt_compatibility(model) == []
    return model


def _snr_db(reference: np.ndarray, actual: np.ndarray) -> float:
    noise = np.sum((reference.astype(np.float64) - actual) ** 2)
    return float(10 * np.log10(np.sum(reference.astype(np.float64) ** 2) / max(noise, 1e-30)))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    folder = tmp_path_factory.mktemp("trt")
    onnx_path = folder / "conv.onnx"
    onnx.save(qdq_conv_model(), onnx_path)
    shapes = profiles_from_build_options({"x": ("batch", 3, "height", "width")}, (1, 2, 4), (8, 16, 32))
    config = TensorRTBuildConfig(
        shapes=shapes, builder_optimization_level=3, workspace_bytes=1 << 28,
        timing_cache_path=str(folder / "timing.cache"),
    )
    engine_path = build_engine(onnx_path, config, folder / "conv.plan")
    return onnx_path, engine_path, config


def test_build_writes_engine_record_and_timing_cache(built):
    onnx_path, engine_path, config = built
    assert engine_path.stat().st_size > 0
    record = json.loads(engine_path.with_name(engine_path.name + ".json").read_text())
    assert TensorRTBuildConfig.from_dict(record["config"]) == config
    assert (onnx_path.parent / "timing.cache").stat().st_size > 0
    assert not list(engine_path.parent.glob(".*.tmp"))  # atomic write left nothing behind


def test_engine_matches_onnxruntime_cpu_with_polygraphy_comparator(built):
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner
    from polygraphy.comparator import Comparator
    from polygraphy.comparator.compare import SnrCompareFunc

    onnx_path, engine_path, _ = built
    rng = np.random.default_rng(5)
    feeds = [{"x": rng.standard_normal((b, 3, hw, hw)).astype(np.float32)} for b, hw in [(1, 8), (2, 16), (4, 32)]]
    runners = [
        TrtRunner(EngineFromBytes(BytesFromPath(str(engine_path))), name="trt"),
        OnnxrtRunner(SessionFromOnnx(str(onnx_path), providers=["CPUExecutionProvider"]), name="onnxrt-cpu"),
    ]
    results = Comparator.run(runners, data_loader=feeds)
    accuracy = Comparator.compare_accuracy(results, compare_func=SnrCompareFunc(snr_threshold=SNR_DB_MIN))
    assert bool(accuracy), f"TensorRT vs ONNX Runtime CPU below {SNR_DB_MIN} dB SNR (see log above)"


def test_tensorrt_engine_infer_dynamic_shapes(built):
    import onnxruntime as ort

    onnx_path, engine_path, _ = built
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(6)
    with TensorRTEngine(engine_path) as engine:
        assert engine.input_names == ["x"] and engine.output_names == ["y"]
        for batch, hw in [(1, 8), (3, 24), (4, 32)]:
            x = rng.standard_normal((batch, 3, hw, hw)).astype(np.float32)
            y = engine.infer({"x": x})["y"]
            (ref,) = session.run(None, {"x": x})
            diff = np.abs(y - ref)
            snr = _snr_db(ref, y)
            print(f"batch={batch} hw={hw}: snr={snr:.1f} dB max={diff.max():.3g} mean={diff.mean():.3g}")
            assert y.shape == ref.shape and snr >= SNR_DB_MIN
        with pytest.raises(UserError, match="outside the engine's profile"):
            engine.infer({"x": np.zeros((8, 3, 8, 8), np.float32)})


def test_engine_runner_feeds_tensorrt_with_its_metadata(built):
    """EngineRunner over TensorRTEngine: the Comparator gets the engine's own input metadata and timings."""
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.comparator import Comparator
    from polygraphy.comparator.compare import SnrCompareFunc

    from qdc_export.engines.runners import EngineRunner

    onnx_path, engine_path, _ = built
    feeds = [{"x": np.random.default_rng(7).standard_normal((2, 3, 16, 16)).astype(np.float32)}]
    with TensorRTEngine(engine_path) as engine:
        runner = EngineRunner(engine, name="tensorrt")
        results = Comparator.run([runner, OnnxrtRunner(SessionFromOnnx(str(onnx_path)), name="ort")],
                                 data_loader=feeds)
        assert runner.last_inference_time() is not None and runner.last_inference_time() > 0
    assert bool(Comparator.compare_accuracy(results, compare_func=SnrCompareFunc(snr_threshold=SNR_DB_MIN)))


def test_check_against_goldens_with_the_tensorrt_backend(build_factory, tmp_path):
    """`check --backend tensorrt --against goldens.json` on the FP16 TensorRT form of a bundled model."""
    from qdc_export.check.folder import check_against, check_build

    result = build_factory(str(__import__("pathlib").Path(__file__).resolve().parents[2] / "models" / "digits-uncond"),
                           "w8a8", target="tensorrt")
    assert (result.out / "model.engine").is_file()
    goldens = tmp_path / "goldens.json"
    check_build(result.out, save_goldens_to=goldens)
    report = check_against(result.out, goldens, backend="tensorrt")
    assert report["passed"], report["worst"]
