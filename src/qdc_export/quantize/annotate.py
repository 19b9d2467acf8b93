"""Annotation pass: declares *what* to quantize, following TensorRT's explicit-quantization rules
(docs/tensorrt.md): the inputs of Conv and Linear (optionally the attention inputs) get INT8 symmetric
per-tensor activation specs; their weights INT8 symmetric per-output-channel. Outputs are never
annotated, so ONNX Runtime keeps DQ -> float op and TensorRT fuses Q/DQ into its INT8 kernels.
The timestep embedding path is never annotated (it stays float by the adapters' float-layer globs,
and the sinusoidal projection has no Conv/Linear). Observers and Q/DQ are then materialized by
torchao's PT2E (prepare_pt2e / convert_pt2e) in :mod:`qdc_export.quantize.qdq`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torchao.quantization.pt2e import PerChannelMinMaxObserver
from torchao.quantization.pt2e.quantizer import QuantizationAnnotation, QuantizationSpec, Quantizer

from qdc_export.load.plugins.base import layer_is_float
from qdc_export.quantize.observers import activation_observer

ANNOTATION_KEY = "quantization_annotation"
_CONV_LINEAR = (torch.ops.aten.conv2d.default, torch.ops.aten.linear.default)
_ATTENTION = (torch.ops.aten.scaled_dot_product_attention.default,)


@dataclass(frozen=True, kw_only=True)
class QuantizationPlan:
    """Which layers to quantize and how. Layer names are module paths inside the UNet."""

    weight_bits: int = 8
    activation_bits: int | None = 8
    observer: str = "percentile"
    percentile: float = 99.99
    quantize_attention: bool = False
    float_layers: tuple[str, ...] = ()
    include: tuple[str, ...] = ()
    module_prefix: str = "unet."
    # Q/DQ layout: "tensorrt" (inputs of Conv/Linear only; TensorRT fuses the rest) or "onnxruntime-cpu" (Conv
    # outputs too, UINT8 activations: ONNX Runtime's integer kernels, quantize.annotate_cpu)
    layout: str = "tensorrt"


def layer_name(node: torch.fx.Node, prefix: str) -> str | None:
    """Module path of a Conv/Linear call, from its weight's get_attr target ("unet.a.b.weight" -> "a.b")."""
    weight = node.args[1] if len(node.args) > 1 else None
    if not isinstance(weight, torch.fx.Node) or weight.op != "get_attr":
        return None
    target = str(weight.target)
    target = target[len(prefix):] if target.startswith(prefix) else target
    return target.rsplit(".", 1)[0]


def _act_spec(plan: QuantizationPlan) -> QuantizationSpec:
    qmax = 2 ** (plan.activation_bits - 1) - 1
    return QuantizationSpec(
        dtype=torch.int8, quant_min=-qmax - 1, quant_max=qmax, qscheme=torch.per_tensor_symmetric,
        is_dynamic=False, observer_or_fake_quant_ctr=activation_observer(plan.observer, plan.percentile),
    )


def _weight_spec() -> QuantizationSpec:
    # Symmetric range -127..127: zero point 0 exactly, as TensorRT requires.
    return QuantizationSpec(
        dtype=torch.int8, quant_min=-127, quant_max=127, qscheme=torch.per_channel_symmetric, ch_axis=0,
        is_dynamic=False, observer_or_fake_quant_ctr=PerChannelMinMaxObserver.with_args(eps=2**-12),
    )


class TensorRTStyleQuantizer(Quantizer):
    """A PT2E Quantizer that annotates per :class:`QuantizationPlan` and records the layers it chose."""

    def __init__(self, plan: QuantizationPlan) -> None:
        super().__init__()
        self.plan = plan
        self.quantized_layers: list[str] = []
        self.float_layers: list[str] = []

    def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
        plan = self.plan
        act = _act_spec(plan) if plan.activation_bits else None
        for node in model.graph.nodes:
            if node.op != "call_function":
                continue
            if node.target in _CONV_LINEAR:
                name = layer_name(node, plan.module_prefix)
                if name is None:
                    continue
                if layer_is_float(name, float_globs=plan.float_layers, include=plan.include) or self.stays_float(node):
                    self.float_layers.append(name)
                    continue
                qspec_map = {node.args[1]: _weight_spec()} if plan.weight_bits == 8 else {}
                if act is not None:
                    qspec_map[node.args[0]] = act
                if qspec_map:
                    node.meta[ANNOTATION_KEY] = QuantizationAnnotation(input_qspec_map=qspec_map, _annotated=True)
                self.quantized_layers.append(name)
            elif node.target in _ATTENTION and plan.quantize_attention and act is not None:
                qspec_map = {arg: act for arg in node.args[:3] if isinstance(arg, torch.fx.Node)}
                node.meta[ANNOTATION_KEY] = QuantizationAnnotation(input_qspec_map=qspec_map, _annotated=True)
        return model

    def stays_float(self, node: torch.fx.Node) -> bool:
        """A layout's own float rule for a Conv/Linear call, on top of the plan's globs (none here)."""
        return False

    def validate(self, model: torch.fx.GraphModule) -> None:
        return None


def fake_quantize_with_spec(x: torch.Tensor, spec: QuantizationSpec) -> torch.Tensor:
    """``x`` through the observer and quantizer a PT2E spec of this module describes, as the build would compute
    them from this one tensor (range from the spec's own observer, then round-to-nearest-even and clamp)."""
    kwargs: dict[str, Any] = dict(dtype=spec.dtype, quant_min=spec.quant_min, quant_max=spec.quant_max,
                                  qscheme=spec.qscheme)
    per_channel = spec.qscheme == torch.per_channel_symmetric
    if per_channel:
        kwargs["ch_axis"] = spec.ch_axis
    observer = spec.observer_or_fake_quant_ctr(**kwargs)
    observer(x.detach())
    scale, zero_point = observer.calculate_qparams()
    if per_channel:
        return torch.fake_quantize_per_channel_affine(x, scale.float(), zero_point.to(torch.int32), spec.ch_axis,
                                                      spec.quant_min, spec.quant_max)
    return torch.fake_quantize_per_tensor_affine(x, float(scale), int(zero_point), spec.quant_min, spec.quant_max)


def int8_weight_spec() -> QuantizationSpec:
    """The INT8 weight quantizer of W8A8 layers (per output channel, -127..127)."""
    return _weight_spec()


def int8_activation_spec(plan: QuantizationPlan) -> QuantizationSpec:
    """The static INT8 activation quantizer of ``plan`` (per tensor, its observer and percentile)."""
    return _act_spec(plan)
