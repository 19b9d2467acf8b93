"""--target tensorrt (rule check + engine-build inputs everywhere; engine only with TensorRT) and
goldens: parity results saved on one machine and checked on another (here: ONNX Runtime CPU both)."""

import json
from collections import Counter

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto as TP
from polygraphy.json import load_json, save_json

from qdc_export.check.folder import check_against, check_build
from qdc_export.cli import main
from qdc_export.config import BuildConfig
from qdc_export.engines.ort_tensorrt import tensorrt_provider_options
from qdc_export.engines.runners import EngineRunner, backend_runner
from qdc_export.engines.tensorrt import TensorRTBuildConfig, tensorrt_available
from qdc_export.engines.trt_rules import OLDEST_SUPPORTED
from qdc_export.errors import UserError
from qdc_export.manifest import read_manifest


def test_tensorrt_form_keeps_the_folded_head_in_fp32(build_factory):
    """The FP16 network with folded TCEC tables: the head (tables, comp_state and its ops) stays FP32, so the check
    holds it elementwise to the FP32 tables at 1e-5 (in FP16 it was off by 3.7e-3 on digits-uncond)."""
    import onnx

    result = build_factory("tiny-unet2d", "w8a8", target="tensorrt", compensation="tcec", tcec_variant="m1-fitted",
                           comp_validate=False)
    head = result.parity["compensation_head"]
    # the head alone: this random-weight model's FP16 body is known to miss the per-step SNR bound by a fraction of
    # a dB (benchmarks/results/tensorrt_form.md), which says nothing about the head
    assert head["passed"], (head["max_abs"], head["mean_abs"], head["p99_abs"])
    proto = onnx.load(str(result.out / "model.onnx"), load_external_data=False)
    head_tables = [i for i in proto.graph.initializer if i.name.startswith("head.")]
    assert head_tables and all(i.data_type == onnx.TensorProto.FLOAT for i in head_tables)
    state = next(i for i in proto.graph.input if i.name == "comp_state")
    assert state.type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def test_tensorrt_target_writes_engine_build_inputs(build_factory):
    result = build_factory("tiny-unet2d", "w8a8", target="tensorrt")
    target = read_manifest(result.out)["target"]
    assert target["name"] == "tensorrt" and target["rules_passed"] and target["strongly_typed"]
    assert target["rules_version"] == OLDEST_SUPPORTED and target["network_float"] == "fp16"
    config = TensorRTBuildConfig.from_dict(json.loads((result.out / "tensorrt_build.json").read_text()))
    assert config.shapes["sample"] == ((1, 3, 16, 16), (2, 3, 16, 16), (8, 3, 16, 16))
    assert config.shapes["timestep"] == ((1,), (2,), (8,))
    available, reason = tensorrt_available()
    if available:
        assert target["engine"] == "model.engine" and (result.out / "model.engine").is_file()
    else:  # never pretend the engine was built
        assert target["engine"] is None and target["engine_skipped"] == reason
        assert not (result.out / "model.engine").exists()


@pytest.mark.parametrize("precision", ["w4a4", "w4a8"])
def test_4bit_activations_for_tensorrt_are_refused_with_the_reason(precision):
    with pytest.raises(UserError, match="cannot target TensorRT") as info:
        BuildConfig(precision=precision, target="tensorrt")
    assert "\n" not in str(info.value)


def test_tensorrt_form_is_an_fp16_network_with_int8_qdq_and_fp32_io(build_factory):
    """Every float initializer FP16 (INT8 weights stay INT8), every DQ's scale FP16 so it feeds its
    Conv / MatMul directly (no Cast), engine I/O FP32; the onnxruntime form of the same build stays FP32."""
    proto = onnx.load(str(build_factory("tiny-unet2d", "w8a8", target="tensorrt").out / "model.onnx"))
    inits = {i.name: i for i in proto.graph.initializer}
    float_types = Counter(i.data_type for i in inits.values()
                          if i.data_type in (TP.FLOAT, TP.FLOAT16) and len(i.dims) > 0)
    users = {}
    for node in proto.graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    # FP32 is left only where it must be: Resize scales, and the sinusoid frequencies of the timestep embedding
    for init in inits.values():
        if init.data_type == TP.FLOAT and len(init.dims) > 0:
            for user in users[init.name]:
                feeds_sinusoid = user.op_type == "Mul" and {"Sin", "Cos"} <= {
                    u.op_type for out in user.output for u in users.get(out, [])}
                assert user.op_type == "Resize" or feeds_sinusoid, (init.name, user.op_type)
    assert float_types[TP.FLOAT16] > 10 * float_types[TP.FLOAT], float_types
    dq = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"]
    assert dq and all(inits[n.input[1]].data_type == TP.FLOAT16 for n in dq if n.input[1] in inits)
    assert {i.type.tensor_type.elem_type for i in [*proto.graph.input, *proto.graph.output]} == {TP.FLOAT}
    assert {"Sin", "Cos"} <= {n.op_type for n in proto.graph.node}  # timestep embedding kept in FP32 ...
    fp32 = onnx.load(str(build_factory("tiny-unet2d", "w8a8").out / "model.onnx"))
    assert not any(i.data_type == TP.FLOAT16 for i in fp32.graph.initializer)


def test_bf16_network_is_refused_with_the_reason():
    """BF16 Conv needs ONNX opset 22 (the export writes 21): refused, not written as an invalid model."""
    with pytest.raises(UserError, match="opset 22"):
        BuildConfig(precision="w8a8", target="tensorrt", trt_float="bf16")


def test_ort_tensorrt_provider_options_come_from_the_build(build_factory):
    trt = build_factory("tiny-unet2d", "w8a8", target="tensorrt").out
    options = tensorrt_provider_options(trt)
    assert options["trt_engine_cache_path"] == options["trt_timing_cache_path"] == str(trt / "trt_cache")
    assert options["trt_profile_min_shapes"] == "sample:1x3x16x16,timestep:1"
    assert options["trt_profile_opt_shapes"] == "sample:2x3x16x16,timestep:2"
    assert options["trt_profile_max_shapes"] == "sample:8x3x16x16,timestep:8"
    assert options["trt_fp16_enable"] == "True" and options["trt_bf16_enable"] == "False"
    assert tensorrt_provider_options(build_factory("tiny-unet2d", "w8a8").out)["trt_fp16_enable"] == "False"


def test_goldens_round_trip_and_detect_a_different_engine(build_factory, tmp_path):
    result = build_factory("tiny-unet2d", "w8a8")
    goldens = tmp_path / "goldens.json"
    report = check_build(result.out, save_goldens_to=goldens)
    assert report["passed"] and goldens.is_file()
    runner = backend_runner(result.out, "onnxruntime", "cpu")
    assert isinstance(runner, EngineRunner)  # ONNX Runtime through the runner class TensorRT engines use
    with runner:
        meta = runner.get_input_metadata()
        assert list(meta) == ["sample", "timestep"]
        assert meta["sample"].dtype == np.float32 and tuple(meta["sample"].shape)[1:] == (3, 16, 16)
        runner.infer(_first_feed(goldens))
        assert runner.last_inference_time() > 0  # Polygraphy reads it for every iteration
    same = check_against(result.out, goldens)
    assert same["passed"] and same["worst"]["max_abs"] == 0.0, same["worst"]
    # Perturb the saved outputs as if another machine's engine were off: the check must fail.
    data = load_json(str(goldens))
    for iteration in list(data["outputs"].items())[0][1]:
        iteration["noise_pred"] = iteration["noise_pred"] * 0.5
    save_json(data, str(tmp_path / "bad.json"))
    bad = check_against(result.out, tmp_path / "bad.json")
    assert not bad["passed"] and bad["worst"]["min_snr_db"] < 10, bad["worst"]


def _first_feed(goldens):
    return load_json(str(goldens))["inputs"][0]


def test_goldens_of_the_tensorrt_form_round_trip_through_the_engine_runner(build_factory, tmp_path):
    """The FP16 network's goldens (FP32 I/O) replayed through EngineRunner(OrtEngine): the path a GPU machine
    takes with EngineRunner(TensorRTEngine) and `check --backend tensorrt --against`."""
    result = build_factory("tiny-unet2d", "w8a8", target="tensorrt")
    goldens = tmp_path / "trt-goldens.json"
    check_build(result.out, save_goldens_to=goldens)
    same = check_against(result.out, goldens)
    assert same["passed"] and same["worst"]["max_abs"] == 0.0 and same["runner"] == "onnxruntime-cpu", same


def test_cli_against_and_tensorrt_backend_messages(build_factory, tmp_path):
    result = build_factory("tiny-unet2d", "w8a8")
    runner = CliRunner()
    out = runner.invoke(main, ["check", str(result.out), "--save-goldens", str(tmp_path / "g.json")])
    assert out.exit_code == 0, out.output
    out = runner.invoke(main, ["check", str(result.out), "--against", str(tmp_path / "g.json")])
    assert out.exit_code == 0 and out.output.strip().splitlines()[-1].startswith("PASS onnxruntime-cpu"), out.output
    out = runner.invoke(main, ["check", str(result.out), "--backend", "tensorrt"])
    assert out.exit_code == 1 and "--against" in out.output
    if not tensorrt_available()[0]:
        out = runner.invoke(main, ["check", str(result.out), "--backend", "tensorrt", "--against", str(tmp_path / "g.json")])
        assert out.exit_code == 1 and "needs TensorRT" in out.output and "Traceback" not in out.output
