"""ONNX Runtime sessions for opset-21 Q/DQ models, with the known quirks handled.

Quirks (measured with onnxruntime 1.32 on CPU, see docs/runtime-notes.md):

* An INT8 QuantizeLinear that carries the opset-21 ``output_dtype`` attribute (the torch dynamo
  exporter writes it) makes session creation fail at EXTENDED/ALL: "output_dtype INT8 does not
  match y_zero_point type UINT8". The culprit is the ``QDQS8ToU8Transformer``, which rewrites the
  zero point to uint8 but leaves the attribute. We disable that one optimizer through the session
  config key ``optimization.disable_specified_optimizers`` (same effect as the Python-only
  ``InferenceSession(..., disabled_optimizers=[...])`` keyword, but it travels with the
  SessionOptions object, so a caller that only uses :func:`make_session_options` is safe too).
* INT4 DequantizeLinear -> MatMul fuses to ``MatMulNBits`` at ALL, whose default accuracy level
  quantizes the activations to int8 (errors ~1e-2). ``session.qdq_matmulnbits_accuracy_level = 1``
  keeps the fused kernel in fp32, exact against the unfused graph.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import onnx
import onnxruntime as ort

from qdc_export.engines.ort_cpu import CPU_FORM_TARGET, cpu_form_session_source, publish_optimized_model
from qdc_export.errors import UserError

__all__ = ["PROVIDERS", "create_session", "make_session_options"]

PROVIDERS: dict[str, str] = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}

# Fallbacks after the requested provider, for nodes it does not take.
_FALLBACKS: dict[str, tuple[str, ...]] = {
    "cpu": (),
    "cuda": ("CPUExecutionProvider",),
    "tensorrt": ("CUDAExecutionProvider", "CPUExecutionProvider"),
}

_OPTIMIZATION_LEVELS: dict[str, ort.GraphOptimizationLevel] = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}

DISABLED_OPTIMIZERS: tuple[str, ...] = ("QDQS8ToU8Transformer",)
_DISABLE_OPTIMIZERS_KEY = "optimization.disable_specified_optimizers"
_MATMULNBITS_ACCURACY_KEY = "session.qdq_matmulnbits_accuracy_level"
_MATMULNBITS_EXACT_LEVEL = "1"  # fp32 compute; the default (4) quantizes activations to int8

_FOUR_BIT = frozenset({onnx.TensorProto.INT4, onnx.TensorProto.UINT4})


def _has_four_bit_weights(model: onnx.ModelProto) -> bool:
    return any(init.data_type in _FOUR_BIT for init in model.graph.initializer)


def _resolve_providers(provider: str) -> list[str]:
    key = provider.lower()
    if key not in PROVIDERS:
        raise UserError(f"unknown provider {provider!r}; choose one of: {', '.join(PROVIDERS)}")
    wanted = PROVIDERS[key]
    available = ort.get_available_providers()
    if wanted not in available:
        raise UserError(
            f"provider {provider!r} ({wanted}) is not available in this onnxruntime build; "
            f"available: {', '.join(available)}"
        )
    return [wanted, *(p for p in _FALLBACKS[key] if p in available)]


def make_session_options(
    model: onnx.ModelProto | None,
    *,
    provider: str,
    optimization: Literal["disable", "basic", "extended", "all"] = "all",
) -> tuple[ort.SessionOptions, list[str]]:
    """SessionOptions and the provider list for running ``model`` on ``provider``.

    ``provider`` is "cpu", "cuda" or "tensorrt"; one that this onnxruntime build lacks raises
    :class:`UserError` listing the available ones. ``model`` (may be None when unknown) only
    decides whether the INT4 MatMulNBits setting is needed; with None it is set anyway.
    """
    providers = _resolve_providers(provider)
    if optimization not in _OPTIMIZATION_LEVELS:
        raise UserError(
            f"unknown optimization level {optimization!r}; choose one of: {', '.join(_OPTIMIZATION_LEVELS)}"
        )
    options = ort.SessionOptions()
    options.graph_optimization_level = _OPTIMIZATION_LEVELS[optimization]
    options.add_session_config_entry(_DISABLE_OPTIMIZERS_KEY, ",".join(DISABLED_OPTIMIZERS))
    if model is None or _has_four_bit_weights(model):
        options.add_session_config_entry(_MATMULNBITS_ACCURACY_KEY, _MATMULNBITS_EXACT_LEVEL)
    return options, providers


def create_session(
    model_path_or_proto: str | os.PathLike[str] | onnx.ModelProto,
    provider: str = "cpu",
    optimization: Literal["disable", "basic", "extended", "all"] = "all",
    *,
    cpu_mem_arena: bool = True,
    threads: int | None = None,
    target: str | None = None,
) -> ort.InferenceSession:
    """An InferenceSession for an ONNX file or ModelProto, with the quirks above handled. ``target``: run the
    file the way a build of that target runs it (default: the target of the build folder holding it).

    A path is handed to onnxruntime as a path (so external weight files next to it resolve); its
    graph is loaded without external data only to inspect initializer types.
    """
    source: Any
    if isinstance(model_path_or_proto, onnx.ModelProto):
        model: onnx.ModelProto = model_path_or_proto
        source = model.SerializeToString()
    else:
        path = os.fspath(model_path_or_proto)
        if not os.path.isfile(path):
            raise UserError(f"ONNX model not found: {path}")
        model = onnx.load(path, load_external_data=False)
        source = path
    options, providers = make_session_options(model, provider=provider, optimization=optimization)
    chosen: list[Any] = list(providers)
    folder = None if isinstance(model_path_or_proto, onnx.ModelProto) else os.path.dirname(os.fspath(source))
    if providers[0] == PROVIDERS["tensorrt"] and folder and os.path.isfile(os.path.join(folder, "manifest.json")):
        from qdc_export.engines.ort_tensorrt import tensorrt_provider_options

        chosen[0] = (providers[0], tensorrt_provider_options(Path(folder)))
    if target is None and folder is not None:
        target = build_target(folder)
    cpu_form = providers[0] == PROVIDERS["cpu"] and folder is not None and target == CPU_FORM_TARGET
    if cpu_form:  # the CPU deployment form: its runtime settings and saved optimized graph (engines/ort_cpu.py)
        source = cpu_form_session_source(Path(source), options)
    # The CPU arena never returns memory and grew by ~2.6 GB per run of a w8a8 SD 1.5 UNet (the DQ'd weights
    # and attention scores of each run): without it RSS stays flat (benchmarks/results/scale.md).
    options.enable_cpu_mem_arena = cpu_mem_arena
    if threads:  # intra-op threads (None: ONNX Runtime's default, one per physical core)
        options.intra_op_num_threads = int(threads)
    session = ort.InferenceSession(source, options, providers=chosen)
    if cpu_form:
        publish_optimized_model(Path(model_path_or_proto))  # type: ignore[arg-type]
    return session


def build_target(folder: str | os.PathLike[str]) -> str | None:
    """The ``target.name`` of the build folder holding a model, None outside a build folder."""
    import json

    manifest = Path(folder) / "manifest.json"
    if not manifest.is_file():
        return None
    try:
        return json.loads(manifest.read_text()).get("target", {}).get("name")
    except (OSError, ValueError):
        return None
