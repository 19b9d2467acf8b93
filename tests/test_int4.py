"""INT4: blockwise weights with clip search, w4a16 / w4a8 / w4a4 builds end to end (ONNX Runtime parity with
the same statistical tolerances as w8a8), packed INT4 initializers, no custom ops, TensorRT rules, SVDQuant."""


import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto
from parity_assertions import assert_statistical_parity

from qdc_export.check.parity import summarize
from qdc_export.config import BuildConfig
from qdc_export.engines.trt_rules import check_tensorrt_compatibility
from qdc_export.errors import UserError
from qdc_export.manifest import read_manifest
from qdc_export.quantize.fake_quant import (
    DEFAULT_CLIP_RATIOS,
    dequantize_blockwise,
    fake_quantize_blockwise,
    fake_quantize_int4_group,
    quantize_blockwise,
    search_clip_ratio,
)
from qdc_export.quantize.int4 import Int4Options, insert_recorders_, pack_int4_initializers, quantize_int4_
from qdc_export.quantize.svdquant import SvdQuantOptions, svdquant_
from qdc_export.report.inspection import inspect_model

BUILDS = [  # (model, precision, overrides): each INT4 form once; tiny-sd is the SD-style reference
    ("tiny-sd", "w4a16", {}),
    ("tiny-sd", "w4a8", {}),
    ("tiny-unet2d", "w4a4", {}),
    # random weights, 4-bit activations: its per-step agreement is at the graph's own 1-ulp noise floor (1 torch
    # thread: 14.7 dB at step 0 for ONNX Runtime and for PyTorch against itself), judged by check/parity.py against it
    ("tiny-unet2d", "w4a4", {"ptq": "svdquant"}),
    ("digits-uncond", "w4a4", {"ptq": "svdquant"}),  # trained: 36.8 / 38.6 dB at 1 / 2 threads
]
IDS = ["sd-w4a16", "sd-w4a8", "unet2d-w4a4", "unet2d-w4a4-svdquant", "digits-w4a4-svdquant"]


@pytest.mark.parametrize("model,precision,overrides", BUILDS, ids=IDS)
def test_int4_build_passes_statistical_parity(build_factory, model, precision, overrides):
    assert_statistical_parity(build_factory(model, precision, **overrides).parity)


@pytest.mark.parametrize("model,precision,overrides", BUILDS, ids=IDS)
def test_int4_onnx_has_packed_int4_weights_and_no_custom_ops(build_factory, model, precision, overrides):
    result = build_factory(model, precision, **overrides)
    proto = onnx.load(str(result.out / "model.onnx"))
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [21]
    assert all(n.domain in ("", "ai.onnx") for n in proto.graph.node), "custom ops in the export"
    int4 = [i for i in proto.graph.initializer if i.data_type == TensorProto.INT4]
    assert len(int4) == len(read_manifest(result.out)["quantization"]["quantized_layers"]), "one INT4 weight per layer"
    blocked = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"
               and any(a.name == "block_size" and a.i == 64 for a in n.attribute)]
    assert len(blocked) >= len(int4)
    # Linear weights: the exporter's Transpose is folded, DQ feeds MatMul directly (MatMulNBits fusion)
    producers = {o: n for n in proto.graph.node for o in n.output}
    matmuls = [n for n in proto.graph.node if n.op_type == "MatMul" and n.input[1] in producers
               and producers[n.input[1]].op_type == "DequantizeLinear"
               and producers[n.input[1]].input[0] in {i.name for i in int4}]
    assert matmuls, "no INT4 DQ -> MatMul left after Transpose folding"
    onnx.checker.check_model(proto, full_check=True)


@pytest.mark.parametrize("model,precision", [("tiny-sd", "w4a16"), ("tiny-sd", "w4a8")])
def test_onnxruntime_int4_forms_are_not_tensorrt_forms(build_factory, model, precision):
    """The onnxruntime form keeps INT4 convolutions (DQ -> Reshape -> Conv): TensorRT runs INT4 only in GEMMs."""
    proto = onnx.load(str(build_factory(model, precision).out / "model.onnx"))
    assert "R8" in {v.rule for v in check_tensorrt_compatibility(proto)}
    assert read_manifest(build_factory(model, precision).out)["quantization"]["deployable_on"] == ["onnxruntime"]


def test_w4a16_tensorrt_form_has_int4_only_on_gemms_with_fp16_scales(build_factory):
    result = build_factory("tiny-sd", "w4a16", target="tensorrt")
    proto = onnx.load(str(result.out / "model.onnx"))
    violations = check_tensorrt_compatibility(proto)
    assert violations == [], [str(v) for v in violations[:5]]
    inits = {i.name: i for i in proto.graph.initializer}
    producers = {o: n for n in proto.graph.node for o in n.output}
    users: dict[str, list[str]] = {}
    for node in proto.graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node.op_type)
    int4 = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"
            and inits.get(n.input[0]) is not None and inits[n.input[0]].data_type == onnx.TensorProto.INT4]
    assert int4, "no INT4 weights in the TensorRT W4A16 form"
    for node in int4:
        assert set(users[node.output[0]]) <= {"MatMul", "Gemm"}, (node.name, users[node.output[0]])
        assert inits[node.input[1]].data_type == onnx.TensorProto.FLOAT16
        assert dict((a.name, a.i) for a in node.attribute)["block_size"] in (64, 128)
    manifest = read_manifest(result.out)
    assert manifest["quantization"]["deployable_on"] == ["onnxruntime", "tensorrt"]
    # convolutions: W8A8 by default (INT8 per-channel weight DQ and per-tensor INT8 input Q/DQ, FP16 scales)
    conv_weights = [producers[n.input[1]] for n in proto.graph.node if n.op_type == "Conv"
                    and n.input[1] in producers and producers[n.input[1]].op_type == "DequantizeLinear"]
    assert conv_weights and all(inits[dq.input[0]].data_type == onnx.TensorProto.INT8 for dq in conv_weights)
    int4_layers = next(p for p in manifest["quantization"]["passes"] if p["name"] == "quantize_int4")["layers"]
    int8_layers = manifest["quantization"]["int8_layers"]
    assert int8_layers and not set(int8_layers) & set(int4_layers)
    assert len(conv_weights) >= len(int8_layers)  # every INT8 layer is a Conv with an INT8 weight DQ
    assert manifest["build"]["trt_conv"] == "int8"


def test_w4a16_tensorrt_form_can_leave_convolutions_float(build_factory):
    proto = onnx.load(str(build_factory("tiny-sd", "w4a16", target="tensorrt", trt_conv="float").out / "model.onnx"))
    assert check_tensorrt_compatibility(proto) == []
    producers = {o: n for n in proto.graph.node for o in n.output}
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    assert convs and not any(producers.get(n.input[1]) is not None
                             and producers[n.input[1]].op_type == "DequantizeLinear" for n in convs)


def test_quantized_parity_measures_the_reference_noise_floor(build_factory):
    """Every quantized report carries the reference's self-agreement under rounding noise (two draws) and the
    thresholds derived from it (docs/parity.md), recomputed here from the report's own floors: every step is held
    to min(absolute, the worst floor step of either draw - margin); the median step to the 4-ulp floor's worse
    median (capped) - margin; each step's gain to twice the floor's largest deviation; the final images to the
    worse noisy draw (capped) - margin - the spread between the draws."""
    import numpy as np

    for precision, overrides in (("w4a4", {"ptq": "svdquant"}), ("w8a8", {})):
        report = build_factory("tiny-unet2d", precision, **overrides).parity
        floor, tol = report["noise_floor"], report["tolerances"]
        draws = list(floor["by_draw_snr_db"].values())
        assert len(draws) == 2 and floor["ulps"] == tol["noise_ulps"] > 0
        assert floor["per_step_snr_db"] == [min(d[k] for d in draws) for k in range(report["steps"])]
        worst = min(min(d) for d in draws)
        expected = min(tol["step_min_snr_db"], worst - tol["noise_floor_margin_db"])
        assert floor["required_snr_db"] == pytest.approx([expected] * report["steps"], abs=1e-9)
        typical = report["typical_step"]
        medians = [float(np.median(v)) for v in typical["floor_by_draw_snr_db"].values()]
        assert typical["required_db"] == pytest.approx(
            min(min(medians), tol["floor_cap_db"]) - tol["median_margin_db"], abs=1e-9)
        assert typical["median_snr_db"] == pytest.approx(float(np.median([s["snr_db"] for s in report["per_step"]])))
        gain = report["step_gain"]
        deviation = max(abs(g - 1) for v in floor["by_draw_gain"].values() for g in v)
        assert gain["allowed_deviation"] == pytest.approx(max(tol["gain_factor"] * deviation, tol["gain_atol"]))
        images = report["images_vs_reference"]
        noisy = [min(v, tol["floor_cap_db"]) for v in images["noisy_reference_mean_psnr_db"].values()]
        assert images["required_db"] == pytest.approx(min(noisy) - tol["image_margin_db"] - (max(noisy) - min(noisy)))
        assert len(report["trajectory"]["psnr_vs_fp_pytorch_noisy_db"]) == 2
        assert "own noise floor" in summarize(report) and "median step SNR" in summarize(report)


def test_w4a4_is_onnxruntime_only(build_factory):
    result = build_factory("tiny-unet2d", "w4a4")
    proto = onnx.load(str(result.out / "model.onnx"))
    rules = {v.rule for v in check_tensorrt_compatibility(proto)}
    assert "R4" in rules  # INT4 activations: not expressible in TensorRT
    assert read_manifest(result.out)["quantization"]["deployable_on"] == ["onnxruntime"]
    with pytest.raises(UserError, match="TensorRT"):
        BuildConfig(precision="w4a4", target="tensorrt")


def test_config_validates_ptq_options():
    with pytest.raises(UserError, match="svdquant"):
        BuildConfig(precision="w8a8", ptq="svdquant")  # INT4 weights only (w4a16 too since recipes, issue 14)
    with pytest.raises(UserError, match="rank"):
        BuildConfig(precision="w4a4", ptq="svdquant", svdquant_rank=0)
    with pytest.raises(UserError, match="ptq"):
        BuildConfig(precision="w4a4", ptq="awq")
    assert BuildConfig.from_dict(BuildConfig(precision="w4a8", ptq="svdquant").to_dict()).ptq == "svdquant"


def test_inspect_and_manifest_report_int4(build_factory):
    w4a16 = build_factory("tiny-sd", "w4a16")
    info = inspect_model(w4a16.out)
    weights = {layer["weight"] for layer in info["layers"]}
    assert "int4" in weights and "float" in weights  # float-kept layers (conv_in, time embedding, ...)
    assert info["weight_bytes_by_dtype"]["int4"] > 0
    assert read_manifest(w4a16.out)["quantization"]["weight_bytes_by_dtype"]["int4"] > 0
    w4a4 = inspect_model(build_factory("tiny-unet2d", "w4a4").out)
    assert any(layer["weight"] == "int4" and layer["activation"] == "int4" for layer in w4a4["layers"])


# ---------------------------------------------------------------- units


def test_blockwise_round_trip_is_exact_on_the_grid():
    torch.manual_seed(0)
    out_features, k, block = 6, 200, 64  # ragged last block (200 = 3 * 64 + 8)
    q = torch.randint(-7, 8, (out_features, k), dtype=torch.int8)
    q[:, ::block] = 7  # every block reaches the top of the grid, so max|w| / 7 is its scale
    scale = 2.0 ** torch.randint(-10, -2, (out_features, -(-k // block))).float()  # exact in float32
    w = dequantize_blockwise(q, scale, block)
    q2, scale2 = quantize_blockwise(w, block)
    assert torch.equal(q2, q) and torch.equal(scale2, scale)
    assert torch.equal(dequantize_blockwise(q2, scale2, block), w)


def _output_error_by_hand(w: torch.Tensor, x: torch.Tensor, block: int, ratio: float) -> float:
    """||X (W - W_hat)^T||^2 with W_hat written out here in numpy: per block of ``block`` input columns,
    scale = ratio * max|w| / 7, q = clip(round-half-even(w / scale), -8, 7), W_hat = q * scale."""
    wn = w.numpy()
    w_hat = np.empty_like(wn)
    for start in range(0, wn.shape[1], block):
        cols = wn[:, start:start + block]
        scale = (np.abs(cols).max(axis=1, keepdims=True) * np.float32(ratio) / np.float32(7.0)).astype(np.float32)
        w_hat[:, start:start + block] = np.clip(np.round(cols / scale), -8, 7) * scale
    d = (wn - w_hat).astype(np.float64)
    return float(((x.double().numpy() @ d.T) ** 2).sum())


def test_clip_search_picks_the_ratio_with_the_least_output_error():
    """Against a brute force over the same ratios with a quantizer written out in the test; with weight outliers
    clipping must pay (a search that always kept 1.0 fails here)."""
    torch.manual_seed(1)
    for trial in range(5):
        w = torch.randn(32, 128)
        w[torch.rand_like(w) < 0.01] *= 8  # weight outliers: clipping pays
        x = torch.randn(256, 128)
        ratio, errors = search_clip_ratio(w, x, 64)
        by_hand = {r: _output_error_by_hand(w, x, 64, r) for r in DEFAULT_CLIP_RATIOS}
        best = min(by_hand, key=lambda r: (by_hand[r], -r))
        worst_rel = max(abs(errors[r] - v) / v for r, v in by_hand.items())
        assert ratio == best, (trial, ratio, best, errors, by_hand)
        assert worst_rel <= 1e-6, f"trial {trial}: max rel. error difference {worst_rel:.2e} > 1e-6"
        assert ratio < 1.0 and by_hand[ratio] < by_hand[1.0], (trial, ratio, by_hand)
    assert search_clip_ratio(w, None, 64) == (1.0, {})


@pytest.mark.parametrize("rows", [512, 16], ids=["gram-route", "direct-route"])
def test_clip_search_error_is_the_layer_output_error(rows):
    # both routes (Gram matrix when rows > K, direct product when rows < K) compute ||X (W - W_hat)^T||^2
    torch.manual_seed(2)
    w, x = torch.randn(24, 96), torch.randn(rows, 96)
    _, errors = search_clip_ratio(w, x, 32)
    for ratio, value in errors.items():
        expected = float(((x.double() @ (w - fake_quantize_blockwise(w, 32, ratio)).double().T) ** 2).sum())
        assert value == pytest.approx(expected, rel=1e-9), (ratio, value, expected)


def test_group_activation_quantization_matches_onnx_semantics():
    x = torch.tensor([[0.5, -1.0, 0.25, 0.7, 7.0, 3.5, -2.5, 0.0]])
    y = fake_quantize_int4_group(x, 1, 4)
    # group 2: scale max|x| / 7 = 1; ties round half to even as ONNX QuantizeLinear does (3.5 -> 4, -2.5 -> -2)
    assert torch.equal(y[0, 4:], torch.tensor([7.0, 4.0, -2.0, 0.0]))
    # group 1: ONNX divides by the float32 scale (x / (1/7)), it does not multiply by 7: 0.5 / (1/7) is
    # 3.4999998 in float32 and rounds to 3, not to 4.
    scale = x[0, :4].abs().max() / 7
    assert torch.allclose(y[0, :4], torch.round(x[0, :4] / scale) * scale, atol=1e-6)


class _Linear(torch.nn.Module):
    def __init__(self, k: int = 128, o: int = 96) -> None:
        super().__init__()
        self.unet = torch.nn.Module()
        self.unet.proj = torch.nn.Linear(k, o)

    def forward(self, x):
        return self.unet.proj(x)


def _graph(module, x):
    return torch.export.export(module, (x,), strict=False).module()


def _outlier_inputs(k: int = 128, n: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    xs = []
    for _ in range(n):
        x = torch.randn(1, 16, k, generator=g)
        x[..., [5, 40, 77]] *= 40.0  # a few outlier channels, as in diffusion transformer activations
        xs.append(x)
    return xs


def test_svdquant_reduces_w4a4_layer_error_vs_rtn():
    torch.manual_seed(0)
    module = _Linear().eval()
    xs = _outlier_inputs()
    test_x = _outlier_inputs(n=5)[-1]  # same distribution, not among the calibration inputs
    reference = module(test_x)

    def w4a4(ptq: str) -> torch.Tensor:
        gm = _graph(module, xs[0])
        acts = {"proj": list(xs)}
        if ptq == "svdquant":
            result = svdquant_(gm, ["proj"], acts, SvdQuantOptions(rank=8, rank_divisor=4))
            acts = result.products["activations"]
            assert result.modified and result.details["layers"]["proj"]["error"] < \
                result.details["layers"]["proj"]["rtn_error"]
        quantize_int4_(gm, ["proj"], Int4Options(activation_group=64), acts)
        with torch.no_grad():
            return gm(test_x)

    rtn_err = float(((w4a4("rtn") - reference) ** 2).mean())
    svd_err = float(((w4a4("svdquant") - reference) ** 2).mean())
    print(f"W4A4 layer MSE: rtn {rtn_err:.4g}, svdquant {svd_err:.4g}")
    assert svd_err < 0.5 * rtn_err


def test_passes_report_modified_honestly():
    module = _Linear().eval()
    x = torch.randn(1, 4, 128)
    gm = _graph(module, x)
    assert not quantize_int4_(gm, [], Int4Options()).modified
    assert not insert_recorders_(gm, []).modified
    result = svdquant_(gm, ["proj"], {}, SvdQuantOptions())  # no recorded inputs: nothing to do
    assert not result.modified
    fp = torch.onnx.export(gm, (x,), dynamo=True, opset_version=21, verbose=False).model_proto
    _, counts = pack_int4_initializers(fp)
    assert counts == {"int4_initializers": 0}
    # and the real thing does modify, and stays numerically the same graph
    before = gm(x)
    assert quantize_int4_(gm, ["proj"], Int4Options()).modified
    assert not quantize_int4_(gm, ["proj"], Int4Options()).modified  # already INT4: nothing left to do
    w = module.unet.proj.weight.detach()
    expected = F.linear(x, dequantize_blockwise(*quantize_blockwise(w, 64), 64), module.unet.proj.bias)
    assert torch.allclose(gm(x), expected, atol=1e-6) and not torch.equal(gm(x), before)
