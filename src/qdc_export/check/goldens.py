"""Goldens: the step inputs of a parity run and one runtime's outputs, saved with Polygraphy's JSON
serialization, so a machine with another backend (a GPU with TensorRT) can be checked against results
made on this one (ONNX Runtime on CPU): ``qdc-export check DIR --against goldens.json``."""

from __future__ import annotations

import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
from polygraphy.backend.base import BaseRunner
from polygraphy.comparator import Comparator, CompareFunc, RunResults
from polygraphy.comparator.compare import CosineSimilarityCompareFunc, SnrCompareFunc
from polygraphy.json import load_json, save_json
from polygraphy.logger import G_LOGGER

from qdc_export.check.parity import ParityTolerances
from qdc_export.errors import UserError
from qdc_export.load.plugins.base import NOISE_PRED
from qdc_export.metrics import error_stats
from qdc_export.quantize.plan import PrecisionPlan

GOLDEN_RUNNER = "golden"


def save_goldens(path: Path, feeds: list[OrderedDict], results: RunResults, *, precision: str,
                 runner_index: int = 1) -> None:
    name, iterations = list(results.items())[runner_index]
    golden = RunResults()
    golden.append((GOLDEN_RUNNER, iterations))
    save_json({"format": "qdc-export-goldens/1", "precision": precision, "made_by": name,
               "inputs": feeds, "outputs": golden}, str(path), description="parity goldens")


class EngineRunner(BaseRunner):
    """A Polygraphy runner over an engine object with ``input_metadata() -> {name: (numpy dtype, shape)}``
    (-1 for dynamic dims) and ``infer(feeds) -> dict``: :class:`qdc_export.engines.tensorrt.TensorRTEngine`
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


def compare_against(goldens_path: Path, runner: BaseRunner, tol: ParityTolerances | None = None) -> dict[str, Any]:
    tol = tol or ParityTolerances()
    try:
        with G_LOGGER.verbosity(G_LOGGER.ERROR):
            data = load_json(str(goldens_path), description="parity goldens")
    except Exception as exc:
        raise UserError(f"cannot read goldens {goldens_path}: {str(exc).splitlines()[0][:200]}") from None
    if not isinstance(data, dict) or data.get("format") != "qdc-export-goldens/1":
        raise UserError(f"{goldens_path} is not a qdc-export goldens file")
    feeds, golden = data["inputs"], data["outputs"]
    quantized = PrecisionPlan.parse(data["precision"]).quantized
    with G_LOGGER.verbosity(G_LOGGER.ERROR):
        fresh = Comparator.run([runner], data_loader=feeds)
        combined = RunResults()
        combined.append(list(golden.items())[0])
        combined.append(list(fresh.items())[0])
        funcs = ([SnrCompareFunc(snr_threshold=tol.step_min_snr_db),
                  CosineSimilarityCompareFunc(cosine_similarity_threshold=tol.step_min_cosine)] if quantized
                 else [CompareFunc.simple(atol=tol.fp32_atol, rtol=tol.fp32_rtol, check_error_stat="elemwise")])
        accuracy = Comparator.compare_accuracy(combined, compare_func=funcs)
    (_, gold_iters), (_, new_iters) = list(combined.items())
    per_step = [error_stats(a[NOISE_PRED], b[NOISE_PRED]) for a, b in zip(gold_iters, new_iters)]
    return {
        "mode": "statistical" if quantized else "elementwise",
        "against": str(goldens_path), "golden_made_by": data["made_by"], "runner": runner.name,
        "tolerances": tol.__dict__, "per_step": per_step,
        "worst": {"max_abs": max(s["max_abs"] for s in per_step), "min_snr_db": min(s["snr_db"] for s in per_step),
                  "min_cosine": min(s["cosine"] for s in per_step),
                  "p99_abs": max(s["p99_abs"] for s in per_step),
                  "mean_abs": sum(s["mean_abs"] for s in per_step) / len(per_step)},
        "passed": bool(accuracy),
    }


def backend_runner(folder: Path, backend: str, provider: str) -> BaseRunner:
    if backend == "onnxruntime":
        from qdc_export.engines.providers import create_session

        session = create_session(folder / "model.onnx", provider=provider)
        return EngineRunner(OrtEngine(session), name=f"onnxruntime-{provider}")
    from qdc_export.engines.tensorrt import TensorRTEngine, tensorrt_available

    available, reason = tensorrt_available()
    if not available:
        raise UserError(f"--backend tensorrt needs TensorRT and a GPU: {reason}")
    engine_path = folder / "model.engine"
    if not engine_path.is_file():
        raise UserError(f"{folder} has no model.engine; build with --target tensorrt on a machine with TensorRT")
    engine = TensorRTEngine(engine_path)
    engine.activate()
    return EngineRunner(engine, name="tensorrt")
