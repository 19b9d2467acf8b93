"""First-order propagation of per-step model-output errors to the latent (method.md, "Propagation").

Legend (code symbol -> docs/method.md notation)
    row ``i``                 step in scheduler order; row ``i`` is method.md's step n = N - i
    ``per_step_errors[i]``    e_n = eps~(x, t_n) - eps(x, t_n), the output error at row ``i``
    ``d_before[i]``           d_n = x~_n - x_n, the latent error entering row ``i`` (d_N = 0 at row 0)
    ``d_after[i]``            d_{n-1}, the latent error after row ``i``; ``d_after[N-1]`` is the final error
    ``coeffs.A/B/C/A_prev``   A_n, B_n (and the multistep terms, see coefficients.py)
    ``jvp(i, v)``             J_n v, the denoiser Jacobian at row ``i`` applied to v (only if not J ~ 0)
    ``error_gains(coeffs)[i]`` G_k: final error = sum_k G_k e_k under J ~ 0 (the closed-form sum)

Recurrence (all arrays indexed by step row):
    e_eff[i]   = e[i] + J_i d_before[i]                 (J_i d = 0 when jacobian_zero)
    d_after[i] = A[i] d_before[i] + B[i] e_eff[i] + A_prev[i] d_before[i-1] + C[i] e_eff[i-1]
For a first-order sampler with J ~ 0 this is  d_final = sum_k [prod_{j>k} A_j] B_k e_k;  for DDIM it equals
method.md's sqrt(abar_final) * sum_k (s_{k-1} - s_k) e_k with s = sqrt((1-abar)/abar).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from qdc_export.compensation.coefficients import SamplerCoefficients

__all__ = ["error_gains", "predicted_final_error", "propagate_errors"]


def _as_list(
    coeffs: SamplerCoefficients, per_step_errors: torch.Tensor | Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    errs = list(per_step_errors) if not isinstance(per_step_errors, torch.Tensor) else list(per_step_errors.unbind(0))
    if len(errs) != coeffs.num_steps:
        raise ValueError(f"per_step_errors has {len(errs)} steps, the sampler has {coeffs.num_steps}")
    return errs


def propagate_errors(
    coeffs: SamplerCoefficients,
    per_step_errors: torch.Tensor | Sequence[torch.Tensor],
    jacobian_zero: bool = True,
    jvp: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Latent error after each step, ``d_after`` [N, *shape] (row ``i`` = error of the latent leaving row ``i``).

    ``per_step_errors``: [N, *shape] tensor or N tensors, row order = scheduler order. With
    ``jacobian_zero=False`` a ``jvp(i, v) -> J_i v`` callable is required (first-order propagation through the
    denoiser Jacobian). Computed in float64.
    """
    if not jacobian_zero and jvp is None:
        raise ValueError("jacobian_zero=False needs a jvp(i, v) callable")
    errs = [e.to(torch.float64) for e in _as_list(coeffs, per_step_errors)]
    d_before = torch.zeros_like(errs[0])
    d_before_prev = torch.zeros_like(errs[0])
    e_eff_prev = torch.zeros_like(errs[0])
    out = []
    for i, e in enumerate(errs):
        e_eff = e if jvp is None or jacobian_zero else e + jvp(i, d_before).to(torch.float64)
        d = coeffs.A[i] * d_before + coeffs.B[i] * e_eff
        if coeffs.A_prev[i] != 0 or coeffs.C[i] != 0:
            d = d + coeffs.A_prev[i] * d_before_prev + coeffs.C[i] * e_eff_prev
        out.append(d)
        d_before_prev, d_before, e_eff_prev = d_before, d, e_eff
    return torch.stack(out)


def error_gains(coeffs: SamplerCoefficients) -> np.ndarray:
    """G [N] float64 with d_final = sum_k G[k] e_k under J ~ 0 (unit impulses through the recurrence)."""
    n = coeffs.num_steps
    eye = torch.eye(n, dtype=torch.float64)  # row i = e at step i, column k = impulse at step k
    gains: np.ndarray = propagate_errors(coeffs, eye)[-1].numpy()
    return gains


def predicted_final_error(
    coeffs: SamplerCoefficients, per_step_errors: torch.Tensor | Sequence[torch.Tensor]
) -> torch.Tensor:
    """Closed form d_final = sum_k G_k e_k (J ~ 0), float64, shape of one error tensor."""
    errs = _as_list(coeffs, per_step_errors)
    g = error_gains(coeffs)
    total = torch.zeros_like(errs[0], dtype=torch.float64)
    for gk, e in zip(g, errs):
        total = total + float(gk) * e.to(torch.float64)
    return total
