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
from qdc_export.passes import PassLog
from qdc_export.quantize.annotate import QuantizationPlan
from qdc_export.quantize.calibrate import run_calibration
from qdc_export.quantize.cleanup import remove_inference_noops_
from qdc_export.quantize.int4_build import SVDQUANT_FLOAT_GLOB, build_int4_graph, weight_summary
from qdc_export.quantize.qdq import static_int8_qdq_


def quantization_plan(config: BuildConfig, model: LoadedModel) -> QuantizationPlan:
    excluded = tuple(model.adapter.default_float_layers) + tuple(config.exclude)
    if config.plan.ptq_transform == "svdquant":
        excluded += (SVDQUANT_FLOAT_GLOB,)  # SVDQuant's low-rank branch stays float
    # PT2E observes static INT8 activations only (w8a8, w4a8); W4A4's dynamic INT4 ones come from the INT4 pass
    return QuantizationPlan(
        weight_bits=config.plan.weight_bits or 8, activation_bits=config.plan.static_activation_bits,
        observer=config.observer, percentile=config.percentile,
        quantize_attention=config.quantize_attention, float_layers=excluded, include=config.include,
        layout="onnxruntime-cpu" if config.target == "onnxruntime-cpu" else "tensorrt",
    )


def build_graph(model: LoadedModel, config: BuildConfig, *, progress: bool = False,
                timer: StageTimer | None = None) -> tuple[torch.fx.GraphModule, tuple[torch.Tensor, ...], dict[str, Any]]:
    """The in-memory part of the build: the PyTorch graph that is exported, and what the passes did."""
    timer = timer or StageTimer()
    info: dict[str, Any] = {"passes": []}
    log = PassLog(info["passes"], timer)
    with timer.stage("capture"):
        gm, example = capture(model.unet, model.adapter)
    gm = log.run(remove_inference_noops_, gm).module
    if config.plan.int4_weights:
        gm = build_int4_graph(gm, model, config, quantization_plan(config, model), info, log, progress)
    elif config.plan.quantized:
        def calibrate(module: torch.fx.GraphModule) -> None:
            run_calibration(module, model, scheduler_name=config.scheduler, steps=config.steps,
                            seed=config.seed, samples=config.calib_samples, progress=progress)

        converted = static_int8_qdq_(gm, quantization_plan(config, model), log, calibrate)
        info["quantized_layers"] = converted.products["quantized_layers"]
        info["float_layers"] = converted.products["float_layers"]
        gm = converted.module
    info.update(weight_summary(gm, config.plan, config.target))
    return gm, example, info


