"""OpenVINO engine (``--target openvino``, docs/cpu.md): the build's standard ONNX file compiled by OpenVINO's
CPU plugin, behind the same Denoiser interface as :class:`qdc_export.engines.onnxruntime.OrtDenoiser`
(sample, timestep, conditioning..., [comp_state] in; noise_pred, [comp_state_out] out).

OpenVINO reads QuantizeLinear/DequantizeLinear as FakeQuantize and its low-precision transformations run the
Conv/MatMul that a FakeQuantize feeds in INT8 (runtime precision u8/i8 in the compiled model). Settings:

* ``INFERENCE_PRECISION_HINT = f32``: on CPUs with BF16 units OpenVINO's default hint is bf16, which runs every
  float layer (an FP32 export included) in bfloat16; the engine must match its PyTorch graph, so f32 is pinned
  (``precision_hint`` changes it, e.g. for the benchmark's bf16 rows);
* ``CACHE_DIR``: compiled models are cached in the build folder (``ov_cache/``), so later sessions skip compiling;
* ``PERFORMANCE_HINT = LATENCY``; threads from ``threads`` (None: OpenVINO's default).

OpenVINO is an optional dependency (``pip install qdc-export[openvino]``); importing this module without it
raises a one-line :class:`UserError`."""

from __future__ import annotations

import time
from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from qdc_export.engines.onnxruntime import OrtDenoiser
from qdc_export.errors import UserError
from qdc_export.load.plugins.base import (
    COMP_STATE,
    COMP_STATE_OUT,
    ENCODER_HIDDEN_STATES,
    NOISE_PRED,
    SAMPLE,
    TEXT_EMBEDS,
    TIME_IDS,
    TIMESTEP,
)

# the engine interface's names: a port can carry several tensor names (an input that is also a node's output
# name after OpenVINO's graph rewrites, e.g. {"timestep", "mul_1"}), so ports are named by these first
INTERFACE_NAMES = frozenset({SAMPLE, TIMESTEP, ENCODER_HIDDEN_STATES, TEXT_EMBEDS, TIME_IDS, COMP_STATE, NOISE_PRED,
                             COMP_STATE_OUT})


def port_name(port: Any) -> str:
    names = sorted(port.get_names())
    return next((n for n in names if n in INTERFACE_NAMES), port.get_any_name())

OPENVINO_TARGET = "openvino"
CACHE_DIR = "ov_cache"

try:
    import openvino as ov
except ImportError:  # pragma: no cover - depends on the environment
    ov = None


def require_openvino() -> Any:
    if ov is None:
        raise UserError("OpenVINO is not installed; pip install 'qdc-export[openvino]' (openvino 2026.4)")
    return ov


def compile_model(model_path: Path | str, *, cache_dir: Path | None = None, precision_hint: str = "f32",
                  threads: int | None = None) -> Any:
    """An OpenVINO CompiledModel for an ONNX file (external data next to it resolves)."""
    openvino = require_openvino()
    path = Path(model_path)
    if not path.is_file():
        raise UserError(f"ONNX model not found: {path}")
    core = openvino.Core()
    config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": precision_hint}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    if cache_dir is not None:
        try:
            cache_dir.mkdir(exist_ok=True)
            config["CACHE_DIR"] = str(cache_dir)
        except OSError:  # a read-only build folder compiles every time
            pass
    return core.compile_model(str(path), "CPU", config)


class OvEngine:
    """A compiled model with one infer request; ``run(feeds)`` -> outputs by name order, as a session's run."""

    def __init__(self, compiled: Any) -> None:
        self.compiled = compiled
        self.request = compiled.create_infer_request()
        self.input_names = [port_name(i) for i in compiled.inputs]
        self.output_names = [port_name(o) for o in compiled.outputs]

    @classmethod
    def from_path(cls, model_path: Path | str, *, precision_hint: str = "f32", threads: int | None = None,
                  cache: bool = True) -> OvEngine:
        path = Path(model_path)
        return cls(compile_model(path, cache_dir=path.parent / CACHE_DIR if cache else None,
                                 precision_hint=precision_hint, threads=threads))

    def get_inputs(self) -> list[Any]:
        """Inputs with a ``name``, as an ONNX Runtime session lists them (OrtDenoiser-based wrappers read this)."""
        return [SimpleNamespace(name=name) for name in self.input_names]

    def run(self, output_names: list[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        ports = dict(zip(self.input_names, self.compiled.inputs))
        result = self.request.infer({ports[k]: np.ascontiguousarray(v) for k, v in feeds.items()})
        names = output_names or self.output_names
        by_name = {name: result[o] for name, o in zip(self.output_names, self.compiled.outputs)}
        return [np.array(by_name[n], copy=True) for n in names]


class OvDenoiser(OrtDenoiser):
    """The Denoiser of the sampling loop over an :class:`OvEngine`: OrtDenoiser's feeding and compensation state,
    on an engine that lists its inputs and runs like an ONNX Runtime session."""

    @classmethod
    def from_path(cls, model_path: Path | str, provider: str = "cpu", **kwargs: Any) -> OvDenoiser:
        if provider != "cpu":
            raise UserError(f"--target openvino builds run on the CPU; provider {provider!r} does not apply")
        return cls(OvEngine.from_path(model_path, **kwargs))


def polygraphy_runner(engine: OvEngine, name: str = "openvino") -> Any:
    """A Polygraphy runner over the engine, for the parity check's Comparator (Polygraphy has none for OpenVINO)."""
    from polygraphy.backend.base import BaseRunner
    from polygraphy.common import TensorMetadata

    class OpenVinoRunner(BaseRunner):
        def __init__(self) -> None:
            super().__init__(name=name, prefix="openvino-runner")

        def activate_impl(self) -> None:
            return None

        def get_input_metadata_impl(self) -> Any:
            meta = TensorMetadata()
            for port in engine.compiled.inputs:
                shape = [d.get_length() if d.is_static else -1 for d in port.get_partial_shape()]
                meta.add(port_name(port), np.float32, shape)
            return meta

        def infer_impl(self, feed_dict: dict[str, np.ndarray]) -> OrderedDict[str, np.ndarray]:
            start = time.perf_counter()
            outputs = OrderedDict(zip(engine.output_names, engine.run(engine.output_names, feed_dict)))
            self.inference_time = time.perf_counter() - start  # what Polygraphy's Comparator sums
            return outputs

        def deactivate_impl(self) -> None:
            return None

    return OpenVinoRunner()
