"""Closed-form (ridge least-squares) fitting of compensation tables from paired FP / quantized trajectories.

Legend (code symbol -> docs/method.md notation)
    row ``i``              step in scheduler order = method.md's step n = N - i; tables are indexed by step row
    ``x_fp[i]``            x_n, FP trajectory latent entering row i
    ``x_q[i]``             x~_n (uncompensated run) or x^_n (run with the compensation fitted so far)
    ``a`` / ``eps_q[i]``   eps~_n = quantized RAW output at x_q[i]
    ``p``                  eps~_{n+1}: previous row's RAW quantized output (zeros at row 0)
    ``eps_fp[i]``          eps(x_q[i], t_n): FP output at the *same input* as the quantized model
    ``y``                  the fit target: eps_fp[i] ("same-input") or the cumulative target
                           eps*_n = eps(x^_n) - g (A_n / B_n) (x^_n - x_n)  ("cumulative")
    ``r = a - y``          the error to explain;  the model is  r ~ K a + L p + b  so that
                           eps^ = (1 - K) a - L p - b  =  scale a - prev p - bias   (tables.py semantics)
    ``K``, ``L``, ``b``    K_{n,c}, L_{n,c}, b_{n,c}; ``rho[i] = A[i] B[i-1] / B[i]`` is rho_n = A_n B_{n+1} / B_n
    ``ridge``              lambda relative to the energy: the normal matrix G gets  + ridge * diag(G)

Sums run over batch and spatial positions, separately per channel (PTQD pools channels for its k).

Variants
    ptqd               k_n = sum(y r) / (sum(y^2) (1 + ridge)) pooled over everything; scale = 1 / (1 + k_n);
                       bias[c] = mean over batch and pixels of (a / (1 + k_n) - y). prev = 0.
    tac                Reconstruction of TAC-Diffusion's per-step, per-channel convex fit with a relative error
                       term: minimise sum_w (eps^ - y)^2 with weights w = 1 + beta * m_c / (y^2 + delta * m_c),
                       m_c = mean(y^2) over the channel, i.e. absolute squared error plus beta times a relative
                       squared error floored at delta; closed-form weighted ridge for K (and b with fit_bias).
                       Fitted sequentially along the corrected trajectory. SIMPLIFICATION: TAC applies its
                       correction only where |eps~| is large; here it is applied everywhere (no mask), since the
                       runtime hook is a pure per-channel affine map.
    tcec-m0            K = sum(a r) / (sum(a^2) (1 + ridge)) per channel (with fit_bias: 2x2 ridge for K, b).
    tcec-m1-analytic   K as m0; prev[i] = rho[i] * K[i-1] (prev[0] = 0). CAVEAT (method.md): this double-counts
                       when step n+1 is itself corrected by (1 - K_{n+1}), which it is at runtime; an ablation.
    tcec-m1-fitted     two-tap: per channel a 2x2 (3x3 with fit_bias) ridge solve for (K, L, b) of r on
                       (a, p, 1), sequentially along the corrected trajectory; target "same-input" or
                       "cumulative" (g in (0, 1], default 0.5). For multistep samplers A_n / B_n is the
                       current-output coefficient ratio only (documented approximation).
    none               identity tables (still runs the trajectories and reports the residual statistics).

Nonlinear updates (the model's own scheduler with ``clip_sample`` or ``thresholding``): the trajectories step
with the scheduler exactly as configured (what the client runs). Two things in the fit need the update's linear
form, and get it where the update *is* linear: (1) the coefficients A, B (cumulative target, m1-analytic) are
those of the same scheduler without clipping/thresholding, i.e. the update's Jacobian where x0 is inside the clip
range; (2) with ``clip_sample`` the update is elementwise and piecewise linear in the output, with a per-pixel gain
that depends on whether the predicted x0 is clipped (DDPM: 0, the posterior mean then ignores the output; DDIM:
sqrt(1 - abar_prev), its direction term keeps the raw output). The per-channel regressions (tcec, tac) weight
each pixel's squared error by its squared gain (``_output_gain``, measured with the scheduler's own ``step`` at
the FP output), i.e. they minimise the error that reaches the next latent. Thresholding rescales by a per-sample
percentile (not elementwise); only (1) applies there.

Sequential fitting (default for tac and tcec-m1-fitted, optional for the others): at row i the quantized run is
at x^_i produced by the compensation already fitted for rows < i, row i is fitted, and the sampler is stepped
with the compensated output (float32 table values, same op order as the runtime head, so the calibration run is
the deployed run). Non-sequential: the quantized run is stepped with its raw output.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from qdc_export.compensation.coefficients import SamplerCoefficients, sampler_coefficients
from qdc_export.compensation.tables import METHODS, CompensationTables, apply_row
from qdc_export.errors import UserError
from qdc_export.sampling import Episode, seeded_step_kwargs

__all__ = ["FitOptions", "PairedTrajectories", "fit_from_pairs", "fit_tables", "ridge_fit"]

Denoiser = Callable[..., torch.Tensor]
SEQUENTIAL_BY_DEFAULT = ("tac", "tcec-m1-fitted")


@dataclasses.dataclass(frozen=True, kw_only=True)
class FitOptions:
    """Validated fitting options (frozen, keyword-only; recorded in ``CompensationTables.options``)."""

    ridge: float = 1e-3
    fit_bias: bool = False
    target: str = "same-input"  # or "cumulative"
    g: float = 0.5
    sequential: bool | None = None  # None -> method default (True for tac, tcec-m1-fitted)
    tac_beta: float = 1.0
    tac_delta: float = 0.1

    def __post_init__(self) -> None:
        if not (self.ridge >= 0 and np.isfinite(self.ridge)):
            raise UserError(f"ridge must be a finite number >= 0, got {self.ridge}")
        if self.target not in ("same-input", "cumulative"):
            raise UserError(f"target must be 'same-input' or 'cumulative', got {self.target!r}")
        if not (0 < self.g <= 1):
            raise UserError(f"g must be in (0, 1], got {self.g}")
        if self.tac_beta < 0 or self.tac_delta <= 0:
            raise UserError("tac_beta must be >= 0 and tac_delta > 0")

    def resolved_sequential(self, method: str) -> bool:
        return method in SEQUENTIAL_BY_DEFAULT if self.sequential is None else bool(self.sequential)


@dataclasses.dataclass
class PairedTrajectories:
    """Per-row calibration data (lists of length N, scheduler order; ``x_*`` have N+1 entries incl. the final).

    ``eps_fp[i]`` is the FP output at ``x_q[i]`` (same-input target), ``eps_q[i]`` the RAW quantized output at
    ``x_q[i]``, ``eps_hat[i]`` what was handed to the sampler (== eps_q[i] in a non-sequential run).
    """

    coeffs: SamplerCoefficients
    x_fp: list[torch.Tensor]
    x_q: list[torch.Tensor]
    eps_fp: list[torch.Tensor]
    eps_q: list[torch.Tensor]
    eps_hat: list[torch.Tensor] = dataclasses.field(default_factory=list)
    sequential: bool = False


# ---- numerics ----------------------------------------------------------------------------------------------------
def _csum(u: torch.Tensor) -> torch.Tensor:
    """Sum over every dim but the channel dim 1 -> [C] float64."""
    u = u.to(torch.float64)
    return u.transpose(0, 1).reshape(u.shape[1], -1).sum(dim=1)


def ridge_fit(
    features: list[torch.Tensor], r: torch.Tensor, ridge: float, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-channel ridge least squares of r on the features: coef [F, C] float64.

    Minimises sum w (r - sum_j coef_j f_j)^2 + ridge * sum_j G_jj coef_j^2 (G the weighted Gram matrix), i.e. the
    ridge is relative to each feature's energy. A feature with zero energy in a channel gets coefficient 0.
    """
    w = torch.ones_like(r, dtype=torch.float64) if weights is None else weights.to(torch.float64)
    nf = len(features)
    c = r.shape[1]
    G = torch.zeros(c, nf, nf, dtype=torch.float64)
    h = torch.zeros(c, nf, dtype=torch.float64)
    f64 = [f.to(torch.float64).expand_as(r) for f in features]
    r64 = r.to(torch.float64)
    for j in range(nf):
        h[:, j] = _csum(w * f64[j] * r64)
        for k in range(j, nf):
            G[:, j, k] = G[:, k, j] = _csum(w * f64[j] * f64[k])
    diag = torch.diagonal(G, dim1=1, dim2=2)
    empty = diag <= 0
    G = G + torch.diag_embed(torch.where(empty, torch.ones_like(diag), ridge * diag))
    h = torch.where(empty, torch.zeros_like(h), h)
    coef: torch.Tensor = torch.linalg.solve(G, h.unsqueeze(-1)).squeeze(-1).T.contiguous()
    return coef


def _rms(u: torch.Tensor) -> float:
    return float(u.to(torch.float64).pow(2).mean().sqrt())


def _bc(row: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[C] row -> [1, C, 1, ...] in ``like``'s dtype (the runtime head's broadcast)."""
    return row.reshape((1, -1) + (1,) * (like.dim() - 2)).to(like.dtype)


class _RowFitter:
    """Fits one table row at a time; keeps K of the previous row for tcec-m1-analytic."""

    def __init__(self, method: str, coeffs: SamplerCoefficients, opts: FitOptions, channels: int):
        self.method, self.coeffs, self.opts, self.c = method, coeffs, opts, channels
        self.prev_K = torch.zeros(channels, dtype=torch.float64)

    def target(self, i: int, eps_fp: torch.Tensor, x_q: torch.Tensor, x_fp: torch.Tensor) -> torch.Tensor:
        if self.opts.target == "same-input":
            return eps_fp
        A, B = float(self.coeffs.A[i]), float(self.coeffs.B[i])
        if B == 0:
            return eps_fp
        d = x_q.to(torch.float64) - x_fp.to(torch.float64)
        return eps_fp.to(torch.float64) - (self.opts.g * A / B) * d

    def fit(
        self, i: int, a: torch.Tensor, p: torch.Tensor, y: torch.Tensor, active: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (scale, prev, bias) float64 [C] for row i. ``active``: per-pixel weights of the regressions (the
        update's squared gain in the output, see the module docstring); None = all ones."""
        m, o, c = self.method, self.opts, self.c
        a64, p64, y64 = a.to(torch.float64), p.to(torch.float64), y.to(torch.float64)
        r = a64 - y64
        one = torch.ones_like(a64)
        zeros = torch.zeros(c, dtype=torch.float64)
        if m == "none":
            return torch.ones(c, dtype=torch.float64), zeros, zeros
        if m == "ptqd":
            den = float((y64 * y64).sum()) * (1.0 + o.ridge)
            k = float((y64 * r).sum()) / den if den > 0 else 0.0
            scale = torch.full((c,), 1.0 / (1.0 + k), dtype=torch.float64)
            resid = a64 / (1.0 + k) - y64
            bias = _csum(resid) / (resid.numel() / c)
            return scale, zeros, bias
        weights = None
        if m == "tac":
            m_c = _csum(y64 * y64) / (y64.numel() / c)
            m_c = _bc(m_c, y64)
            weights = 1.0 + o.tac_beta * m_c / (y64 * y64 + o.tac_delta * m_c).clamp_min(1e-30)
        feats = [a64]
        if m == "tcec-m1-fitted":
            feats.append(p64)
        if o.fit_bias:
            feats.append(one)
        if active is not None:
            weights = active if weights is None else weights * active
        coef = ridge_fit(feats, r, o.ridge, weights)
        K = coef[0]
        L = coef[1] if m == "tcec-m1-fitted" else zeros
        b = coef[-1] if o.fit_bias else zeros
        if m == "tcec-m1-analytic":
            if i > 0 and self.coeffs.B[i] != 0:
                rho = self.coeffs.A[i] * self.coeffs.B[i - 1] / self.coeffs.B[i]
                L = rho * self.prev_K
            self.prev_K = K.clone()
        return 1.0 - K, L, b


def _linearized(scheduler: Any) -> tuple[Any, list[str]]:
    """The scheduler without x0 clipping / thresholding (for its linear coefficients) and what was turned off."""
    off = [k for k in ("clip_sample", "thresholding") if scheduler.config.get(k, False)]
    if not off:
        return scheduler, []
    return type(scheduler).from_config(scheduler.config, **{k: False for k in off}), off


def _output_gain(sched: Any, x: torch.Tensor, eps: torch.Tensor, t: Any, seed: int) -> torch.Tensor | None:
    """Squared per-pixel gain of the update in the model output, |d x_prev / d eps|^2, from the scheduler's own
    ``step`` (a finite difference, float64, identically seeded noise): the weights of the per-pixel squared errors
    that reach the next latent. None without ``clip_sample`` (the update is then linear: uniform weights).
    With clipping the update is elementwise and piecewise linear in eps, so the difference is exact away from the
    clip boundary: DDPM's posterior mean ignores eps where x0 is clipped (gain 0); DDIM keeps eps in its direction
    term there (gain sqrt(1 - abar_prev) instead of the linear B)."""
    if not sched.config.get("clip_sample", False):
        return None
    h = 1e-6  # float64: small enough that only pixels within 1e-6 of the clip boundary see a partial gain
    x64, eps64 = x.to(torch.float64), eps.to(torch.float64)

    def step(out: torch.Tensor) -> torch.Tensor:
        probe = copy.deepcopy(sched)  # step may advance a scheduler's internal counters
        prev: torch.Tensor = probe.step(out, t, x64, **seeded_step_kwargs(probe, seed, x.device)).prev_sample
        return prev.to(torch.float64)

    gain = (step(eps64 + h) - step(eps64)) / h
    return gain * gain


# ---- trajectories ------------------------------------------------------------------------------------------------
def fit_tables(
    method: str,
    quant_denoiser: Denoiser,
    fp_denoiser: Denoiser,
    scheduler: Any,
    num_steps: int,
    latents: torch.Tensor,
    *,
    options: FitOptions | None = None,
    seed: int = 0,
    return_trajectories: bool = False,
    **option_kwargs: Any,
) -> CompensationTables | tuple[CompensationTables, PairedTrajectories]:
    """Run the FP and the quantized(+compensation so far) sampler episodes from the same ``latents`` and fit tables.

    ``quant_denoiser(x, t)`` and ``fp_denoiser(x, t)`` return the model output that enters the sampler (with
    classifier-free guidance already applied by the caller: :meth:`Episode.output`). ``x`` is what
    ``scheduler.scale_model_input`` gives (the model input), ``t`` the scheduler's timestep value. ``latents`` is
    the initial unit noise (the episodes scale it by ``init_noise_sigma``). Stochastic steps (DDPM) get identically
    seeded generators in both episodes. Options: ``options=FitOptions(...)`` or the same names as keywords (ridge,
    fit_bias, target, g, sequential, tac_beta, tac_delta).
    """
    if method not in METHODS:
        raise UserError(f"compensation method {method!r} is not one of {', '.join(METHODS)}")
    if options is not None and option_kwargs:
        raise UserError("pass either options=FitOptions(...) or option keywords, not both")
    try:
        opts = options or FitOptions(**option_kwargs)
    except TypeError as exc:
        raise UserError(f"bad fit option: {exc}") from None
    linear, linearized = _linearized(scheduler)
    coeffs = sampler_coefficients(linear, num_steps)
    sequential = opts.resolved_sequential(method)

    fp_run, q_run = (Episode(scheduler, num_steps, latents, step_seed=seed) for _ in range(2))
    x_fp, x_q = fp_run.start.clone(), q_run.start.clone()
    c = latents.shape[1]
    fitter = _RowFitter(method, coeffs, opts, c)
    rows_s, rows_p, rows_b = [], [], []
    res_before, res_after, lat_err = [], [], []
    pairs = PairedTrajectories(coeffs, [x_fp], [x_q], [], [], [], sequential) if return_trajectories else None
    p = torch.zeros_like(latents)

    with torch.no_grad():
        for i, t in enumerate(q_run.timesteps):
            lat_err.append(_rms(x_q - x_fp) / max(_rms(x_fp), 1e-30))
            eps_fp_traj = fp_denoiser(fp_run.model_input(x_fp, t), t)
            eps_fp_same = fp_denoiser(q_run.model_input(x_q, t), t)
            a = quant_denoiser(q_run.model_input(x_q, t), t)
            if a.shape != x_q.shape or a.shape[1] != c:
                raise UserError(f"quant_denoiser returned shape {tuple(a.shape)}, expected {tuple(x_q.shape)}")
            y = fitter.target(i, eps_fp_same, x_q, x_fp)
            active = _output_gain(q_run.scheduler, x_q, eps_fp_same, t, seed)
            sc, pv, bs = (v.to(torch.float32) for v in fitter.fit(i, a, p, y, active))
            eps_hat = apply_row(sc, pv, bs, a, p)
            rms_y = max(_rms(y), 1e-30)
            res_before.append(_rms(a.to(torch.float64) - y) / rms_y)
            res_after.append(_rms(eps_hat.to(torch.float64) - y) / rms_y)
            rows_s.append(sc)
            rows_p.append(pv)
            rows_b.append(bs)
            if pairs is not None:
                pairs.eps_fp.append(eps_fp_same)
                pairs.eps_q.append(a)
                pairs.eps_hat.append(eps_hat)
            x_fp = fp_run.step(eps_fp_traj, t, x_fp)
            x_q = q_run.step(eps_hat if sequential else a, t, x_q)
            p = a
            if pairs is not None:
                pairs.x_fp.append(x_fp)
                pairs.x_q.append(x_q)
    final_err = _rms(x_q - x_fp) / max(_rms(x_fp), 1e-30)
    stats = {
        "residual_before": res_before,
        "residual_after": res_after,
        "latent_rel_error": lat_err + [final_err],
        "final_latent_rel_error": final_err,
        "trajectory": "compensated" if sequential else "uncompensated",
        "sampler": coeffs.kind,
        "calibration_batch": int(latents.shape[0]),
        "linearized": linearized,
    }
    tables = CompensationTables.from_rows(
        method, coeffs.timesteps, torch.stack(rows_s), torch.stack(rows_p), torch.stack(rows_b),
        options={**dataclasses.asdict(opts), "sampler": coeffs.kind, "sequential": sequential}, stats=stats,
    )
    if pairs is not None:
        return tables, pairs
    return tables


def fit_from_pairs(
    method: str, pairs: PairedTrajectories, *, options: FitOptions | None = None, **option_kwargs: Any
) -> CompensationTables:
    """Fit tables from already collected ``PairedTrajectories`` without re-running any model (the fit is made on
    that fixed trajectory, i.e. non-sequentially, whatever the method)."""
    if method not in METHODS:
        raise UserError(f"compensation method {method!r} is not one of {', '.join(METHODS)}")
    opts = options or FitOptions(**option_kwargs)
    coeffs = pairs.coeffs
    n = coeffs.num_steps
    if len(pairs.eps_q) != n or len(pairs.eps_fp) != n or len(pairs.x_q) < n or len(pairs.x_fp) < n:
        raise UserError(f"PairedTrajectories must hold {n} steps")
    c = pairs.eps_q[0].shape[1]
    fitter = _RowFitter(method, coeffs, opts, c)
    rows, before, after = [], [], []
    p = torch.zeros_like(pairs.eps_q[0])
    for i in range(n):
        a = pairs.eps_q[i]
        y = fitter.target(i, pairs.eps_fp[i], pairs.x_q[i], pairs.x_fp[i])
        sc, pv, bs = (v.to(torch.float32) for v in fitter.fit(i, a, p, y))
        eps_hat = apply_row(sc, pv, bs, a, p)
        rms_y = max(_rms(y), 1e-30)
        before.append(_rms(a.to(torch.float64) - y) / rms_y)
        after.append(_rms(eps_hat.to(torch.float64) - y) / rms_y)
        rows.append((sc, pv, bs))
        p = a
    s, pv, b = (torch.stack([r[j] for r in rows]) for j in range(3))
    return CompensationTables.from_rows(
        method, coeffs.timesteps, s, pv, b,
        options={**dataclasses.asdict(opts), "sampler": coeffs.kind, "sequential": False},
        stats={"residual_before": before, "residual_after": after, "trajectory": "given pairs"},
    )
