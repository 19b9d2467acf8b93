"""The reference graph's noise floor: the PyTorch Q/DQ graph run again with every activation entering a quantizer
moved a few ulp up or down at random, so values at a rounding boundary may round the other way, as another
runtime's kernels can make them. Why, and how big:
(parity.md, "Quantized builds: statistics against the graph's own noise floor")."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from qdc_export.load.plugins.base import NOISE_PRED
from qdc_export.metrics import error_stats


def _quantizer_ops() -> set[Any]:
    import torchao.quantization.pt2e  # noqa: F401  registers quantized_decomposed

    import qdc_export.quantize.int4  # noqa: F401  registers qdc::fake_quantize_int4_group

    ops = torch.ops.quantized_decomposed
    return {ops.quantize_per_tensor.default, ops.quantize_per_tensor.tensor,
            torch.ops.qdc.fake_quantize_int4_group.default}


class RoundingNoise(TorchDispatchMode):
    """While active, every activation entering a quantizer moves by ``ulps`` ulp up or down, at random per element
    (seeded): the PyTorch graph with the kind of difference another runtime's kernels make (another accumulation
    order), which decides the side of a rounding boundary that a value near it falls on."""

    def __init__(self, seed: int, ulps: float) -> None:
        super().__init__()
        self.generator, self.ulps, self.ops = torch.Generator().manual_seed(seed), ulps, _quantizer_ops()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.ops:
            x = args[0]
            spacing = torch.nextafter(x.abs(), torch.tensor(float("inf"), dtype=x.dtype)) - x.abs()
            sign = torch.randint(0, 2, x.shape, generator=self.generator, dtype=x.dtype) * 2 - 1
            args = (x + sign * self.ulps * spacing, *args[1:])
        return func(*args, **(kwargs or {}))


class NoisyDenoiser:
    """A Denoiser that runs every call under :class:`RoundingNoise` (one generator for the whole trajectory)."""

    def __init__(self, inner: Any, seed: int, ulps: float) -> None:
        self.inner, self.noise = inner, RoundingNoise(seed, ulps)

    def reset(self, batch: int) -> None:
        self.inner.reset(batch)

    def __call__(self, sample, timestep, cond):
        with self.noise:
            return self.inner(sample, timestep, cond)


NOISE_SEEDS = (1, 2)


def step_noise_floor(module: Any, feeds: list[OrderedDict[str, np.ndarray]], reference_iters: Any,
                      ulps: float) -> dict:
    """Per step: the reference's outputs at the recorded feeds against its outputs under rounding noise, the
    worse of two noise draws."""
    by_draw: dict[str, list[dict[str, float]]] = {str(seed): [] for seed in NOISE_SEEDS}
    with torch.no_grad():
        for seed in NOISE_SEEDS:
            noise = RoundingNoise(seed, ulps)
            for feed, ref in zip(feeds, reference_iters):
                with noise:
                    out = module(*[torch.from_numpy(np.ascontiguousarray(a)) for a in feed.values()])
                out = out[0] if isinstance(out, (tuple, list)) else out  # NOISE_PRED is the first output
                by_draw[str(seed)].append(error_stats(ref[NOISE_PRED], out.numpy()))
    draws = list(by_draw.values())
    return {"what": f"per-step SNR / cosine of the PyTorch reference against itself with every quantizer input "
                    f"moved {ulps:g} ulp up or down at random (worse of {len(draws)} draws)",
            "ulps": ulps,
            "per_step_snr_db": [min(d[k]["snr_db"] for d in draws) for k in range(len(feeds))],
            "per_step_cosine": [min(d[k]["cosine"] for d in draws) for k in range(len(feeds))],
            "by_draw_snr_db": {k: [s["snr_db"] for s in v] for k, v in by_draw.items()},
            "by_draw_cosine": {k: [s["cosine"] for s in v] for k, v in by_draw.items()},
            "by_draw_gain": {k: [s["gain"] for s in v] for k, v in by_draw.items()}}
