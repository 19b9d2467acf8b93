"""The build: load -> capture -> passes (cleanup, annotate + observe) -> calibrate -> materialize Q/DQ
-> export ONNX -> parity check -> manifest, all inside an atomic staging folder."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from . import __version__
from .calibrate import run_calibration
from .capture import capture
from .check import ParityTolerances, summarize
from .config import BuildConfig
from .export import export_onnx
from .loading import LoadedModel, load_model
from .manifest import canonical_json, package_versions, write_manifest
from .passes.annotate import QuantizationPlan
from .passes.cleanup import remove_inference_noops
from .passes.qdq import insert_observers, materialize_qdq
from .plugins.base import NOISE_PRED
from .sampling import make_scheduler, schedule_timesteps
from .staging import staged_folder

MODEL_FILE = "model.onnx"
REFERENCE_FILE = "reference.pt2"
CONDITIONING_FILE = "conditioning.safetensors"
PARITY_FILE = "parity.json"


@dataclass
class BuildResult:
    out: Path
    manifest: dict[str, Any]
    parity: dict[str, Any]
    timings: dict[str, float]


class _Timer:
    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    def stage(self, name: str):
        timer = self

        class _Stage:
            def __enter__(self_inner):
                self_inner.start = time.perf_counter()

            def __exit__(self_inner, *exc):
                timer.timings[name] = round(time.perf_counter() - self_inner.start, 3)

        return _Stage()


def quantization_plan(config: BuildConfig, model: LoadedModel) -> QuantizationPlan:
    excluded = tuple(model.adapter.default_float_layers) + tuple(config.exclude)
    return QuantizationPlan(
        weight_bits=8, activation_bits=8, observer=config.observer, percentile=config.percentile,
        quantize_attention=config.quantize_attention, float_layers=excluded, include=config.include,
    )


def build_graph(model: LoadedModel, config: BuildConfig, *, progress: bool = False,
                timer: _Timer | None = None) -> tuple[torch.fx.GraphModule, tuple[torch.Tensor, ...], dict[str, Any]]:
    """The in-memory part of the build: the PyTorch graph that is exported, and what the passes did."""
    timer = timer or _Timer()
    info: dict[str, Any] = {"passes": []}
    with timer.stage("capture"):
        gm, example = capture(model.unet, model.adapter)
    result = remove_inference_noops(gm)
    info["passes"].append({"name": "remove_inference_noops", "modified": result.modified, **result.details})
    gm = result.module
    if config.quantized:
        plan = quantization_plan(config, model)
        with timer.stage("insert_observers"):
            observed, _ = insert_observers(gm, plan)
        info["passes"].append({"name": "insert_observers", "modified": observed.modified,
                               "observers": observed.details["observers"]})
        info["quantized_layers"] = observed.details["quantized_layers"]
        info["float_layers"] = observed.details["float_layers"]
        with timer.stage("calibrate"):
            run_calibration(observed.module, model, scheduler_name=config.scheduler, steps=config.steps,
                            seed=config.seed, samples=config.calib_samples, progress=progress)
        with timer.stage("materialize_qdq"):
            converted = materialize_qdq(observed.module)
        info["passes"].append({"name": "materialize_qdq", "modified": converted.modified, **converted.details})
        gm = converted.module
    return gm, example, info


def io_description(model: LoadedModel) -> dict[str, Any]:
    inputs = [{"name": s.name, "shape": list(s.shape), "dtype": s.dtype} for s in model.adapter.input_specs(model.unet)]
    out = model.adapter.output_spec(model.unet)
    outputs = [{"name": out.name, "shape": list(out.shape), "dtype": out.dtype}]
    return {"inputs": inputs, "outputs": outputs, "dynamic_axes": {"batch": "axis 0 of every input and output"}}


def build(model_arg: str | None, config: BuildConfig, out: Path, *, force: bool = False,
          progress: bool = False, run_check: bool = True) -> BuildResult:
    from .checking import check_build  # check imports the build's artifacts; avoid a cycle at import time

    timer = _Timer()
    with timer.stage("load"):
        model = load_model(model_arg)
    with staged_folder(out, force) as staging:
        gm, example, info = build_graph(model, config, progress=progress, timer=timer)
        io = io_description(model)
        input_names = [i["name"] for i in io["inputs"]]
        with timer.stage("export_onnx"):
            export_onnx(gm, example, staging / MODEL_FILE, input_names=input_names, output_names=[NOISE_PRED])
        with timer.stage("save_reference"):
            program = torch.export.export(gm, example, dynamic_shapes=tuple({0: torch.export.Dim.AUTO} for _ in example),
                                          strict=False)
            torch.export.save(program, str(staging / REFERENCE_FILE))
        if model.conditioning.table:
            save_file({k: v.contiguous() for k, v in model.conditioning.table.items()}, str(staging / CONDITIONING_FILE))
        scheduler = make_scheduler(config.scheduler, model.scheduler_config)
        content = {
            "qdc_export_version": __version__,
            "model": {"source": model.source, "adapter": model.adapter.name,
                      "unet_class": type(model.unet).__name__, "unet_config": dict(model.unet.config)},
            "build": config.to_dict(),
            "scheduler": {"name": config.scheduler, "class": type(scheduler).__name__,
                          "config": dict(scheduler.config), "steps": config.steps,
                          "timesteps": schedule_timesteps(scheduler, config.steps)},
            "conditioning": {
                "names": [s.name for s in model.conditioning.specs],
                "num_classes": model.conditioning.num_classes, "null_index": model.conditioning.null_index,
                "guidance_scale": model.conditioning.guidance_scale, "image_size": model.conditioning.image_size,
                "table": CONDITIONING_FILE if model.conditioning.table else None,
            },
            "io": io,
            "quantization": info,
            "tolerances": ParityTolerances().__dict__,
            "package_versions": package_versions(),
        }
        write_manifest(staging, content)
        parity: dict[str, Any] = {}
        if run_check:
            with timer.stage("check"):
                parity = check_build(staging, model=model)
            (staging / PARITY_FILE).write_text(canonical_json(parity))
            content["parity_summary"] = summarize(parity)
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        manifest = write_manifest(staging, content, unhashed={"created": created, "timings_s": timer.timings})
    return BuildResult(out, manifest, parity, timer.timings)
