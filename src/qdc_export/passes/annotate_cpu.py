"""Annotation of the CPU deployment form (``--target onnxruntime-cpu``).

The TensorRT-style annotation (:mod:`qdc_export.passes.annotate`) quantizes only the *inputs* of Conv and
Linear: ``DQ(x), DQ(W) -> Conv``. ONNX Runtime's CPU QDQ fusions need the *output* quantized too:
``DQ(x), DQ(W) -> Conv -> Q(y)`` becomes QLinearConv and ``DQ(x), DQ(W) -> MatMul -> Q(y)`` QLinearMatMul
(measured, docs/cpu.md); with inputs only it keeps DQ + float Conv. So this quantizer annotates, on every
quantized Conv/Linear, its input x and weight W as the TensorRT form does and, in addition, its output y
with an activation spec of the same observer (``output_qspec``), so y = DQ(Q(y)) in the PyTorch reference
graph and in the ONNX file alike: the parity check judges the form against its own Q/DQ graph.

Activation type ``activation_dtype``: ``uint8`` (U8S8, affine, zero point from the observed range) or
``int8`` (S8S8, symmetric). Weights stay INT8 symmetric per output channel in both."""

from __future__ import annotations

import torch
import torch.fx
from torchao.quantization.pt2e.quantizer import QuantizationAnnotation, QuantizationSpec

from .annotate import ANNOTATION_KEY, QuantizationPlan, TensorRTStyleQuantizer
from .observers import activation_observer

ACTIVATION_DTYPES = ("uint8", "int8")


def cpu_activation_spec(plan: QuantizationPlan, activation_dtype: str) -> QuantizationSpec:
    """INT8 symmetric (zero point 0) or UINT8 affine over the same observer's range."""
    observer = activation_observer(plan.observer, plan.percentile)
    if activation_dtype == "int8":
        return QuantizationSpec(dtype=torch.int8, quant_min=-128, quant_max=127, qscheme=torch.per_tensor_symmetric,
                                is_dynamic=False, observer_or_fake_quant_ctr=observer)
    if activation_dtype == "uint8":
        return QuantizationSpec(dtype=torch.uint8, quant_min=0, quant_max=255, qscheme=torch.per_tensor_affine,
                                is_dynamic=False, observer_or_fake_quant_ctr=observer)
    raise ValueError(f"unknown activation dtype {activation_dtype!r}; expected one of {ACTIVATION_DTYPES}")


class CpuFormQuantizer(TensorRTStyleQuantizer):
    """Inputs, weights and outputs of each quantized Conv/Linear (8-bit activations only)."""

    def __init__(self, plan: QuantizationPlan, activation_dtype: str = "uint8") -> None:
        super().__init__(plan)
        if plan.activation_bits != 8 or plan.weight_bits != 8:
            raise ValueError("the CPU form is W8A8: 8-bit weights and activations")
        self.activation_dtype = activation_dtype

    def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
        super().annotate(model)
        act = cpu_activation_spec(self.plan, self.activation_dtype)
        for node in model.graph.nodes:
            annotation = node.meta.get(ANNOTATION_KEY)
            if annotation is None:
                continue
            # every annotated activation (conv/linear input, attention inputs) takes the form's type; weights keep theirs
            qspecs = {arg: (spec if arg is node.args[1] and len(node.args) > 1 and spec.dtype == torch.int8
                            and spec.qscheme == torch.per_channel_symmetric else act)
                      for arg, spec in annotation.input_qspec_map.items()}
            output = act if node.target in (torch.ops.aten.conv2d.default, torch.ops.aten.linear.default) else None
            node.meta[ANNOTATION_KEY] = QuantizationAnnotation(input_qspec_map=qspecs, output_qspec=output,
                                                               _annotated=True)
        return model


CPU_FORM_ACTIVATION_DTYPE = "uint8"  # U8S8: measured faster than S8S8 on ONNX Runtime's x86 kernels (docs/cpu.md)


def cpu_form_quantizer(plan: QuantizationPlan) -> CpuFormQuantizer:
    return CpuFormQuantizer(plan, CPU_FORM_ACTIVATION_DTYPE)
