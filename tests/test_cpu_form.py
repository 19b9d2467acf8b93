"""The CPU deployment forms (docs/cpu.md): ``--target onnxruntime-cpu`` passes its parity check against its own
PyTorch Q/DQ graph, stays standard ONNX (opset 21, ai.onnx only), makes ONNX Runtime select its integer kernels
(read from the runtime's own optimized graph, written by a plain ONNX Runtime session, not by our code), and
keeps the compensation head and its state I/O of the onnxruntime form. ``--target openvino`` (where OpenVINO is
installed) passes its check on OpenVINO."""

from __future__ import annotations

import collections
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from parity_assertions import assert_statistical_parity

from qdc_export.check.parity import summarize
from qdc_export.config import BuildConfig
from qdc_export.engines.ort_cpu import optimized_model_path
from qdc_export.engines.providers import create_session
from qdc_export.errors import UserError
from qdc_export.manifest import read_manifest
from qdc_export.metrics import error_stats

# the head and its state I/O (TCEC m=1 is stateful); folded whatever the held-out check says on random weights
COMPENSATED = {"compensation": "tcec", "tcec_variant": "m1-fitted", "comp_validate": False}


def _cpu_build(build_factory):
    return build_factory("tiny-sd", "w8a8", target="onnxruntime-cpu", **COMPENSATED)


def test_cpu_form_passes_check_and_is_standard_onnx(build_factory):
    result = _cpu_build(build_factory)
    assert_statistical_parity(result.parity)
    assert result.parity["compensation_head"]["passed"], result.parity["compensation_head"]
    model = onnx.load(str(result.out / "model.onnx"), load_external_data=False)
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 21)]
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}
    ops = collections.Counter(n.op_type for n in model.graph.node)
    # outputs quantized too: a Q after each quantized Conv, so there are more Q than in the TensorRT layout
    reference = onnx.load(str(build_factory("tiny-sd", "w8a8", **COMPENSATED).out / "model.onnx"),
                          load_external_data=False)
    reference_q = sum(n.op_type == "QuantizeLinear" for n in reference.graph.node)
    assert ops["QuantizeLinear"] > reference_q, (ops["QuantizeLinear"], reference_q)
    activations = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    zero_points = {i.name: i.data_type for i in model.graph.initializer}
    types = {zero_points.get(q.input[2]) for q in activations if len(q.input) > 2}
    assert types == {onnx.TensorProto.UINT8}, f"activation types (U8S8 expected): {types}"


def test_residual_joining_convs_stay_float(build_factory):
    """A ResNet block's conv2 (its output is added to the block's input) stays float; conv1 (added to the
    broadcast time embedding only) is quantized. Names from diffusers' module tree, not from our detection."""
    quantization = read_manifest(_cpu_build(build_factory).out)["quantization"]
    floats, quantized = set(quantization["float_layers"]), set(quantization["quantized_layers"])
    conv2 = {n for n in floats | quantized if ".resnets." in n and n.endswith(".conv2")}
    conv1 = {n for n in floats | quantized if ".resnets." in n and n.endswith(".conv1")}
    assert conv2 and conv2 <= floats, sorted(conv2 - floats)
    assert conv1 and conv1 <= quantized, sorted(conv1 - quantized)


def test_onnxruntime_selects_integer_kernels(build_factory, tmp_path):
    """A plain session at level ALL (our session code not involved) must fuse the form into QLinearConv."""
    result = _cpu_build(build_factory)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(result.out / "model.onnx"), options, providers=["CPUExecutionProvider"])
    ops = collections.Counter(n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node)
    assert ops["QLinearConv"] > 0 and ops["MatMulIntegerToFloat"] > 0, dict(ops)
    # and the build's own saved optimized graph, which later sessions load, holds the same kernels
    saved = collections.Counter(n.op_type for n in onnx.load(str(optimized_model_path(result.out))).graph.node)
    assert saved["QLinearConv"] == ops["QLinearConv"], (dict(saved), dict(ops))


def test_saved_optimized_graph_is_reused_with_the_same_outputs(build_factory):
    result = _cpu_build(build_factory)
    cached = optimized_model_path(result.out)
    assert cached.is_file()
    stamp = cached.stat().st_mtime_ns
    model_path = result.out / "model.onnx"
    fresh_options = ort.SessionOptions()
    fresh_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    fresh = ort.InferenceSession(str(model_path), fresh_options, providers=["CPUExecutionProvider"])
    reused = create_session(model_path)
    assert cached.stat().st_mtime_ns == stamp, "the saved optimized graph was rewritten instead of loaded"
    generator = torch.Generator().manual_seed(0)
    timesteps = read_manifest(result.out)["scheduler"]["timesteps"]
    feeds = {"sample": torch.randn(2, 4, 16, 16, generator=generator).numpy(),
             "timestep": np.array([timesteps[1]] * 2, dtype=np.float32),
             "encoder_hidden_states": torch.randn(2, 8, 32, generator=generator).numpy(),
             "comp_state": torch.randn(2, 4, 16, 16, generator=generator).numpy()}
    for want, got in zip(fresh.run(None, feeds), reused.run(None, feeds)):
        stats = error_stats(want, got)
        # the same kernels on the same inputs; tolerance: FP32 accumulation order only (1e-5 absolute)
        assert stats["max_abs"] <= 1e-5, stats


def test_compensation_head_io_same_as_onnxruntime_form(build_factory):
    cpu = read_manifest(_cpu_build(build_factory).out)
    reference = read_manifest(build_factory("tiny-sd", "w8a8", **COMPENSATED).out)
    assert cpu["io"] == reference["io"]
    assert cpu["compensation"]["stateful"] and reference["compensation"]["stateful"]
    assert [i["name"] for i in cpu["io"]["inputs"]][-1] == "comp_state"
    assert [o["name"] for o in cpu["io"]["outputs"]] == ["noise_pred", "comp_state_out"]
    assert cpu["target"]["name"] == "onnxruntime-cpu"


def test_cpu_form_refuses_other_precisions():
    with pytest.raises(UserError, match="onnxruntime-cpu takes w8a8"):
        BuildConfig(precision="w4a16", target="onnxruntime-cpu")
    proc = subprocess.run([sys.executable, "-m", "qdc_export.cli", "build", "tiny-unet2d", "--precision", "w4a8",
                           "--target", "onnxruntime-cpu", "--out", "/nonexistent/x"], capture_output=True, text=True, check=False)
    assert proc.returncode == 1 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert proc.stderr.startswith("error: --target onnxruntime-cpu takes w8a8"), proc.stderr


def test_openvino_form_passes_check_on_openvino(build_factory):
    pytest.importorskip("openvino")
    from qdc_export.engines.openvino import OvEngine
    from qdc_export.engines.select import denoiser_from_build, open_engine

    result = build_factory("tiny-sd", "w8a8", target="openvino", **COMPENSATED)
    assert_statistical_parity(result.parity)
    assert result.parity["compensation_head"]["passed"], summarize(result.parity)
    assert isinstance(open_engine(result.out / "model.onnx"), OvEngine)
    assert (result.out / "ov_cache").is_dir() and any((result.out / "ov_cache").iterdir())
    denoiser = denoiser_from_build(result.out)
    assert denoiser.stateful and denoiser.cond_names == ["encoder_hidden_states"]
