"""Per-layer sensitivity of a build's quantized layers (report section 3): SQNR (dB) of each quantized layer's
output when only that layer's input and weight are quantized, on inputs recorded from FP calibration trajectories
(a few steps spread over the schedule). The quantizers are the build's own, chosen by the precision plan: INT8
weights and activations through the PT2E specs and observers of quantize.annotate (ranges observed on the
recorded input), INT4 weights on quantize.fake_quant's blockwise grid (round-to-nearest, no clip search or GPTQ),
W4A4 activations through the dynamic group quantizer of the graph. It ranks layers by rounding sensitivity; the
recipes (GPTQ, AWQ, SVDQuant) and the multi-step observer ranges of the real build are not re-run here."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from qdc_export.config import BuildConfig
from qdc_export.load.models import LoadedModel
from qdc_export.precision import ACTIVATION_GROUP
from qdc_export.quantize.annotate import (
    QuantizationPlan,
    fake_quantize_with_spec,
    int8_activation_spec,
    int8_weight_spec,
)
from qdc_export.quantize.calibrate import calibration_seeds
from qdc_export.quantize.fake_quant import activation_group, fake_quantize_blockwise, fake_quantize_int4_group
from qdc_export.report.fidelity import fp_denoiser
from qdc_export.sampling import Episode, make_scheduler, run_episode


def _quantize_weight(module: torch.nn.Conv2d | torch.nn.Linear, config: BuildConfig) -> torch.Tensor:
    w = module.weight.detach()
    if config.plan.int4_weights:  # the INT4 grid of quantize.int4: blocks along K of the weight as [O, K]
        return fake_quantize_blockwise(w.flatten(1), config.plan.weight_block_size).reshape(w.shape)
    return fake_quantize_with_spec(w, int8_weight_spec())


def _quantize_activation(module: torch.nn.Conv2d | torch.nn.Linear, x: torch.Tensor,
                         config: BuildConfig) -> torch.Tensor:
    plan = config.plan
    if plan.activation == "float":
        return x
    if plan.activation == "int4-group":  # dynamic, per group of channels on the layer's channel axis
        axis = 1 if isinstance(module, torch.nn.Conv2d) else x.dim() - 1
        return fake_quantize_int4_group(x, axis, activation_group(x.shape[axis], ACTIVATION_GROUP))
    spec = int8_activation_spec(QuantizationPlan(observer=config.observer, percentile=config.percentile,
                                                 activation_bits=plan.static_activation_bits))
    return fake_quantize_with_spec(x, spec)


def _layer_output(
    module: torch.nn.Conv2d | torch.nn.Linear, x: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    if isinstance(module, torch.nn.Conv2d):
        out: torch.Tensor = module._conv_forward(x, weight, module.bias)
        return out
    return torch.nn.functional.linear(x, weight, module.bias)


def sqnr_db(reference: torch.Tensor, actual: torch.Tensor) -> float:
    noise = float((reference.double() - actual.double()).pow(2).sum())
    signal = float(reference.double().pow(2).sum())
    return math.inf if noise == 0 else 10 * math.log10(max(signal, 1e-30) / noise)


def layer_sensitivity(
    model: LoadedModel, config: BuildConfig, layers: list[str], *, samples: int = 2, keep_steps: int = 4
) -> list[dict[str, Any]]:
    """SQNR of each named layer's output with only that layer quantized (see the module docstring)."""
    modules = dict(model.unet.named_modules())
    chosen = [n for n in layers if isinstance(modules.get(n), (torch.nn.Conv2d, torch.nn.Linear))]
    scheduler = make_scheduler(config.scheduler, model.scheduler_config)
    keep = set(np.linspace(0, config.steps - 1, min(keep_steps, config.steps)).round().astype(int).tolist())
    recorded: dict[str, list[torch.Tensor]] = {n: [] for n in chosen}
    state = {"step": -1}

    def hook(name: str) -> Callable[..., None]:
        def fn(_module: Any, inputs: tuple[torch.Tensor, ...], _output: Any) -> None:
            if state["step"] in keep:
                recorded[name].append(inputs[0].detach().clone())

        return fn

    def count(row: int, _t: Any, _model_in: torch.Tensor) -> None:
        state["step"] = row  # the step whose model call comes next

    handles = [modules[n].register_forward_hook(hook(n)) for n in chosen]
    try:
        seeds = calibration_seeds(config.seed, samples)
        shape = model.adapter.input_specs(model.unet)[0].concrete(1)[1:]
        episode = Episode.from_seeds(scheduler, config.steps, model.conditioning, shape, seeds)
        run_episode(fp_denoiser(model), episode, record=False, before=count)
    finally:
        for h in handles:
            h.remove()
    rows = []
    with torch.no_grad():
        for name in chosen:
            if not recorded[name]:
                continue
            module = modules[name]
            x = torch.cat(recorded[name])
            ref = _layer_output(module, x, module.weight)
            out = _layer_output(module, _quantize_activation(module, x, config), _quantize_weight(module, config))
            rows.append({"layer": name, "type": type(module).__name__, "sqnr_db": sqnr_db(ref, out)})
            recorded[name] = []
    return sorted(rows, key=lambda r: r["sqnr_db"])


def quantized_layers(manifest: dict[str, Any], model: LoadedModel) -> list[str]:
    """The build's quantized Conv/Linear layers: from the manifest, else every one not kept in float."""
    layers = manifest.get("quantization", {}).get("quantized_layers")
    if layers:
        return list(layers)
    floats = set(manifest.get("quantization", {}).get("float_layers", []))
    return [
        n
        for n, m in model.unet.named_modules()
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and n not in floats
    ]
