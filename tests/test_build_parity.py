"""End to end on each adapter: build -> ONNX (opset 21, INT8 initializers) -> ONNX Runtime -> parity."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto
from parity_assertions import assert_statistical_parity

from qdc_export.check.parity import summarize
from qdc_export.engines.onnxruntime import OrtDenoiser
from qdc_export.manifest import read_manifest, sha256_file

MODELS = ["tiny-unet2d", "tiny-sd", "tiny-sdxl"]


@pytest.mark.parametrize("model", MODELS)
def test_fp32_export_matches_eager_elementwise(build_factory, model):
    result = build_factory(model, "fp32")
    report = result.parity
    assert report["mode"] == "elementwise"
    assert report["passed"], summarize(report)
    # Stricter than Polygraphy's verdict (which passes an element on atol OR rtol): every element within atol.
    assert report["worst"]["max_abs"] <= report["tolerances"]["fp32_atol"], summarize(report)
    assert "noise_floor" not in report  # elementwise: no statistics, no floor


@pytest.mark.parametrize("model", MODELS)
def test_w8a8_build_passes_statistical_parity(build_factory, model):
    assert_statistical_parity(build_factory(model, "w8a8").parity)


@pytest.mark.parametrize("model", MODELS)
def test_w8a8_onnx_is_standard_qdq_with_int8_weights(build_factory, model):
    result = build_factory(model, "w8a8")
    onnx_model = onnx.load(str(result.out / "model.onnx"))
    assert [o.version for o in onnx_model.opset_import if o.domain in ("", "ai.onnx")] == [21]
    assert all(n.domain in ("", "ai.onnx") for n in onnx_model.graph.node), "custom ops in the export"
    ops = {n.op_type for n in onnx_model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    int8_weights = [i for i in onnx_model.graph.initializer if i.data_type == TensorProto.INT8 and len(i.dims) >= 2]
    assert int8_weights, "weights should be INT8 initializers behind DequantizeLinear"
    onnx.checker.check_model(onnx_model, full_check=True)


def test_engine_runs_at_other_batch_sizes(build_factory):
    result = build_factory("tiny-sd", "w8a8")
    engine = OrtDenoiser.from_path(result.out / "model.onnx")
    import torch

    for batch in (1, 3):
        out = engine(torch.randn(batch, 4, 16, 16), torch.full((batch,), 321.0),
                     {"encoder_hidden_states": torch.randn(batch, 8, 32)})
        assert out.shape == (batch, 4, 16, 16) and torch.isfinite(out).all()


def test_manifest_records_what_was_built(build_factory):
    result = build_factory("tiny-sdxl", "w8a8")
    manifest = read_manifest(result.out)
    assert manifest["model"]["adapter"] == "sdxl"
    assert manifest["build"]["precision"] == "w8a8"
    assert manifest["scheduler"]["name"] == "ddim" and len(manifest["scheduler"]["timesteps"]) == 4
    assert [i["name"] for i in manifest["io"]["inputs"]] == ["sample", "timestep", "encoder_hidden_states",
                                                              "text_embeds", "time_ids"]
    assert manifest["io"]["outputs"][0]["name"] == "noise_pred"
    assert manifest["package_versions"]["torch"].startswith("2.13")
    for rel, digest in manifest["artifacts"].items():
        assert sha256_file(result.out / rel) == digest
    assert "parity.json" in manifest["artifacts"] and manifest["parity_summary"].startswith("PASS")


def test_check_detects_a_broken_engine(build_factory, tmp_path):
    """A check that cannot fail is worthless: swap in a different model's ONNX and expect failure."""
    import shutil

    from qdc_export.check.folder import check_build
    from qdc_export.errors import UserError

    good = build_factory("tiny-unet2d", "w8a8").out
    broken = tmp_path / "broken"
    shutil.copytree(good, broken)
    (broken / "model.onnx").write_bytes(b"garbage")
    with pytest.raises(UserError, match="sha256"):
        check_build(broken)
    # Same file hashes recorded, but a perturbed weight: the statistics must catch it.
    shutil.copytree(good, tmp_path / "perturbed")
    model = onnx.load(str(tmp_path / "perturbed" / "model.onnx"))
    for init in model.graph.initializer:
        if init.data_type == TensorProto.INT8 and len(init.dims) == 4:
            arr = onnx.numpy_helper.to_array(init).copy()
            arr[...] = np.clip(arr.astype(np.int16) * -1, -127, 127).astype(np.int8)
            init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
            break
    onnx.save(model, str(tmp_path / "perturbed" / "model.onnx"))
    from qdc_export.manifest import write_manifest

    manifest = read_manifest(tmp_path / "perturbed")
    write_manifest(tmp_path / "perturbed", manifest)
    report = check_build(tmp_path / "perturbed")
    assert not report["passed"], summarize(report)
