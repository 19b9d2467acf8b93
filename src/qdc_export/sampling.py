"""The sampler episode: drives any denoiser (eager PyTorch, a captured graph, an ONNX Runtime session,
a TensorRT engine) step by step through a diffusers scheduler, with classifier-free guidance.

:class:`Episode` holds one episode's setup (the scheduler set to N steps, the starting noise from the seeds, the
conditioning), :func:`run_episode` runs it with optional hooks before and after each model call. Every stage
samples through them: calibration, the compensation fit (two episodes in lock-step), the held-out check, parity,
the report and ``qdc-export sample``.

Notation (docs/method.md): steps n = N..1 in scheduler order; ``latents[k]`` is x_n before step k
(``latents[0]`` = x_N, the shared starting noise; ``latents[-1]`` = x_0, the final latent);
``outputs[k]`` is the guided model output eps_n that entered the scheduler at step k."""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
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
    outputs: list[torch.Tensor] = field(default_factory=list)  # what entered the scheduler at each step

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


def seeded_step_kwargs(scheduler: Any, seed: int, device: torch.device | str = "cpu") -> dict[str, Any]:
    """``generator=`` for a scheduler whose ``step`` draws noise (DDPM; ancestral samplers), seeded with ``seed``;
    nothing for one that does not take it. Two runs given identically seeded generators draw the same noise."""
    if "generator" in inspect.signature(scheduler.step).parameters:
        return {"generator": torch.Generator(device=device).manual_seed(seed)}
    return {}


StepHook = Callable[[int, Any, torch.Tensor], None]
OutputHook = Callable[[int, Any, torch.Tensor, torch.Tensor], "torch.Tensor | None"]


class Episode:
    """One sampler episode's setup: a copy of ``scheduler`` set to ``steps``, the starting latent
    x_N = ``noise`` * ``init_noise_sigma`` of the *set* schedule (before set_timesteps, Euler reports the largest
    training sigma, 20291 for a cosine schedule, instead of the first sampled one), and the conditioning:
    classifier-free guidance doubles the batch as [uncond; cond] when ``uncond`` is given, there is conditioning
    and guidance_scale != 1. ``step_seed``: the scheduler's step noise comes from a generator seeded with it
    (the fit's paired runs draw identical noise); None: the scheduler's default (the global generator)."""

    def __init__(self, scheduler: Any, steps: int, noise: torch.Tensor, cond: dict[str, torch.Tensor] | None = None,
                 uncond: dict[str, torch.Tensor] | None = None, guidance_scale: float = 1.0, *,
                 step_seed: int | None = None) -> None:
        self.scheduler = copy.deepcopy(scheduler)
        self.scheduler.set_timesteps(steps, device=noise.device)
        self.timesteps = self.scheduler.timesteps
        self.cond = dict(cond or {})
        use_cfg = uncond is not None and bool(self.cond) and guidance_scale != 1.0
        self.uncond, self.guidance_scale = (uncond if use_cfg else None), guidance_scale
        self.noise, self.start = noise, noise * float(self.scheduler.init_noise_sigma)
        self.step_kwargs = {} if step_seed is None else seeded_step_kwargs(self.scheduler, step_seed, noise.device)

    @classmethod
    def from_seeds(cls, scheduler: Any, steps: int, conditioning: Any, latent_shape: tuple[int, ...],
                   seeds: list[int], **kwargs: Any) -> Episode:
        """The episode of a batch of seeds: unit noise from :func:`initial_latents`, conditioning (and its
        unconditional twin, the guidance scale) from ``conditioning.for_samples(seeds)``."""
        cond, uncond = conditioning.for_samples(seeds)
        return cls(scheduler, steps, initial_latents(latent_shape, seeds), cond, uncond,
                   conditioning.guidance_scale, **kwargs)

    @property
    def batch(self) -> int:
        """The model's batch: doubled under classifier-free guidance."""
        return self.start.shape[0] * (2 if self.uncond is not None else 1)

    def model_input(self, x: torch.Tensor, t: Any) -> torch.Tensor:
        scaled: torch.Tensor = self.scheduler.scale_model_input(x, t)
        return scaled

    def output(self, denoiser: Denoiser, model_in: torch.Tensor, t: Any) -> torch.Tensor:
        """The (guided) output eps_n that enters the scheduler at timestep value ``t``."""
        return guided_output(denoiser, model_in, t, self.cond, self.uncond, self.guidance_scale)

    def step(self, eps: torch.Tensor, t: Any, x: torch.Tensor) -> torch.Tensor:
        """x_{n-1} from x_n and the output that enters the scheduler."""
        out: torch.Tensor = self.scheduler.step(eps, t, x, return_dict=False, **self.step_kwargs)[0]
        return out


def run_episode(denoiser: Denoiser, episode: Episode, *, record: bool = True, progress: bool = False,
                desc: str = "sampling", before: StepHook | None = None, after: OutputHook | None = None) -> Trajectory:
    """Run ``denoiser`` through ``episode``. Per step (row i, timestep value t): ``before(i, t, model_in)`` ahead of
    the model call; ``after(i, t, model_in, eps)`` after it, which may return the output the scheduler steps with
    instead of eps (a compensation applied outside the model). ``record``: keep every latent and output."""
    x = episode.start
    denoiser.reset(episode.batch)
    traj = Trajectory(timesteps=[float(t) for t in episode.timesteps])
    if record:
        traj.latents.append(x.clone())
    for row, t in enumerate(tqdm(episode.timesteps, desc=desc, disable=not progress, leave=False)):
        model_in = episode.model_input(x, t)
        if before is not None:
            before(row, t, model_in)
        eps = episode.output(denoiser, model_in, t)
        if after is not None:
            replaced = after(row, t, model_in, eps)
            eps = eps if replaced is None else replaced
        x = episode.step(eps, t, x)
        if record:
            traj.outputs.append(eps.clone())
            traj.latents.append(x.clone())
    if not record:
        traj.latents.append(x)
    return traj


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
    """:func:`run_episode` of ``Episode(scheduler, steps, latents, cond, uncond, guidance_scale)``; ``latents`` is
    unit noise (:func:`initial_latents`)."""
    return run_episode(denoiser, Episode(scheduler, steps, latents, cond, uncond, guidance_scale), record=record,
                       progress=progress, desc=desc)


def latents_to_images(latents: torch.Tensor) -> torch.Tensor:
    """[-1, 1] model space -> [0, 1] images (the reference models are pixel-space diffusion)."""
    return ((latents.clamp(-1, 1) + 1) / 2).float()
