"""GPTQ (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", Algorithm 1) for the blockwise INT4 weights of :mod:`qdc_export.quantize.int4`.

The objective per layer is the one RTN's clip search already uses, the layer output error on recorded
calibration inputs X: ||X W^T - X Q^T||^2 = tr(D H D^T), D = W - Q, H = X^T X. GPTQ quantizes the columns
of W (flattened to [O, K] exactly as RTN does: Linear K = in_features, Conv K = C * kh * kw) one at a time
and spreads each column's rounding error over the columns not yet quantized through the inverse Hessian,
which RTN cannot do.

What is kept from RTN, so that export, TensorRT rules and ONNX Runtime see nothing new: the integer grid
(symmetric -8..7, int8 storage) and the scales, one per block of ``block_size`` inputs, fixed *before*
GPTQ runs (``ratio * max|w| / 7`` of the original block, "static groups"); GPTQ only chooses the integers.
Fixed scales are also what make activation order (columns by decreasing H_ii) safe with blocks: a column
keeps its block's scale whatever order it is visited in.

Details, all from the paper: H is accumulated sample by sample (``hessian``: the unfolded rows of one
recorded input at a time are never concatenated, so memory is one K x K matrix per layer, freed after the
layer); dampening adds ``damp * mean(diag H)`` to the diagonal; dead inputs (H_jj = 0) get H_jj = 1; the
inverse is taken through Cholesky and its upper Cholesky factor drives the updates; lazy batch updates
apply a block of ``lazy_block`` columns' errors to the remaining columns in one matrix product.

Why not a library: torchao's ``prototype.gptq`` handles ``nn.Linear`` weights only (tensor subclasses for its
own INT4 / NVFP4 layouts, asymmetric with zero points), AutoGPTQ / GPTQModel target Hugging Face causal LMs
and CUDA kernels; none quantizes an FX graph's Conv2d weights onto this project's symmetric blocked grid.
The algorithm itself is ~40 lines (``gptq_quantize``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F

from qdc_export.quantize.fake_quant import LINEAR, QMAX, QMIN, dequantize_blockwise, quantize_blockwise

DEFAULT_DAMP = 0.01
DEFAULT_LAZY_BLOCK = 128
FLOAT64_MAX_K = 8192  # above this, H in float32 (SDXL's 3x3 convs on 1280 channels have K = 11520)


@dataclass(frozen=True, kw_only=True)
class GptqOptions:
    damp: float = DEFAULT_DAMP
    act_order: bool = True
    lazy_block: int = DEFAULT_LAZY_BLOCK


def _rows_of(node: torch.fx.Node, weight_shape: Sequence[int], sample: torch.Tensor) -> torch.Tensor | None:
    """One recorded input as [N, K] rows matching the weight flattened to [O, K] (None: unsupported conv)."""
    if node.target == LINEAR:
        return sample.reshape(-1, sample.shape[-1])
    args = list(node.args) + [None] * (7 - len(node.args))
    stride, padding, dilation, groups = args[3] or 1, args[4] or 0, args[5] or 1, args[6] or 1
    if groups != 1 or isinstance(padding, str):
        return None
    cols = F.unfold(sample, tuple(weight_shape[2:]), dilation=dilation, padding=padding, stride=stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def hessian(node: torch.fx.Node, weight_shape: Sequence[int], samples: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """H = sum over recorded inputs of X^T X, accumulated one recorded tensor at a time (never the whole X)."""
    k = math.prod(weight_shape[1:])
    dtype = torch.float64 if k <= FLOAT64_MAX_K else torch.float32
    h = None
    for sample in samples:
        rows = _rows_of(node, weight_shape, sample)
        if rows is None:
            return None
        rows = rows.to(dtype)
        h = rows.T @ rows if h is None else h.addmm_(rows.T, rows)
    return h


def output_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    """||X W^T - X W_hat^T||^2 = tr(D H D^T) with D = W - W_hat."""
    d = (w - w_hat).to(h.dtype)
    return float(((d @ h) * d).sum())


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) I)^-1; more dampening if H is still not positive
    definite in floating point (possible in float32)."""
    diag = torch.arange(h.shape[0])
    scale = float(h[diag, diag].mean())
    for attempt in range(6):
        damped = h.clone()
        damped[diag, diag] += damp * (10**attempt) * scale
        factor, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(factor)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return upper
    raise ValueError("GPTQ: the dampened Hessian is not positive definite")


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, scale: torch.Tensor, block_size: int,
                  options: GptqOptions = GptqOptions()) -> torch.Tensor:
    """w float [O, K], H [K, K], scale [O, ceil(K / block_size)] (fixed) -> q int8 [O, K] in -8..7."""
    out_features, k = w.shape
    h = h.clone()
    dtype = h.dtype
    diag = torch.arange(k)
    dead = h[diag, diag] == 0
    h[dead, dead] = 1.0
    column_scale = scale.repeat_interleave(block_size, dim=1)[:, :k].to(dtype)
    weights = w.to(dtype).clone()
    order = torch.argsort(h[diag, diag], descending=True) if options.act_order else diag
    weights, column_scale, h = weights[:, order], column_scale[:, order], h[order][:, order]
    hinv = _inverse_cholesky(h, options.damp)
    q = torch.zeros_like(weights)
    for start in range(0, k, options.lazy_block):
        end = min(start + options.lazy_block, k)
        block = weights[:, start:end].clone()
        errors = torch.zeros_like(block)
        hinv_block = hinv[start:end, start:end]
        for i in range(end - start):
            column, s = block[:, i], column_scale[:, start + i]
            rounded = torch.clamp(torch.round(column / s), QMIN, QMAX)
            q[:, start + i] = rounded
            err = (column - rounded * s) / hinv_block[i, i]
            block[:, i:] -= err.unsqueeze(1) * hinv_block[i, i:].unsqueeze(0)
            errors[:, i] = err
        weights[:, end:] -= errors @ hinv[start:end, end:]
    inverse_order = torch.argsort(order)
    return q[:, inverse_order].to(torch.int8)


@dataclass
class GptqLayerResult:
    q: torch.Tensor
    scale: torch.Tensor
    clip_ratio: float
    method: str  # "gptq", or "rtn" where rounding to nearest came out better on the recorded inputs
    error: float
    rtn_error: float  # best RTN over the same clip ratios, same H


def quantize_layer_gptq(w: torch.Tensor, h: torch.Tensor, block_size: int, clip_ratios: Sequence[float],
                        options: GptqOptions = GptqOptions()) -> GptqLayerResult:
    """GPTQ with each clip ratio's RTN scales; the candidate (GPTQ or RTN, any ratio) with the lowest output
    error on H wins, so a layer never ends up worse than RTN on its own calibration objective."""

    best: GptqLayerResult | None = None
    rtn_best = math.inf
    for ratio in clip_ratios:
        q_rtn, scale = quantize_blockwise(w, block_size, float(ratio))
        rtn_error = output_error(w, dequantize_blockwise(q_rtn, scale, block_size), h)
        rtn_best = min(rtn_best, rtn_error)
        q_gptq = gptq_quantize(w, h, scale, block_size, options)
        gptq_error = output_error(w, dequantize_blockwise(q_gptq, scale, block_size), h)
        for method, q, error in (("gptq", q_gptq, gptq_error), ("rtn", q_rtn, rtn_error)):
            if best is None or error < best.error:
                best = GptqLayerResult(q, scale, float(ratio), method, error, math.inf)
    assert best is not None
    best.rtn_error = rtn_best
    return best


def round_layer(node: torch.fx.Node, weight_shape: Sequence[int], w2d: torch.Tensor, samples: Sequence[torch.Tensor],
                block_size: int, clip_ratios: Sequence[float], options: GptqOptions | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, float, dict[str, Any]] | None:
    """(q, scale, clip ratio, manifest record) for one layer of :func:`qdc_export.quantize.int4.quantize_int4`;
    None where the Hessian cannot be formed (grouped conv, string padding): that layer keeps RTN."""
    h = hessian(node, weight_shape, samples)
    if h is None:
        return None
    found = quantize_layer_gptq(w2d, h, block_size, clip_ratios, options or GptqOptions())
    del h
    return found.q, found.scale, found.clip_ratio, {"rounding": found.method, "error_chosen": found.error,
                                                     "error_rtn_best": found.rtn_error}
