"""The INT4 part of the build (w4a16, w4a8, w4a4; a PTQ recipe, config.PTQ_RECIPES), called from build_graph:

record layer inputs on calibration trajectories -> [awq | svdquant] -> [w4a8: PT2E INT8 activation observers,
calibration, Q/DQ] -> INT4 weights (rtn: clip search on the recorded inputs; gptq: GPTQ rounding with the
Hessian of the recorded inputs, same grid and scales) [+ w4a4 dynamic group INT4 activations]."""

from __future__ import annotations

from typing import Any

import torch

from .calibrate import run_calibration
from .config import BuildConfig
from .loading import LoadedModel
from .passes.annotate import QuantizationPlan
from .passes.int4 import Int4Options, insert_recorders, quantize_int4, remove_recorders, select_layers, \
    weight_bytes_by_dtype
from .passes.qdq import insert_observers, materialize_qdq
from .passes.awq import AwqOptions, awq
from .passes.svdquant import HOLDER, SvdQuantOptions, svdquant

RECORD_SAMPLES = 2  # calibration trajectories whose layer inputs feed clip search / SVDQuant
# AWQ and GPTQ fit more than one number per layer (a scale per input channel; every rounding decision):
# they record more trajectories and several batch items per call (both halves of a guided batch)
RECORD_SAMPLES_FITTED = 4
RECORD_ITEMS_FITTED = 4
ACTIVATION_GROUP = 64


def deployability(precision: str) -> tuple[list[str], str]:
    if precision == "w4a4":
        return ["onnxruntime"], ("INT4 activations (W4A4) cannot be expressed in TensorRT (INT4 is weight-only "
                                 "there); this model runs on ONNX Runtime")
    if precision in ("w4a16", "w4a8"):
        return ["onnxruntime", "tensorrt"], ("TensorRT: passes the explicit-quantization rules R1-R7; INT4 weight-only "
                                             "is documented by TensorRT for MatMul/Gemm, Conv INT4 (DQ->Reshape->Conv) "
                                             "is unverified without a TensorRT build")
    return ["onnxruntime", "tensorrt"], ""


def build_int4_graph(gm: torch.fx.GraphModule, model: LoadedModel, config: BuildConfig, plan: QuantizationPlan,
                     info: dict[str, Any], timer: Any, progress: bool = False) -> torch.fx.GraphModule:
    quantized, kept = select_layers(gm, plan.float_layers, plan.include)
    info["quantized_layers"], info["float_layers"] = quantized, kept
    calib = dict(model=model, scheduler_name=config.scheduler, steps=config.steps, seed=config.seed, progress=progress)
    fitted = config.ptq_transform == "awq" or config.ptq_rounding == "gptq"
    samples, items = (RECORD_SAMPLES_FITTED, RECORD_ITEMS_FITTED) if fitted else (RECORD_SAMPLES, 1)
    with timer.stage("record_activations"):
        rec = insert_recorders(gm, quantized, items=items)
        run_calibration(gm, **calib, samples=min(samples, config.calib_samples))
        removed, activations = remove_recorders(gm)
    info["passes"].append({"name": "record_layer_inputs", "modified": False, "layers": rec.details["recorders"],
                           "trajectories": min(samples, config.calib_samples), "batch_items_per_call": items})
    info["ptq"] = config.ptq
    if config.ptq_transform == "awq":
        awq_options = AwqOptions(block_size=config.weight_block_size,
                                 activation="int8-tensor" if config.precision == "w4a8" else "none")
        with timer.stage("awq"):
            result, activations = awq(gm, quantized, activations, awq_options)
        info["passes"].append({"name": "awq", "modified": result.modified, **result.details})
    if config.ptq_transform == "svdquant":
        options = SvdQuantOptions(rank=config.svdquant_rank, block_size=config.weight_block_size,
                                  activation={"w4a4": "int4-group", "w4a8": "int8-tensor"}.get(config.precision, "none"),
                                  activation_group=ACTIVATION_GROUP)
        with timer.stage("svdquant"):
            result, activations = svdquant(gm, quantized, activations, options)
        info["passes"].append({"name": "svdquant", "modified": result.modified, **result.details})
    if plan.activation_bits:  # w4a8: INT8 per-tensor activations through PT2E (weights left to the INT4 pass)
        with timer.stage("insert_observers"):
            observed, _ = insert_observers(gm, plan)
        info["passes"].append({"name": "insert_observers", "modified": observed.modified,
                               "observers": observed.details["observers"]})
        with timer.stage("calibrate"):
            run_calibration(observed.module, **calib, samples=config.calib_samples)
        with timer.stage("materialize_qdq"):
            converted = materialize_qdq(observed.module)
        info["passes"].append({"name": "materialize_qdq", "modified": converted.modified, **converted.details})
        gm = converted.module
    options4 = Int4Options(block_size=config.weight_block_size, rounding=config.ptq_rounding,
                           activation_group=ACTIVATION_GROUP if config.precision == "w4a4" else None)
    with timer.stage("quantize_int4"):
        result = quantize_int4(gm, quantized, options4, activations)
    info["passes"].append({"name": "quantize_int4", "modified": result.modified, **result.details})
    return result.module


def weight_summary(gm: torch.nn.Module, precision: str) -> dict[str, Any]:
    deployable, note = deployability(precision)
    out: dict[str, Any] = {"weight_bytes_by_dtype": weight_bytes_by_dtype(gm), "deployable_on": deployable}
    if note:
        out["deployability_note"] = note
    return out


SVDQUANT_FLOAT_GLOB = HOLDER
