"""Calibration driven by real sampling: the observed graph is the denoiser of full sampler trajectories
(the build's scheduler and step count), over calibration seeds and conditionings distinct from the
evaluation seeds, so activation ranges cover every timestep the engine will see."""

from __future__ import annotations

import math

import torch

from .errors import CalibrationError
from .loading import LoadedModel
from .sampling import TorchDenoiser, initial_latents, make_scheduler, run_sampler

CALIBRATION_SEED_OFFSET = 100_000  # calibration seeds never overlap evaluation seeds


def calibration_seeds(seed: int, count: int) -> list[int]:
    return [CALIBRATION_SEED_OFFSET + seed * 1000 + i for i in range(count)]


def run_calibration(observed: torch.nn.Module, model: LoadedModel, *, scheduler_name: str, steps: int,
                    seed: int, samples: int, batch: int = 8, progress: bool = False) -> None:
    scheduler = make_scheduler(scheduler_name, model.scheduler_config)
    cond_names = [spec.name for spec in model.conditioning.specs]
    denoiser = TorchDenoiser(observed, cond_names)
    seeds = calibration_seeds(seed, samples)
    shape = model.adapter.input_specs(model.unet)[0].concrete(1)[1:]
    for start in range(0, samples, batch):
        chunk = seeds[start:start + batch]
        cond, uncond = model.conditioning.for_samples(chunk)
        latents = initial_latents(shape, chunk, float(scheduler.init_noise_sigma))
        traj = run_sampler(denoiser, scheduler, steps, latents, cond, uncond,
                           model.conditioning.guidance_scale, record=False, progress=progress,
                           desc=f"calibrating {start // batch + 1}/{math.ceil(samples / batch)}")
        if not torch.isfinite(traj.final).all():
            raise CalibrationError("calibration trajectory produced NaN/Inf latents")
    check_observers(observed)


def check_observers(observed: torch.nn.Module) -> None:
    """Fail loudly on ranges that never got data or got NaN/Inf, naming the observers."""
    empty, bad = [], []
    for name, module in observed.named_modules():
        min_val, max_val = getattr(module, "min_val", None), getattr(module, "max_val", None)
        if not isinstance(min_val, torch.Tensor) or not isinstance(max_val, torch.Tensor):
            continue
        if min_val.numel() == 0 or bool((min_val > max_val).any()):
            empty.append(name)
        elif not (torch.isfinite(min_val).all() and torch.isfinite(max_val).all()):
            bad.append(name)
    if bad:
        raise CalibrationError(f"NaN/Inf ranges in {len(bad)} observers: {', '.join(bad[:5])}")
    if empty:
        raise CalibrationError(f"{len(empty)} observers never saw data: {', '.join(empty[:5])}")
