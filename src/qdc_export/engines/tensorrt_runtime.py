"""Running a TensorRT engine with torch CUDA buffers (the build side is engines/tensorrt.py). TensorRT and torch
are imported inside the methods, so this module imports on machines without either. Typed against
``tensorrt-stubs`` like the build side (scripts/typecheck.sh)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np

from qdc_export.engines.tensorrt import tensorrt_available
from qdc_export.errors import UserError

if TYPE_CHECKING:
    import tensorrt as trt
    import torch

__all__ = ["TensorRTEngine"]

class TensorRTEngine:
    """A deserialized engine with one execution context; a context manager.

    ``infer`` copies numpy feeds to CUDA torch tensors, sets shapes and addresses, runs
    ``execute_async_v3`` on the current torch stream, and returns numpy outputs.

    >>> with TensorRTEngine("unet.plan") as engine:        # doctest: +SKIP
    ...     outputs = engine.infer({"sample": x, "timestep": t})
    """

    def __init__(self, engine_path: str | os.PathLike[str]) -> None:
        self.engine_path = Path(engine_path)
        self._engine: trt.ICudaEngine | None = None
        self._context: trt.IExecutionContext | None = None
        self._runtime: trt.Runtime | None = None
        self._stream: torch.cuda.Stream | None = None
        self.input_names: list[str] = []
        self.output_names: list[str] = []

    def __enter__(self) -> TensorRTEngine:
        self.activate()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.deactivate()

    def activate(self) -> None:
        available, reason = tensorrt_available()
        if not available:
            raise UserError(f"cannot run TensorRT engine {self.engine_path.name}: {reason}")
        if not self.engine_path.is_file():
            raise UserError(f"TensorRT engine not found: {self.engine_path}")
        import tensorrt as trt

        logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(logger)
        engine = runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if engine is None:
            raise UserError(
                f"TensorRT could not deserialize {self.engine_path.name} "
                "(built with another TensorRT version or GPU?)"
            )
        self._runtime, self._engine = runtime, engine
        self._context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        is_input = {n: engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.input_names = [n for n in names if is_input[n]]
        self.output_names = [n for n in names if not is_input[n]]

        import torch

        # inference gets its own stream: execute_async_v3 on the legacy default stream makes TensorRT
        # synchronize extra work, and other torch work then cannot overlap or be serialized behind it
        self._stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]  # torch leaves it untyped

    def input_metadata(self) -> dict[str, tuple[np.dtype[Any], tuple[int, ...]]]:
        """name -> (numpy dtype, shape with -1 for dynamic dims), for Polygraphy's Comparator."""
        if self._engine is None:
            raise RuntimeError("TensorRTEngine.input_metadata called outside its context (use `with`)")
        engine = self._engine
        numpy_of = {"FLOAT": np.float32, "HALF": np.float16, "INT32": np.int32, "INT64": np.int64,
                    "INT8": np.int8, "BOOL": np.bool_, "BF16": np.float32}
        result: dict[str, tuple[np.dtype[Any], tuple[int, ...]]] = {}
        for name in self.input_names:
            dims = engine.get_tensor_shape(name)
            result[name] = (np.dtype(numpy_of[engine.get_tensor_dtype(name).name]),
                            tuple(int(dims[i]) for i in range(len(dims))))
        return result

    def deactivate(self) -> None:
        self._stream = None
        self._context = None
        self._engine = None
        self._runtime = None

    def _torch_dtype(self, name: str) -> torch.dtype:
        import torch

        assert self._engine is not None
        trt_dtype = self._engine.get_tensor_dtype(name)
        by_name = {
            "FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT8": torch.int8,
            "UINT8": torch.uint8, "INT32": torch.int32, "INT64": torch.int64, "BOOL": torch.bool,
        }
        if trt_dtype.name not in by_name:
            raise UserError(f"engine I/O tensor {name!r} has type {trt_dtype.name}, not supported by infer()")
        return by_name[trt_dtype.name]

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run once. ``feeds`` must hold exactly the engine's inputs; shapes within the profile."""
        import torch

        if self._engine is None or self._context is None or self._stream is None:
            raise RuntimeError("TensorRTEngine.infer called outside its context (use `with`)")
        if set(feeds) != set(self.input_names):
            raise UserError(f"engine inputs are {self.input_names}, got feeds for {sorted(feeds)}")
        with torch.cuda.stream(self._stream):  # copies, allocations and the run all on the engine's stream
            return self._infer_on_stream(self._context, self._stream, feeds)

    def _infer_on_stream(self, context: trt.IExecutionContext, stream: torch.cuda.Stream,
                         feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        keep_alive: list[torch.Tensor] = []
        for name in self.input_names:
            tensor = torch.from_numpy(np.ascontiguousarray(feeds[name])).to(
                device="cuda", dtype=self._torch_dtype(name)
            )
            keep_alive.append(tensor)
            if not context.set_input_shape(name, tuple(tensor.shape)):
                raise UserError(f"input {name!r} shape {tuple(tensor.shape)} is outside the engine's profile")
            context.set_tensor_address(name, tensor.data_ptr())

        outputs: dict[str, torch.Tensor] = {}
        for name in self.output_names:
            dims = context.get_tensor_shape(name)
            shape = tuple(int(dims[i]) for i in range(len(dims)))
            if any(d < 0 for d in shape):
                raise UserError(f"output {name!r} has a data-dependent shape {shape}; not supported")
            out = torch.empty(shape, dtype=self._torch_dtype(name), device="cuda")
            outputs[name] = out
            context.set_tensor_address(name, out.data_ptr())

        if not context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT execute_async_v3 failed for {self.engine_path.name}")
        stream.synchronize()
        # numpy has no bfloat16: such outputs come back as float32.
        return {
            name: (t.float() if t.dtype == torch.bfloat16 else t).cpu().numpy() for name, t in outputs.items()
        }
