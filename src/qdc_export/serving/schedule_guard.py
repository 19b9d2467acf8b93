"""The schedule guard: a build is made for one scheduler (class and config) and one step count, and its
compensation rows are reached through the timestep values of that schedule. Before an engine is used, the
client's scheduler is compared with what the manifest recorded; a mismatch is refused with one line naming it.

What is compared (``schedule_mismatch``):
    class            ``type(scheduler).__name__`` against ``manifest.scheduler.class``
    config           every public config field the build recorded (betas, spacing, offset, clipping,
                     thresholding, prediction type, solver settings, ...): any of them changes the trajectory
    timesteps        the client scheduler's ``timesteps`` after its ``set_timesteps`` (what the engine will
                     be called with), against ``manifest.scheduler.timesteps`` (count and values)
"""

from __future__ import annotations

import inspect
import math
from typing import Any

from qdc_export.errors import UserError

# Bookkeeping fields of a diffusers config: they do not change a trajectory.
_IGNORED_FIELDS = frozenset({"_class_name", "_diffusers_version", "_use_default_values", "_name_or_path"})
TIMESTEP_ATOL = 1e-3


class ScheduleMismatchError(UserError):
    """The client's scheduler is not the one the engine was built for."""


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) \
            and not isinstance(b, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return bool(a == b)


def schedule_mismatch(recorded: dict[str, Any], scheduler: Any, timesteps: list[float] | None = None) -> str | None:
    """The first difference between the build's schedule (``manifest["scheduler"]``) and ``scheduler``, as one
    phrase, or None when they agree. ``timesteps``: the values the client will call with (default: the
    scheduler's current ``timesteps``, i.e. after the pipeline's ``set_timesteps``)."""
    cls = type(scheduler).__name__
    if cls != recorded["class"]:
        return f"scheduler class {cls}, the build was made for {recorded['class']}"
    config = dict(scheduler.config)
    for key, built in sorted(recorded["config"].items()):
        if key in _IGNORED_FIELDS or key not in config:
            continue
        if not _same_value(config[key], built):
            return f"scheduler config {key}={config[key]!r}, the build was made with {key}={built!r}"
    if timesteps is None:
        current = getattr(scheduler, "timesteps", None)
        timesteps = [] if current is None else [float(t) for t in (
            current.tolist() if hasattr(current, "tolist") else current)]
    return timesteps_mismatch(recorded, timesteps)


def timesteps_mismatch(recorded: dict[str, Any], timesteps: list[float]) -> str | None:
    built = [float(t) for t in recorded["timesteps"]]
    if len(timesteps) != len(built):
        return (f"{len(timesteps)} sampling steps, the build was made for {len(built)} "
                f"({recorded['name']} x {recorded['steps']})")
    for i, (got, want) in enumerate(zip(timesteps, built)):
        if abs(got - want) > TIMESTEP_ATOL:
            return f"timestep {got:g} at step {i}, the build's schedule has {want:g} there"
    return None


def calling_pipeline_scheduler(module: Any, max_depth: int = 12) -> Any | None:
    """The scheduler of the diffusers pipeline that is calling ``module`` as its ``unet``, found on the call
    stack (the pipeline's ``__call__`` runs ``self.unet(...)``); None when not called from a pipeline."""
    frame = inspect.currentframe()
    try:
        for _ in range(max_depth):
            if frame is None:
                return None
            owner = frame.f_locals.get("self")
            if owner is not None and owner is not module and getattr(owner, "unet", None) is module:
                return getattr(owner, "scheduler", None)
            frame = frame.f_back
        return None
    finally:
        del frame
