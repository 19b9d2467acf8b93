"""The quantizers of the build, in one place: the INT4 grid of the weights (blockwise, symmetric -8..7) and of
the W4A4 activations (dynamic, per channel group), the dynamic INT8 per-tensor activation quantizer the INT4
recipes search with, and the torch.library ops that carry INT4 through torch.export to ONNX Q/DQ.

Notation (docs/method.md): Q(w) = s * clamp(round(w / s), -8, 7) with s = ratio * max|w_block| / 7, one s per
block of ``block_size`` input elements of the weight flattened to [O, K]; activations x -> Q(x) with one
s = max|x_group| / 7 per ``group`` channels of each token/pixel (W4A4) or s = max|x| / 127 over the tensor (the
INT8 activations of W4A8 as the recipes model them). Rounding is half to even, as ONNX QuantizeLinear does.
The INT8 Q/DQ of W8A8 are PT2E's (quantize.annotate, quantize.qdq), not defined here."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import onnx
import torch
import torch.nn.functional as F

QMIN, QMAX = -8, 7
DEFAULT_CLIP_RATIOS: tuple[float, ...] = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)
SCALE_EPS = 2.0**-20
INT8_ACT_SCALE_EPS = 2.0**-12
# The layers the INT4 grid applies to (aten ops of the captured graph).
CONV2D = torch.ops.aten.conv2d.default
LINEAR = torch.ops.aten.linear.default


def fake_quantize_int8_tensor(x: torch.Tensor) -> torch.Tensor:
    """Dynamic symmetric INT8, one scale for the whole tensor (the W4A8 activations inside the recipes' searches)."""
    scale = torch.clamp(x.abs().amax() / 127.0, min=INT8_ACT_SCALE_EPS)
    return torch.clamp(torch.round(x / scale), -128, 127) * scale


# --------------------------------------------------------------------------------------------------
# Custom ops (PyTorch reference semantics; ONNX translation below)
# --------------------------------------------------------------------------------------------------


@torch.library.custom_op("qdc::dequantize_blockwise", mutates_args=())
def dequantize_blockwise(q: torch.Tensor, scale: torch.Tensor, block_size: int) -> torch.Tensor:
    """q int8 [O, K] (values -8..7), scale float [O, ceil(K / block_size)] -> float [O, K]."""
    expanded = scale.repeat_interleave(block_size, dim=1)[:, : q.shape[1]]
    return q.to(scale.dtype) * expanded


@dequantize_blockwise.register_fake
def _(q: torch.Tensor, scale: torch.Tensor, block_size: int) -> torch.Tensor:
    return torch.empty(q.shape, dtype=scale.dtype, device=q.device)


def _group_view(x: torch.Tensor, axis: int, group: int) -> torch.Tensor:
    shape = list(x.shape)
    return x.reshape(shape[:axis] + [shape[axis] // group, group] + shape[axis + 1:])


@torch.library.custom_op("qdc::fake_quantize_int4_group", mutates_args=())
def fake_quantize_int4_group(x: torch.Tensor, axis: int, group: int) -> torch.Tensor:
    """Dynamic symmetric INT4 fake quantization, one scale per ``group`` channels along ``axis``
    (axis >= 0, x.shape[axis] % group == 0). Same arithmetic as ONNX Q/DQ: round half to even."""
    amax = _group_view(x, axis, group).abs().amax(dim=axis + 1)
    scale = torch.clamp(amax / 7.0, min=SCALE_EPS).repeat_interleave(group, dim=axis)
    return torch.clamp(torch.round(x / scale), QMIN, QMAX) * scale


@fake_quantize_int4_group.register_fake
def _(x: torch.Tensor, axis: int, group: int) -> torch.Tensor:
    return torch.empty_like(x)


def _onnx_dequantize_blockwise(q, scale, block_size: int):
    from onnxscript import opset21 as op

    return op.DequantizeLinear(q, scale, axis=1, block_size=block_size)


def _onnx_fake_quantize_int4_group(x, axis: int, group: int):
    from onnxscript import opset21 as op

    shape = op.Shape(x)
    channels = op.Shape(x, start=axis, end=axis + 1)
    groups = op.Div(channels, op.Constant(value_ints=[group]))
    grouped_shape = op.Concat(op.Shape(x, end=axis), groups, op.Constant(value_ints=[group]),
                              op.Shape(x, start=axis + 1), axis=0)
    del shape
    amax = op.ReduceMax(op.Abs(op.Reshape(x, grouped_shape)), op.Constant(value_ints=[axis + 1]), keepdims=0)
    scale = op.Max(op.Div(amax, op.Constant(value_float=7.0)), op.Constant(value_float=SCALE_EPS))
    xq = op.QuantizeLinear(x, scale, axis=axis, block_size=group, output_dtype=onnx.TensorProto.INT4)
    return op.DequantizeLinear(xq, scale, axis=axis, block_size=group)


ONNX_TRANSLATIONS: dict[Any, Any] = {
    torch.ops.qdc.dequantize_blockwise.default: _onnx_dequantize_blockwise,
    torch.ops.qdc.fake_quantize_int4_group.default: _onnx_fake_quantize_int4_group,
}


# --------------------------------------------------------------------------------------------------
# Blockwise quantization and clip search (tensor math, no graph)
# --------------------------------------------------------------------------------------------------


def quantize_blockwise(w: torch.Tensor, block_size: int, clip_ratio: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """w float [O, K] -> (q int8 [O, K] in -8..7, scale float32 [O, ceil(K / block_size)])."""
    out_features, k = w.shape
    blocks = math.ceil(k / block_size)
    padded = F.pad(w.float(), (0, blocks * block_size - k))
    amax = padded.reshape(out_features, blocks, block_size).abs().amax(dim=2)
    scale = torch.clamp(amax * clip_ratio / 7.0, min=SCALE_EPS)
    expanded = scale.repeat_interleave(block_size, dim=1)[:, :k]
    q = torch.clamp(torch.round(w.float() / expanded), QMIN, QMAX).to(torch.int8)
    return q, scale


def fake_quantize_blockwise(w: torch.Tensor, block_size: int, clip_ratio: float = 1.0) -> torch.Tensor:
    q, scale = quantize_blockwise(w, block_size, clip_ratio)
    return dequantize_blockwise(q, scale, block_size)


def search_clip_ratio(w: torch.Tensor, x_rows: torch.Tensor | None, block_size: int,
                      ratios: Sequence[float] = DEFAULT_CLIP_RATIOS) -> tuple[float, dict[float, float]]:
    """The ratio (from ``ratios``) minimizing the layer output error ||X D^T||^2, D = W - W_hat(ratio);
    with no activations, 1.0.

    Two exact routes, in float64, whichever costs fewer multiply-adds: through the Gram matrix
    G = X^T X (N K^2 once, then O K^2 per ratio; wins when the N rows outnumber K) or directly
    (N K O per ratio). A full-size 3x3 conv on 1280 channels has K = 11520 > N = 1024 rows: the Gram
    route there is a 1 GB matrix and 170 GFLOP per ratio, the direct one 15 GFLOP.
    """
    if x_rows is None or x_rows.numel() == 0:
        return 1.0, {}
    rows, k = x_rows.shape
    out_features = w.shape[0]
    through_gram = rows * k * k + len(ratios) * out_features * k * k < len(ratios) * rows * k * out_features
    with torch.no_grad():
        x = x_rows.double()
        gram = x.T @ x if through_gram else None

        def error(ratio: float) -> float:
            d = (w - fake_quantize_blockwise(w, block_size, ratio)).double()
            if gram is not None:
                return float(((d @ gram) * d).sum())
            return float(((x @ d.T) ** 2).sum())

        errors = {float(r): error(r) for r in ratios}
    best = min(errors, key=lambda r: (errors[r], -r))
    return best, errors


def activation_group(channels: int, group: int) -> int:
    """Largest divisor of ``channels`` that is <= ``group``."""
    for g in range(min(group, channels), 0, -1):
        if channels % g == 0:
            return g
    return 1
