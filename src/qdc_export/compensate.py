"""Fit compensation tables for a quantized graph against the FP model (build stage between calibration
and export). Paired FP / quantized trajectories start from the same noise and conditioning on
calibration seeds (never the evaluation seeds); see :mod:`qdc_export.compensation.fit`.

The fits use the *guided* output (after classifier-free guidance) while the engine corrects each branch
output: the head is affine with the same row for both branches and CFG weights sum to one, so
guided(head(branches)) == head(guided(branches)) exactly; tests/test_compensation*.py checks it."""

from __future__ import annotations

from typing import Any

import torch

from .calibrate import calibration_seeds
from .compensation import CompensationTables, FitOptions, fit_tables
from .config import BuildConfig
from .loading import LoadedModel
from .sampling import TorchDenoiser, guided_output, initial_latents, make_scheduler

FIT_SEED_SHIFT = 7  # compensation fits use calibration seeds shifted away from the range observers saw


def method_name(config: BuildConfig) -> str:
    return f"tcec-{config.tcec_variant}" if config.compensation == "tcec" else config.compensation


def guided_denoiser(module: Any, model: LoadedModel, cond: dict[str, torch.Tensor],
                    uncond: dict[str, torch.Tensor]):
    """The fit's ``denoiser(x, t)``: the positional module with classifier-free guidance, as the sampler runs it."""
    denoiser = TorchDenoiser(module, [spec.name for spec in model.conditioning.specs])
    use_cfg = bool(model.conditioning.specs) and model.conditioning.guidance_scale != 1.0

    def denoise(x: torch.Tensor, t: Any, **_: Any) -> torch.Tensor:
        return guided_output(denoiser, x, t, cond, uncond if use_cfg else None, model.conditioning.guidance_scale)

    return denoise


def fit_compensation(quantized: torch.nn.Module, model: LoadedModel, config: BuildConfig) -> CompensationTables:
    seeds = calibration_seeds(config.seed + FIT_SEED_SHIFT, config.calib_samples)
    cond, uncond = model.conditioning.for_samples(seeds)
    shape = model.adapter.input_specs(model.unet)[0].concrete(1)[1:]
    latents = initial_latents(shape, seeds)  # fit_tables scales by init_noise_sigma itself
    scheduler = make_scheduler(config.scheduler, model.scheduler_config)
    fp = model.adapter.wrap(model.unet).eval()
    options = FitOptions(ridge=config.comp_ridge, fit_bias=config.comp_fit_bias, target=config.comp_target)
    return fit_tables(
        method_name(config),
        guided_denoiser(quantized, model, cond, uncond),
        guided_denoiser(fp, model, cond, uncond),
        scheduler, config.steps, latents, options=options, seed=config.seed,
    )
