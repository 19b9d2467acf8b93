"""Annotation of the CPU deployment form (``--target onnxruntime-cpu``, docs/cpu.md).

The TensorRT-style annotation (:mod:`qdc_export.quantize.annotate`) quantizes only the *inputs* of Conv and
Linear (INT8 symmetric): ``DQ(x), DQ(W) -> Conv``. ONNX Runtime's CPU kernels need more (measured with
onnxruntime 1.32, docs/cpu.md):

* Conv: ``DQ(x), DQ(W) -> Conv -> Q(y)`` becomes QLinearConv only with the *output* quantized; with inputs only
  it stays DQ + float Conv. So every quantized Conv also gets an ``output_qspec``: y = DQ(Q(y)) in the PyTorch
  reference graph and in the ONNX file alike, and the parity check judges the form against its own graph.
* Linear: on 3-D inputs the exporter writes ``MatMul -> Add(bias)``, so a Q after the Linear never follows the
  MatMul; ``DQ(x_u8), DQ(W) -> MatMul`` becomes MatMulIntegerToFloat without it. Linear outputs stay float
  (quantizing them cost fidelity and bought no kernel).
* Activations UINT8 affine (U8S8): with INT8 activations ONNX Runtime fused nothing (its S8 -> U8 rewrite is
  the optimizer disabled for the opset-21 quirk, engines/providers.py).

* Convs that join the residual stream (their output added to a tensor of the same shape: a ResNet block's
  ``conv2``, a transformer's 1x1 ``proj_out``) stay float, inputs and weights too. Their output quantization
  cost the most fidelity (requantized residuals add up over the blocks), and quantized inputs with a float
  output would run as DQ + float Conv, slower than a float Conv (benchmarks/results/cpu_form_layouts.md).

Ranges: Conv/Linear inputs take the build's observer, two-sided for the affine type
(:class:`AsymmetricPercentileObserver` for ``percentile``); Conv outputs take min/max (no clipping: clipped
outliers cost more than resolution; measured on digits-uncond). Weights stay INT8 symmetric per output
channel."""

from __future__ import annotations

import torch
import torch.fx
from torchao.quantization.pt2e import MinMaxObserver
from torchao.quantization.pt2e.quantizer import QuantizationAnnotation, QuantizationSpec

from qdc_export.quantize.annotate import ANNOTATION_KEY, QuantizationPlan, TensorRTStyleQuantizer
from qdc_export.quantize.observers import AsymmetricPercentileObserver, activation_observer

ACTIVATION_DTYPES = ("uint8", "int8")


def cpu_activation_spec(plan: QuantizationPlan, activation_dtype: str, asymmetric: bool = False) -> QuantizationSpec:
    """INT8 symmetric (zero point 0) or UINT8 affine over the same observer's range (``asymmetric``: the
    percentile observer's range from both tails instead of +-amax)."""
    observer = activation_observer(plan.observer, plan.percentile)
    if asymmetric and activation_dtype == "uint8" and plan.observer == "percentile":
        observer = AsymmetricPercentileObserver.with_args(eps=2**-12, percentile=plan.percentile)
    if activation_dtype == "int8":
        return QuantizationSpec(dtype=torch.int8, quant_min=-128, quant_max=127, qscheme=torch.per_tensor_symmetric,
                                is_dynamic=False, observer_or_fake_quant_ctr=observer)
    if activation_dtype == "uint8":
        return QuantizationSpec(dtype=torch.uint8, quant_min=0, quant_max=255, qscheme=torch.per_tensor_affine,
                                is_dynamic=False, observer_or_fake_quant_ctr=observer)
    raise ValueError(f"unknown activation dtype {activation_dtype!r}; expected one of {ACTIVATION_DTYPES}")


class CpuFormQuantizer(TensorRTStyleQuantizer):
    """Inputs and weights of each quantized Conv/Linear, outputs of ``output_ops`` (default: Conv), 8-bit only.
    ``output_observer``: "minmax", or None for the inputs' observer."""

    def __init__(self, plan: QuantizationPlan, activation_dtype: str = "uint8", asymmetric: bool = False,
                 output_ops: tuple = (torch.ops.aten.conv2d.default,), output_observer: str | None = "minmax",
                 float_residual_convs: bool = False) -> None:
        super().__init__(plan)
        if plan.activation_bits != 8 or plan.weight_bits != 8:
            raise ValueError("the CPU form is W8A8: 8-bit weights and activations")
        self.activation_dtype = activation_dtype
        self.asymmetric = asymmetric
        self.output_ops = tuple(output_ops)
        self.output_observer = output_observer
        self.float_residual_convs = float_residual_convs

    def stays_float(self, node: torch.fx.Node) -> bool:
        return self.float_residual_convs and node.target in self.output_ops and joins_residual(node)

    def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
        super().annotate(model)
        act = cpu_activation_spec(self.plan, self.activation_dtype, self.asymmetric)
        out_act = act
        if self.output_observer == "minmax":
            out_act = QuantizationSpec(dtype=act.dtype, quant_min=act.quant_min, quant_max=act.quant_max,
                                       qscheme=act.qscheme, is_dynamic=False,
                                       observer_or_fake_quant_ctr=MinMaxObserver.with_args(eps=2**-12))
        for node in model.graph.nodes:
            annotation = node.meta.get(ANNOTATION_KEY)
            if annotation is None:
                continue
            # every annotated activation (conv/linear input, attention inputs) takes the form's type; weights keep theirs
            qspecs = {arg: (spec if arg is node.args[1] and len(node.args) > 1 and spec.dtype == torch.int8
                            and spec.qscheme == torch.per_channel_symmetric else act)
                      for arg, spec in annotation.input_qspec_map.items()}
            output = out_act if node.target in self.output_ops else None
            node.meta[ANNOTATION_KEY] = QuantizationAnnotation(input_qspec_map=qspecs, output_qspec=output,
                                                               _annotated=True)
        return model


def joins_residual(node: torch.fx.Node) -> bool:
    """The node's output is added to another tensor of its own shape (a residual join; ``x + temb`` broadcasts a
    [B, C, 1, 1] tensor and is not one)."""
    shape = getattr(node.meta.get("val"), "shape", None)
    if shape is None:
        return False
    return any(other is not node and isinstance(other, torch.fx.Node)
               and getattr(other.meta.get("val"), "shape", None) == shape
               for user in node.users if user.target in (torch.ops.aten.add.Tensor, torch.ops.aten.add_.Tensor)
               for other in user.args)


CPU_FORM_ACTIVATION_DTYPE = "uint8"  # U8S8: S8S8 did not fuse on ONNX Runtime's x86 CPU provider (docs/cpu.md)


def cpu_form_quantizer(plan: QuantizationPlan) -> CpuFormQuantizer:
    """The form's layout: UINT8 inputs (two-sided ranges), Conv outputs UINT8 min/max, Linear outputs float,
    residual-joining Convs float."""
    return CpuFormQuantizer(plan, CPU_FORM_ACTIVATION_DTYPE, asymmetric=True, float_residual_convs=True)
