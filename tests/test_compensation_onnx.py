"""The runtime head exports to ONNX (opset 21, dynamic batch) and ONNX Runtime reproduces it bit-exactly.

Only a check that CompensationHead stays export-friendly; the real fold/export lives in the passes/export code."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qdc_export.compensation import CompensationTables

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def test_head_onnx_export_matches_torch(tmp_path):
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        g = np.random.default_rng(0)
        ts = [999.0, 899.0, 799.0, 699.0]
        tab = CompensationTables.from_rows("tcec-m1-fitted", ts, 1 + 0.1 * g.standard_normal((4, 4)),
                                           0.1 * g.standard_normal((4, 4)), 0.1 * g.standard_normal((4, 4)))
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
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        ops = sorted({node.op_type for node in prog.model_proto.graph.node}) if hasattr(prog, "model_proto") else []
        print("onnx ops:", ops)
        for t in ([899.0, 5.0], [999.0, 699.0, 799.2, 698.6], [0.0] * 6):  # known, unknown, CFG-doubled batches
            b = len(t)
            eps, tt, st = torch.randn(b, 4, 8, 8), torch.tensor(t), torch.randn(b, 4, 8, 8)
            got = sess.run(None, {"eps_q": eps.numpy(), "timestep": tt.numpy(), "state": st.numpy()})
            ref = head(eps, tt, st)
            err = max(float(np.abs(got[0] - ref[0].numpy()).max()), float(np.abs(got[1] - ref[1].numpy()).max()))
            print(f"batch {b}: max abs diff ORT vs torch {err:.1e}")
            assert err == 0.0
    finally:
        torch.set_num_threads(n_threads)
