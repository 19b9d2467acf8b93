"""Compensation tables and their runtime semantics: the reference the exported graph must reproduce exactly.

Legend (code symbol -> docs/method.md notation)
    ``eps_q``             eps~_n, the raw (uncompensated) model output at the current step
    ``state``             eps~_{n+1}, the previous step's RAW model output (zeros at the first step)
    ``eps_hat``           eps^_n, the compensated output handed to the sampler
    ``scale[r, c]``       1 - K_{n,c}  (PTQD: 1 / (1 + k_n))
    ``prev[r, c]``        L_{n,c}  (m = 1 analytic: rho_n K_{n+1,c};  zero for m = 0, PTQD, TAC)
    ``bias[r, c]``        b_{n,c}
    ``timesteps[r]``      t_n, the timestep value diffusers passes for table row r

Runtime semantics, broadcast over [B, C, *spatial]:
    r        = timestep_to_row(timesteps, t)            one row per batch element
    eps_hat  = scale[r] * eps_q - prev[r] * state - bias[r]
    state'   = eps_q                                     (the RAW output, never eps_hat)

Indexing: tables are indexed by **step row** (row n <-> ``timesteps[n]``, scheduler order, row 0 = first
step), and the runtime reaches a row **through the timestep value**, because diffusers passes timestep values
(999, 979, ... or fractional Euler values), not step indices:
    row = argmin_n |t - timesteps[n]|, and if that distance > tol then row N (the identity row: scale 1,
    prev 0, bias 0), tol = min(0.25 * min gap between schedule timesteps, 0.5) (0.5 for a 1-step schedule).
An unknown timestep (another schedule, another step count) is therefore passed through unchanged.

Classifier-free guidance: guidance is an affine combination with weights summing to one, and the compensation
is affine per channel, so compensating each branch (batch 2B, each branch carrying its own raw state) and then
guiding gives exactly the compensation of the guided output with the guided raw state. The head works for
any batch; a timestep of shape [], [1] or [B] broadcasts.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from qdc_export.errors import UserError

__all__ = [
    "METHODS",
    "CompensationHead",
    "CompensationTables",
    "apply_compensation",
    "apply_row",
    "compensate",
    "compensate_rows",
    "compensation_formula",
    "lookup_tolerance",
    "timestep_to_row",
]

METHODS = ("tcec-m0", "tcec-m1-analytic", "tcec-m1-fitted", "ptqd", "tac", "none")
TABLES_FILE = "compensation.safetensors"
META_FILE = "compensation.json"
FORMAT_VERSION = 1


def lookup_tolerance(timesteps: np.ndarray | torch.Tensor | list[float]) -> float:
    """tol = min(0.25 * min gap between distinct schedule timesteps, 0.5); 0.5 when there is one timestep."""
    ts = np.unique(np.asarray(timesteps, dtype=np.float64))
    if len(ts) < 2:
        return 0.5
    return float(min(0.25 * np.min(np.diff(ts)), 0.5))


def timestep_to_row(timesteps_table: torch.Tensor, t: torch.Tensor | float, tol: float | torch.Tensor) -> torch.Tensor:
    """LongTensor [B] of table rows for timestep(s) ``t`` (shape [], [1] or [B], integer or float).

    row = argmin_n |t - timesteps_table[n]|; row N (identity) where that distance > tol. Only sub / abs /
    min(dim) / where: no Python branching on tensor values, so it traces and exports to ONNX.
    """
    table = timesteps_table.to(torch.float32)
    if not isinstance(t, torch.Tensor):
        t = torch.tensor(t, device=table.device)
    t = t.to(torch.float32).reshape(-1)
    dist = (t.unsqueeze(1) - table.unsqueeze(0)).abs()  # [B, N]
    min_dist, idx = dist.min(dim=1)
    identity_row = torch.full_like(idx, table.shape[0])
    tol_t = tol.to(torch.float32) if isinstance(tol, torch.Tensor) else torch.tensor(float(tol), device=table.device)
    return torch.where(min_dist <= tol_t, idx, identity_row)


def compensation_formula(s: torch.Tensor, p: torch.Tensor | None, b: torch.Tensor, eps_q: torch.Tensor,
                         state: torch.Tensor | None) -> torch.Tensor:
    """eps_hat = s * eps_q - p * state - b with s, p, b already gathered and broadcastable to eps_q: the one place the
    compensation formula is written (the head, the folded graph and the fit all evaluate it here, with this order
    of operations). ``p is None``: stateless tables, the state term is skipped rather than multiplied by zeros."""
    if p is None:
        return s * eps_q - b
    return s * eps_q - p * state.to(eps_q.dtype) - b  # type: ignore[union-attr]


def apply_row(scale: torch.Tensor, prev: torch.Tensor, bias: torch.Tensor, eps_q: torch.Tensor,
              state: torch.Tensor) -> torch.Tensor:
    """One table row (float32 [C] each, before the tables exist: the fit) applied to every element of the batch,
    broadcast as [1, C, 1, ...] like the head's gathered rows."""
    view = (1, -1) + (1,) * (eps_q.dim() - 2)
    s, p, b = (v.reshape(view).to(eps_q.dtype) for v in (scale, prev, bias))
    return compensation_formula(s, p, b, eps_q, state)


def compensate_rows(scale: torch.Tensor, prev: torch.Tensor | None, bias: torch.Tensor, row: torch.Tensor,
                    eps_q: torch.Tensor, state: torch.Tensor | None) -> torch.Tensor:
    """The graph form: gather each batch element's row r (a LongTensor [B]) of the [N+1, C] tables, then the
    formula. ``prev``/``state`` None: stateless tables (the folded graph of m = 0, PTQD, TAC)."""
    view = (row.shape[0], scale.shape[1]) + (1,) * (eps_q.dim() - 2)  # [Bt, C, 1, 1(, 1)]
    if prev is None or state is None:
        s = scale.index_select(0, row).reshape(view)
        b = bias.index_select(0, row).reshape(view)
        return compensation_formula(s, None, b, eps_q, None)
    s = scale.index_select(0, row).reshape(view).to(eps_q.dtype)
    p = prev.index_select(0, row).reshape(view).to(eps_q.dtype)
    b = bias.index_select(0, row).reshape(view).to(eps_q.dtype)
    return compensation_formula(s, p, b, eps_q, state)


def compensate(
    scale: torch.Tensor,
    prev: torch.Tensor,
    bias: torch.Tensor,
    timesteps: torch.Tensor,
    tol: float | torch.Tensor,
    eps_q: torch.Tensor,
    timestep: torch.Tensor | float,
    state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The functional reference: (eps_hat, state_out) = (scale[r] eps_q - prev[r] state - bias[r], eps_q)."""
    row = timestep_to_row(timesteps, timestep, tol)  # [Bt]
    return compensate_rows(scale, prev, bias, row, eps_q, state), eps_q


def _frozen(arr: Any, dtype: Any, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    if isinstance(arr, torch.Tensor):
        arr = arr.detach().cpu().numpy()
    out = np.array(arr, dtype=dtype, copy=True)
    if shape is not None and out.shape != shape:
        raise UserError(f"CompensationTables.{name} has shape {out.shape}, expected {shape}")
    if not np.all(np.isfinite(out)):
        raise UserError(f"CompensationTables.{name} contains NaN or Inf")
    out.setflags(write=False)
    return out


@dataclasses.dataclass(frozen=True, eq=False)
class CompensationTables:
    """Per-step, per-channel compensation tables, rows indexed by step (see module docstring).

    ``scale``, ``prev``, ``bias`` are float32 [N+1, C]; row N is the identity row. ``timesteps`` is float64 [N]
    exactly as the scheduler emits them, distinct. ``options`` records the variant (ridge, target, ...), ``stats``
    the fit statistics; both must be JSON-serialisable.
    """

    method: str
    timesteps: np.ndarray
    scale: np.ndarray
    prev: np.ndarray
    bias: np.ndarray
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise UserError(f"compensation method {self.method!r} is not one of {', '.join(METHODS)}")
        ts = _frozen(self.timesteps, np.float64, "timesteps")
        if ts.ndim != 1 or len(ts) == 0:
            raise UserError(f"CompensationTables.timesteps must be a non-empty 1-D list, got shape {ts.shape}")
        if len(np.unique(ts)) != len(ts):
            raise UserError("CompensationTables.timesteps must be distinct (a timestep must name one row)")
        n = len(ts)
        scale = np.asarray(self.scale)
        if scale.ndim != 2 or scale.shape[0] != n + 1:
            raise UserError(f"CompensationTables.scale has shape {scale.shape}, expected ({n + 1}, C)")
        shape = (n + 1, scale.shape[1])
        object.__setattr__(self, "timesteps", ts)
        for name in ("scale", "prev", "bias"):
            object.__setattr__(self, name, _frozen(getattr(self, name), np.float32, name, shape))
        if not (np.all(self.scale[n] == 1) and np.all(self.prev[n] == 0) and np.all(self.bias[n] == 0)):
            raise UserError("CompensationTables: row N must be the identity row (scale 1, prev 0, bias 0)")
        object.__setattr__(self, "options", dict(self.options))
        object.__setattr__(self, "stats", dict(self.stats))
        try:
            json.dumps(self.options), json.dumps(self.stats)
        except TypeError as exc:
            raise UserError(f"CompensationTables options/stats must be JSON-serialisable: {exc}") from None

    # ---- shape and semantics -------------------------------------------------------------------------------
    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @property
    def channels(self) -> int:
        return int(self.scale.shape[1])

    @property
    def uses_state(self) -> bool:
        """True when any prev coefficient is non-zero: the graph then needs the previous-output state I/O."""
        return bool(np.any(self.prev != 0))

    @property
    def tolerance(self) -> float:
        return lookup_tolerance(self.timesteps)

    @property
    def is_identity(self) -> bool:
        """Every row is the identity (scale 1, prev 0, bias 0): the head would change nothing."""
        return bool(np.all(self.scale == 1) and np.all(self.prev == 0) and np.all(self.bias == 0))

    def rows(self, timestep: torch.Tensor | float) -> torch.Tensor:
        """LongTensor [B] of table rows for timestep value(s) (``timestep_to_row`` with this table's tolerance)."""
        return timestep_to_row(torch.tensor(self.timesteps), timestep, self.tolerance)

    def row_for(self, t: float) -> int:
        """Python-side row lookup for one timestep (same rule as ``timestep_to_row``)."""
        return int(self.rows(torch.tensor([float(t)]))[0])

    def head(self) -> CompensationHead:
        return CompensationHead(self)

    @functools.cached_property
    def _head(self) -> CompensationHead:
        return CompensationHead(self)

    def apply(self, eps_q: torch.Tensor, timestep: torch.Tensor | float,
              state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(eps_hat, state_out) = (scale[r] eps_q - prev[r] state - bias[r], eps_q), evaluated by the head module
        the graph folds; ``state=None`` means zeros (the first step)."""
        return _run_head(self._head, eps_q, timestep, state)

    def undo(self, eps_hat: torch.Tensor, timestep: torch.Tensor, state: torch.Tensor | None = None) -> torch.Tensor:
        """The raw output back from the compensated one: eps_q = (eps_hat + prev[r] state + bias[r]) / scale[r], exact
        up to float32 rounding. ``state`` (the previous raw output) is needed when the tables use it. Refuses rows
        whose scale is 0 (the head erased eps_q there: it cannot be recovered)."""
        if state is None and self.uses_state:
            raise UserError(f"{self.method} tables use the previous output: undoing them needs the state")
        row = self.rows(timestep)
        if bool(np.any(self.scale[row.numpy()] == 0)):
            bad = sorted({int(r) for r in row if np.any(self.scale[int(r)] == 0)})
            raise UserError(f"compensation rows {bad} have scale 0 in some channel: the raw output cannot be "
                            "recovered from the compensated one")
        view = (len(row), eps_hat.shape[1]) + (1,) * (eps_hat.dim() - 2)
        s, b = (torch.from_numpy(t[row.numpy()]).reshape(view) for t in (self.scale, self.bias))
        if state is None:
            return (eps_hat + b) / s
        p = torch.from_numpy(self.prev[row.numpy()]).reshape(view)
        return (eps_hat + p * state + b) / s

    # ---- constructors ----------------------------------------------------------------------------------------
    @classmethod
    def identity(cls, timesteps: Any, channels: int, **options: Any) -> CompensationTables:
        ts = np.asarray(timesteps.detach().cpu() if isinstance(timesteps, torch.Tensor) else timesteps, np.float64)
        n = len(ts)
        return cls(
            method="none",
            timesteps=ts,
            scale=np.ones((n + 1, channels), np.float32),
            prev=np.zeros((n + 1, channels), np.float32),
            bias=np.zeros((n + 1, channels), np.float32),
            options=options,
        )

    @classmethod
    def from_rows(
        cls, method: str, timesteps: Any, scale: Any, prev: Any, bias: Any, options: dict[str, Any] | None = None,
        stats: dict[str, Any] | None = None,
    ) -> CompensationTables:
        """Build from [N, C] step rows; appends the identity row N."""
        scale, prev, bias = (np.asarray(a, np.float64) for a in (scale, prev, bias))
        c = scale.shape[1]
        return cls(
            method=method,
            timesteps=np.asarray(timesteps, np.float64),
            scale=np.concatenate([scale, np.ones((1, c))]),
            prev=np.concatenate([prev, np.zeros((1, c))]),
            bias=np.concatenate([bias, np.zeros((1, c))]),
            options=options or {},
            stats=stats or {},
        )

    # ---- persistence -----------------------------------------------------------------------------------------
    def save(self, path_dir: str | Path) -> Path:
        """Write ``compensation.safetensors`` (scale, prev, bias float32; timesteps float64) and
        ``compensation.json`` (method, options, N, C, timesteps, stats) into ``path_dir``."""
        from safetensors.numpy import save_file

        d = Path(path_dir)
        d.mkdir(parents=True, exist_ok=True)
        save_file(
            {
                "scale": np.ascontiguousarray(self.scale),
                "prev": np.ascontiguousarray(self.prev),
                "bias": np.ascontiguousarray(self.bias),
                "timesteps": np.ascontiguousarray(self.timesteps),
            },
            str(d / TABLES_FILE),
        )
        meta = {
            "format_version": FORMAT_VERSION,
            "method": self.method,
            "options": self.options,
            "num_steps": self.num_steps,
            "channels": self.channels,
            "timesteps": [float(t) for t in self.timesteps],
            "uses_state": self.uses_state,
            "lookup_tolerance": self.tolerance,
            "semantics": "eps_hat = scale[r]*eps_q - prev[r]*state - bias[r]; state' = eps_q (raw); "
            "r = argmin|t - timesteps| or N if > lookup_tolerance",
            "stats": self.stats,
        }
        (d / META_FILE).write_text(json.dumps(meta, indent=2, allow_nan=False) + "\n")
        return d

    @classmethod
    def load(cls, path_dir: str | Path) -> CompensationTables:
        from safetensors.numpy import load_file

        d = Path(path_dir)
        if not (d / TABLES_FILE).is_file() or not (d / META_FILE).is_file():
            raise UserError(f"no compensation tables in {d} (need {TABLES_FILE} and {META_FILE})")
        meta = json.loads((d / META_FILE).read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise UserError(f"{d / META_FILE}: unsupported format_version {meta.get('format_version')!r}")
        arrays = load_file(str(d / TABLES_FILE))
        tables = cls(
            method=meta["method"],
            timesteps=arrays["timesteps"],
            scale=arrays["scale"],
            prev=arrays["prev"],
            bias=arrays["bias"],
            options=meta.get("options", {}),
            stats=meta.get("stats", {}),
        )
        if (tables.num_steps, tables.channels) != (meta["num_steps"], meta["channels"]) or not np.array_equal(
            tables.timesteps, np.asarray(meta["timesteps"], np.float64)
        ):
            raise UserError(f"{d}: {META_FILE} does not match {TABLES_FILE} (N, C or timesteps differ)")
        return tables


class CompensationHead(nn.Module):
    """``forward(eps_q, timestep, state) -> (eps_hat, state_out)``: the module the graph fold pass inlines.

    Buffers (all float32): ``timesteps`` [N], ``scale``/``prev``/``bias`` [N+1, C], ``tol`` []. Export-friendly:
    ``torch.export.export(head, (eps_q, t, state), strict=False)`` works for any batch.
    """

    timesteps: torch.Tensor
    scale: torch.Tensor
    prev: torch.Tensor
    bias: torch.Tensor
    tol: torch.Tensor

    def __init__(self, tables: CompensationTables) -> None:
        super().__init__()
        self.method = tables.method
        self.uses_state = tables.uses_state
        self.register_buffer("timesteps", torch.tensor(tables.timesteps, dtype=torch.float32))
        self.register_buffer("scale", torch.tensor(tables.scale, dtype=torch.float32))
        self.register_buffer("prev", torch.tensor(tables.prev, dtype=torch.float32))
        self.register_buffer("bias", torch.tensor(tables.bias, dtype=torch.float32))
        self.register_buffer("tol", torch.tensor(tables.tolerance, dtype=torch.float32))
        if not math.isfinite(tables.tolerance):
            raise UserError("compensation lookup tolerance is not finite")

    def rows(self, timestep: torch.Tensor) -> torch.Tensor:
        return timestep_to_row(self.timesteps, timestep, self.tol)

    def forward(
        self, eps_q: torch.Tensor, timestep: torch.Tensor, state: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return compensate(self.scale, self.prev, self.bias, self.timesteps, self.tol, eps_q, timestep, state)


def _run_head(head: CompensationHead, eps_q: torch.Tensor, timestep: torch.Tensor | float,
              state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    head = head.to(eps_q.device)
    if state is None:
        state = torch.zeros_like(eps_q)
    out: tuple[torch.Tensor, torch.Tensor] = head(eps_q, torch.as_tensor(timestep, device=eps_q.device), state)
    return out


def apply_compensation(
    tables: CompensationTables | CompensationHead,
    eps_q: torch.Tensor,
    timestep: torch.Tensor | float,
    state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference semantics in one call: ``(eps_hat, state_out)``; ``state=None`` means zeros (first step)."""
    if isinstance(tables, CompensationTables):
        return tables.apply(eps_q, timestep, state)
    return _run_head(tables, eps_q, timestep, state)
