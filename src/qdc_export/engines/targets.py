"""Deployment targets of a build. ``tensorrt``: the ONNX model must pass TensorRT's explicit-quantization
rules (checked on the CPU, offending nodes named), the engine-build inputs (optimization profile, build
config) are written everywhere, and the engine itself is built only where TensorRT and a GPU exist."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx

from qdc_export.engines.tensorrt import (
    TensorRTBuildConfig,
    build_engine,
    profiles_from_build_options,
    tensorrt_available,
)
from qdc_export.engines.trt_rules import OLDEST_SUPPORTED, assert_tensorrt_compatible
from qdc_export.manifest import canonical_json

TRT_BUILD_FILE = "tensorrt_build.json"
TRT_ENGINE_FILE = "model.engine"
TRT_TIMING_CACHE = "timing.cache"


def prepare_tensorrt(folder: Path, io: dict[str, Any], onnx_file: str, batch_range: tuple[int, int, int],
                     trt_version: str = "", half: str | None = None) -> dict[str, Any]:
    model = onnx.load(str(folder / onnx_file), load_external_data=False)
    version = trt_version or OLDEST_SUPPORTED
    assert_tensorrt_compatible(model, version=version)  # TensorRTCompatibilityError (a user error) names the nodes
    specs = {i["name"]: i["shape"] for i in io["inputs"]}
    shapes = profiles_from_build_options(specs, batch_range, (1, 1, 1))  # H, W are fixed in the export
    relative = TensorRTBuildConfig(shapes=shapes, timing_cache_path=TRT_TIMING_CACHE)
    (folder / TRT_BUILD_FILE).write_text(canonical_json(relative.to_dict()))
    available, reason = tensorrt_available()
    description: dict[str, Any] = {
        "rules_passed": True, "rules_version": version, "build_config": TRT_BUILD_FILE,
        "batch_range": list(batch_range), "strongly_typed": True, "network_float": half or "fp32", "engine": None,
    }
    if available:
        absolute = TensorRTBuildConfig(shapes=shapes, timing_cache_path=str(folder / TRT_TIMING_CACHE))
        build_engine(folder / onnx_file, absolute, folder / TRT_ENGINE_FILE, check_rules=False)
        description["engine"] = TRT_ENGINE_FILE
    else:
        description["engine_skipped"] = reason
    return description
