"""Subtly broken engines for testing the power of the parity check: each function edits one thing in a build
folder's model.onnx (one layer's weight scale, one output channel's weights, the compensation table) and
re-hashes the manifest, so the folder is a valid build whose engine is wrong in a way a bad export, a wrong
packing or an off-by-one lookup would make it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from qdc_export.manifest import MANIFEST, sha256_file

_WEIGHT_TYPES = (onnx.TensorProto.INT8, onnx.TensorProto.INT4)


def _weight_dequantizers(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, onnx.TensorProto]]:
    """DequantizeLinear nodes whose data input is an integer weight initializer (>= 2-D), in graph order."""
    inits = {i.name: i for i in model.graph.initializer}
    found = []
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            init = inits[node.input[0]]
            if init.data_type in _WEIGHT_TYPES and len(init.dims) >= 2:
                found.append((node, init))
    return found


def _layer_at(model: onnx.ModelProto, fraction: float) -> tuple[onnx.NodeProto, onnx.TensorProto]:
    """The quantized layer at ``fraction`` of the way through the graph (graph order)."""
    layers = _weight_dequantizers(model)
    assert layers, "no quantized weights in the model"
    return layers[int(len(layers) * fraction)]


def _middle_layer(model: onnx.ModelProto) -> tuple[onnx.NodeProto, onnx.TensorProto]:
    """The quantized layer halfway through the graph: not the first or last, whose errors are easiest to see."""
    return _layer_at(model, 0.5)


def _replace_initializer(model: onnx.ModelProto, name: str, array: np.ndarray) -> None:
    for i, init in enumerate(model.graph.initializer):
        if init.name == name:
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(array, name))
            return
    raise KeyError(name)


def _rewrite(folder: Path, edit) -> str:
    path = folder / "model.onnx"
    model = onnx.load(str(path))
    what = edit(model)
    onnx.save(model, str(path))
    manifest_path = folder / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest["artifacts"]["model.onnx"] = sha256_file(path)  # a valid folder: only the engine is wrong
    manifest_path.write_text(json.dumps(manifest, indent=2))
    return what


def double_one_weight_scale(folder: Path, fraction: float = 0.5) -> str:
    """One layer's weight dequantization scale x2 (a wrong scale written at export); the layer at ``fraction``
    of the graph (default: the middle one)."""
    def edit(model: onnx.ModelProto) -> str:
        node, _ = _layer_at(model, fraction)
        inits = {i.name: i for i in model.graph.initializer}
        scale = numpy_helper.to_array(inits[node.input[1]])
        _replace_initializer(model, node.input[1], (scale * 2).astype(scale.dtype))
        return f"scale of {node.input[0]} x2"
    return _rewrite(folder, edit)


def negate_one_output_channel(folder: Path) -> str:
    """One output channel of one layer's integer weights negated (the channel with the largest weights)."""
    def edit(model: onnx.ModelProto) -> str:
        node, init = _middle_layer(model)
        weights = numpy_helper.to_array(init)
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        # Linear weights are stored pre-transposed ([K, O], DQ axis 1); conv weights are [O, ...] (axis 0).
        out_axis = axis if weights.ndim == 2 else 0
        moved = np.moveaxis(weights.astype(np.int16), out_axis, 0)
        channel = int(np.argmax(np.abs(moved).reshape(moved.shape[0], -1).sum(1)))
        limit = 7 if init.data_type == onnx.TensorProto.INT4 else 127
        moved[channel] = np.clip(-moved[channel], -limit, limit)
        _replace_initializer(model, init.name, np.moveaxis(moved, 0, out_axis).astype(weights.dtype))
        return f"output channel {channel} of {init.name} negated"
    return _rewrite(folder, edit)


def shift_compensation_table(folder: Path) -> str:
    """Every compensation table read one row late (an off-by-one in the timestep lookup): rows 0..N-1 of
    each [N + 1, C] table (scale, bias, prev) are rolled by one; the identity row N is kept."""
    steps = len(json.loads((folder / MANIFEST).read_text())["scheduler"]["timesteps"])

    def edit(model: onnx.ModelProto) -> str:
        gathered = {n.input[0] for n in model.graph.node if n.op_type == "Gather"}
        shifted = []
        for init in list(model.graph.initializer):
            if init.name in gathered and len(init.dims) == 2 and init.dims[0] == steps + 1 \
                    and init.data_type == onnx.TensorProto.FLOAT:
                table = numpy_helper.to_array(init).copy()
                table[:steps] = np.roll(table[:steps], 1, axis=0)
                _replace_initializer(model, init.name, table)
                shifted.append(init.name)
        assert shifted, "no compensation table ([steps + 1, C] Gather data) in the model"
        return f"tables {shifted} shifted by one row"
    return _rewrite(folder, edit)


def scale_output_at_step(folder: Path, row: int, factor: float) -> str:
    """The engine's noise_pred multiplied by ``factor`` at one timestep of the build's schedule only (row ``row``
    of manifest timesteps; -1 = the last step): a fault a per-step check sees at one step of twenty, and one
    that hardly moves the final image when it is the last step."""
    timesteps = json.loads((folder / MANIFEST).read_text())["scheduler"]["timesteps"]
    t = float(timesteps[row])

    def edit(model: onnx.ModelProto) -> str:
        out = model.graph.output[0].name
        raw = out + "_before_fault"
        for node in model.graph.node:
            node.output[:] = [raw if o == out else o for o in node.output]
            node.input[:] = [raw if i == out else i for i in node.input]
        timestep = model.graph.input[1].name
        consts = {"fault_t": np.array(t, np.float32), "fault_factor": np.array(factor, np.float32),
                  "fault_one": np.array(1.0, np.float32), "fault_shape": np.array([-1, 1, 1, 1], np.int64)}
        model.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in consts.items())
        model.graph.node.extend([
            onnx.helper.make_node("Equal", [timestep, "fault_t"], ["fault_hit"]),
            onnx.helper.make_node("Where", ["fault_hit", "fault_factor", "fault_one"], ["fault_gain"]),
            onnx.helper.make_node("Reshape", ["fault_gain", "fault_shape"], ["fault_gain_b"]),
            onnx.helper.make_node("Mul", [raw, "fault_gain_b"], [out]),
        ])
        return f"{out} x{factor} at timestep {t:g} only"
    return _rewrite(folder, edit)


BREAKERS = {
    "weight-scale-x2": double_one_weight_scale,
    "weight-scale-x2-early": lambda folder: double_one_weight_scale(folder, 0.25),
    "negated-channel": negate_one_output_channel,
    "output-x0.7-last-step": lambda folder: scale_output_at_step(folder, -1, 0.7),
    "output-x0.8-mid-step": lambda folder: scale_output_at_step(folder, len(json.loads(
        (folder / MANIFEST).read_text())["scheduler"]["timesteps"]) // 2, 0.8),
    "shifted-table": shift_compensation_table,
}
# breakers that need a folded compensation head
NEEDS_TABLES = ("shifted-table",)
