"""The runtime head exports to ONNX (opset 21, standard ops only, dynamic batch) and ONNX Runtime computes
the documented formula: for a timestep within the lookup tolerance of table row r,
noise_pred = scale[r] * eps_q - prev[r] * comp_state - bias[r]; for any other timestep (off the table) the
identity (row N). Checked against that formula written out in numpy, and bit-exactly against the torch head.

Only a check that CompensationHead stays export-friendly; the real fold/export lives in the passes/export code.
onnxruntime and onnxscript are hard dependencies: imported, never skipped."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import onnxscript  # noqa: F401  (torch.onnx.export(dynamo=True) needs it; a missing install must fail here)
import torch

from qdc_export.compensation import CompensationTables

FORMULA_ATOL = 1e-6  # numpy float32 vs ONNX Runtime: one multiply-add order apart at most


def _by_hand(tables: CompensationTables, eps: np.ndarray, timesteps: list[float], state: np.ndarray) -> np.ndarray:
    """The documented lookup and formula, row by row in numpy (independent of CompensationHead)."""
    out = np.empty_like(eps)
    for i, t in enumerate(timesteps):
        distances = [abs(t - s) for s in tables.timesteps]
        row = int(np.argmin(distances))
        if distances[row] > tables.tolerance:  # off the table: identity
            out[i] = eps[i]
            continue
        shape = (-1, 1, 1)
        out[i] = (tables.scale[row].reshape(shape) * eps[i] - tables.prev[row].reshape(shape) * state[i]
                  - tables.bias[row].reshape(shape))
    return out


def test_head_onnx_export_matches_the_formula(tmp_path):
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        g = np.random.default_rng(0)
        ts = [999.0, 899.0, 799.0, 699.0]
        tab = CompensationTables.from_rows("tcec-m1-fitted", ts, 1 + 0.1 * g.standard_normal((4, 4)),
                                           0.1 * g.standard_normal((4, 4)), 0.1 * g.standard_normal((4, 4)))
        assert tab.tolerance == 0.5  # min(0.25 * 100, 0.5): 799.2, 698.6 are on the table; 699.6, 849.0, 5.0, 0.0 not
        head = tab.head().eval()
        batch = torch.export.Dim("batch", min=1, max=64)
        args = (torch.randn(2, 4, 8, 8), torch.tensor([899.0, 5.0]), torch.randn(2, 4, 8, 8))
        prog = torch.onnx.export(
            head, args, dynamo=True, opset_version=21, input_names=["eps_q", "timestep", "state"],
            output_names=["eps_hat", "state_out"],
            dynamic_shapes={"eps_q": {0: batch}, "timestep": {0: batch}, "state": {0: batch}},
        )
        path = tmp_path / "head.onnx"
        prog.save(str(path))
        proto = onnx.load(str(path))
        ops = sorted({(node.domain or "ai.onnx", node.op_type) for node in proto.graph.node})
        print("onnx ops:", ops)
        assert ops and all(domain == "ai.onnx" for domain, _ in ops), f"non-standard ops: {ops}"
        assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # batch stays symbolic
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        # known, within tolerance (799.2, 698.6), just off the table (699.6: 0.6 > 0.5), far off; CFG-doubled batch
        for t in ([899.0, 5.0], [999.0, 699.0, 799.2, 698.6], [699.6, 849.0, 0.0, 0.0, 0.0, 0.0]):
            b = len(t)
            eps, tt, st = torch.randn(b, 4, 8, 8), torch.tensor(t), torch.randn(b, 4, 8, 8)
            got = sess.run(None, {"eps_q": eps.numpy(), "timestep": tt.numpy(), "state": st.numpy()})
            expected = _by_hand(tab, eps.numpy(), t, st.numpy())
            formula_err = float(np.abs(got[0] - expected).max())
            ref = head(eps, tt, st)
            err = max(float(np.abs(got[0] - ref[0].numpy()).max()), float(np.abs(got[1] - ref[1].numpy()).max()))
            print(f"batch {b}: max abs diff ORT vs formula {formula_err:.1e} (tolerance {FORMULA_ATOL}), "
                  f"ORT vs torch head {err:.1e} (tolerance 0)")
            assert formula_err <= FORMULA_ATOL
            assert np.array_equal(got[1], eps.numpy())  # the state fed back is the raw model output
            assert err == 0.0
    finally:
        torch.set_num_threads(n_threads)
