"""Polygraphy runners over our engines, so Polygraphy's Comparator drives every backend the same way: an ONNX
Runtime session (any machine) or a TensorRT engine (a GPU with TensorRT). Used by ``qdc-export check --against``
and ``--save-goldens`` (check.goldens)."""

from __future__ import annotations

import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
from polygraphy.backend.base import BaseRunner

from qdc_export.errors import UserError


class EngineRunner(BaseRunner):
    """A Polygraphy runner over an engine object with ``input_metadata() -> {name: (numpy dtype, shape)}``
    (-1 for dynamic dims) and ``infer(feeds) -> dict``: :class:`qdc_export.engines.tensorrt_runtime.TensorRTEngine`
    on a GPU, :class:`OrtEngine` anywhere. The Comparator checks feeds against the metadata, so it must be
    the engine's own; the runner times each inference for Polygraphy's ``inference_time``."""

    def __init__(self, engine: Any, name: str) -> None:
        super().__init__(name=name, prefix="engine-runner")
        self.engine = engine

    def activate_impl(self) -> None:
        return None

    def get_input_metadata_impl(self):
        from polygraphy.common import TensorMetadata

        metadata = TensorMetadata()
        for name, (dtype, shape) in self.engine.input_metadata().items():
            metadata.add(name, dtype=dtype, shape=shape)
        return metadata

    def infer_impl(self, feed_dict):
        start = time.perf_counter()
        outputs = OrderedDict(self.engine.infer(feed_dict))
        self.inference_time = time.perf_counter() - start
        return outputs

    def deactivate_impl(self) -> None:
        return None


class OrtEngine:
    """An ONNX Runtime session with the engine interface :class:`EngineRunner` drives (metadata from the
    session's inputs, outputs by name): the same runner path as a TensorRT engine, on any machine."""

    _NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
              "tensor(int32)": np.int32}

    def __init__(self, session: Any) -> None:
        self.session = session

    def input_metadata(self) -> dict[str, tuple[Any, tuple[int, ...]]]:
        return {i.name: (np.dtype(self._NUMPY[i.type]), tuple(d if isinstance(d, int) else -1 for d in i.shape))
                for i in self.session.get_inputs()}

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [o.name for o in self.session.get_outputs()]
        return dict(zip(names, self.session.run(names, dict(feeds))))


def backend_runner(folder: Path, backend: str, provider: str) -> BaseRunner:
    if backend == "onnxruntime":
        from qdc_export.engines.providers import create_session

        session = create_session(folder / "model.onnx", provider=provider)
        return EngineRunner(OrtEngine(session), name=f"onnxruntime-{provider}")
    from qdc_export.engines.tensorrt import tensorrt_available
    from qdc_export.engines.tensorrt_runtime import TensorRTEngine

    available, reason = tensorrt_available()
    if not available:
        raise UserError(f"--backend tensorrt needs TensorRT and a GPU: {reason}")
    engine_path = folder / "model.engine"
    if not engine_path.is_file():
        raise UserError(f"{folder} has no model.engine; build with --target tensorrt on a machine with TensorRT")
    engine = TensorRTEngine(engine_path)
    engine.activate()
    return EngineRunner(engine, name="tensorrt")
