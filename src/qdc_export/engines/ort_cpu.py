"""ONNX Runtime settings of the CPU deployment form (``--target onnxruntime-cpu``, docs/cpu.md).

The form's ONNX file is standard (opset 21, ai.onnx only): ``DQ(x_u8), DQ(W_s8) -> Conv -> Q(y_u8)``. The
runtime's graph optimizer turns it into its own kernels: QLinearConv (U8S8, VNNI), MatMulIntegerToFloat
for Linear layers on 3-D inputs (MatMul -> Add(bias) -> Q leaves the MatMul without a Q of its own). Settings:

* graph optimization level ALL (the QDQ fusions run at EXTENDED and above, NCHWc layouts at ALL);
* prepacking of constant weights on (``session.disable_prepacking = 0``, ONNX Runtime's default, stated);
* the optimized graph is saved into the build folder (``ort_cpu/``) on first use and loaded on later runs
  when it is newer than model.onnx; it holds com.microsoft ops and NCHWc layouts chosen for this CPU, so the
  file name carries the onnxruntime version and a digest of the CPU's flags, and another machine makes its own.
  A build folder that cannot be written to just optimizes on every session creation.
"""

from __future__ import annotations

import hashlib
import os
import platform
from pathlib import Path

import onnxruntime as ort

CPU_FORM_TARGET = "onnxruntime-cpu"
OPTIMIZED_DIR = "ort_cpu"
_PREPACKING_KEY = "session.disable_prepacking"
_EXTERNAL_KEY = "session.optimized_model_external_initializers_file_name"
_EXTERNAL_MIN_KEY = "session.optimized_model_external_initializers_min_size_in_bytes"


def cpu_signature() -> str:
    """A short digest of what the optimized graph depends on: the CPU's instruction set flags and the machine."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line
                break
    except OSError:
        pass
    return hashlib.sha256(f"{platform.machine()}|{flags}".encode()).hexdigest()[:12]


def optimized_model_path(folder: Path) -> Path:
    return Path(folder) / OPTIMIZED_DIR / f"model.ort{ort.__version__}.{cpu_signature()}.onnx"


def _writable(folder: Path) -> bool:
    return os.access(folder, os.W_OK)


def cpu_form_session_source(model_path: Path, options: ort.SessionOptions) -> str:
    """Adjusts ``options`` for the CPU form and returns the file to open: the saved optimized graph when it is
    fresh, else model.onnx (and then the optimized graph is saved on this session's creation)."""
    model_path = Path(model_path)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry(_PREPACKING_KEY, "0")
    cached = optimized_model_path(model_path.parent)
    if cached.is_file() and cached.stat().st_mtime >= model_path.stat().st_mtime:
        return str(cached)
    if _writable(model_path.parent):
        cached.parent.mkdir(exist_ok=True)
        partial = cached.with_name(f".{cached.name}.{os.getpid()}.partial")
        options.optimized_model_filepath = str(partial)
        if Path(str(model_path) + ".data").is_file():  # > 2 GB models: the optimized graph keeps external data too
            options.add_session_config_entry(_EXTERNAL_KEY, cached.name + ".data")
            options.add_session_config_entry(_EXTERNAL_MIN_KEY, "1024")
    return str(model_path)


def publish_optimized_model(model_path: Path) -> None:
    """After session creation: move the optimized graph written by this process into place (atomically)."""
    cached = optimized_model_path(Path(model_path).parent)
    partial = cached.with_name(f".{cached.name}.{os.getpid()}.partial")
    if partial.is_file():
        partial.replace(cached)
