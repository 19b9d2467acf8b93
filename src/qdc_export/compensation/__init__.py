"""Timestep-aware cumulative error compensation (TCEC, reconstructed; see docs/method.md) as a pure-torch library.

coefficients: each supported sampler's update as x_{n-1} = A x_n + B out_n (+ multistep terms), by step row.
cumulative:   first-order (J ~ 0) propagation of per-step output errors to the latent, and its closed form.
tables:       CompensationTables (by step row, reached through the timestep value) with apply / undo / is_identity,
              and CompensationHead, the runtime reference  eps_hat = scale[r] eps_q - prev[r] state - bias[r],
              state' = raw eps_q; the formula is written once (compensation_formula) for the head, fold and fit.
fit:          closed-form ridge fits (ptqd, tac, tcec-m0, tcec-m1-analytic, tcec-m1-fitted) from FP/quantized runs.
"""

from qdc_export.compensation.coefficients import (
    SUPPORTED_SCHEDULERS,
    SamplerCoefficients,
    sampler_coefficients,
)
from qdc_export.compensation.cumulative import error_gains, predicted_final_error, propagate_errors
from qdc_export.compensation.fit import FitOptions, PairedTrajectories, fit_from_pairs, fit_tables, ridge_fit
from qdc_export.compensation.tables import (
    METHODS,
    CompensationHead,
    CompensationTables,
    apply_compensation,
    compensate,
    lookup_tolerance,
    timestep_to_row,
)

__all__ = [
    "METHODS",
    "SUPPORTED_SCHEDULERS",
    "CompensationHead",
    "CompensationTables",
    "FitOptions",
    "PairedTrajectories",
    "SamplerCoefficients",
    "apply_compensation",
    "compensate",
    "error_gains",
    "fit_from_pairs",
    "fit_tables",
    "lookup_tolerance",
    "predicted_final_error",
    "propagate_errors",
    "ridge_fit",
    "sampler_coefficients",
    "timestep_to_row",
]
