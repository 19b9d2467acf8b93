"""INT4 passes: blockwise INT4 weights (w4a16 / w4a8 / w4a4) and dynamic group INT4 activations (w4a4).

Weights. Symmetric, range -8..7, one scale per block of ``block_size`` consecutive input elements of
the weight flattened to [O, K] (Linear: K = in_features; Conv: K = C * kh * kw in PyTorch order, so a
block spans input channels and kernel taps; the last block may be ragged). The scale of a block is
``ratio * max|w| / 7`` with one clip ratio per layer, chosen from a grid by the layer output error
``||X W^T - X Q(W)^T||`` on recorded calibration inputs X (ratio 1.0 is in the grid, so the choice is
never worse than plain max scaling on that objective).

In the graph a quantized weight is ``qdc::dequantize_blockwise(q_int8, scale, block_size)`` (+ a
reshape back to 4-D for Conv), a custom torch.library op. :data:`ONNX_TRANSLATIONS` maps it through
``torch.onnx.export(custom_translation_table=...)`` to a standard opset-21 ``DequantizeLinear(axis=1,
block_size)``; :func:`qdc_export.export.onnx_weights.fold_weight_transposes` folds the ``Transpose``
that the exporter puts between DQ and MatMul for Linear (axis 1 -> 0, exact), so ONNX Runtime fuses
DQ -> MatMul into MatMulNBits, and :func:`pack_int4_initializers` stores those INT8 initializers as
packed INT4. The final ONNX has no custom-domain ops.

Measured with onnxruntime 1.32 CPU (docs in the module tests and benchmarks/results/int4.md): blocked
INT4 DequantizeLinear runs on 2-D weights with a ragged last block and on 4-D weights; an INT4
QuantizeLinear with block_size and a run-time scale runs too. TensorRT's rule R4 wants the block axis
on one of the last two dims, which the flattened [O, K] form satisfies (a 4-D Conv weight blocked on
axis 1 would not); hence the DQ -> Reshape -> Conv form.

Activations (w4a4 only). Dynamic symmetric INT4 per group of ``group`` channels (the SVDQuant recipe:
scale = max|x| / 7 over each group of each token/pixel, computed at run time), as
``qdc::fake_quantize_int4_group`` in PyTorch and QuantizeLinear/DequantizeLinear(INT4, block_size) in
ONNX. A static blocked scale cannot be expressed for a dynamic batch (ONNX wants the scale shaped like
the input except on the block axis). Channels not divisible by the group use the largest divisor of C
that is <= group (32-channel layers get one group of 32)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import onnx
import torch
import torch.fx
import torch.nn.functional as F
from onnx import numpy_helper

from qdc_export.load.plugins.base import layer_is_float
from qdc_export.passes import PassResult, require
from qdc_export.quantize.fake_quant import (
    CONV2D,
    DEFAULT_CLIP_RATIOS,
    LINEAR,
    QMAX,
    QMIN,
    activation_group,
    quantize_blockwise,
    search_clip_ratio,
)

INT4_ATTR = "qdc_int4"  # submodule holding the INT4 weights (int8 storage) and their scales


# --------------------------------------------------------------------------------------------------
# Custom ops (PyTornputs (for clip search and SVDQuant)
# --------------------------------------------------------------------------------------------------


class InputRecorder(torch.nn.Module):
    """Identity that keeps a few of the tensors it sees: ``items`` batch items (spread over the batch, so a
    classifier-free-guidance batch [uncond; cond] gives both halves when items >= 2) of up to ``max_calls``
    calls. items = 1 keeps the first item, as RTN and SVDQuant builds always have."""

    def __init__(self, max_calls: int = 64, items: int = 1) -> None:
        super().__init__()
        self.max_calls = max_calls
        self.items = items
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.seen) < self.max_calls:
            batch = x.shape[0]
            index = torch.linspace(0, batch - 1, min(self.items, batch)).round().long() if self.items > 1 \
                else torch.tensor([0])
            self.seen.append(x[index].detach().float().clone())
        return x


RECORDER_PREFIX = "qdc_recorder_"


def compute_layers(gm: torch.fx.GraphModule, prefix: str = "unet.") -> Iterable[tuple[str, torch.fx.Node]]:
    """(layer name, node) of every Conv2d/Linear call whose weight is a get_attr."""
    from qdc_export.quantize.annotate import layer_name

    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in (CONV2D, LINEAR):
            name = layer_name(node, prefix)
            if name is not None:
                yield name, node


def select_layers(gm: torch.fx.GraphModule, float_globs: tuple[str, ...], include: tuple[str, ...],
                  prefix: str = "unet.") -> tuple[list[str], list[str]]:
    quantized, kept = [], []
    for name, _ in compute_layers(gm, prefix):
        (kept if layer_is_float(name, float_globs=float_globs, include=include) else quantized).append(name)
    return quantized, kept


def insert_recorders_(gm: torch.fx.GraphModule, layers: Iterable[str], prefix: str = "unet.",
                     items: int = 1) -> PassResult:
    """Needs: Conv/Linear calls with get_attr weights. Guarantees: an :class:`InputRecorder` on the input of
    each named layer (remove with :func:`remove_recorders`)."""
    wanted = set(layers)
    added = 0
    for name, node in list(compute_layers(gm, prefix)):
        if name not in wanted:
            continue
        target = RECORDER_PREFIX + name.replace(".", "_")
        gm.add_submodule(target, InputRecorder(items=items))
        with gm.graph.inserting_before(node):
            rec = gm.graph.call_module(target, (node.args[0],))
        node.update_arg(0, rec)
        added += 1
    if added:
        gm.recompile()
    return PassResult(gm, added > 0, {"recorders": added})


def remove_recorders_(gm: torch.fx.GraphModule) -> PassResult:
    """Removes every recorder; ``products["activations"]``: what each saw, keyed by layer name (dots restored
    from the node)."""
    seen: dict[str, list[torch.Tensor]] = {}
    removed = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and str(node.target).startswith(RECORDER_PREFIX):
            module = gm.get_submodule(str(node.target))
            for user in list(node.users):
                if user.op == "call_function" and user.target in (CONV2D, LINEAR):
                    from qdc_export.quantize.annotate import layer_name

                    name = layer_name(user, "unet.")
                    if name is not None:
                        seen[name] = list(module.seen)
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            delattr(gm, str(node.target))
            removed += 1
    if removed:
        gm.recompile()
    return PassResult(gm, removed > 0, {"recorders_removed": removed}, {"activations": seen})


def input_rows(node: torch.fx.Node, weight_shape: Sequence[int], samples: list[torch.Tensor],
               max_rows: int = 1024) -> torch.Tensor | None:
    """Layer inputs in the flattened [N, K] form matching the weight flattened to [O, K]."""
    if not samples:
        return None
    if node.target == LINEAR:
        rows = torch.cat([s.reshape(-1, s.shape[-1]) for s in samples])
    else:
        args = list(node.args) + [None] * (7 - len(node.args))
        kernel = tuple(weight_shape[2:])
        stride, padding, dilation = args[3] or 1, args[4] or 0, args[5] or 1
        groups = args[6] or 1
        if groups != 1 or isinstance(padding, str):
            return None
        cols = [F.unfold(s, kernel, dilation=dilation, padding=padding, stride=stride) for s in samples]
        rows = torch.cat([c.transpose(1, 2).reshape(-1, c.shape[1]) for c in cols])  # every batch item
    if rows.shape[0] > max_rows:
        index = torch.linspace(0, rows.shape[0] - 1, max_rows).round().long()
        rows = rows[index]
    return rows


# --------------------------------------------------------------------------------------------------
# The FX pass
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Int4Options:
    block_size: int = 64
    clip_ratios: tuple[float, ...] = DEFAULT_CLIP_RATIOS
    activation_group: int | None = None  # w4a4: INT4 dynamic group activations
    rounding: str = "rtn"  # or "gptq" (qdc_export.quantize.gptq), same grid and scales layout
    gptq: Any = None  # GptqOptions; None = its defaults
    prefix: str = "unet."


def _holder(gm: torch.fx.GraphModule) -> torch.nn.Module:
    if not hasattr(gm, INT4_ATTR):
        gm.add_submodule(INT4_ATTR, torch.nn.Module())
    return gm.get_submodule(INT4_ATTR)


def layers_with_inputs(gm: torch.fx.GraphModule, layers: Iterable[str], activations: dict[str, list[torch.Tensor]],
                       prefix: str) -> list[tuple[str, torch.fx.Node, list[torch.Tensor]]]:
    """(name, node, recorded inputs) of the wanted layers that have recorded inputs, in graph order; a list, so
    callers may edit the graph while they walk it (the per-layer loop of AWQ and SVDQuant)."""
    wanted = set(layers)
    return [(name, node, activations[name]) for name, node in compute_layers(gm, prefix)
            if name in wanted and activations.get(name)]


def holder_submodule(gm: torch.fx.GraphModule, name: str) -> torch.nn.Module:
    """The buffer-only submodule ``name`` of ``gm`` that a pass puts its constants in (created on first use)."""
    if not hasattr(gm, name):
        gm.add_submodule(name, torch.nn.Module())
    return gm.get_submodule(name)


def weight_value(gm: torch.fx.GraphModule, node: torch.fx.Node) -> torch.Tensor:
    return gm.get_parameter(str(node.target)) if str(node.target) in dict(gm.named_parameters()) \
        else gm.get_buffer(str(node.target))


def _delete_attr(gm: torch.fx.GraphModule, target: str) -> None:
    owner_path, _, leaf = target.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    delattr(owner, leaf)


def quantize_int4_(gm: torch.fx.GraphModule, layers: Iterable[str], options: Int4Options,
                  activations: dict[str, list[torch.Tensor]] | None = None) -> PassResult:
    """Needs: Conv2d/Linear calls whose weight is a float get_attr (INT4 layers named in ``layers``).
    Guarantees: each such weight is replaced by ``dequantize_blockwise`` of INT4 values (int8 storage) and
    scales; the old float attribute is deleted when no other node reads it; with
    ``options.activation_group`` the layer input goes through ``fake_quantize_int4_group``.
    Consumes ``activations``: a quantized layer's entry is removed from the dict."""
    wanted = set(layers)
    activations = activations or {}
    holder = _holder(gm)
    per_layer: dict[str, dict[str, Any]] = {}
    for name, node in list(compute_layers(gm, options.prefix)):
        if name not in wanted:
            continue
        weight_node = node.args[1]
        w = weight_value(gm, weight_node).detach().float()
        require(w.dim() in (2, 4), "quantize_int4", f"{name}: unexpected weight rank {w.dim()}")
        w2d = w.reshape(w.shape[0], -1)
        # popped: each layer's recorded inputs are freed once its clip ratio is chosen (3.8 GB on SDXL)
        samples = activations.pop(name, [])
        found = None
        if options.rounding == "gptq" and samples:
            from qdc_export.quantize.gptq import round_layer  # gptq imports this module

            found = round_layer(node, w.shape, w2d, samples, options.block_size, options.clip_ratios, options.gptq)
        if found is not None:
            q, scale, ratio, record = found
        else:
            rows = input_rows(node, w.shape, samples)
            ratio, errors = search_clip_ratio(w2d, rows, options.block_size, options.clip_ratios)
            q, scale = quantize_blockwise(w2d, options.block_size, ratio)
            record = {"rounding": "rtn", "error_ratio_1": errors.get(1.0), "error_chosen": errors.get(ratio)}
        del samples
        key = name.replace(".", "_")
        holder.register_buffer(f"{key}_q", q)
        holder.register_buffer(f"{key}_scale", scale)
        graph = gm.graph
        with graph.inserting_before(node):
            q_node = graph.get_attr(f"{INT4_ATTR}.{key}_q")
            s_node = graph.get_attr(f"{INT4_ATTR}.{key}_scale")
            dq = graph.call_function(torch.ops.qdc.dequantize_blockwise.default, (q_node, s_node, options.block_size))
            new_weight = dq
            if w.dim() == 4:
                new_weight = graph.call_function(torch.ops.aten.reshape.default, (dq, list(w.shape)))
            if options.activation_group:
                x = node.args[0]
                val = x.meta.get("val", node.meta.get("val"))  # Linear keeps the rank of its input
                axis = 1 if node.target == CONV2D else len(val.shape) - 1 if val is not None else None
                require(axis is not None, "quantize_int4", f"{name}: input rank unknown (no 'val' meta)")
                channels = int(w.shape[1]) if node.target == CONV2D else int(w.shape[-1])
                group = activation_group(channels, options.activation_group)
                fq = graph.call_function(torch.ops.qdc.fake_quantize_int4_group.default, (x, axis, group))
                node.update_arg(0, fq)
        node.update_arg(1, new_weight)
        if not weight_node.users:
            graph.erase_node(weight_node)
            _delete_attr(gm, str(weight_node.target))
        per_layer[name] = {"clip_ratio": ratio, "shape": list(w.shape), "blocks": int(scale.shape[1]), **record}
    if per_layer:
        gm.graph.lint()
        gm.recompile()
    details: dict[str, Any] = {"int4_layers": len(per_layer), "block_size": options.block_size,
                               "activation_group": options.activation_group, "rounding": options.rounding}
    if options.rounding == "gptq":
        details["gptq_layers"] = sum(1 for v in per_layer.values() if v["rounding"] == "gptq")
    return PassResult(gm, bool(per_layer), {**details, "layers": per_layer})



# --------------------------------------------------------------------------------------------------
# ONNX post-pass: true INT4 initializers
# --------------------------------------------------------------------------------------------------


def _attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def pack_int4_initializers(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, int]]:
    """In place on ``model``. Stores every INT8 initializer read only by a blocked DequantizeLinear, whose
    values all lie in -8..7, as packed INT4 (the Linear Transpose is already folded into it by
    :func:`qdc_export.export.onnx_weights.fold_weight_transposes`). Returns the model and the count
    (``modified`` = count > 0)."""
    import ml_dtypes

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    packed = 0
    touched: set[str] = set()
    for node in list(graph.node):
        if node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx") or not _attr(node, "block_size", 0):
            continue
        data, scale_name = node.input[0], node.input[1]
        init, scale_init = inits.get(data), inits.get(scale_name)
        if init is None or scale_init is None or init.data_type != onnx.TensorProto.INT8:
            continue
        if len(consumers.get(data, [])) != 1 or len(consumers.get(scale_name, [])) != 1:
            continue
        values = numpy_helper.to_array(init)
        if values.min() < QMIN or values.max() > QMAX:
            continue
        init.CopyFrom(numpy_helper.from_array(values.astype(ml_dtypes.int4), data))
        touched.add(data)
        packed += 1
    # value_info entries of retyped tensors may now be stale
    if packed:
        kept = [vi for vi in graph.value_info if vi.name not in touched]
        del graph.value_info[:]
        graph.value_info.extend(kept)
    return model, {"int4_initializers": packed}


def int4_buffer_names(gm: torch.nn.Module) -> set[str]:
    """State-dict keys of INT4 values (int8 storage) written by :func:`quantize_int4`."""
    return {k for k in gm.state_dict() if k.startswith(INT4_ATTR + ".") and k.endswith("_q")}


def weight_bytes_by_dtype(gm: torch.nn.Module) -> dict[str, int]:
    """Bytes of the graph's constants by storage dtype, counting INT4 values at 4 bits."""
    int4 = int4_buffer_names(gm)
    sizes: dict[str, int] = {}
    for key, t in gm.state_dict().items():
        if key in int4:
            dtype, nbytes = "int4", (t.numel() + 1) // 2
        else:
            dtype, nbytes = str(t.dtype).removeprefix("torch."), t.numel() * t.element_size()
        sizes[dtype] = sizes.get(dtype, 0) + nbytes
    return dict(sorted(sizes.items()))
