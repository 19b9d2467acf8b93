"""Per-layer sensitivity of a build's quantized layers (report section 3): SQNR (dB) of each quantized layer's
output when only that layer's input and weight are quantized, on inputs recorded from FP calibration trajectories
(a few steps spread over the schedule). The quantizers are re-created from the build config (weights: symmetric
per output channel at 8 bits, per group of ``weight_block_size`` input channels at 4 bits; activations: symmetric
per tensor at 8 bits with the build's observer range (percentile or max; mse falls back to max), per group of 64
channels at 4 bits, none for a16). It ranks layers; it is not the build's exact graph."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from qdc_export.config import BuildConfig
from qdc_export.load.models import LoadedModel
from qdc_export.quantize.calibrate import calibration_seeds
from qdc_export.report.fidelity import fp_denoiser
from qdc_export.sampling import Episode, make_scheduler, run_episode


def _fake_quant(x: torch.Tensor, amax: torch.Tensor, bits: int) -> torch.Tensor:
    qmax = 2 ** (bits - 1) - 1
    scale = (amax / qmax).clamp_min(1e-12)
    q: torch.Tensor = (x / scale).round().clamp(-qmax - 1, qmax) * scale
    return q


def _group_quant(x: torch.Tensor, bits: int, group: int, dim: int) -> torch.Tensor:
    """Symmetric quantization with one scale per ``group`` consecutive entries along ``dim``."""
    moved = x.movedim(dim, -1)
    size = moved.shape[-1]
    pad = (-size) % group
    padded = torch.nn.functional.pad(moved, (0, pad))
    grouped = padded.reshape(*padded.shape[:-1], -1, group)
    q = _fake_quant(grouped, grouped.abs().amax(-1, keepdim=True), bits)
    return q.reshape(padded.shape)[..., :size].movedim(-1, dim)


def _quantize_weight(w: torch.Tensor, config: BuildConfig) -> torch.Tensor:
    if config.precision.startswith("w4"):
        return _group_quant(w, 4, config.weight_block_size, dim=1)
    return _fake_quant(w, w.abs().flatten(1).amax(1).reshape(-1, *([1] * (w.dim() - 1))), 8)


def _quantize_activation(x: torch.Tensor, config: BuildConfig) -> torch.Tensor:
    if config.precision in ("w4a16", "fp32"):
        return x
    if config.precision == "w4a4":
        return _group_quant(x, 4, 64, dim=1)
    flat = x.abs().flatten().double()
    if config.observer == "percentile":
        sample = flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))[:1_000_000]]
        amax = torch.quantile(sample, config.percentile / 100).float()
    else:
        amax = flat.max().float()
    return _fake_quant(x, amax, 8)


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
            out = _layer_output(
                module, _quantize_activation(x, config), _quantize_weight(module.weight, config)
            )
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
