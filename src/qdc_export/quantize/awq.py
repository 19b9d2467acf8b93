"""Activation-aware weight scaling (AWQ, Lin et al., MLSys 2024) as an FX pass, for w4a16 and w4a8.

Per quantized layer with weight W (input channel j) and recorded inputs X:

    s_j = mean|X_j|^alpha, normalized by sqrt(max s * min s);  W' = W * s (per input channel),  x' = x / s

so x' W'^T = x W^T exactly in float: the pass changes no output before rounding (tests check it). The INT4
grid then rounds W', whose salient input channels (large mean |X_j|) were scaled up and so lose less to
rounding. ``alpha`` is searched per layer on a grid by the deployed layer output error
``||X W^T - Qa(X') Qw(W')^T||^2`` with Qw the blockwise INT4 weight quantizer (clip ratio 1; the INT4 pass
searches the clip afterwards) and Qa the INT8 per-tensor activation quantizer for w4a8 (identity for
w4a16). alpha = 0 gives s = 1, the unscaled layer, so the chosen alpha is never worse on that objective.

Where 1/s goes: an explicit ``Mul`` on the layer's input (as SVDQuant's smoothing does), before the INT8
activation quantizer of w4a8, so that quantizer sees x'. Folding 1/s into the previous op (a norm's affine,
the previous layer's output channels) would save that Mul, but the input of a quantized layer is often
shared (q/k/v read the same normed tensor; a SiLU sits between most GroupNorms and convs) and the Mul is a
per-channel multiply on the activation, small next to the layer. Weight-dequantization folding
(``DQ -> Mul -> MatMul``) would break ONNX Runtime's DQ -> MatMul fusion (MatMulNBits) and TensorRT's
weight-only INT4 pattern, so it is not used."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx

from qdc_export.passes import PassResult
from qdc_export.quantize.fake_quant import CONV2D, fake_quantize_blockwise, fake_quantize_int8_tensor
from qdc_export.quantize.int4 import holder_submodule, input_rows, layers_with_inputs, weight_value
from qdc_export.quantize.svdquant import _replace_attr

HOLDER = "qdc_awq"  # submodule holding the 1/s factors (buffers only: no new layers)
DEFAULT_ALPHAS: tuple[float, ...] = tuple(i / 10 for i in range(11))


@dataclass(frozen=True, kw_only=True)
class AwqOptions:
    alphas: tuple[float, ...] = DEFAULT_ALPHAS
    block_size: int = 64
    activation: str = "none"  # or "int8-tensor" (w4a8)
    prefix: str = "unet."


def _act_quant(x: torch.Tensor, activation: str) -> torch.Tensor:
    return fake_quantize_int8_tensor(x) if activation == "int8-tensor" else x


def _channel_axis(node: torch.fx.Node, sample: torch.Tensor) -> int:
    return 1 if node.target == CONV2D else sample.dim() - 1


def awq_scales(node: torch.fx.Node, w: torch.Tensor, samples: list[torch.Tensor],
               options: AwqOptions) -> tuple[torch.Tensor, float, float, float] | None:
    """(s per input channel, alpha, error with s, error with s = 1) for one layer; None if unsupported."""
    rows = input_rows(node, w.shape, samples)
    if rows is None:
        return None
    axis = _channel_axis(node, samples[0])
    reduce_dims = [d for d in range(samples[0].dim()) if d != axis]
    total = sum(s.abs().sum(dim=reduce_dims).double() for s in samples)
    count = sum(s.numel() // s.shape[axis] for s in samples)
    mean_abs = (total / count).float().clamp(min=1e-6)
    out_ch, k = w.shape[0], w[0].numel()
    reference = rows @ w.reshape(out_ch, k).T
    wview = [1] * w.dim()
    wview[1] = -1
    view = [1] * samples[0].dim()
    view[axis] = -1
    best: tuple[torch.Tensor, float, float] | None = None
    base_error = float("nan")
    for alpha in options.alphas:
        s = mean_abs ** alpha
        s = (s / (s.max() * s.min()).sqrt()).clamp(1e-4, 1e4)
        scaled = (w * s.reshape(wview)).reshape(out_ch, k)
        x_rows = input_rows(node, w.shape, [_act_quant(x / s.reshape(view), options.activation) for x in samples])
        out = x_rows @ fake_quantize_blockwise(scaled, options.block_size).T
        error = float(((reference - out) ** 2).sum())
        if alpha == 0.0:
            base_error = error
        if best is None or error < best[2]:
            best = (s, float(alpha), error)
    assert best is not None
    return best[0], best[1], best[2], base_error


def awq_(gm: torch.fx.GraphModule, layers: Iterable[str], activations: dict[str, list[torch.Tensor]],
        options: AwqOptions) -> PassResult:
    """Needs: float Conv2d/Linear calls with get_attr weights and recorded inputs per layer.
    Guarantees: per layer, ``x * (1/s)`` on its input and the weight replaced by W * s (both float; the
    layer's output is unchanged up to float rounding). ``products["activations"]``: the inputs as the layer now
    sees them (x / s)."""
    holder = holder_submodule(gm, HOLDER)
    scaled_inputs = dict(activations)
    per_layer: dict[str, dict[str, Any]] = {}
    graph = gm.graph
    for name, node, samples in layers_with_inputs(gm, layers, activations, options.prefix):
        target = str(node.args[1].target)
        w = weight_value(gm, node.args[1]).detach().float()
        found = awq_scales(node, w, samples, options)
        if found is None:
            continue
        s, alpha, error, base_error = found
        if alpha == 0.0:  # s = 1: nothing to insert
            per_layer[name] = {"alpha": 0.0, "error": error, "error_unscaled": base_error}
            continue
        axis = _channel_axis(node, samples[0])
        wview = [1] * w.dim()
        wview[1] = -1
        _replace_attr(gm, target, (w * s.reshape(wview)).contiguous())
        key = name.replace(".", "_")
        inv_shape = [-1, 1, 1] if axis == 1 and samples[0].dim() == 4 else [-1]
        holder.register_buffer(f"{key}_inv_s", (1.0 / s).reshape(inv_shape).contiguous())
        x = node.args[0]
        with graph.inserting_before(node):
            inv = graph.get_attr(f"{HOLDER}.{key}_inv_s")
            xs = graph.call_function(torch.ops.aten.mul.Tensor, (x, inv))
            if "val" in x.meta:
                xs.meta["val"] = x.meta["val"]
        node.update_arg(0, xs)
        view = [1] * samples[0].dim()
        view[axis] = -1
        scaled_inputs[name] = [x_ / s.reshape(view) for x_ in samples]
        per_layer[name] = {"alpha": alpha, "error": error, "error_unscaled": base_error}
    if per_layer:
        graph.lint()
        gm.recompile()
    scaled = sum(1 for v in per_layer.values() if v["alpha"] > 0)
    return PassResult(gm, scaled > 0, {"awq_layers": scaled, "layers": per_layer}, {"activations": scaled_inputs})
