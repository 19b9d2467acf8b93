"""--target tensorrt (rule check + engine-build inputs everywhere; engine only with TensorRT) and
goldens: parity results saved on one machine and checked on another (here: ONNX Runtime CPU both)."""

import json

import pytest
from click.testing import CliRunner
from polygraphy.json import load_json, save_json

from qdc_export.checking import check_against, check_build
from qdc_export.cli import main
from qdc_export.config import BuildConfig
from qdc_export.engines.tensorrt import TensorRTBuildConfig, tensorrt_available
from qdc_export.errors import UserError
from qdc_export.manifest import read_manifest


def test_tensorrt_target_writes_engine_build_inputs(build_factory):
    result = build_factory("tiny-unet2d", "w8a8", target="tensorrt")
    target = read_manifest(result.out)["target"]
    assert target["name"] == "tensorrt" and target["rules_passed"] and target["strongly_typed"]
    config = TensorRTBuildConfig.from_dict(json.loads((result.out / "tensorrt_build.json").read_text()))
    assert config.shapes["sample"] == ((1, 3, 16, 16), (2, 3, 16, 16), (8, 3, 16, 16))
    assert config.shapes["timestep"] == ((1,), (2,), (8,))
    available, reason = tensorrt_available()
    if available:
        assert target["engine"] == "model.engine" and (result.out / "model.engine").is_file()
    else:  # never pretend the engine was built
        assert target["engine"] is None and target["engine_skipped"] == reason
        assert not (result.out / "model.engine").exists()


def test_w4a4_for_tensorrt_is_refused_with_the_reason():
    with pytest.raises(UserError, match="TensorRT"):
        BuildConfig(precision="w4a4", target="tensorrt")


def test_goldens_round_trip_and_detect_a_different_engine(build_factory, tmp_path):
    result = build_factory("tiny-unet2d", "w8a8")
    goldens = tmp_path / "goldens.json"
    report = check_build(result.out, save_goldens_to=goldens)
    assert report["passed"] and goldens.is_file()
    same = check_against(result.out, goldens)
    assert same["passed"] and same["worst"]["max_abs"] == 0.0, same["worst"]
    # Perturb the saved outputs as if another machine's engine were off: the check must fail.
    data = load_json(str(goldens))
    for iteration in list(data["outputs"].items())[0][1]:
        iteration["noise_pred"] = iteration["noise_pred"] * 0.5
    save_json(data, str(tmp_path / "bad.json"))
    bad = check_against(result.out, tmp_path / "bad.json")
    assert not bad["passed"] and bad["worst"]["min_snr_db"] < 10, bad["worst"]


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
