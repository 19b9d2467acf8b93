"""Sampler coefficients: each supported diffusers scheduler's update written as a linear map.

Legend (code symbol -> docs/method.md notation)
    row ``i``            step index in *scheduler order* (row 0 = first, noisiest step);
                         method.md counts down, so row ``i`` is its step ``n = N - i``
    ``timesteps[i]``     the timestep value diffusers passes to the model at row ``i`` (t_n)
    ``x`` (row i)        the sampler's latent entering row ``i`` (x_n); ``x`` after row ``i`` is x_{n-1}
    ``out`` (row i)      the model output entering the sampler at row ``i`` (eps_n; the velocity for
                         flow matching, v for v-prediction: whatever ``prediction_type`` says)
    ``A[i]``, ``B[i]``   A_n, B_n of  x_{n-1} = A_n x_n + B_n eps_n
    ``C[i]``             coefficient on the *previous* model output eps_{n+1} (row ``i-1``); multistep only
    ``A_prev[i]``        coefficient on the *previous* latent x_{n+1} (row ``i-1``); multistep only
    ``abar``             alphas_cumprod (alpha-bar); ``sigma`` the Euler/Karras sigma sqrt((1-abar)/abar)

So every supported sampler is, per row ``i``:

    x_after[i] = A[i] x[i] + B[i] out[i] + A_prev[i] x[i-1] + C[i] out[i-1]

with the ``i-1`` terms absent (coefficients 0) for first-order samplers and at row 0. All arrays are
indexed by *step row*, never by timestep value.

Which space ``x`` lives in
    DDIM / DDPM / DPM-Solver++ : the diffusers latent as passed to ``scheduler.step`` (``scale_model_input``
        is the identity for them).
    EulerDiscrete : the *unscaled* sigma-space latent that ``scheduler.step`` takes and returns,
        x = x0 + sigma * eps. The model sees ``x / sqrt(sigma^2 + 1)`` (``scale_model_input``); the
        coefficients here act on the unscaled x, not on the model input.
    FlowMatchEulerDiscrete : the flow latent x = (1 - sigma) x0 + sigma * noise; ``out`` is the velocity.

Per-scheduler derivations (each read from the diffusers 0.42 ``step`` source, and each checked against
``step`` in tests/test_compensation_coefficients.py)
    DDIM (eta = 0, the default ``step`` call): x0 = px x + po out, eps = qx x + qo out (prediction type),
        x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev) eps; the previous timestep is
        t - num_train_timesteps // N, with ``final_alpha_cumprod`` below 0 (exactly as the scheduler).
    DDPM: the *posterior mean* mu(x_t, x0) of formula (7) of Ho et al., i.e. ``step`` without its added
        noise. The noise term is the same for the FP and the quantized run when both use the same generator,
        so it cancels in the latent error d_n and the J~0 propagation stays exact. Deterministic DDPM in
        this sense is not DDIM: A, B are the eta = 1 posterior-mean coefficients.
    EulerDiscrete (s_churn = 0, the default ``step`` call): x_prev = x + (sigma_{n-1} - sigma_n) * d,
        d = (x - x0) / sigma_n; for epsilon A = 1, B = sigma_{n-1} - sigma_n.
    DPM-Solver++ (2M, midpoint or heun, deterministic): m_n = px_n x_n + po_n out_n is the data prediction;
        x_prev = (sigma_t / sigma_s0) x + c0 m_n + c1 m_{n+1} with c0, c1 from the scheduler's own
        lambda = log(alpha) - log(sigma); the first step and (per ``lower_order_final`` /
        ``final_sigmas_type``) the last step are first order (c1 = 0). Because m_{n+1} carries x_{n+1},
        the previous *latent* enters too: A_prev = c1 px_{n+1}, C = c1 po_{n+1}.
    FlowMatchEulerDiscrete (deterministic): x_prev = x + (sigma_{n-1} - sigma_n) v, A = 1, B = sigma_{n-1} - sigma_n.

Anything else (other schedulers, DDIM/DDPM with clip_sample or thresholding, stochastic variants,
solver_order 3, learned variance) raises ``UserError``: those updates are not linear in (x, out).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import numpy as np

from qdc_export.errors import UserError

__all__ = ["SUPPORTED_SCHEDULERS", "SamplerCoefficients", "sampler_coefficients"]

SUPPORTED_SCHEDULERS = (
    "DDIMScheduler",
    "DDPMScheduler",
    "EulerDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "FlowMatchEulerDiscreteScheduler",
)


@dataclasses.dataclass(frozen=True, eq=False)
class SamplerCoefficients:
    """Per-row linear sampler coefficients (see the module legend). All arrays float64 of length N, row order =
    scheduler order."""

    kind: str  # "ddim" | "ddpm-mean" | "euler" | "dpmsolver++2m" | "flow-euler"
    prediction_type: str  # what ``out`` is: "epsilon", "v_prediction", "sample", "flow_prediction"
    timesteps: np.ndarray  # [N] float64, exactly the values in scheduler.timesteps after set_timesteps
    A: np.ndarray  # [N]
    B: np.ndarray  # [N]
    C: np.ndarray  # [N] coefficient on the previous output (row i-1); zeros for first-order samplers
    A_prev: np.ndarray  # [N] coefficient on the previous latent (row i-1); zeros for first-order samplers

    def __post_init__(self) -> None:
        n = len(self.timesteps)
        for name in ("timesteps", "A", "B", "C", "A_prev"):
            arr = np.ascontiguousarray(np.asarray(getattr(self, name), dtype=np.float64))
            if arr.shape != (n,):
                raise ValueError(f"SamplerCoefficients.{name} has shape {arr.shape}, expected ({n},)")
            arr.setflags(write=False)
            object.__setattr__(self, name, arr)
        if n and (self.C[0] != 0 or self.A_prev[0] != 0):
            raise ValueError("SamplerCoefficients: row 0 has no previous step, C[0] and A_prev[0] must be 0")

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @property
    def is_multistep(self) -> bool:
        return bool(np.any(self.C != 0) or np.any(self.A_prev != 0))

    def step(self, i: int, x: Any, out: Any, x_prev: Any = None, out_prev: Any = None) -> Any:
        """Apply row ``i`` of the linear update to tensors (torch or numpy); ``*_prev`` are row ``i-1``'s."""
        y = self.A[i] * x + self.B[i] * out
        if self.C[i] != 0 or self.A_prev[i] != 0:
            if x_prev is None or out_prev is None:
                raise ValueError(f"row {i} of a multistep sampler needs x_prev and out_prev")
            y = y + self.A_prev[i] * x_prev + self.C[i] * out_prev
        return y


def _unsupported(scheduler: Any, why: str) -> UserError:
    return UserError(f"compensation: {type(scheduler).__name__} is not supported ({why})")


def _prepared(scheduler: Any, num_inference_steps: int | None, set_timesteps_kwargs: dict[str, Any]) -> Any:
    sched = copy.deepcopy(scheduler)
    if num_inference_steps is not None:
        sched.set_timesteps(num_inference_steps, **set_timesteps_kwargs)
    elif getattr(sched, "timesteps", None) is None or getattr(sched, "num_inference_steps", None) is None:
        raise UserError("compensation: pass num_inference_steps or call scheduler.set_timesteps first")
    return sched


def _x0_from_ddpm_like(prediction_type: str, abar: float) -> tuple[float, float, float, float]:
    """(px, po, qx, qo) with x0 = px x + po out and eps = qx x + qo out at cumulative alpha ``abar``."""
    a, b = np.sqrt(abar), np.sqrt(1.0 - abar)
    if prediction_type == "epsilon":
        return 1.0 / a, -b / a, 0.0, 1.0
    if prediction_type == "v_prediction":
        return a, -b, b, a
    if prediction_type == "sample":
        return 0.0, 1.0, 1.0 / b, -a / b
    raise ValueError(prediction_type)


def _check_linear_x0(scheduler: Any) -> None:
    cfg = scheduler.config
    if getattr(cfg, "thresholding", False):
        raise _unsupported(scheduler, "thresholding=True makes the update nonlinear; set thresholding=False")
    if getattr(cfg, "clip_sample", False):
        raise _unsupported(scheduler, "clip_sample=True makes the update nonlinear; set clip_sample=False")
    if cfg.prediction_type not in ("epsilon", "v_prediction", "sample"):
        raise _unsupported(scheduler, f"prediction_type={cfg.prediction_type!r}")


def _ddim(sched: Any) -> SamplerCoefficients:
    _check_linear_x0(sched)
    abar = sched.alphas_cumprod.double().cpu().numpy()
    final = float(sched.final_alpha_cumprod)
    ratio = sched.config.num_train_timesteps // sched.num_inference_steps
    ts = sched.timesteps.cpu().numpy()
    A, B = np.zeros(len(ts)), np.zeros(len(ts))
    for i, t in enumerate(ts):
        t = int(t)
        tp = t - ratio
        a_t = abar[t]
        a_p = abar[tp] if tp >= 0 else final
        px, po, qx, qo = _x0_from_ddpm_like(sched.config.prediction_type, a_t)
        A[i] = np.sqrt(a_p) * px + np.sqrt(1.0 - a_p) * qx
        B[i] = np.sqrt(a_p) * po + np.sqrt(1.0 - a_p) * qo
    z = np.zeros(len(ts))
    return SamplerCoefficients("ddim", sched.config.prediction_type, ts.astype(np.float64), A, B, z, z)


def _ddpm(sched: Any) -> SamplerCoefficients:
    _check_linear_x0(sched)
    if sched.config.variance_type in ("learned", "learned_range"):
        raise _unsupported(sched, f"variance_type={sched.config.variance_type!r}")
    abar = sched.alphas_cumprod.double().cpu().numpy()
    ts = sched.timesteps.cpu().numpy()
    A, B = np.zeros(len(ts)), np.zeros(len(ts))
    for i, t in enumerate(ts):
        t = int(t)
        tp = int(sched.previous_timestep(t))
        a_t = abar[t]
        a_p = abar[tp] if tp >= 0 else 1.0
        cur_alpha = a_t / a_p
        cur_beta = 1.0 - cur_alpha
        c_x0 = np.sqrt(a_p) * cur_beta / (1.0 - a_t)
        c_x = np.sqrt(cur_alpha) * (1.0 - a_p) / (1.0 - a_t)
        px, po, _, _ = _x0_from_ddpm_like(sched.config.prediction_type, a_t)
        A[i] = c_x + c_x0 * px
        B[i] = c_x0 * po
    z = np.zeros(len(ts))
    return SamplerCoefficients("ddpm-mean", sched.config.prediction_type, ts.astype(np.float64), A, B, z, z)


def _euler(sched: Any) -> SamplerCoefficients:
    pt = sched.config.prediction_type
    sig = sched.sigmas.double().cpu().numpy()
    ts = sched.timesteps.double().cpu().numpy()
    n = len(ts)
    A, B = np.zeros(n), np.zeros(n)
    for i in range(n):
        s, dt = sig[i], sig[i + 1] - sig[i]
        if pt == "epsilon":
            A[i], B[i] = 1.0, dt
        elif pt == "v_prediction":  # d = x s/(s^2+1) + v/sqrt(s^2+1)
            A[i], B[i] = 1.0 + dt * s / (s * s + 1.0), dt / np.sqrt(s * s + 1.0)
        elif pt in ("sample", "original_sample"):  # d = (x - out) / s
            A[i], B[i] = 1.0 + dt / s, -dt / s
        else:
            raise _unsupported(sched, f"prediction_type={pt!r}")
    z = np.zeros(n)
    return SamplerCoefficients("euler", pt, ts, A, B, z, z)


def _flow_euler(sched: Any) -> SamplerCoefficients:
    if getattr(sched.config, "stochastic_sampling", False):
        raise _unsupported(sched, "stochastic_sampling=True")
    sig = sched.sigmas.double().cpu().numpy()
    ts = sched.timesteps.double().cpu().numpy()
    n = len(ts)
    z = np.zeros(n)
    return SamplerCoefficients("flow-euler", "flow_prediction", ts, np.ones(n), sig[1 : n + 1] - sig[:n], z, z)


def _dpmpp(sched: Any) -> SamplerCoefficients:
    cfg = sched.config
    if cfg.algorithm_type != "dpmsolver++":
        raise _unsupported(sched, f"algorithm_type={cfg.algorithm_type!r}; only 'dpmsolver++' is linear here")
    if cfg.solver_order not in (1, 2):
        raise _unsupported(sched, f"solver_order={cfg.solver_order}; only 1 and 2")
    if cfg.thresholding:
        raise _unsupported(sched, "thresholding=True makes the update nonlinear")
    if cfg.variance_type in ("learned", "learned_range"):
        raise _unsupported(sched, f"variance_type={cfg.variance_type!r}")
    pt = cfg.prediction_type
    if pt not in ("epsilon", "v_prediction", "sample", "flow_prediction"):
        raise _unsupported(sched, f"prediction_type={pt!r}")
    sig = sched.sigmas.double().cpu().numpy()
    ts = sched.timesteps.double().cpu().numpy()
    n = len(ts)

    def alpha_sigma(s: float) -> tuple[float, float]:
        if cfg.use_flow_sigmas:
            return 1.0 - s, s
        al = 1.0 / np.sqrt(s * s + 1.0)
        return al, s * al

    def x0_coeffs(i: int) -> tuple[float, float]:  # m_i = px x_i + po out_i
        al, sg = alpha_sigma(sig[i])
        if pt == "epsilon":
            return 1.0 / al, -sg / al
        if pt == "v_prediction":
            return al, -sg
        if pt == "sample":
            return 0.0, 1.0
        return 1.0, -sig[i]  # flow_prediction

    A, B, C, Ap = np.zeros(n), np.zeros(n), np.zeros(n), np.zeros(n)
    with np.errstate(divide="ignore", invalid="ignore"):
        for i in range(n):
            lower_order_final = (i == n - 1) and (
                cfg.euler_at_final or (cfg.lower_order_final and n < 15) or cfg.final_sigmas_type == "zero"
            )
            first_order = cfg.solver_order == 1 or i < 1 or lower_order_final
            al_t, sg_t = alpha_sigma(sig[i + 1])
            al_0, sg_0 = alpha_sigma(sig[i])
            lam_t = np.log(al_t) - np.log(sg_t)
            lam_0 = np.log(al_0) - np.log(sg_0)
            h = lam_t - lam_0
            phi = -al_t * (np.exp(-h) - 1.0)  # coefficient on D0
            c0, c1 = phi, 0.0
            if not first_order:
                al_1, sg_1 = alpha_sigma(sig[i - 1])
                lam_1 = np.log(al_1) - np.log(sg_1)
                r0 = (lam_0 - lam_1) / h
                if cfg.solver_type == "midpoint":
                    psi = 0.5 * phi
                elif cfg.solver_type == "heun":
                    psi = al_t * ((np.exp(-h) - 1.0) / h + 1.0)
                else:
                    raise _unsupported(sched, f"solver_type={cfg.solver_type!r}")
                # x = ratio x + phi D0 + psi D1, D0 = m0, D1 = (m0 - m1) / r0
                c0, c1 = phi + psi / r0, -psi / r0
            px0, po0 = x0_coeffs(i)
            A[i] = sg_t / sg_0 + c0 * px0
            B[i] = c0 * po0
            if c1 != 0.0:
                px1, po1 = x0_coeffs(i - 1)
                Ap[i] = c1 * px1
                C[i] = c1 * po1
    for name, arr in (("A", A), ("B", B), ("C", C), ("A_prev", Ap)):
        if not np.all(np.isfinite(arr)):
            raise _unsupported(sched, f"non-finite {name} coefficient for this schedule")
    return SamplerCoefficients("dpmsolver++2m", pt, ts, A, B, C, Ap)


def sampler_coefficients(
    scheduler: Any, num_inference_steps: int | None = None, **set_timesteps_kwargs: Any
) -> SamplerCoefficients:
    """Read the linear update coefficients of ``scheduler`` for ``num_inference_steps`` steps.

    The scheduler is deep-copied (the caller's object is not touched). If ``num_inference_steps`` is None the
    copy's current ``set_timesteps`` state is used. Extra keyword arguments go to ``set_timesteps`` (``mu`` for
    dynamically shifted flow schedules, for instance). Unsupported schedulers or configurations raise
    ``UserError``.
    """
    name = type(scheduler).__name__
    import diffusers  # lazy: only here to recognise the scheduler classes

    dispatch = (
        (diffusers.DDIMScheduler, _ddim),
        (diffusers.DDPMScheduler, _ddpm),
        (diffusers.EulerDiscreteScheduler, _euler),
        (diffusers.DPMSolverMultistepScheduler, _dpmpp),
        (diffusers.FlowMatchEulerDiscreteScheduler, _flow_euler),
    )
    for cls, fn in dispatch:
        if type(scheduler) is cls:
            return fn(_prepared(scheduler, num_inference_steps, set_timesteps_kwargs))
    raise UserError(
        f"compensation: scheduler {name} is not supported (supported: {', '.join(SUPPORTED_SCHEDULERS)})"
    )
