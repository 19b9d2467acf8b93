"""The quantize stage: capture the UNet (torch.export), then the passes that turn it into the Q/DQ graph the
engine is exported from: cleanup, annotate + observe, calibrate on sampler trajectories, materialize Q/DQ (or
the INT4 recipes of quantize.int4_build). The in-memory part of the build; nothing here writes files."""

from __future__ import annotations

from typing import Any

import torch

from qdc_export.capture import capture
from qdc_export.config import BuildConfig
from qdc_export.infra.timing import StageTimer
from qdc_export.load.models import LoadedModel
from qdc_export.quantize.annotate import QuantizationPlan
from qdc_export.quantize.calibrate import run_calibration
from qdc_export.quantize.cleanup import remove_inference_noops
from qdc_export.quantize.int4_build import SVDQUANT_FLOAT_GLOB, build_int4_graph, weight_summary
from qdc_export.quantize.qdq import insert_observers, materialize_qdq


def quantization_plan(config: BuildConfig, model: LoadedModel) -> QuantizationPlan:
    excluded = tuple(model.adapter.default_float_layers) + tuple(config.exclude)
    if config.plan.ptq_transform == "svdquant":
        excluded += (SVDQUANT_FLOAT_GLOB,)  # SVDQuant's low-rank branch stays float
    # PT2E observes static INT8 activations only (w8a8, w4a8); W4A4's dynamic INT4 ones come from the INT4 pass
    return QuantizationPlan(
        weight_bits=config.plan.weight_bits or 8, activation_bits=config.plan.static_activation_bits,
        observer=config.observer, percentile=config.percentile,
        quantize_attention=config.quantize_attention, float_layers=excluded, include=config.include,
    )


def build_graph(model: LoadedModel, config: BuildConfig, *, progress: bool = False,
                timer: StageTimer | None = None) -> tuple[torch.fx.GraphModule, tuple[torch.Tensor, ...], dict[str, Any]]:
    """The in-memory part of the build: the PyTorch graph that is exported, and what the passes did."""
    timer = timer or StageTimer()
    info: dict[str, Any] = {"passes": []}
    with timer.stage("capture"):
        gm, example = capture(model.unet, model.adapter)
    result = remove_inference_noops(gm)
    info["passes"].append({"name": "remove_inference_noops", "modified": result.modified, **result.details})
    gm = result.module
    if config.plan.int4_weights:
        gm = build_int4_graph(gm, model, config, quantization_plan(config, model), info, timer, progress)
    elif config.plan.quantized:
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
    info.update(weight_summary(gm, config.plan, config.target))
    return gm, example, info


