"""The [gpu] extra installs from the Python package index alone: its requirements resolve to wheels for this
interpreter and platform (asks the index, metadata only), the check names a requirement that is not a wheel (the
TensorRT step), and the extras keep the CPU and GPU ONNX Runtime wheels apart."""

import json
import subprocess
import sys
from pathlib import Path

import tomllib
from packaging.requirements import Requirement

from qdc_export.engines.trt_rules import OLDEST_SUPPORTED, TENSORRT_REQUIREMENT

ROOT = Path(__file__).resolve().parents[1]


def _project():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_cpu_and_gpu_onnxruntime_never_in_one_requirement_set():
    project = _project()
    base = {Requirement(r).name for r in project["dependencies"]}
    extras = {k: {Requirement(r).name for r in v} for k, v in project["optional-dependencies"].items()}
    assert not base & {"onnxruntime", "onnxruntime-gpu"}
    assert "onnxruntime" in extras["cpu"] and "onnxruntime-gpu" in extras["gpu"]
    assert not any({"onnxruntime", "onnxruntime-gpu"} <= names for names in extras.values())


def test_tensorrt_pinned_to_the_10x_major_the_rules_default_to():
    trt = Requirement(TENSORRT_REQUIREMENT)
    assert trt.specifier.contains(OLDEST_SUPPORTED + ".0") and not trt.specifier.contains("11.0")
    major, minor = (int(p) for p in OLDEST_SUPPORTED.split("."))
    assert not trt.specifier.contains(f"{major}.{minor - 1}.0")  # nothing older than the rules' default
    assert not any(Requirement(r).name.startswith("tensorrt") for r in _project()["optional-dependencies"]["gpu"])


def _check(*args: str) -> tuple[int, dict]:
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_gpu_extra.py"), *args], capture_output=True,
                         text=True, timeout=900)
    return out.returncode, json.loads(out.stdout)


def test_the_gpu_extra_resolves_to_wheels_and_tensorrt_is_named_as_a_separate_step():
    code, report = _check()
    assert code == 0 and report["ok"] and report["extra_from_wheels"]["wheels"], report
    assert "onnxruntime-gpu" in report["extra_from_wheels"]["resolves_to"], report
    assert report["tensorrt"]["requirement"] == TENSORRT_REQUIREMENT and not report["tensorrt"]["wheels"], report


def test_the_check_fails_on_a_requirement_that_is_not_a_wheel():
    code, report = _check("--requirement", TENSORRT_REQUIREMENT)
    assert code == 1 and not report["ok"] and report["not_wheels"] == [TENSORRT_REQUIREMENT], report
