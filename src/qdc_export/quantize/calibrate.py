"""Calibration driven by real sampling: the observed graph is the denoiser of full sampler trajectories
(the build's scheduler and step count), over calibration seeds and conditionings distinct from the
evaluation seeds, so activation ranges cover every timestep the engine will see."""

from __future__ import annotations

import contextvars
import math
from typing import Any

import torch

from qdc_export.errors import CalibrationError
from qdc_export.load.models import LoadedModel
from qdc_export.quantize.annotate import _CONV_LINEAR
from qdc_export.sampling import Episode, TorchDenoiser, make_scheduler, run_episode

CALIBRATION_SEED_OFFSET = 100_000  # calibration seeds never overlap evaluation seeds


# Set by :mod:`qdc_export.quantize.distributed` while a distributed build runs: which calibration batches this process
# runs (``select``) and how the observer statistics are combined across processes afterwards (``reduce``).
CALIBRATION_SHARDING: contextvars.ContextVar[Any] = contextvars.ContextVar("qdc_calibration_sharding", default=None)


def _has_observers(module: torch.nn.Module) -> bool:
    return any(hasattr(m, "min_val") for m in module.modules())


def calibration_seeds(seed: int, count: int) -> list[int]:
    return [CALIBRATION_SEED_OFFSET + seed * 1000 + i for i in range(count)]


def run_calibration(observed: torch.nn.Module, model: LoadedModel, *, scheduler_name: str, steps: int,
                    seed: int, samples: int, batch: int = 8, progress: bool = False) -> None:
    scheduler = make_scheduler(scheduler_name, model.scheduler_config)
    cond_names = [spec.name for spec in model.conditioning.specs]
    denoiser = _CheckedDenoiser(TorchDenoiser(observed, cond_names), observed)
    seeds = calibration_seeds(seed, samples)
    shape = model.adapter.input_specs(model.unet)[0].concrete(1)[1:]
    starts = list(range(0, samples, batch))
    # Distributed: the unit of work is the calibration batch, the same batches as in one process, so that
    # per-call statistics (the percentile observer) and batch-size-dependent kernels give identical ranges.
    sharding = CALIBRATION_SHARDING.get() if _has_observers(observed) else None
    if sharding is not None:
        starts = sharding.select(starts, observed)
    try:
        for start in starts:
            chunk = seeds[start:start + batch]
            episode = Episode.from_seeds(scheduler, steps, model.conditioning, shape, chunk)
            traj = run_episode(denoiser, episode, record=False, progress=progress,
                               desc=f"calibrating {start // batch + 1}/{math.ceil(samples / batch)}")
            if not torch.isfinite(traj.final).all():
                check_observers(observed)  # names the first layers whose ranges went NaN/Inf, if any did
                raise CalibrationError("calibration trajectory produced NaN/Inf latents (observer ranges are "
                                       "finite: the NaN/Inf arises in an unobserved op)")
    except CalibrationError as exc:
        if sharding is None:
            raise
        sharding.reduce(observed, error=exc)  # tells the other processes, then raises
    if sharding is not None:
        sharding.reduce(observed, error=None)
    check_observers(observed)


class _CheckedDenoiser:
    """Checks the observer ranges after every denoiser call, so a NaN/Inf is reported at the step where it
    first appears, before the sampler feeds it back and every range downstream of the input is NaN too."""

    def __init__(self, inner: TorchDenoiser, observed: torch.nn.Module) -> None:
        self.inner, self.observed, self.calls = inner, observed, 0

    def reset(self, batch: int) -> None:
        self.inner.reset(batch)

    def __call__(self, sample, timestep, cond):
        out = self.inner(sample, timestep, cond)
        self.calls += 1
        check_observers(self.observed, require_data=False,
                        when=f" at model call {self.calls} (timestep {float(timestep.flatten()[0]):g})")
        return out


def observer_layers(observed: torch.nn.Module) -> dict[str, str]:
    """Observer module name -> what it observes, in graph order: "<layer> (input|weight)" for the
    Conv/Linear it feeds ("sdpa query/key/value" for attention inputs), else the observed node's name."""
    graph = getattr(observed, "graph", None)
    if graph is None:
        return {}
    roles = {0: "input", 1: "weight"}
    names: dict[str, str] = {}
    for node in graph.nodes:
        if node.op != "call_module" or not hasattr(observed.get_submodule(node.target), "min_val"):
            continue
        described = []
        for user in node.users:
            if user.op != "call_function":
                continue
            index = next((i for i, arg in enumerate(user.args) if arg is node), None)
            weight = user.args[1] if len(user.args) > 1 else None
            if isinstance(weight, torch.fx.Node) and weight.op == "call_module" and weight.args:
                weight = weight.args[0]  # the weight's own observer sits between get_attr and the layer
            layer = None
            if isinstance(weight, torch.fx.Node) and weight.op == "get_attr":
                layer = str(weight.target).removeprefix("unet.").rsplit(".", 1)[0]
            if "scaled_dot_product_attention" in str(user.target):
                described.append(f"{user.name} ({('query', 'key', 'value')[index] if index in (0, 1, 2) else 'input'})")
            elif layer is not None and index in roles and user.target in _CONV_LINEAR:
                described.append(f"{layer} ({roles[index]})")
        source = node.args[0] if node.args else None
        names[str(node.target)] = ", ".join(dict.fromkeys(described)) or f"output of {getattr(source, 'name', source)}"
    return names


def check_observers(observed: torch.nn.Module, *, require_data: bool = True, when: str = "") -> None:
    """Fail loudly on ranges that got NaN/Inf or never got data, naming the layers the observers feed
    (in graph order, so the first NaN named is where it entered)."""
    layers = observer_layers(observed)
    order = {name: i for i, name in enumerate(layers)}
    empty, bad = [], []
    for name, module in observed.named_modules():
        min_val, max_val = getattr(module, "min_val", None), getattr(module, "max_val", None)
        if not isinstance(min_val, torch.Tensor) or not isinstance(max_val, torch.Tensor):
            continue
        if min_val.numel() == 0 or bool((min_val > max_val).any()):  # still (+inf, -inf): no data; NaN compares False
            empty.append(name)
        elif not (torch.isfinite(min_val).all() and torch.isfinite(max_val).all()):
            bad.append(name)

    def describe(names: list[str]) -> str:
        names = sorted(names, key=lambda n: order.get(n, len(order)))
        shown = "; ".join(f"{layers.get(n, n)} [{n}]" for n in names[:5])
        return shown + (f"; and {len(names) - 5} more" if len(names) > 5 else "")

    if bad:
        raise CalibrationError(f"NaN/Inf ranges in {len(bad)} observers{when} (first in graph order): {describe(bad)}")
    if empty and require_data:
        raise CalibrationError(f"{len(empty)} observers never saw data: {describe(empty)}")
