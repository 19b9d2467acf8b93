"""The build: load -> capture -> passes (cleanup, annotate + observe) -> calibrate -> materialize Q/DQ
-> export ONNX -> parity check -> manifest, all inside an atomic staging folder."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from . import __version__
from .calibrate import run_calibration
from .capture import capture
from .check import ParityTolerances, summarize
from .compensate import fit_compensation, validate_compensation
from .config import BuildConfig
from .export import export_onnx
from .int4_pipeline import SVDQUANT_FLOAT_GLOB, build_int4_graph, weight_summary
from .loading import LoadedModel, load_model
from .memory import log_resident, release_memory
from .manifest import canonical_json, package_versions, write_manifest
from .passes.annotate import QuantizationPlan
from .passes.cleanup import remove_inference_noops, remove_unused_weights, sink_weight_computations
from .passes.fold_compensation import fold_compensation
from .passes.half import HALF_DTYPES, to_half
from .passes.annotate_cpu import cpu_form_quantizer
from .passes.qdq import insert_observers, materialize_qdq
from .plugins.base import COMP_STATE, COMP_STATE_OUT
from .reproducible import save_program
from .sampling import make_scheduler, schedule_timesteps
from .staging import staged_folder
from .targets import prepare_tensorrt

MODEL_FILE = "model.onnx"
REFERENCE_FILE = "reference.pt2"
CONDITIONING_FILE = "conditioning.safetensors"
PARITY_FILE = "parity.json"
COMPENSATION_DIR = "compensation"


@dataclass
class BuildResult:
    out: Path
    manifest: dict[str, Any]
    parity: dict[str, Any]
    timings: dict[str, float]


class _Timer:
    """Wall time per build stage, kept out of the hashed manifest content."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = round(time.perf_counter() - start, 3)


def quantization_plan(config: BuildConfig, model: LoadedModel) -> QuantizationPlan:
    excluded = tuple(model.adapter.default_float_layers) + tuple(config.exclude)
    if config.ptq_transform == "svdquant":
        excluded += (SVDQUANT_FLOAT_GLOB,)  # SVDQuant's low-rank branch stays float
    # w4a16: no activation quantization; w4a4: INT4 dynamic group activations come from the INT4 pass
    activation_bits = {"w4a16": None, "w4a4": None}.get(config.precision, 8)
    return QuantizationPlan(
        weight_bits=4 if config.precision.startswith("w4") else 8, activation_bits=activation_bits,
        observer=config.observer, percentile=config.percentile,
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
    if config.precision.startswith("w4"):
        gm = build_int4_graph(gm, model, config, quantization_plan(config, model), info, timer, progress)
    elif config.quantized:
        plan = quantization_plan(config, model)
        with timer.stage("insert_observers"):
            observed, _ = insert_observers(gm, plan, cpu_form_quantizer(plan) if config.target == "onnxruntime-cpu" else None)
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
    info.update(weight_summary(gm, config.precision, config.target))
    return gm, example, info


def io_description(model: LoadedModel) -> dict[str, Any]:
    inputs = [{"name": s.name, "shape": list(s.shape), "dtype": s.dtype} for s in model.adapter.input_specs(model.unet)]
    out = model.adapter.output_spec(model.unet)
    outputs = [{"name": out.name, "shape": list(out.shape), "dtype": out.dtype}]
    return {"inputs": inputs, "outputs": outputs, "dynamic_axes": {"batch": "axis 0 of every input and output"}}


def add_compensation(gm: torch.fx.GraphModule, example: tuple[torch.Tensor, ...], model: LoadedModel,
                     config: BuildConfig, staging: Path, io: dict[str, Any]):
    """Fit the tables on paired trajectories, fold them into the graph, save them, extend the I/O."""
    tables = fit_compensation(gm, model, config)
    folded, folded_example = fold_compensation(gm, tables, example)
    validation = (validate_compensation(gm, folded.module, tables.uses_state, model, config)
                  if config.comp_validate and folded.modified else None)
    if validation is not None and not validation["accepted"]:
        # kept out of the engine: the held-out images got worse with it (see validate_compensation)
        return gm, example, {"method": tables.method, "folded": False, "rejected": True, "validation": validation,
                             "options": tables.options}
    example = folded_example
    tables.save(staging / COMPENSATION_DIR)
    if tables.uses_state:
        shape = io["outputs"][0]["shape"]
        io["inputs"].append({"name": COMP_STATE, "shape": shape, "dtype": "float32"})
        io["outputs"].append({"name": COMP_STATE_OUT, "shape": shape, "dtype": "float32"})
    description = {
        "method": tables.method, "folded": folded.modified, "stateful": tables.uses_state,
        "tables": f"{COMPENSATION_DIR}/", "rows": "step rows in scheduler order; row N is the identity",
        "lookup": "row = argmin |timestep - timesteps[n]| if within tolerance else N",
        "formula": "noise_pred = scale[r] * eps_q - prev[r] * comp_state - bias[r]",
        "options": tables.options,
        "validation": validation,
    }
    if tables.uses_state:
        description["state"] = (f"{COMP_STATE}: the previous step's raw model output (zeros at the first step); "
                                f"feed back {COMP_STATE_OUT}")
    return folded.module, example, description


def load_for_build(model_arg: str | None, config: BuildConfig,
                   scheduler_config: Path | str | dict[str, Any] | None = None) -> tuple[LoadedModel, dict[str, Any]]:
    """The model with the build's scheduler config (its own, plus the explicit ``scheduler_overrides``), which
    every stage samples with: calibration, fit, held-out check, parity, report. Also returns the model's own."""
    model = load_model(model_arg, scheduler_config)
    own = dict(model.scheduler_config)
    make_scheduler(config.scheduler, own, config.scheduler_overrides)  # refuses unknown override fields
    model.scheduler_config = {**own, **config.scheduler_overrides}
    return model, own


def build(model_arg: str | None, config: BuildConfig, out: Path, *, force: bool = False,
          progress: bool = False, run_check: bool = True, write_report: bool = True,
          scheduler_config: Path | str | dict[str, Any] | None = None) -> BuildResult:
    """``scheduler_config``: the model's scheduler config where its folder has none (``--scheduler-config``)."""
    from .checking import check_build  # check imports the build's artifacts; avoid a cycle at import time

    timer = _Timer()
    with timer.stage("load"):
        model, source_scheduler_config = load_for_build(model_arg, config, scheduler_config)
    with staged_folder(out, force) as staging:
        gm, example, info = build_graph(model, config, progress=progress, timer=timer)
        io = io_description(model)
        compensation: dict[str, Any] = {"method": "none"}
        if config.compensation != "none":
            with timer.stage("fit_compensation"):
                gm, example, compensation = add_compensation(gm, example, model, config, staging, io)
            info["passes"].append({"name": "fold_compensation", "modified": compensation["folded"]})
        input_names = [i["name"] for i in io["inputs"]]
        output_names = [o["name"] for o in io["outputs"]]
        unused = remove_unused_weights(gm)  # float weights replaced by INT8 constants: not exported, not saved
        info["passes"].append({"name": "remove_unused_weights", "modified": unused.modified, **unused.details})
        sunk = sink_weight_computations(gm)  # the reference graph then holds one dequantized weight at a time
        info["passes"].append({"name": "sink_weight_computations", "modified": sunk.modified, **sunk.details})
        half = config.trt_float if config.target == "tensorrt" else None
        if half is not None:  # TensorRT's form: an FP16/BF16 network; reference.pt2 is this same graph
            halved = to_half(gm, example, input_names, HALF_DTYPES[half])
            info["passes"].append({"name": "to_half", "modified": halved.modified, **halved.details})
        with timer.stage("export_onnx"):
            export_onnx(gm, example, staging / MODEL_FILE, input_names=input_names, output_names=output_names,
                        half=half)
        if config.target == "tensorrt":
            with timer.stage("tensorrt"):
                deploy = prepare_tensorrt(staging, io, MODEL_FILE, config.trt_batch_range, config.trt_version,
                                          half)
        else:
            deploy = {}
        with timer.stage("save_reference"):
            program = torch.export.export(gm, example, dynamic_shapes=tuple({0: torch.export.Dim.AUTO} for _ in example),
                                          strict=False)
            save_program(program, staging / REFERENCE_FILE)  # byte-reproducible archive
        del gm, program  # written out; the check loads the files, so don't hold a second copy of the weights
        release_memory()
        log_resident("build: ONNX model and reference graph written")
        if model.conditioning.table:
            save_file({k: v.contiguous() for k, v in model.conditioning.table.items()}, str(staging / CONDITIONING_FILE))
        scheduler = make_scheduler(config.scheduler, model.scheduler_config)
        content = {
            "qdc_export_version": __version__,
            "model": {"source": model.source, "adapter": model.adapter.name,
                      "unet_class": type(model.unet).__name__, "unet_config": {k: v for k, v in model.unet.config.items() if not k.startswith("_")}},
            "build": config.to_dict(),
            "scheduler": {"name": config.scheduler, "class": type(scheduler).__name__,
                          "config": dict(scheduler.config), "steps": config.steps,
                          "source_config": source_scheduler_config, "overrides": dict(config.scheduler_overrides),
                          "timesteps": schedule_timesteps(scheduler, config.steps)},
            "conditioning": {
                "names": [s.name for s in model.conditioning.specs],
                "num_classes": model.conditioning.num_classes, "null_index": model.conditioning.null_index,
                "guidance_scale": model.conditioning.guidance_scale, "image_size": model.conditioning.image_size,
                "table": CONDITIONING_FILE if model.conditioning.table else None,
            },
            "io": io,
            "quantization": info,
            "compensation": compensation,
            "target": {"name": config.target, **deploy},
            "tolerances": ParityTolerances().__dict__,
            "package_versions": package_versions(),
        }
        write_manifest(staging, content)
        parity: dict[str, Any] = {}
        if run_check:
            with timer.stage("check"):
                parity = check_build(staging, model=model, release_model=True)
            (staging / PARITY_FILE).write_text(canonical_json(parity))
            content["parity_summary"] = summarize(parity)
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        manifest = write_manifest(staging, content, unhashed={"created": created, "timings_s": timer.timings})
        if write_report:  # derived from the artifacts above, written after the manifest (not hashed)
            from .report import write_report as _write_report

            with timer.stage("report"):
                _write_report(staging, model=None if model.released else model, num=8)
    return BuildResult(out, manifest, parity, timer.timings)
