"""SVDQuant (Li et al., ICLR 2025) as an FX pass, for w4a4 and w4a8 (and w4a16, where only the weights are
rounded: the low-rank branch then takes the weights' largest directions out of INT4, at its size cost).

Per quantized layer with weight W (input channel j) and recorded inputs X:

1. Smoothing: lambda_j = max|X_j|^a / max|W_j|^(1 - a); X' = X / lambda, W' = W * lambda (exact in float).
   ``a`` is chosen per layer from a grid by the layer output error below (a = 0 with lambda = 1/max|W_j|
   is in the grid's neighbourhood; 1.0 is not, as it moves all range into the weights).
2. Low rank: W' (flattened to [O, K]) = L1 L2 + R with L1 = U_r S_r, L2 = V_r^T from the SVD; the branch
   is rounded to 16-bit (fp16 values) and *stored as float32* in ONNX: ONNX Runtime CPU has no fast fp16
   MatMul/Conv and a Cast after an fp16 initializer would be constant-folded back to float32 by the
   exporter's optimizer, so float16 storage would cost Cast nodes for no runtime gain; the size cost is
   r * (O + K) * 4 bytes per layer (reported by the build's ``weight_bytes_by_dtype``).
3. R is left as the layer's (float) weight; :func:`qdc_export.quantize.int4.quantize_int4` then makes it
   INT4 blockwise with its clip search, on the smoothed inputs this pass hands back.

Objective for ``a``: ||X W^T - (Qa(X') Qw(R)^T + X' L2^T L1^T)||^2, Qa the deployed activation quantizer
(INT4 dynamic group for w4a4, INT8 per-tensor max for w4a8), Qw INT4 blockwise.

Graph form (ordinary ONNX ops after export): ``x' = x * (1 / lambda)`` as an explicit Mul (folding it into
a preceding LayerNorm/Conv is possible but not done: the input is often shared by q/k/v), the main layer
reads x', and ``up(down(x'))`` is added to its output. Linear: two Linear (MatMul) ops. Conv2d (groups 1,
numeric padding): ``down`` is a Conv with the layer's kernel, stride, padding and dilation and r output
channels, ``up`` a 1x1 Conv. The effective rank is min(rank, min(O, K) // 4) so the branch stays a small
fraction of the layer (on the tiny test models rank 32 would otherwise be full rank and hide all error);
layers where that is 0 get smoothing only."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx

from qdc_export.passes import PassResult, require
from qdc_export.quantize.fake_quant import (
    CONV2D,
    LINEAR,
    activation_group,
    fake_quantize_blockwise,
    fake_quantize_int4_group,
    fake_quantize_int8_tensor,
)
from qdc_export.quantize.int4 import holder_submodule, input_rows, layers_with_inputs, weight_value

HOLDER = "qdc_svdquant"  # submodule holding smoothing factors and low-rank factors; a float-layer glob
DEFAULT_ALPHAS: tuple[float, ...] = (0.25, 0.4, 0.5, 0.6, 0.75)


@dataclass(frozen=True, kw_only=True)
class SvdQuantOptions:
    rank: int = 32
    alphas: tuple[float, ...] = DEFAULT_ALPHAS
    block_size: int = 64
    activation: str = "int4-group"  # or "int8-tensor" (w4a8), "none" (w4a16: weight-only)
    activation_group: int = 64
    rank_divisor: int = 4
    prefix: str = "unet."


def _act_quant(x: torch.Tensor, axis: int, options: SvdQuantOptions) -> torch.Tensor:
    if options.activation == "none":
        return x
    if options.activation == "int4-group":
        return fake_quantize_int4_group(x, axis, activation_group(x.shape[axis], options.activation_group))
    return fake_quantize_int8_tensor(x)


@dataclass
class _Candidate:
    alpha: float
    error: float
    lam: torch.Tensor
    residual: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor


def svdquant_layer(node: torch.fx.Node, w: torch.Tensor, samples: list[torch.Tensor],
                   options: SvdQuantOptions) -> tuple[_Candidate, float] | None:
    """Best smoothing + low-rank decomposition for one layer, and the plain RTN error for comparison."""
    axis = 1 if node.target == CONV2D else samples[0].dim() - 1
    rows = input_rows(node, w.shape, samples)
    if rows is None:
        return None
    out_ch, k = w.shape[0], w[0].numel()
    w2d = w.reshape(out_ch, k)
    reference = rows @ w2d.T
    reduce_dims = [d for d in range(samples[0].dim()) if d != axis]
    xmax = torch.stack([s.abs().amax(dim=reduce_dims) for s in samples]).amax(dim=0)
    wmax = w.abs().amax(dim=[d for d in range(w.dim()) if d != 1])
    rank = min(options.rank, min(out_ch, k) // options.rank_divisor)
    view = [1] * samples[0].dim()
    view[axis] = -1
    rtn_rows = input_rows(node, w.shape, [_act_quant(s, axis, options) for s in samples])
    rtn_error = float(((reference - rtn_rows @ fake_quantize_blockwise(w2d, options.block_size).T) ** 2).sum())
    best: _Candidate | None = None
    for alpha in options.alphas:
        lam = (xmax.clamp(min=1e-5) ** alpha) / (wmax.clamp(min=1e-5) ** (1 - alpha))
        lam = torch.where((xmax > 0) & (wmax > 0), lam, torch.ones_like(lam)).clamp(1e-4, 1e4)
        wview = [1] * w.dim()
        wview[1] = -1
        ws = (w * lam.reshape(wview)).reshape(out_ch, k)
        if rank > 0:
            u, s, vh = torch.linalg.svd(ws.double(), full_matrices=False)
            up = (u[:, :rank] * s[:rank]).float().half().float()
            down = vh[:rank].float().half().float()
            residual = ws - up @ down
        else:
            up, down, residual = torch.zeros(out_ch, 0), torch.zeros(0, k), ws
        smoothed = [s / lam.reshape(view) for s in samples]
        x_rows = input_rows(node, w.shape, smoothed)
        q_rows = input_rows(node, w.shape, [_act_quant(s, axis, options) for s in smoothed])
        out = q_rows @ fake_quantize_blockwise(residual, options.block_size).T
        if rank > 0:
            out = out + (x_rows @ down.T) @ up.T
        error = float(((reference - out) ** 2).sum())
        if best is None or error < best.error:
            best = _Candidate(alpha, error, lam, residual, up, down)
    assert best is not None
    return best, rtn_error


def _replace_attr(gm: torch.fx.GraphModule, target: str, value: torch.Tensor) -> None:
    """New tensor under ``target`` (never in place: the captured graph may share storage with the FP model)."""
    owner_path, _, leaf = target.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    old = getattr(owner, leaf)
    delattr(owner, leaf)
    if isinstance(old, torch.nn.Parameter):
        owner.register_parameter(leaf, torch.nn.Parameter(value, requires_grad=False))
    else:
        owner.register_buffer(leaf, value)


def svdquant_(gm: torch.fx.GraphModule, layers: Iterable[str], activations: dict[str, list[torch.Tensor]],
             options: SvdQuantOptions) -> PassResult:
    """Needs: float Conv2d/Linear calls with get_attr weights and recorded inputs per layer.
    Guarantees: per layer, smoothing Mul on its input, the weight replaced by the float residual R and a
    low-rank float branch added to its output. ``products["activations"]``: the inputs as the layer now sees them
    (X')."""
    holder = holder_submodule(gm, HOLDER)
    smoothed_inputs = dict(activations)
    per_layer: dict[str, dict[str, Any]] = {}
    graph = gm.graph
    for name, node, samples in layers_with_inputs(gm, layers, activations, options.prefix):
        args = list(node.args) + [None] * (7 - len(node.args))
        if node.target == CONV2D and ((args[6] or 1) != 1 or isinstance(args[4], str)):
            continue
        weight_node = node.args[1]
        w = weight_value(gm, weight_node).detach().float()
        found = svdquant_layer(node, w, samples, options)
        if found is None:
            continue
        best, rtn_error = found
        key = name.replace(".", "_")
        axis = 1 if node.target == CONV2D else samples[0].dim() - 1
        view = [1] * samples[0].dim()
        view[axis] = -1
        holder.register_buffer(f"{key}_inv_lambda", (1.0 / best.lam).reshape(view[1:] if axis == samples[0].dim() - 1
                                                                               else [-1, 1, 1]).contiguous())
        _replace_attr(gm, str(weight_node.target), best.residual.reshape(w.shape).contiguous())
        rank = best.up.shape[1]
        x = node.args[0]
        with graph.inserting_before(node):
            inv = graph.get_attr(f"{HOLDER}.{key}_inv_lambda")
            xs = graph.call_function(torch.ops.aten.mul.Tensor, (x, inv))
            if "val" in x.meta:
                xs.meta["val"] = x.meta["val"]
        node.update_arg(0, xs)
        if rank > 0:
            if node.target == CONV2D:
                holder.register_buffer(f"{key}_down", best.down.reshape(rank, *w.shape[1:]).contiguous())
                holder.register_buffer(f"{key}_up", best.up.reshape(w.shape[0], rank, 1, 1).contiguous())
            else:
                holder.register_buffer(f"{key}_down", best.down.contiguous())
                holder.register_buffer(f"{key}_up", best.up.contiguous())
            with graph.inserting_after(node):
                down_w = graph.get_attr(f"{HOLDER}.{key}_down")
            with graph.inserting_after(down_w):
                up_w = graph.get_attr(f"{HOLDER}.{key}_up")
            with graph.inserting_after(up_w):
                if node.target == CONV2D:
                    stride, padding, dilation = args[3] or [1, 1], args[4] or [0, 0], args[5] or [1, 1]
                    down = graph.call_function(CONV2D, (xs, down_w, None, stride, padding, dilation, 1))
                else:
                    down = graph.call_function(LINEAR, (xs, down_w))
            with graph.inserting_after(down):
                up = graph.call_function(CONV2D, (down, up_w)) if node.target == CONV2D \
                    else graph.call_function(LINEAR, (down, up_w))
            with graph.inserting_after(up):
                added = graph.call_function(torch.ops.aten.add.Tensor, (node, up))
            node.replace_all_uses_with(added, delete_user_cb=lambda user: user is not added)
        smoothed_inputs[name] = [s / best.lam.reshape(view) for s in samples]
        per_layer[name] = {"alpha": best.alpha, "rank": rank, "error": best.error, "rtn_error": rtn_error}
    require(all(v["error"] == v["error"] for v in per_layer.values()), "svdquant", "NaN layer error")
    if per_layer:
        graph.lint()
        gm.recompile()
    return PassResult(gm, bool(per_layer), {"svdquant_layers": len(per_layer), "layers": per_layer},
                      {"activations": smoothed_inputs})
