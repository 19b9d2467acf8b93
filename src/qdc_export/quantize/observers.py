"""Activation observers for calibration over whole sampler trajectories.

- minmax: running max |x| over every call (every step of every trajectory).
- percentile: per call (one denoising step) the p-th percentile of |x|, collapsed by max over calls, as
  ModelOpt's diffusers recipe does per step. Outliers that appear in one step do not set the range.
- mse: torchao's HistogramObserver (search of the clipping range minimizing L2 quantization error).
"""

from __future__ import annotations

import torch
from torchao.quantization.pt2e import HistogramObserver, MinMaxObserver

_MAX_SAMPLE = 1 << 20  # elements per call used for the percentile (deterministic strided subsample)


def _strided_sample(x: torch.Tensor) -> torch.Tensor:
    """x as float32, flattened, thinned to at most about _MAX_SAMPLE elements by a fixed stride."""
    flat = x.float().flatten()
    return flat[:: flat.numel() // _MAX_SAMPLE + 1] if flat.numel() > _MAX_SAMPLE else flat


def _kth_rank(n: int, percent: float, offset: int = 0) -> int:
    """1-based rank of the ``percent``-th percentile among ``n`` values (plus ``offset``), clamped to 1..n."""
    return max(1, min(n, int(round(n * percent / 100.0)) + offset))


class PercentileObserver(MinMaxObserver):
    def __init__(self, *args, percentile: float = 99.99, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.percentile = percentile

    def forward(self, x_orig: torch.Tensor) -> torch.Tensor:
        if x_orig.numel() == 0:
            return x_orig
        flat = _strided_sample(x_orig.detach().abs())
        amax = flat.kthvalue(_kth_rank(flat.numel(), self.percentile)).values
        self.min_val.copy_(torch.minimum(self.min_val, -amax))
        self.max_val.copy_(torch.maximum(self.max_val, amax))
        return x_orig


class AsymmetricPercentileObserver(PercentileObserver):
    """Per call the p-th percentile of x and the (100 - p)-th, collapsed by max / min over calls: the percentile
    observer's outlier rule for an affine (UINT8) range, which a one-sided activation fills on one side only
    (the CPU form, quantize.annotate_cpu)."""

    def forward(self, x_orig: torch.Tensor) -> torch.Tensor:
        if x_orig.numel() == 0:
            return x_orig
        flat = _strided_sample(x_orig.detach())
        n = flat.numel()
        hi = flat.kthvalue(_kth_rank(n, self.percentile)).values
        lo = flat.kthvalue(_kth_rank(n, 100.0 - self.percentile, offset=1)).values
        self.min_val.copy_(torch.minimum(self.min_val, torch.minimum(lo, torch.zeros_like(lo))))
        self.max_val.copy_(torch.maximum(self.max_val, torch.maximum(hi, torch.zeros_like(hi))))
        return x_orig


def activation_observer(kind: str, percentile: float):
    eps = 2**-12
    if kind == "minmax":
        return MinMaxObserver.with_args(eps=eps)
    if kind == "percentile":
        return PercentileObserver.with_args(eps=eps, percentile=percentile)
    if kind == "mse":
        return HistogramObserver.with_args(eps=eps)
    raise ValueError(f"unknown observer {kind!r}")
