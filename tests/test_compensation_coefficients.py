"""SamplerCoefficients against the real diffusers ``step``: random x and model outputs for every step, and the
linear form A x + B out (+ A_prev x_prev + C out_prev) must give the scheduler's prev_sample."""

from __future__ import annotations

import inspect

import diffusers
import numpy as np
import pytest
import torch

from qdc_export.compensation import sampler_coefficients
from qdc_export.errors import UserError

REL_TOL = 1e-5


def _schedulers():
    return [
        ("ddim-leading", diffusers.DDIMScheduler(clip_sample=False), 10),
        ("ddim-trailing", diffusers.DDIMScheduler(clip_sample=False, timestep_spacing="trailing"), 7),
        ("ddim-sd", diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                            clip_sample=False, set_alpha_to_one=False, steps_offset=1), 20),
        ("ddim-vpred", diffusers.DDIMScheduler(clip_sample=False, prediction_type="v_prediction"), 8),
        ("ddpm", diffusers.DDPMScheduler(clip_sample=False), 10),
        ("euler", diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                   beta_end=0.012), 12),
        ("euler-karras-vpred", diffusers.EulerDiscreteScheduler(use_karras_sigmas=True,
                                                                prediction_type="v_prediction"), 9),
        ("dpmpp2m", diffusers.DPMSolverMultistepScheduler(), 10),
        ("dpmpp2m-heun-20", diffusers.DPMSolverMultistepScheduler(solver_type="heun"), 20),
        ("dpmpp2m-sigma-min", diffusers.DPMSolverMultistepScheduler(final_sigmas_type="sigma_min",
                                                                    lower_order_final=False), 16),
        ("flow-euler", diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), 8),
    ]


def _run_and_compare(sched, n_steps, seed=0):
    coeffs = sampler_coefficients(sched, n_steps)
    sched.set_timesteps(n_steps)
    assert np.array_equal(coeffs.timesteps, sched.timesteps.double().numpy())
    g = torch.Generator().manual_seed(seed)
    step_has_gen = "generator" in inspect.signature(sched.step).parameters
    x_prev = out_prev = None
    worst = 0.0
    for i, t in enumerate(sched.timesteps):
        x = torch.randn(2, 4, 8, 8, generator=g) * float(1 + 5 * g.initial_seed() % 3)
        out = torch.randn(2, 4, 8, 8, generator=g)
        kw = {}
        noise_term = 0.0
        if isinstance(sched, diffusers.DDPMScheduler):
            # DDPM adds noise; rebuild it from an identically seeded generator and subtract it
            kw["generator"] = torch.Generator().manual_seed(1000 + i)
            if int(t) > 0:
                ng = torch.Generator().manual_seed(1000 + i)
                noise = torch.randn(out.shape, generator=ng)
                noise_term = sched._get_variance(int(t)) ** 0.5 * noise
        elif step_has_gen:
            kw["generator"] = torch.Generator().manual_seed(1000 + i)
        if hasattr(sched, "scale_model_input"):
            sched.scale_model_input(x, t)  # Euler wants it called; identity elsewhere
        ref = sched.step(out, t, x, **kw).prev_sample.double() - noise_term
        mine = coeffs.step(i, x.double(), out.double(),
                           None if x_prev is None else x_prev.double(),
                           None if out_prev is None else out_prev.double())
        err = float((mine - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
        worst = max(worst, err)
        x_prev, out_prev = x, out
    return coeffs, worst


@pytest.mark.parametrize("name,sched,n", _schedulers(), ids=[s[0] for s in _schedulers()])
def test_coefficients_reproduce_scheduler_step(name, sched, n):
    coeffs, worst = _run_and_compare(sched, n)
    print(f"{name}: kind={coeffs.kind} N={coeffs.num_steps} multistep={coeffs.is_multistep} "
          f"max rel err={worst:.2e}")
    assert worst < REL_TOL, f"{name}: max relative error {worst:.3e} > {REL_TOL}"


def test_ddim_closed_form_matches_method_md():
    """A_n = sqrt(abar_{n-1}/abar_n), B_n = sqrt(1-abar_{n-1}) - sqrt(abar_{n-1}(1-abar_n)/abar_n)."""
    sched = diffusers.DDIMScheduler(clip_sample=False)
    c = sampler_coefficients(sched, 10)
    ab = sched.alphas_cumprod.double().numpy()
    for i, t in enumerate(c.timesteps.astype(int)):
        a, ap = ab[t], (ab[t - 100] if t - 100 >= 0 else float(sched.final_alpha_cumprod))
        assert abs(c.A[i] - np.sqrt(ap / a)) < 1e-12
        assert abs(c.B[i] - (np.sqrt(1 - ap) - np.sqrt(ap * (1 - a) / a))) < 1e-12


def test_dpmpp_has_previous_output_terms():
    c = sampler_coefficients(diffusers.DPMSolverMultistepScheduler(), 10)
    assert c.is_multistep and c.C[0] == 0 and c.C[-1] == 0  # first and (final_sigmas zero) last are 1st order
    assert np.all(c.C[1:-1] != 0)


def test_unsupported_raise_user_error():
    with pytest.raises(UserError, match="not supported"):
        sampler_coefficients(diffusers.HeunDiscreteScheduler(), 10)
    with pytest.raises(UserError, match="clip_sample"):
        sampler_coefficients(diffusers.DDIMScheduler(clip_sample=True), 10)
    with pytest.raises(UserError, match="solver_order"):
        sampler_coefficients(diffusers.DPMSolverMultistepScheduler(solver_order=3), 10)
    with pytest.raises(UserError, match="stochastic"):
        sampler_coefficients(diffusers.FlowMatchEulerDiscreteScheduler(stochastic_sampling=True), 10)


def test_caller_scheduler_untouched():
    sched = diffusers.DDIMScheduler(clip_sample=False)
    sched.set_timesteps(5)
    before = sched.timesteps.clone()
    c = sampler_coefficients(sched, 10)
    assert c.num_steps == 10 and torch.equal(sched.timesteps, before)
    assert sampler_coefficients(sched).num_steps == 5  # None -> current set_timesteps state
