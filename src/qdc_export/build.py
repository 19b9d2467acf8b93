"""The build, the one place that strings the stages together: load -> capture + quantize (quantize.graph) ->
compensation (fit, validate, fold) -> export ONNX -> engine target -> parity check -> manifest -> report, all
inside an atomic staging folder. ``build_distributed`` is the same build with calibration split over torchrun
processes (quantize.distributed)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from qdc_export import __version__
from qdc_export.check.folder import check_build
from qdc_export.check.parity import ParityTolerances, summarize
from qdc_export.compensation.stage import add_compensation
from qdc_export.config import BuildConfig
from qdc_export.engines.openvino import OPENVINO_TARGET, require_openvino
from qdc_export.engines.targets import prepare_tensorrt
from qdc_export.errors import RejectedBuild, UserError
from qdc_export.export.to_onnx import export_onnx
from qdc_export.infra.memory import log_resident, release_memory
from qdc_export.infra.provenance import git_state, machine_load
from qdc_export.infra.reproducible import save_program
from qdc_export.infra.staging import check_output, staged_folder
from qdc_export.infra.timing import StageTimer, to_stderr
from qdc_export.load.models import LoadedModel, io_description, load_model
from qdc_export.manifest import (
    CONDITIONING_FILE,
    MODEL_FILE,
    PARITY_FILE,
    REFERENCE_FILE,
    canonical_json,
    package_versions,
    write_manifest,
)
from qdc_export.passes import PassLog
from qdc_export.quantize.cleanup import remove_unused_weights_, sink_weight_computations_
from qdc_export.quantize.distributed import agree_across_ranks, init_from_env, sharded_calibration
from qdc_export.quantize.graph import build_graph
from qdc_export.quantize.half import HALF_DTYPES, to_half_
from qdc_export.report.writer import write_report as _write_report
from qdc_export.sampling import make_scheduler, schedule_timesteps


@dataclass
class BuildResult:
    out: Path
    manifest: dict[str, Any]
    parity: dict[str, Any]
    timings: dict[str, float]


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
    check_output(out, force)  # refusals that need no work: before the model loads
    if config.target == OPENVINO_TARGET:
        require_openvino()  # the runtime the build's check will open, not found only after the build's work
    timer = StageTimer(report=to_stderr if progress else None)
    with timer.stage("load"):
        model, source_scheduler_config = load_for_build(model_arg, config, scheduler_config)
    with staged_folder(out, force) as staging:
        gm, example, info = build_graph(model, config, progress=progress, timer=timer)
        log = PassLog(info["passes"], timer)
        io = io_description(model)
        compensation: dict[str, Any] = {"method": "none"}
        if config.compensation != "none":
            with timer.stage("fit_compensation"):
                gm, example, compensation = add_compensation(gm, example, model, config, staging, io)
            log.record("fold_compensation", compensation["folded"])
        input_names = [i["name"] for i in io["inputs"]]
        output_names = [o["name"] for o in io["outputs"]]
        log.run(remove_unused_weights_, gm)  # float weights replaced by INT8 constants: not exported, not saved
        log.run(sink_weight_computations_, gm)  # the reference graph then holds one dequantized weight at a time
        half = config.trt_float if config.target == "tensorrt" else None
        if half is not None:  # TensorRT's form: an FP16/BF16 network; reference.pt2 is this same graph
            log.run(to_half_, gm, example, input_names, HALF_DTYPES[half])
        with timer.stage("export_onnx"):
            export_onnx(gm, example, staging / MODEL_FILE, input_names=input_names, output_names=output_names,
                        int4_weights=config.plan.int4_weights,
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
        made_on = {**git_state(), **machine_load()}  # who made it and what else the machine was doing
        manifest = write_manifest(staging, content, unhashed={"created": created, "timings_s": timer.timings,
                                                              "made_on": made_on})
        if parity and not parity["passed"]:  # staged_folder keeps it aside as NAME.failed-check
            raise RejectedBuild(f"parity check failed: {content['parity_summary']}")
        if write_report:  # derived from the artifacts above, written after the manifest (not hashed)
            with timer.stage("report"):
                _write_report(staging, model=None if model.released else model, num=8)
    return BuildResult(out, manifest, parity, timer.timings)


def build_distributed(model_arg: str | None, config: Any, out: Path, *, force: bool = False,
                      progress: bool = False, run_check: bool = True, **kwargs: Any) -> Any | None:
    """The build with calibration split over the torchrun processes. Rank 0 returns the BuildResult and
    alone writes ``out``; the other ranks return None after calibration."""
    rank, _ = init_from_env()
    try:
        error: UserError | None = None
        if rank == 0:
            try:
                check_output(out, force)
            except UserError as exc:
                error = exc
        agree_across_ranks(error is None, f"rank 0 cannot write {out}: {error}" if error else "")
        with sharded_calibration():
            if rank == 0:
                return build(model_arg, config, out, force=force, progress=progress, run_check=run_check, **kwargs)
            build_graph(load_for_build(model_arg, config, kwargs.get("scheduler_config"))[0], config)  # its share of calibration; rank 0 writes the folder
            return None
    finally:
        dist.destroy_process_group()
