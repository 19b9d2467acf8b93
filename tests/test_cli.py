"""The CLI through click's CliRunner, plus real subprocesses of the installed ``qdc-export`` entry point."""

import shutil
import subprocess

import pytest
from click.testing import CliRunner

from qdc_export.cli import main

FAST = ["--steps", "4", "--calib-samples", "2", "--parity-samples", "1"]


def run(args):
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    return result


def assert_one_line_error(result, needle):
    assert result.exit_code != 0
    lines = [l for l in result.output.strip().splitlines() if l.strip()]
    assert "Traceback" not in result.output
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], result.output


def test_build_check_inspect_sample(tmp_path):
    out = tmp_path / "build"
    result = run(["build", "tiny-unet2d", "--precision", "w8a8", *FAST, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "PASS quantized parity" in result.output
    # no --compensation: TCEC with its held-out check (>= 64 seeds) is the default
    assert "compensation tcec-m0" in result.output and "64 held-out seeds" in result.output, result.output
    assert {"model.onnx", "manifest.json", "parity.json", "reference.pt2"} <= {p.name for p in out.iterdir()}
    result = run(["check", str(out)])
    assert result.exit_code == 0 and result.output.startswith("PASS"), result.output
    result = run(["inspect", str(out)])
    assert result.exit_code == 0 and "QuantizeLinear {'int8'" in result.output, result.output
    result = run(["sample", str(out), "--num", "2", "--out", str(tmp_path / "imgs")])
    assert result.exit_code == 0, result.output
    pngs = sorted((tmp_path / "imgs").glob("*.png"))
    assert [p.name for p in pngs] == ["seed000000.png", "seed000001.png"]
    # Existing images are user data: not overwritten without --force.
    assert_one_line_error(run(["sample", str(out), "--num", "1", "--out", str(tmp_path / "imgs")]), "--force")
    assert run(["sample", str(out), "--num", "1", "--out", str(tmp_path / "imgs"), "--force"]).exit_code == 0
    # An existing build folder is not replaced without --force.
    assert_one_line_error(run(["build", "tiny-unet2d", *FAST, "--out", str(out)]), "--force")


@pytest.mark.parametrize("args, needle", [
    (["build", "/no/such/model", "--out", "X"], "neither a folder nor a preset"),
    (["build", "tiny-sd", "--precision", "int3", "--out", "X"], "int3"),
    (["build", "tiny-sd", "--steps", "0", "--out", "X"], "--steps"),
    (["build", "tiny-sd", "--precision", "fp32", "--compensation", "tcec", "--out", "X"], "compensation"),
    (["build", "tiny-sd", "--precision", "w4a16", "--ptq", "gptq+foo", "--out", "X"], "unknown part 'foo'"),
    (["build", "tiny-sd", "--precision", "w4a4", "--ptq", "awq+gptq", "--out", "X"], "awq applies to"),
    (["check", "/no/such/dir"], "not a folder"),
    (["inspect", "/no/such/file.onnx"], "does not exist"),
])
def test_bad_input_gets_one_line_and_nonzero_exit(tmp_path, args, needle):
    args = [str(tmp_path / "out") if a == "X" else a for a in args]
    result = run(args)
    if result.exit_code == 2:  # click's own usage errors (unknown choice) are also one clear message
        assert needle in result.output and "Traceback" not in result.output
    else:
        assert_one_line_error(result, needle)
    assert not (tmp_path / "out").exists()


def test_non_diffusers_folder_and_corrupt_onnx(tmp_path):
    (tmp_path / "notamodel").mkdir()
    (tmp_path / "notamodel" / "readme.txt").write_text("hello")
    assert_one_line_error(run(["build", str(tmp_path / "notamodel"), "--out", str(tmp_path / "o")]),
                          "not a diffusers folder")
    (tmp_path / "bad.onnx").write_bytes(b"\x00\x01 not a protobuf")
    assert_one_line_error(run(["inspect", str(tmp_path / "bad.onnx")]), "not a valid ONNX model")
    (tmp_path / "nobuild").mkdir()
    assert_one_line_error(run(["check", str(tmp_path / "nobuild")]), "not a qdc-export build folder")


def test_installed_entry_point_runs_as_a_real_process(tmp_path):
    exe = shutil.which("qdc-export")
    assert exe, "qdc-export console script is not installed"
    ok = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "build" in ok.stdout
    bad = subprocess.run([exe, "build", str(tmp_path / "missing"), "--out", str(tmp_path / "o")],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines() == [
        f"error: MODEL '{tmp_path / 'missing'}' is neither a folder nor a preset "
        "(digits-uncond, digits-cond, tiny-unet2d, tiny-sd, tiny-sdxl, sd15, sdxl)"], bad.stderr
