"""CompensationTables' own runtime (apply, undo, is_identity) against the formula written out in numpy
(docs/method.md): eps_hat = scale[r] eps_q - prev[r] state - bias[r], eps_q = (eps_hat + prev[r] state + bias[r]) / scale[r]."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qdc_export.compensation import CompensationTables
from qdc_export.errors import UserError

ATOL = 1e-5  # float32 rounding of a multiply-add and its inverse on values of a few units


def _tables(prev_scale: float = 0.1, zero_scale_row: int | None = None) -> CompensationTables:
    g = np.random.default_rng(0)
    n, c = 4, 3
    scale = 1 + 0.1 * g.standard_normal((n, c))
    if zero_scale_row is not None:
        scale[zero_scale_row, 1] = 0.0
    return CompensationTables.from_rows("tcec-m1-fitted", [750.0, 500.0, 250.0, 0.0], scale,
                                        prev_scale * g.standard_normal((n, c)), 0.1 * g.standard_normal((n, c)))


def _numpy_head(tables, eps, rows, state):
    s, p, b = (getattr(tables, k)[rows][:, :, None, None].astype(np.float64) for k in ("scale", "prev", "bias"))
    return s * eps - p * state - b


def _report(got, expected):
    err = np.abs(np.asarray(got, np.float64) - expected)
    return f"max {err.max():.3g} mean {err.mean():.3g} p99 {np.quantile(err, 0.99):.3g} > atol {ATOL}"


def test_apply_and_undo_match_the_formula_and_invert_each_other():
    tables = _tables()
    g = torch.Generator().manual_seed(1)
    eps, state = torch.randn(5, 3, 4, 4, generator=g), torch.randn(5, 3, 4, 4, generator=g)
    t = torch.tensor([750.0, 500.0, 250.0, 0.0, 600.0])  # 600 is off the schedule: the identity row
    rows = np.array([0, 1, 2, 3, 4])
    out, state_out = tables.apply(eps, t, state)
    expected = _numpy_head(tables, eps.double().numpy(), rows, state.double().numpy())
    assert np.abs(out.double().numpy() - expected).max() <= ATOL, _report(out, expected)
    assert torch.equal(state_out, eps)  # the state carried on is the RAW output
    back = tables.undo(out, t, state)
    assert np.abs(back.double().numpy() - eps.double().numpy()).max() <= ATOL, _report(back, eps.double().numpy())


def test_undo_refuses_what_cannot_be_undone():
    with pytest.raises(UserError, match="scale 0"):
        _tables(prev_scale=0.0, zero_scale_row=2).undo(torch.ones(1, 3, 2, 2), torch.tensor([250.0]))
    with pytest.raises(UserError, match="needs the state"):
        _tables().undo(torch.ones(1, 3, 2, 2), torch.tensor([250.0]))


def test_is_identity():
    assert CompensationTables.identity([3.0, 2.0, 1.0], 2).is_identity
    assert not _tables().is_identity
