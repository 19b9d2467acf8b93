"""Parity of the engine's folded compensation head against the build's tables, elementwise.

The head (compensation/fold.py)

    noise_pred = scale[r] * eps~ - prev[r] * comp_state - bias[r],   comp_state_out = eps~,   r = row(timestep)

holds no quantization, so unlike the quantized body it must agree with its tables to float rounding. The
statistical check of the whole engine cannot see a head that is slightly wrong: a table read one row late
moved a W8A8 engine's per-step SNR against PyTorch from 52 dB to 47.5 dB, far above any threshold that an honest
quantized engine can be held to. So the head is cut out of the engine's own ONNX file (``onnx.utils.Extractor``,
from the body's output eps~ and the inputs ``timestep``/``comp_state`` to the engine outputs), run by ONNX
Runtime, and compared with :class:`~qdc_export.compensation.CompensationHead` built from ``compensation/`` on
random eps~ and state at every table timestep, between table timesteps and off the table (the identity row)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.utils
import torch

from qdc_export.compensation import CompensationTables
from qdc_export.engines.providers import create_session
from qdc_export.load.plugins.base import COMP_STATE, COMP_STATE_OUT, HEAD_PREFIX, NOISE_PRED, SAMPLE, TIMESTEP
from qdc_export.metrics import error_stats

HEAD_ATOL = 1e-5  # float32 rounding of a multiply-add on |eps~| of a few units; a shifted row moves it by >= 1e-3


def _head_input(graph: onnx.GraphProto) -> str:
    """eps~: the one tensor that depends on ``sample``, is made outside the head and enters a head node. Head
    nodes are those that depend on an initializer of the head module (``head.scale``, ``head.bias``, ...)."""
    head_tensors = {i.name for i in graph.initializer if i.name.startswith(HEAD_PREFIX)}
    from_sample = {SAMPLE}
    candidates: set[str] = set()
    for node in graph.node:  # ONNX graphs are topologically sorted
        inputs = [n for n in node.input if n]
        if any(n in head_tensors for n in inputs):
            candidates.update(n for n in inputs if n in from_sample and n not in head_tensors)
            head_tensors.update(node.output)
        if any(n in from_sample for n in inputs):
            from_sample.update(node.output)
    if len(candidates) != 1:
        raise ValueError(f"cannot find the compensation head's input in the engine (candidates: {sorted(candidates)})")
    return candidates.pop()


def extract_head(model_path: Path, stateful: bool) -> tuple[onnx.ModelProto, str]:
    """The engine's head as a standalone ONNX model (eps~, timestep[, comp_state]) -> outputs."""
    proto = onnx.load(str(model_path), load_external_data=False)  # the head's tables are small and inline
    raw = _head_input(proto.graph)
    inputs = [raw, TIMESTEP] + ([COMP_STATE] if stateful else [])
    outputs = [NOISE_PRED] + ([COMP_STATE_OUT] if stateful else [])
    head = onnx.utils.Extractor(proto).extract_model(inputs, outputs)
    return head, raw


def probe_timesteps(tables: CompensationTables) -> list[float]:
    """Every table timestep, the midpoints between neighbours, and values off the schedule on both sides."""
    ts = [float(t) for t in tables.timesteps]
    mids = [(a + b) / 2 for a, b in zip(ts, ts[1:])]
    return ts + mids + [max(ts) + 50.0, min(ts) - 50.0]


def check_head(model_path: Path, tables_dir: Path, sample_shape: tuple[int, ...], *,
               provider: str = "cpu", atol: float = HEAD_ATOL, seed: int = 0) -> dict[str, Any]:
    tables = CompensationTables.load(tables_dir)
    head_model, raw_name = extract_head(model_path, tables.uses_state)
    session = create_session(head_model, provider=provider)
    reference = tables.head().eval()
    generator = torch.Generator().manual_seed(seed)
    timesteps = probe_timesteps(tables)
    batch = len(timesteps)  # one probe timestep per row, so every row of the lookup is exercised in one call
    eps = torch.randn((batch, *sample_shape), generator=generator) * 2
    state = torch.randn((batch, *sample_shape), generator=generator) * 2
    t = torch.tensor(timesteps, dtype=torch.float32)
    # The FP16 network of the TensorRT form hands the head an FP16 eps~: feed each input in the type the cut graph
    # declares, and give the reference the same rounded values, so only the head's own arithmetic is compared.
    declared = {i.name: onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type)
                for i in head_model.graph.input}
    eps = torch.from_numpy(eps.numpy().astype(declared.get(raw_name, np.float32)).astype(np.float32))
    feeds = {raw_name: eps.numpy().astype(declared.get(raw_name, np.float32)),
             TIMESTEP: t.numpy().astype(declared.get(TIMESTEP, np.float32))}
    if tables.uses_state:
        feeds[COMP_STATE] = state.numpy().astype(declared.get(COMP_STATE, np.float32))
    got = [np.asarray(out, dtype=np.float32) for out in session.run(None, feeds)]
    with torch.no_grad():
        expected = reference(eps, t, state if tables.uses_state else torch.zeros_like(eps))
    stats = error_stats(expected[0].numpy(), got[0])
    if tables.uses_state:
        state_stats = error_stats(expected[1].numpy(), got[1])
        stats["max_abs"] = max(stats["max_abs"], state_stats["max_abs"])
    return {"what": "engine's compensation head (cut from model.onnx) vs the build's tables, elementwise",
            "head_input": raw_name, "timesteps": timesteps, "atol": atol, **stats,
            "passed": bool(stats["max_abs"] <= atol)}
