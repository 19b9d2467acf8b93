"""Half-precision network for TensorRT: the float compute of a (Q/DQ) graph in FP16 or BF16.

A strongly typed TensorRT network runs exactly the types it is given, so an FP32 ONNX file with INT8
Q/DQ builds an engine whose non-quantized layers run in true FP32. Model Optimizer and demoDiffusion
export FP16 networks with INT8/FP8 Q/DQ instead; this pass does the same on the PyTorch graph, so the
reference graph (``reference.pt2``) and the ONNX file are one graph in one dtype.

What it does to a GraphModule (the engine I/O stays FP32: a cast after each float input and before
each output, so every caller keeps feeding and reading float32):

* float32 parameters and buffers become ``dtype`` (INT8/INT4 weights stay integers);
* ``quantize_per_tensor`` / ``dequantize_per_*`` scales are rounded to ``dtype`` and every
  dequantize produces ``dtype`` (``out_dtype``): TensorRT takes a DequantizeLinear's output type
  from its scale type, so the exported DQ carries a ``dtype`` scale and no Cast follows it;
* the timestep input stays FP32 and the sinusoidal embedding is computed from it in FP32, as
  diffusers does in half precision (``get_time_embed`` casts it to the model dtype afterwards): FP16
  has a step of 0.5 at t = 999, far too coarse for ``sin(t * f)``;
* wherever an op would mix FP32 and ``dtype`` tensors (there: the embedding meets the first Linear),
  the FP32 operands are cast to ``dtype``. Found by running the graph once on the example inputs;
* the folded compensation head (module ``head``, its tables and the ``comp_state`` input) stays FP32: it is
  exact arithmetic checked elementwise against the FP32 tables (check/head.py), and FP16 would round it by
  about 1e-3 (measured on digits-uncond). Where the head meets the FP16 body output, that output is cast up.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx
from torch._subclasses.fake_tensor import FakeTensorMode

from qdc_export.load.plugins.base import COMP_STATE, HEAD_PREFIX, TIMESTEP
from qdc_export.passes import PassResult, require

HALF_DTYPES: dict[str, torch.dtype] = {"fp16": torch.float16, "bf16": torch.bfloat16}

_QD = torch.ops.quantized_decomposed
_QUANTIZE = {_QD.quantize_per_tensor.default, _QD.quantize_per_channel.default}
_DEQUANTIZE = {_QD.dequantize_per_tensor.default, _QD.dequantize_per_channel.default}
_TO_COPY = torch.ops.aten._to_copy.default
_ASSERT_METADATA = torch.ops.aten._assert_tensor_metadata.default
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_HEAD = HEAD_PREFIX.rstrip(".")  # the folded compensation head's module (compensation/fold.py)


def _round_scale(value: float, dtype: torch.dtype) -> float:
    """A scale as the half dtype represents it (what the ONNX DequantizeLinear will hold)."""
    return float(torch.tensor(value, dtype=torch.float32).to(dtype).float())


def _cast(graph: torch.fx.Graph, node: torch.fx.Node, dtype: torch.dtype) -> torch.fx.Node:
    return graph.call_function(_TO_COPY, (node,), {"dtype": dtype})


def _in_head(name: str) -> bool:
    return name == _HEAD or name.startswith(_HEAD + ".")


def _convert_state(gm: torch.fx.GraphModule, dtype: torch.dtype) -> int:
    converted = 0
    for qualified, module in gm.named_modules():
        if _in_head(qualified):
            continue
        for name, param in list(module.named_parameters(recurse=False)):
            if param.dtype == torch.float32:
                module.register_parameter(name, torch.nn.Parameter(param.detach().to(dtype), requires_grad=False))
                converted += 1
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf is not None and buf.dtype == torch.float32:
                module.register_buffer(name, buf.to(dtype))
                converted += 1
    for name in list(vars(gm)):  # constants torch.export keeps as plain tensor attributes
        value = getattr(gm, name)
        if isinstance(value, torch.Tensor) and value.dtype == torch.float32 and name not in gm._buffers \
                and not _in_head(name):
            setattr(gm, name, value.to(dtype))
            converted += 1
    return converted


def _retype_qdq(gm: torch.fx.GraphModule, dtype: torch.dtype) -> int:
    changed = 0
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in _QUANTIZE | _DEQUANTIZE and isinstance(node.args[1], float):
            args = list(node.args)
            args[1] = _round_scale(args[1], dtype)
            node.args = tuple(args)
        if node.target in _DEQUANTIZE:
            node.kwargs = {**node.kwargs, "out_dtype": dtype}
            changed += 1
    return changed


class _MixedDtypeResolver(torch.fx.Interpreter):
    """Runs the graph; before each op whose float tensor operands mix FP32 and the half dtype, inserts
    casts of the FP32 operands (into the graph, and applies them to the running values)."""

    def __init__(self, gm: torch.fx.GraphModule, dtype: torch.dtype, fp32_sources: set[torch.fx.Node]) -> None:
        super().__init__(gm)
        self.dtype = dtype
        self.casts = 0
        self.fp32_region = set(fp32_sources)  # the compensation head: computed in FP32, half operands cast up

    def run_node(self, n: torch.fx.Node) -> Any:
        if n.op == "call_function" and n.target is not operator.getitem:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            tensors = [(i, a) for i, a in enumerate(n.args)
                       if isinstance(a, torch.fx.Node) and isinstance(self.env.get(a), torch.Tensor)]
            dtypes = {self.env[a].dtype for _, a in tensors if self.env[a].dtype in _FLOATS}
            in_fp32_region = any(a in self.fp32_region for a in n.all_input_nodes)
            if in_fp32_region:
                self.fp32_region.add(n)
            if torch.float32 in dtypes and self.dtype in dtypes:
                source, target = (self.dtype, torch.float32) if in_fp32_region else (torch.float32, self.dtype)
                new_args = list(n.args)
                for i, a in tensors:
                    if self.env[a].dtype == source:
                        with self.module.graph.inserting_before(n):
                            cast = _cast(self.module.graph, a, target)
                        self.env[cast] = self.env[a].to(target)
                        new_args[i] = cast
                        self.casts += 1
                n.args = tuple(new_args)
        return super().run_node(n)


def to_half_(gm: torch.fx.GraphModule, example: tuple[torch.Tensor, ...], input_names: list[str],
            dtype: torch.dtype = torch.float16) -> PassResult:
    """Needs: a GraphModule whose placeholders are the engine inputs (``input_names`` in order) and
    whose float tensors are FP32. Guarantees: the float compute in ``dtype`` except the timestep
    embedding, FP32 engine I/O, every dequantize producing ``dtype`` (see the module doc)."""
    require(dtype in HALF_DTYPES.values(), "to_half", f"unsupported dtype {dtype}")
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    require(len(placeholders) == len(input_names), "to_half",
            f"{len(placeholders)} graph inputs, {len(input_names)} names")
    # torch.export's dtype assertions name the capture's FP32; they check, never compute
    asserts = [n for n in graph.nodes if n.op == "call_function" and n.target == _ASSERT_METADATA]
    for node in asserts:
        graph.erase_node(node)
    state = _convert_state(gm, dtype)
    dequantize = _retype_qdq(gm, dtype)
    input_casts = 0
    for node, name, value in zip(placeholders, input_names, example):
        if name in (TIMESTEP, COMP_STATE) or not value.is_floating_point():
            continue
        users = list(node.users)
        with graph.inserting_after(node):
            cast = _cast(graph, node, dtype)
        for user in users:
            user.replace_input_with(node, cast)
        input_casts += 1
    (output,) = [n for n in graph.nodes if n.op == "output"]
    outs = output.args[0]
    flat = list(outs) if isinstance(outs, (tuple, list)) else [outs]
    with graph.inserting_before(output):
        flat = [_cast(graph, o, torch.float32) if isinstance(o, torch.fx.Node) else o for o in flat]
    output.args = (type(outs)(flat) if isinstance(outs, (tuple, list)) else flat[0],)
    gm.recompile()
    head_sources = {n for n in graph.nodes if n.op == "get_attr" and _in_head(str(n.target))}
    head_sources |= {node for node, name in zip(placeholders, input_names) if name == COMP_STATE}
    resolver = _MixedDtypeResolver(gm, dtype, head_sources)
    # dtypes are all the resolver needs: fake tensors carry them without computing (a real FP16 run of an SD 1.5
    # UNet on a CPU took over 20 minutes; CPUs have few half-precision kernels)
    with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True) as fake_mode:
        result = resolver.run(*(fake_mode.from_tensor(t) for t in example))
    gm.graph.lint()
    gm.recompile()
    results = result if isinstance(result, (tuple, list)) else [result]
    require(all(r.dtype == torch.float32 for r in results if isinstance(r, torch.Tensor)), "to_half",
            "outputs are not float32 after the output casts")
    return PassResult(gm, True, {"dtype": str(dtype).removeprefix("torch."), "converted_tensors": state,
                                 "dequantize_retyped": dequantize, "dtype_asserts_removed": len(asserts), "input_casts": input_casts,
                                 "mixed_dtype_casts": resolver.casts})
