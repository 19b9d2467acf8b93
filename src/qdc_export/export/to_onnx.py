"""ONNX export (opset 21, standard QuantizeLinear/DequantizeLinear, no custom ops) through
torch.onnx.export(dynamo=True). INT8 weights stay INT8 initializers behind DequantizeLinear, Linear
weights stored pre-transposed (:mod:`qdc_export.export.onnx_weights`); models over 2 GB are written
with external data. Every file passes onnx.checker's full check.

INT4: the graph's ``qdc::`` ops (:mod:`qdc_export.quantize.int4`) are translated to standard opset-21
blocked DequantizeLinear / QuantizeLinear through ``custom_translation_table``; a post-pass then stores
the INT4 weights as packed INT4 initializers and folds the Linear Transpose (no custom ops remain)."""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from typing import Any

import onnx
import torch

from qdc_export.export.onnx_weights import fold_weight_transposes, fold_zero_point_casts
from qdc_export.infra.memory import release_memory
from qdc_export.quantize.fake_quant import ONNX_TRANSLATIONS
from qdc_export.quantize.int4 import pack_int4_initializers

OPSET = 21
EXTERNAL_DATA_THRESHOLD = 2 * 1024**3


NAMESPACE = "namespace"  # kept, compacted: the module path of each node, what TensorRT errors and tools name


def compact_namespace(value: str) -> str:
    """``"unet: UNet2DConditionModel/unet.mid_block: UNetMidBlock2D/conv_3: aten.conv2d.default"`` ->
    ``"unet.mid_block/conv_3: aten.conv2d.default"``: the deepest module path and the node. The exporter's
    chain of every enclosing scope with its class name repeats the same path per level (on a 1.4 M-parameter
    model the chains were 18 % of the file) and adds nothing the module path does not say."""
    *scopes, node = value.split("/")
    module = scopes[-1].split(": ")[0] if scopes else ""
    return f"{module}/{node}" if module else node


def strip_exporter_metadata(model) -> None:
    """Drop the exporter's per-node stack traces, FX node dumps and class hierarchies (machine-specific paths,
    of no use to a runtime) and compact the namespace."""
    for node in model.graph.all_nodes():
        for key in [k for k in node.metadata_props if k != NAMESPACE]:
            del node.metadata_props[key]
        if NAMESPACE in node.metadata_props:
            node.metadata_props[NAMESPACE] = compact_namespace(node.metadata_props[NAMESPACE])
        for value in node.outputs:
            value.metadata_props.clear()
    for value in (*model.graph.inputs, *model.graph.initializers.values()):
        value.metadata_props.clear()


def export_onnx(module: torch.nn.Module, example: tuple[torch.Tensor, ...], path: Path, *,
                input_names: list[str], output_names: list[str], int4_weights: bool,
                half: str | None = None) -> onnx.ModelProto:
    """``int4_weights`` (the precision plan's): the graph holds INT4 weights, stored as packed INT4 initializers.
    ``half`` ("fp16" / "bf16"): the module computes in that type (:mod:`qdc_export.quantize.half`);
    its Q/DQ scales are stored in it (:mod:`qdc_export.export.onnx_half`)."""
    batch = torch.export.Dim("batch")
    dynamic = tuple({0: batch} for _ in example)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        program = torch.onnx.export(
            module, example, input_names=input_names, output_names=output_names, opset_version=OPSET,
            dynamo=True, dynamic_shapes=dynamic, verbose=False, optimize=True,
            custom_translation_table=ONNX_TRANSLATIONS,
        )
    assert program is not None
    strip_exporter_metadata(program.model)
    fold_weight_transposes(program.model)  # DQ -> Transpose -> MatMul would be constant-folded to FP32 by runtimes
    fold_zero_point_casts(program.model)  # TensorRT needs constant zero points (R1)
    if half is not None:
        import onnx_ir as ir

        from qdc_export.export.onnx_half import retype_qdq_scales

        retype_qdq_scales(program.model, {"fp16": ir.DataType.FLOAT16, "bf16": ir.DataType.BFLOAT16}[half])
    size = sum(t.numel() * t.element_size() for t in module.state_dict().values())
    if int4_weights:
        proto, _ = pack_int4_initializers(program.model_proto)
        onnx.save(proto, str(path), save_as_external_data=size > EXTERNAL_DATA_THRESHOLD,
                  location=path.name + ".data")
        del proto  # holds the packed weights when they are embedded; freed before the heap is trimmed below
    else:
        program.save(str(path), external_data=size > EXTERNAL_DATA_THRESHOLD)
    release_exporter_tensors(program)
    release_memory()  # the transposed weight copies sit in glibc's heap until trimmed (+1.3 GB on SDXL)
    onnx.checker.check_model(str(path), full_check=True)
    return onnx.load(str(path), load_external_data=False)


def release_exporter_tensors(program: Any) -> None:
    """Drop the exported ONNX program's references to the module's tensors once the file is written. Its IR
    initializers wrap the module's own parameters (not copies), and the IR graph outlives this call (a
    module-level onnxscript rewrite rule's pattern matcher keeps the last graph it matched): measured on
    SD 1.5, the FP UNet's 3.4 GB stayed resident through the parity check even after the UNet itself was
    released."""
    graph = program.model.graph
    for value in [*graph.initializers.values(), *graph.inputs]:
        value.const_value = None
    graph.initializers.clear()
    with contextlib.suppress(AttributeError):
        program.exported_program = None

