"""Which runtime runs a build: its manifest's ``target.name``. ``openvino`` builds run on OpenVINO
(:mod:`qdc_export.engines.openvino`), every other target on ONNX Runtime (the ``onnxruntime-cpu`` form with its
own session settings, :mod:`qdc_export.engines.ort_cpu`, picked inside ``create_session``). The parity check,
``sample``, the serving drop-in and the benchmarks open engines through here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qdc_export.engines.onnxruntime import OrtDenoiser
from qdc_export.engines.openvino import OPENVINO_TARGET, OvDenoiser, OvEngine, polygraphy_runner
from qdc_export.engines.providers import build_target, create_session
from qdc_export.manifest import MODEL_FILE


def open_engine(model_path: Path | str, provider: str = "cpu", *, cpu_mem_arena: bool = True) -> Any:
    """An ONNX Runtime session, or an :class:`OvEngine` where the model's build folder targets OpenVINO."""
    path = Path(model_path)
    if build_target(path.parent) == OPENVINO_TARGET:
        return OvDenoiser.from_path(path, provider).session
    return create_session(path, provider=provider, cpu_mem_arena=cpu_mem_arena)


def denoiser_for(engine: Any) -> Any:
    return OvDenoiser(engine) if isinstance(engine, OvEngine) else OrtDenoiser(engine)


def runner_for(engine: Any) -> Any:
    """A Polygraphy runner over the engine."""
    if isinstance(engine, OvEngine):
        return polygraphy_runner(engine)
    from polygraphy.backend.onnxrt import OnnxrtRunner

    return OnnxrtRunner(engine, name="onnxruntime")


def denoiser_from_build(build_dir: Path | str, provider: str = "cpu") -> Any:
    return denoiser_for(open_engine(Path(build_dir) / MODEL_FILE, provider))


def denoiser_for_target(model_path: Path | str, target: str, provider: str = "cpu", threads: int | None = None) -> Any:
    """A Denoiser for an ONNX file outside a build folder (the fidelity benchmark's cached engines) run the way a
    build of ``target`` runs it."""
    if target == OPENVINO_TARGET:
        return OvDenoiser.from_path(model_path, provider, threads=threads)
    return OrtDenoiser(create_session(model_path, provider=provider, threads=threads, target=target))
