"""The sampler loop: drives any denoiser (eager PyTorch, a captured graph, an ONNX Runtime session,
a TensorRT engine) step by step through a diffusers scheduler, with classifier-free guidance.

Notation (docs/method.md): steps n = N..1 in scheduler order; ``latents[k]`` is x_n before step k
(``latents[0]`` = x_N, the shared starting noise; ``latents[-1]`` = x_0, the final latent);
``outputs[k]`` is the guided model output eps_n that entered the scheduler at step k."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler
from tqdm.auto import tqdm

from qdc_export.errors import UserError

_SCHEDULER_CLASSES = {
    "ddim": DDIMScheduler,
    "ddpm": DDPMScheduler,
    "euler": EulerDiscreteScheduler,
    "dpmsolver++": DPMSolverMultistepScheduler,
}


def make_scheduler(name: str, base_config: dict[str, Any], overrides: dict[str, Any] | None = None) -> Any:
    """The sampler a build runs: ``name`` picks the class, everything else (betas, timestep spacing, x0
    clipping, thresholding, ...) comes from the model's own scheduler config, as the client's pipeline
    would run it. ``overrides`` are explicit build options (recorded in the manifest), never implicit.
    "dpmsolver++" means DPM-Solver++ 2M: its algorithm and order are part of the name."""
    if name not in _SCHEDULER_CLASSES:
        raise UserError(f"unknown scheduler {name!r}; choose one of: {', '.join(_SCHEDULER_CLASSES)}")
    cls = _SCHEDULER_CLASSES[name]
    fixed: dict[str, Any] = {"algorithm_type": "dpmsolver++", "solver_order": 2} if name == "dpmsolver++" else {}
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(cls.from_config(base_config).config))
    if unknown:
        raise UserError(f"scheduler override {', '.join(unknown)} is not a {cls.__name__} config field")
    return cls.from_config(base_config, **{**fixed, **overrides})


def schedule_timesteps(scheduler: Any, steps: int) -> list[float]:
    """The exact timestep values the engine will be called with (float, as fed to ``timestep``)."""
    sched = copy.deepcopy(scheduler)
    sched.set_timesteps(steps)
    return [float(t) for t in sched.timesteps]


class Denoiser(Protocol):
    """What the sampler loop drives. ``reset`` clears per-trajectory state (compensation state)."""

    def reset(self, batch: int) -> None: ...

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor: ...


class TorchDenoiser:
    """A positional-input module (the adapter's wrapper, a captured or quantized graph) as a Denoiser.
    ``stateful``: the module takes ``comp_state`` last and returns (noise_pred, comp_state_out)."""

    def __init__(self, module: torch.nn.Module | Any, cond_names: list[str], stateful: bool = False) -> None:
        self.module, self.cond_names, self.stateful = module, cond_names, stateful
        self.state: torch.Tensor | None = None

    def reset(self, batch: int) -> None:
        self.state = None

    @torch.no_grad()
    def __call__(self, sample, timestep, cond):
        args = [sample, timestep, *(cond[name] for name in self.cond_names)]
        if not self.stateful:
            return self.module(*args)
        if self.state is None or self.state.shape != sample.shape:
            self.state = torch.zeros_like(sample)
        out, self.state = self.module(*args, self.state)
        return out


def initial_latents(shape: tuple[int, ...], seeds: list[int]) -> torch.Tensor:
    """Unit Gaussian noise, one generator per seed, so an image depends on its seed alone, not on the batch
    it is in. :func:`run_sampler` scales it by the scheduler's ``init_noise_sigma``."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])


@dataclass
class Trajectory:
    timesteps: list[float]
    latents: list[torch.Tensor] = field(default_factory=list)
    outputs: list[torch.Tensor] = field(default_factory=list)

    @property
    def final(self) -> torch.Tensor:
        return self.latents[-1]


def guided_output(denoiser: Denoiser, model_in: torch.Tensor, t: Any, cond: dict[str, torch.Tensor],
                  uncond: dict[str, torch.Tensor] | None, guidance_scale: float) -> torch.Tensor:
    """One model call at timestep value ``t``; with ``uncond`` the batch is doubled as [uncond; cond] and the
    output is eps_u + g (eps_c - eps_u), the output that enters the sampler."""
    if uncond is not None:
        model_in = torch.cat([model_in, model_in])
        cond = {k: torch.cat([uncond[k], cond[k]]) for k in cond}
    tvec = torch.full((model_in.shape[0],), float(t), dtype=torch.float32)
    eps = denoiser(model_in, tvec, cond).float()
    if uncond is None:
        return eps
    eps_u, eps_c = eps.chunk(2)
    return eps_u + guidance_scale * (eps_c - eps_u)


def run_sampler(
    denoiser: Denoiser,
    scheduler: Any,
    steps: int,
    latents: torch.Tensor,
    cond: dict[str, torch.Tensor],
    uncond: dict[str, torch.Tensor] | None = None,
    guidance_scale: float = 1.0,
    *,
    record: bool = True,
    progress: bool = False,
    desc: str = "sampling",
) -> Trajectory:
    """``latents``: unit noise (:func:`initial_latents`), scaled here by ``init_noise_sigma`` of the *set*
    schedule (before set_timesteps, Euler reports the largest training sigma, 20291 for a cosine schedule,
    instead of the first sampled one). Classifier-free guidance doubles the batch as [uncond; cond] when
    guidance_scale != 1."""
    sched = copy.deepcopy(scheduler)
    sched.set_timesteps(steps)
    use_cfg = uncond is not None and bool(cond) and guidance_scale != 1.0
    x = latents * float(sched.init_noise_sigma)
    batch = x.shape[0] * (2 if use_cfg else 1)
    denoiser.reset(batch)
    traj = Trajectory(timesteps=[float(t) for t in sched.timesteps])
    if record:
        traj.latents.append(x.clone())
    for t in tqdm(sched.timesteps, desc=desc, disable=not progress, leave=False):
        eps = guided_output(denoiser, sched.scale_model_input(x, t), t, cond, uncond if use_cfg else None,
                            guidance_scale)
        x = sched.step(eps, t, x, return_dict=False)[0]
        if record:
            traj.outputs.append(eps.clone())
            traj.latents.append(x.clone())
    if not record:
        traj.latents.append(x)
    return traj


def latents_to_images(latents: torch.Tensor) -> torch.Tensor:
    """[-1, 1] model space -> [0, 1] images (the reference models are pixel-space diffusion)."""
    return ((latents.clamp(-1, 1) + 1) / 2).float()
