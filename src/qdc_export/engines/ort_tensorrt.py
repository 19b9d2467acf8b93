"""ONNX Runtime's TensorRT execution provider options for one build folder.

Without options the provider builds a fresh engine for every session and again for every new input
shape. From the build's manifest this sets: engine and timing caches under the build folder (``trt_cache/``),
one optimization profile from the build's batch range (``--trt-batch-range``; the other dims are fixed by
the export), and FP16 / BF16 kernels where the build made an FP16 / BF16 network (``--trt-float``).
Option names as documented for the provider (onnxruntime.ai, TensorRT Execution Provider, Configurations).
Profile strings are ``name:d0xd1x...,name2:...``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["CACHE_DIR", "tensorrt_provider_options"]

CACHE_DIR = "trt_cache"


def _profile(inputs: Sequence[Mapping[str, Any]], batch: int) -> str:
    parts = []
    for spec in inputs:
        dims = [batch if d == "batch" else int(d) for d in spec["shape"]]
        parts.append(f"{spec['name']}:{'x'.join(str(d) for d in dims)}")
    return ",".join(parts)


def tensorrt_provider_options(folder: Path, manifest: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Options for ``TensorrtExecutionProvider`` running ``folder/model.onnx``; ``manifest`` defaults
    to the folder's ``manifest.json``."""
    folder = Path(folder)
    if manifest is None:
        manifest = json.loads((folder / "manifest.json").read_text())
    build = manifest["build"]
    lo, opt, hi = (int(b) for b in build["trt_batch_range"])
    inputs = manifest["io"]["inputs"]
    cache = folder / CACHE_DIR
    cache.mkdir(parents=True, exist_ok=True)
    network_float = manifest.get("target", {}).get("network_float", "fp32")
    return {
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": str(cache),
        "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": str(cache),
        "trt_profile_min_shapes": _profile(inputs, lo),
        "trt_profile_opt_shapes": _profile(inputs, opt),
        "trt_profile_max_shapes": _profile(inputs, hi),
        "trt_fp16_enable": str(network_float == "fp16"),
        "trt_bf16_enable": str(network_float == "bf16"),
    }
