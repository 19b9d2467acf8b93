"""Distributed calibration: the calibration trajectories of one build split across processes with
torch.distributed (gloo on CPU, nccl where CUDA is available), then the observer statistics reduced
across processes, so every process ends with the ranges a single process would have computed.

How it is split. The unit of work is the calibration *batch* (``run_calibration``'s chunks of seeds):
rank r runs batches r, r + W, r + 2W, ... of the same list a single process would run. Using the same
batches (not just the same seeds) is what makes the result identical, not merely close: the percentile
observer takes a percentile *per call*, and convolution kernels may round differently at another batch
size. With fewer batches than processes the build is refused (raise ``--calib-samples``).

How it is reduced (exact, order-free):
- min/max observers (``minmax``; weight observers per channel): all_reduce MIN of ``min_val``, MAX of
  ``max_val``;
- ``percentile``: per call p-th percentile of |x|, collapsed by max over calls
  (:mod:`qdc_export.quantize.observers`), so MAX over processes equals MAX over all calls;
- ``mse`` (torchao's HistogramObserver) is refused: its histogram is re-binned to the running range on
  every call, so the result depends on the order of calls and merged histograms cannot reproduce a
  single-process run.
A calibration error (NaN/Inf) on any process is agreed on before the reduction, so no process waits
forever: the failing process raises its own message, the others a CalibrationError naming its rank.

Use (torchrun sets RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT)::

    torchrun --nproc-per-node 2 -m qdc_export.cli build MODEL --distributed --calib-samples 16 --out DIR

Every process loads the model, captures and calibrates its share; only rank 0 exports, checks and writes
the build folder (the others stop after calibration). The result, manifest included, is the same as
``qdc-export build MODEL --calib-samples 16 --out DIR`` in one process.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from qdc_export.errors import CalibrationError, UserError
from qdc_export.quantize.calibrate import CALIBRATION_SHARDING

_TIMEOUT = datetime.timedelta(minutes=30)


def _observers(module: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """Observer modules in a fixed order (named_modules is deterministic for the same graph)."""
    return [(name, m) for name, m in module.named_modules() if hasattr(m, "min_val") and hasattr(m, "max_val")]


@dataclass(frozen=True)
class CalibrationSharding:
    rank: int
    world: int
    group: Any = None

    @property
    def device(self) -> torch.device:
        backend = dist.get_backend(self.group)
        return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")

    def select(self, starts: list[int], observed: torch.nn.Module) -> list[int]:
        from torchao.quantization.pt2e import HistogramObserver

        if any(isinstance(m, HistogramObserver) for _, m in _observers(observed)):
            raise UserError("observer 'mse' (histogram) cannot be calibrated across processes: its histogram is "
                            "re-binned on every call, so merged histograms would not equal one process's; use "
                            "--observer percentile or minmax, or build without --distributed")
        if len(starts) < self.world:
            raise UserError(f"{len(starts)} calibration batch(es) for {self.world} processes: every process needs "
                            f"at least one; raise --calib-samples or start fewer processes")
        return starts[self.rank::self.world]

    def _agree_no_error(self, error: BaseException | None) -> None:
        failed = torch.tensor([self.rank if error is not None else -1], dtype=torch.int64, device=self.device)
        dist.all_reduce(failed, op=dist.ReduceOp.MAX, group=self.group)
        if error is not None:
            raise error
        if int(failed.item()) >= 0:
            raise CalibrationError(f"calibration failed on rank {int(failed.item())} (see its error)")

    def reduce(self, observed: torch.nn.Module, *, error: BaseException | None) -> None:
        """Collective: every process calls it once per calibration, with its error or None."""
        self._agree_no_error(error)
        observers = _observers(observed)
        count = torch.tensor([len(observers)], device=self.device)
        dist.all_reduce(count, op=dist.ReduceOp.MIN, group=self.group)
        if int(count.item()) != len(observers):
            raise CalibrationError(f"rank {self.rank} has {len(observers)} observers, another has {int(count.item())}")
        for _, module in observers:
            for attr, op in (("min_val", dist.ReduceOp.MIN), ("max_val", dist.ReduceOp.MAX)):
                value: torch.Tensor = getattr(module, attr)
                reduced = value.detach().to(self.device, copy=True)
                dist.all_reduce(reduced, op=op, group=self.group)
                value.copy_(reduced.to(value.device))


@contextlib.contextmanager
def sharded_calibration(rank: int | None = None, world: int | None = None, group: Any = None) -> Iterator[CalibrationSharding]:
    """Within this context, :func:`qdc_export.quantize.calibrate.run_calibration` runs this process's share and
    reduces observer statistics with the other processes (the process group must be initialized)."""
    if not dist.is_initialized():
        raise UserError("distributed calibration needs an initialized torch.distributed process group")
    sharding = CalibrationSharding(dist.get_rank(group) if rank is None else rank,
                                   dist.get_world_size(group) if world is None else world, group)
    token = CALIBRATION_SHARDING.set(sharding)
    try:
        yield sharding
    finally:
        CALIBRATION_SHARDING.reset(token)


def init_from_env() -> tuple[int, int]:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise UserError("--distributed runs under torchrun (RANK/WORLD_SIZE are not set), e.g. "
                        "torchrun --nproc-per-node 2 -m qdc_export.cli build MODEL --distributed --out DIR")
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=_TIMEOUT)
    return dist.get_rank(), dist.get_world_size()


def agree_across_ranks(ok: bool, what: str) -> None:
    flag = torch.tensor([0 if ok else 1], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        flag = flag.cuda()
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if int(flag.item()):
        raise UserError(what)
