"""J ~ 0 error propagation against real scheduler loops.

The "model" ignores its input (out(x, t) = f(t)), so its Jacobian is exactly 0; the "quantized" model adds a known
per-step error e(t). The measured final latent difference of the two real diffusers loops must equal the closed
form sum_k G_k e_k, and the per-step differences must equal propagate_errors."""

from __future__ import annotations

import inspect

import diffusers
import numpy as np
import pytest
import torch

from qdc_export.compensation import error_gains, predicted_final_error, propagate_errors, sampler_coefficients

REL_TOL = 1e-5
SHAPE = (2, 4, 8, 8)


def _scheds():
    return [
        ("ddim", diffusers.DDIMScheduler(clip_sample=False), 10),
        ("ddpm", diffusers.DDPMScheduler(clip_sample=False), 8),
        ("euler", diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                   beta_end=0.012), 10),
        ("dpmpp2m", diffusers.DPMSolverMultistepScheduler(), 10),
        ("flow-euler", diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), 8),
    ]


def _loop(sched, n, x0, out_fn):
    sched.set_timesteps(n)
    kw = lambda: ({"generator": torch.Generator().manual_seed(7)}
                  if "generator" in inspect.signature(sched.step).parameters else {})
    gen_kw = kw()
    x, xs = x0.clone(), []
    for i, t in enumerate(sched.timesteps):
        if hasattr(sched, "scale_model_input"):
            sched.scale_model_input(x, t)
        x = sched.step(out_fn(i), t, x, **gen_kw).prev_sample
        xs.append(x)
    return torch.stack(xs)


@pytest.mark.parametrize("name,sched,n", _scheds(), ids=[s[0] for s in _scheds()])
def test_closed_form_matches_real_loop_when_jacobian_is_zero(name, sched, n):
    g = torch.Generator().manual_seed(0)
    f = torch.randn((n,) + SHAPE, generator=g)  # FP output per step, independent of x  => J = 0
    e = torch.randn((n,) + SHAPE, generator=g) * 0.5  # known per-step output error
    x0 = torch.randn(SHAPE, generator=g) * float(getattr(sched, "init_noise_sigma", 1.0))
    import copy

    xs_fp = _loop(copy.deepcopy(sched), n, x0, lambda i: f[i])
    xs_q = _loop(copy.deepcopy(sched), n, x0, lambda i: f[i] + e[i])
    measured = (xs_q - xs_fp).double()
    coeffs = sampler_coefficients(sched, n)
    per_step = propagate_errors(coeffs, e)
    final = predicted_final_error(coeffs, e)
    scale = measured[-1].abs().max()
    err_final = float((final - measured[-1]).abs().max() / scale)
    err_steps = float((per_step - measured).abs().max() / measured.abs().max())
    print(f"{name}: max|d_final|={float(scale):.3f} rel err closed form={err_final:.2e} per-step={err_steps:.2e}")
    assert err_final < REL_TOL, f"{name}: closed form off by {err_final:.3e} (tol {REL_TOL})"
    assert err_steps < REL_TOL, f"{name}: per-step propagation off by {err_steps:.3e} (tol {REL_TOL})"


def test_ddim_gains_equal_method_md_closed_form():
    """d_final = sqrt(abar_final) * sum_k (s_{k-1} - s_k) e_k, s = sqrt((1 - abar) / abar)."""
    sched = diffusers.DDIMScheduler(clip_sample=False, timestep_spacing="trailing")
    c = sampler_coefficients(sched, 10)
    ab = sched.alphas_cumprod.double().numpy()
    final = float(sched.final_alpha_cumprod)
    s = lambda a: np.sqrt((1 - a) / a)
    expected = []
    for t in c.timesteps.astype(int):
        ap = ab[t - 100] if t - 100 >= 0 else final
        expected.append(np.sqrt(final) * (s(ap) - s(ab[t])))
    err = np.max(np.abs(error_gains(c) - np.array(expected)))
    print(f"max |G - closed form| = {err:.2e}")
    assert err < 1e-12


def test_jvp_path_reduces_to_zero_jacobian():
    c = sampler_coefficients(diffusers.DDIMScheduler(clip_sample=False), 6)
    e = torch.randn(6, 1, 2, 3, 3)
    a = propagate_errors(c, e)
    b = propagate_errors(c, e, jacobian_zero=False, jvp=lambda i, v: torch.zeros_like(v))
    assert torch.equal(a, b)
    with pytest.raises(ValueError):
        propagate_errors(c, e, jacobian_zero=False)
