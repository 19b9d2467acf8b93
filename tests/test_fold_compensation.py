"""The compensation subgraph in the engine: the fold pass, state I/O, and parity of the folded graph."""

import numpy as np
import onnx
import pytest
import torch

from qdc_export.capture import capture
from qdc_export.check.parity import summarize
from qdc_export.compensation import CompensationTables
from qdc_export.compensation.fold import fold_compensation
from qdc_export.engines.onnxruntime import OrtDenoiser
from qdc_export.load.models import load_model
from qdc_export.manifest import read_manifest

TIMESTEPS = [900.0, 600.0, 300.0, 0.0]


def _tables(channels, prev=0.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n = len(TIMESTEPS)
    scale = 1 + 0.05 * torch.randn(n, channels, generator=gen)
    bias = 0.01 * torch.randn(n, channels, generator=gen)
    prev_rows = prev * torch.ones(n, channels)
    return CompensationTables.from_rows("tcec-m1-fitted" if prev else "tcec-m0", TIMESTEPS,
                                        scale, prev_rows, bias)


@pytest.fixture(scope="module")
def captured():
    model = load_model("tiny-unet2d")
    gm, example = capture(model.unet, model.adapter)
    return model, gm, example


def test_identity_tables_leave_the_graph_alone(captured):
    _, gm, example = captured
    result = fold_compensation(gm, CompensationTables.identity(TIMESTEPS, 3), example)
    new_example = result.products["example"]
    assert result.modified is False and result.module is gm and len(new_example) == len(example)


def test_folded_graph_applies_the_row_of_each_timestep(captured):
    model, gm, example = captured
    tables = _tables(3)
    result = fold_compensation(gm, tables, example)
    new_example = result.products["example"]
    assert result.modified and len(new_example) == len(example)
    sample = example[0]
    for t, row in [(900.0, 0), (300.0, 2), (0.0, 3), (450.0, 4)]:  # 450 is no schedule step: identity row
        tvec = torch.full((sample.shape[0],), t)
        with torch.no_grad():
            raw = gm(sample, tvec)
            out = result.module(sample, tvec)
        scale = torch.as_tensor(tables.scale, dtype=torch.float32)[row]  # row 4: the identity row
        bias = torch.as_tensor(tables.bias, dtype=torch.float32)[row]
        expected = scale.view(1, 3, 1, 1) * raw - bias.view(1, 3, 1, 1)
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)


def test_mixed_timesteps_in_one_batch_and_state(captured):
    _, gm, example = captured
    tables = _tables(3, prev=0.1)
    result = fold_compensation(gm, tables, example)
    new_example = result.products["example"]
    assert len(new_example) == len(example) + 1 and result.details["stateful"]
    sample = torch.cat([example[0], example[0]])
    tvec = torch.tensor([900.0, 600.0, 900.0, 600.0])  # classifier-free guidance doubles the batch
    state = torch.randn_like(sample)
    with torch.no_grad():
        raw = gm(sample, tvec)
        out, state_out = result.module(sample, tvec, state)
    torch.testing.assert_close(state_out, raw)
    rows = torch.tensor([0, 1, 0, 1])
    scale = torch.as_tensor(tables.scale, dtype=torch.float32)[rows].view(4, 3, 1, 1)
    bias = torch.as_tensor(tables.bias, dtype=torch.float32)[rows].view(4, 3, 1, 1)
    expected = scale * raw - 0.1 * state - bias
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)


def test_tcec_m1_build_has_state_io_and_passes_parity(build_factory):
    # folding mechanics, whatever the held-out check would say of these tables on a random-weight model
    result = build_factory("tiny-sd", "w8a8", compensation="tcec", tcec_variant="m1-fitted", comp_validate=False)
    assert result.parity["passed"], summarize(result.parity)
    manifest = read_manifest(result.out)
    assert manifest["compensation"]["stateful"] and manifest["compensation"]["method"] == "tcec-m1-fitted"
    model = onnx.load(str(result.out / "model.onnx"))
    assert [i.name for i in model.graph.input][-1] == "comp_state"
    assert [o.name for o in model.graph.output] == ["noise_pred", "comp_state_out"]
    ops = {n.op_type for n in model.graph.node}
    assert {"Gather", "ArgMin"} <= ops, "the lookup subgraph is missing"
    loaded = CompensationTables.load(result.out / "compensation")
    assert loaded.method == "tcec-m1-fitted" and np.abs(loaded.prev).max() > 0
    # The engine carries the state: the second call with the same inputs differs from the first.
    engine = OrtDenoiser.from_path(result.out / "model.onnx")
    engine.reset(2)
    x, t = torch.randn(2, 4, 16, 16), torch.full((2,), float(manifest["scheduler"]["timesteps"][1]))
    cond = {"encoder_hidden_states": torch.randn(2, 8, 32)}
    first, second = engine(x, t, cond), engine(x, t, cond)
    assert not torch.equal(first, second) and engine.state is not None
