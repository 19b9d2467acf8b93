"""The [gpu] extra installs: each pinned requirement resolves to a published distribution (asks the package
index, hence slow-marked), and the extras keep the CPU and GPU ONNX Runtime wheels apart."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement

from qdc_export.engines.trt_rules import OLDEST_SUPPORTED

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
    (trt,) = [Requirement(r) for r in _project()["optional-dependencies"]["gpu"] if r.startswith("tensorrt")]
    assert trt.specifier.contains(OLDEST_SUPPORTED + ".0") and not trt.specifier.contains("11.0")
    major, minor = (int(p) for p in OLDEST_SUPPORTED.split("."))
    assert not trt.specifier.contains(f"{major}.{minor - 1}.0")  # nothing older than the rules' default


@pytest.mark.slow
def test_every_gpu_requirement_resolves_to_a_published_distribution():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_gpu_extra.py")], capture_output=True,
                         text=True, timeout=600)
    report = json.loads(out.stdout)
    assert out.returncode == 0 and report["ok"], report
    assert all(r["resolves_to"] for r in report["requirements"]), report
