"""The INT4 part of the build (w4a16, w4a8, w4a4; a PTQ recipe, precision.PTQ_RECIPES), called from build_graph:

record layer inputs on calibration trajectories -> [awq | svdquant] -> [w4a8: PT2E INT8 activation observers,
calibration, Q/DQ] -> INT4 weights (rtn: clip search on the recorded inputs; gptq: GPTQ rounding with the
Hessian of the recorded inputs, same grid and scales) [+ w4a4 dynamic group INT4 activations]."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import torch

from qdc_export.config import BuildConfig
from qdc_export.load.models import LoadedModel
from qdc_export.passes import PassLog
from qdc_export.precision import ACTIVATION_GROUP, PrecisionPlan
from qdc_export.quantize.annotate import QuantizationPlan
from qdc_export.quantize.awq import AwqOptions, awq_
from qdc_export.quantize.calibrate import run_calibration
from qdc_export.quantize.fake_quant import CONV2D, LINEAR
from qdc_export.quantize.int4 import (
    Int4Options,
    compute_layers,
    insert_recorders_,
    quantize_int4_,
    remove_recorders_,
    select_layers,
    weight_bytes_by_dtype,
    weight_value,
)
from qdc_export.quantize.qdq import static_int8_qdq_
from qdc_export.quantize.svdquant import HOLDER, SvdQuantOptions, svdquant_

RECORD_SAMPLES = 2  # calibration trajectories whose layer inputs feed clip search / SVDQuant
# AWQ and GPTQ fit more than one number per layer (a scale per input channel; every rounding decision):
# they record more trajectories and several batch items per call (both halves of a guided batch)
RECORD_SAMPLES_FITTED = 4
RECORD_ITEMS_FITTED = 4


def deployability(plan: PrecisionPlan, target: str = "onnxruntime") -> tuple[list[str], str]:
    if plan.activation == "int4-group":
        return ["onnxruntime"], ("INT4 activations (W4A4) cannot be expressed in TensorRT (INT4 is weight-only "
                                 "there); this model runs on ONNX Runtime")
    if plan.int4_weights and plan.activation == "int8-tensor":
        return ["onnxruntime"], ("TensorRT has no INT4-weight x INT8-activation kernel (INT4 is weight-only GEMM "
                                 "there); this model runs on ONNX Runtime")
    if plan.int4_weights and target != "tensorrt":
        return ["onnxruntime"], ("this form has INT4 convolutions and ragged blocks, which TensorRT rejects (INT4 "
                                 "only on GEMM weights, block dividing K); build with --target tensorrt")
    if plan.int4_weights:
        return ["onnxruntime", "tensorrt"], ("TensorRT form: INT4 blocked weights on Linear layers whose input size "
                                             "the block divides; convolutions INT8 (W8A8) or float (--trt-conv); "
                                             "other Linear layers float")
    return ["onnxruntime", "tensorrt"], ""


def tensorrt_int4_layers(gm: torch.fx.GraphModule, layers: list[str], block_size: int) -> tuple[list[str], list[str]]:
    """(INT4 layers, layers left float) for TensorRT: INT4 weight-only runs on GEMMs only (MatMul/Gemm), with a
    block size that divides the input size K (no ragged last block). Convolutions stay float."""
    wanted, keep, float_ = set(layers), [], []
    for name, node in compute_layers(gm):
        if name not in wanted:
            continue
        in_features = int(weight_value(gm, node.args[1]).shape[-1]) if node.target == LINEAR else 0
        (keep if node.target == LINEAR and in_features % block_size == 0 else float_).append(name)
    return keep, float_


def build_int4_graph(gm: torch.fx.GraphModule, model: LoadedModel, config: BuildConfig, plan: QuantizationPlan,
                     info: dict[str, Any], log: PassLog, progress: bool = False) -> torch.fx.GraphModule:
    quantized, kept = select_layers(gm, plan.float_layers, plan.include)
    int8_convs: list[str] = []
    if config.target == "tensorrt":
        quantized, not_gemm = tensorrt_int4_layers(gm, quantized, config.plan.weight_block_size)
        convs = {name for name, node in compute_layers(gm) if node.target == CONV2D}
        int8_convs = [n for n in not_gemm if n in convs] if config.trt_conv == "int8" else []
        kept += [n for n in not_gemm if n not in int8_convs]
    info["quantized_layers"], info["float_layers"] = quantized + int8_convs, kept
    if int8_convs:
        info["int8_layers"] = int8_convs
    precision = config.plan

    def calibrate(module: torch.fx.GraphModule, samples: int = config.calib_samples) -> None:
        run_calibration(module, model, scheduler_name=config.scheduler, steps=config.steps, seed=config.seed,
                        progress=progress, samples=samples)

    fitted = precision.ptq_transform == "awq" or precision.ptq_rounding == "gptq"
    samples, items = (RECORD_SAMPLES_FITTED, RECORD_ITEMS_FITTED) if fitted else (RECORD_SAMPLES, 1)
    timing = log.timer.stage("record_activations") if log.timer is not None else contextlib.nullcontext()
    with timing:  # layer inputs on a few calibration trajectories, for clip search, AWQ, SVDQuant and GPTQ
        recorders = insert_recorders_(gm, quantized, items=items)
        calibrate(gm, min(samples, config.calib_samples))
        activations = remove_recorders_(gm).products["activations"]
    log.record("record_layer_inputs", False, layers=recorders.details["recorders"],
               trajectories=min(samples, config.calib_samples), batch_items_per_call=items)
    info["ptq"] = precision.ptq
    if precision.ptq_transform == "awq":
        awq_options = AwqOptions(block_size=precision.weight_block_size,
                                 activation="int8-tensor" if precision.activation == "int8-tensor" else "none")
        activations = log.run(awq_, gm, quantized, activations, awq_options, stage="awq").products["activations"]
    if precision.ptq_transform == "svdquant":
        options = SvdQuantOptions(rank=precision.svdquant_rank, block_size=precision.weight_block_size,
                                  activation="none" if precision.activation == "float" else precision.activation,
                                  activation_group=ACTIVATION_GROUP)
        activations = log.run(svdquant_, gm, quantized, activations, options, stage="svdquant").products["activations"]
    if plan.activation_bits:  # w4a8: INT8 per-tensor activations through PT2E (weights left to the INT4 pass)
        gm = static_int8_qdq_(gm, plan, log, calibrate).module
    if int8_convs:  # TensorRT W4A16: the convolutions as W8A8 (INT8 Q/DQ through PT2E), nothing else
        others = tuple(name for name, _ in compute_layers(gm) if name not in int8_convs)
        conv_plan = dataclasses.replace(plan, weight_bits=8, activation_bits=8, float_layers=others, include=())
        gm = static_int8_qdq_(gm, conv_plan, log, calibrate, layers="int8 convolutions").module
    options4 = Int4Options(block_size=precision.weight_block_size, rounding=precision.ptq_rounding,
                           activation_group=precision.activation_group)
    return log.run(quantize_int4_, gm, quantized, options4, activations, stage="quantize_int4").module


def weight_summary(gm: torch.nn.Module, plan: PrecisionPlan, target: str = "onnxruntime") -> dict[str, Any]:
    deployable, note = deployability(plan, target)
    out: dict[str, Any] = {"weight_bytes_by_dtype": weight_bytes_by_dtype(gm), "deployable_on": deployable}
    if note:
        out["deployability_note"] = note
    return out


SVDQUANT_FLOAT_GLOB = HOLDER  # SVDQuant's low-rank branch and smoothing factors stay float
