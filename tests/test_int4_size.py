"""The W4A16 ONNX file of the SD-style reference model (digits-cond) is at least 3.5x smaller than its FP32
file (issue 5), with the default recipe (conv_in, conv_out, time embeddings, shortcuts kept float)."""

import torch

from qdc_export.config import BuildConfig
from qdc_export.export.to_onnx import export_onnx
from qdc_export.load.models import io_description, load_model
from qdc_export.quantize.graph import build_graph

REQUIRED_RATIO = 3.5


def _export_size(model, precision: str, path) -> int:
    config = BuildConfig(precision=precision, steps=2, calib_samples=1)  # sizes do not depend on calibration
    gm, example, _ = build_graph(model, config)
    io = io_description(model)
    with torch.no_grad():
        export_onnx(gm, example, path, input_names=[i["name"] for i in io["inputs"]],
                    output_names=[o["name"] for o in io["outputs"]], int4_weights=config.plan.int4_weights)
    return path.stat().st_size


def test_w4a16_file_is_at_least_3_5x_smaller_than_fp32_on_digits_cond(tmp_path):
    model = load_model("digits-cond")
    fp32 = _export_size(model, "fp32", tmp_path / "fp32.onnx")
    w4a16 = _export_size(model, "w4a16", tmp_path / "w4a16.onnx")
    ratio = fp32 / w4a16
    assert ratio >= REQUIRED_RATIO, f"fp32 {fp32} B / w4a16 {w4a16} B = {ratio:.3f}x < {REQUIRED_RATIO}x"
