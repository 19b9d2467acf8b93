"""Goldens: the step inputs of a parity run and one runtime's outputs, saved with Polygraphy's JSON
serialization, so a machine with another backend (a GPU with TensorRT) can be checked against results
made on this one (ONNX Runtime on CPU): ``qdc-export check DIR --against goldens.json``."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

from polygraphy.backend.base import BaseRunner
from polygraphy.comparator import Comparator, CompareFunc, RunResults
from polygraphy.comparator.compare import CosineSimilarityCompareFunc, SnrCompareFunc
from polygraphy.json import load_json, save_json
from polygraphy.logger import G_LOGGER

from qdc_export.check.parity import ParityTolerances
from qdc_export.errors import UserError
from qdc_export.load.plugins.base import NOISE_PRED
from qdc_export.metrics import error_stats
from qdc_export.precision import PrecisionPlan

GOLDEN_RUNNER = "golden"


def save_goldens(path: Path, feeds: list[OrderedDict], results: RunResults, *, precision: str,
                 runner_index: int = 1) -> None:
    name, iterations = list(results.items())[runner_index]
    golden = RunResults()
    golden.append((GOLDEN_RUNNER, iterations))
    save_json({"format": "qdc-export-goldens/1", "precision": precision, "made_by": name,
               "inputs": feeds, "outputs": golden}, str(path), description="parity goldens")


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
