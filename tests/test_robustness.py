"""Robustness: calibration that sees NaN/Inf or no data fails naming the layers; corrupted or foreign ONNX
files give one-line CLI errors; a build killed with SIGKILL leaves no target folder, and what it left
behind is cleaned by the next build of the same target. (Pickle-only model folders: tests/test_plugins.py.)"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper

from qdc_export.capture import capture
from qdc_export.cli import main
from qdc_export.config import BuildConfig
from qdc_export.errors import CalibrationError
from qdc_export.infra.staging import clean_stale, staged_folder
from qdc_export.load.models import load_model
from qdc_export.manifest import MANIFEST, sha256_file
from qdc_export.quantize.annotate import QuantizationPlan
from qdc_export.quantize.calibrate import check_observers, observer_layers
from qdc_export.quantize.graph import build_graph
from qdc_export.quantize.qdq import insert_observers_

CALIB = {"steps": 2, "calib_samples": 1, "parity_samples": 1}


def one_line_error(result, needle: str) -> str:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert "Traceback" not in result.output
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], result.output
    return lines[0]


# --- calibration ---------------------------------------------------------------------------------

def test_nan_weight_is_reported_with_its_layer():
    model = load_model("tiny-unet2d")
    with torch.no_grad():
        model.unet.down_blocks[0].resnets[0].conv1.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(CalibrationError) as info:
        build_graph(model, BuildConfig(precision="w8a8", **CALIB))
    message = str(info.value)
    assert message.startswith("NaN/Inf ranges in")
    first = message.split(": ", 1)[1].split(";")[0]
    assert "down_blocks.0.resnets.0.conv1 (weight)" in first, message


def test_inf_activation_is_reported_with_the_layer_it_feeds():
    model = load_model("tiny-unet2d")
    with torch.no_grad():  # +inf bias: conv1's output is +inf, so conv2's input range is not finite
        model.unet.down_blocks[0].resnets[0].conv1.bias[0] = float("inf")
    with pytest.raises(CalibrationError) as info:
        build_graph(model, BuildConfig(precision="w8a8", **CALIB))
    assert "down_blocks.0.resnets.0.conv2 (input)" in str(info.value).split(";")[0], str(info.value)


def test_ranges_that_never_got_data_are_named():
    model = load_model("tiny-unet2d")
    gm, _ = capture(model.unet, model.adapter)
    observed = insert_observers_(gm, QuantizationPlan(float_layers=model.adapter.default_float_layers))
    names = observer_layers(observed.module)
    assert len(names) == observed.details["observers"]
    assert any(v.endswith("(input)") for v in names.values()) and any(v.endswith("(weight)") for v in names.values())
    with pytest.raises(CalibrationError, match=r"observers never saw data: .*\((input|weight)\) \[activation_post_process_"):
        check_observers(observed.module)


# --- corrupted / foreign ONNX --------------------------------------------------------------------

def _foreign_onnx(path: Path) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "foreign", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), str(path))


@pytest.mark.parametrize("content", [b"", b"\x00\xffnot a protobuf\x13" * 50, b'{"json": "not onnx"}'],
                         ids=["empty", "garbage", "json"])
def test_inspect_rejects_corrupt_files(tmp_path, content):
    path = tmp_path / "model.onnx"
    path.write_bytes(content)
    one_line_error(CliRunner().invoke(main, ["inspect", str(path)]), "not a valid ONNX model")


def test_inspect_truncated_and_foreign(tmp_path):
    foreign = tmp_path / "foreign.onnx"
    _foreign_onnx(foreign)
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(foreign.read_bytes()[:-7])
    one_line_error(CliRunner().invoke(main, ["inspect", str(truncated)]), "not a valid ONNX model")
    result = CliRunner().invoke(main, ["inspect", str(foreign)])  # valid ONNX, not ours: still inspectable
    assert result.exit_code == 0, result.output


def test_check_rejects_corrupted_and_foreign_models(tmp_path, build_factory):
    source = build_factory("tiny-unet2d", "w8a8").out
    cases = {}
    for name in ("corrupt", "foreign", "foreign-rehashed", "not-a-build"):
        folder = tmp_path / name
        shutil.copytree(source, folder)
        cases[name] = folder
    with open(cases["corrupt"] / "model.onnx", "r+b") as handle:  # flip bytes in the middle
        handle.seek(os.path.getsize(handle.name) // 2)
        handle.write(b"\xde\xad\xbe\xef" * 16)
    one_line_error(CliRunner().invoke(main, ["check", str(cases["corrupt"])]), "does not match its sha256")
    _foreign_onnx(cases["foreign"] / "model.onnx")
    one_line_error(CliRunner().invoke(main, ["check", str(cases["foreign"])]), "does not match its sha256")
    # a foreign model with a manifest edited to match: the I/O does not match the build's
    _foreign_onnx(cases["foreign-rehashed"] / "model.onnx")
    manifest = json.loads((cases["foreign-rehashed"] / MANIFEST).read_text())
    manifest["artifacts"]["model.onnx"] = sha256_file(cases["foreign-rehashed"] / "model.onnx")
    (cases["foreign-rehashed"] / MANIFEST).write_text(json.dumps(manifest))
    one_line_error(CliRunner().invoke(main, ["check", str(cases["foreign-rehashed"])]), "model.onnx")
    (cases["not-a-build"] / MANIFEST).unlink()
    one_line_error(CliRunner().invoke(main, ["check", str(cases["not-a-build"])]), "not a qdc-export build folder")
    (cases["corrupt"] / MANIFEST).write_text("{ truncated")
    one_line_error(CliRunner().invoke(main, ["check", str(cases["corrupt"])]), "not valid JSON")


# --- killed builds -------------------------------------------------------------------------------

def _entry_point() -> list[str]:
    exe = shutil.which("qdc-export")
    return [exe] if exe else [sys.executable, "-m", "qdc_export.cli"]


def test_sigkill_mid_build_leaves_no_target_and_next_build_cleans_up(tmp_path):
    out = tmp_path / "out"
    cmd = [*_entry_point(), "build", "tiny-unet2d", "--precision", "fp32", "--steps", "2", "--parity-samples", "1",
           "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    staging = tmp_path / f".out.partial-{proc.pid}"
    try:
        deadline = time.monotonic() + 600
        while proc.poll() is None and time.monotonic() < deadline:  # kill once it has started writing
            if staging.is_dir() and any(staging.iterdir()):
                break
            time.sleep(0.02)
        assert staging.is_dir() and any(staging.iterdir()), f"build never wrote into staging (exit {proc.poll()})"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    assert staging.is_dir()  # a SIGKILLed process cannot clean up; the next build of the target does
    other = tmp_path / f".elsewhere.partial-{proc.pid}"  # another target's folder is not ours to remove
    other.mkdir()
    with staged_folder(out, force=False) as new_staging:
        (new_staging / "manifest.json").write_text("{}")
    assert not staging.exists() and out.is_dir() and other.is_dir()


def test_cleanup_spares_running_builds_and_restores_a_stranded_previous_build(tmp_path):
    out = tmp_path / "out"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f".out.partial-{sleeper.pid}"
        live.mkdir()
        dead_pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                                  text=True, check=True).stdout.strip()
        stranded = tmp_path / f".out.old-{dead_pid}"  # killed between the two renames of a --force build
        stranded.mkdir()
        (stranded / "manifest.json").write_text("previous")
        assert clean_stale(out) == []
        assert live.is_dir() and (out / "manifest.json").read_text() == "previous"
    finally:
        sleeper.kill()
        sleeper.wait()
    assert clean_stale(out) == [live]


# --- full size (slow) ----------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("precision", ["w8a8", "w4a16"])
@pytest.mark.parametrize("model,extra", [("sd15", []), ("sdxl", ["--sample-size", "64"])], ids=["sd15", "sdxl"])
def test_full_size_build_stays_under_the_memory_budget(tmp_path, model, extra, precision):
    """SD 1.5 / SDXL UNet architectures (random weights) through the whole build, 1 sample x 2 steps, in a
    fresh process (benchmarks/scale.py run): parity passes and the peak RSS of every stage stays < 22 GB."""
    report = tmp_path / "report.json"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "scale.py"
    subprocess.run([sys.executable, str(script), "run", "--model", model, "--precision", precision,
                    "--json", str(report), "--out", str(tmp_path), *extra], check=True)
    result = json.loads(report.read_text())
    assert result["parity_passed"], result["parity_summary"]
    assert result["peak_rss_gb"] < 22, {k: v["peak_rss_gb"] for k, v in result["stages"].items()}
