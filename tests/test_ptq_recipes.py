"""INT4 PTQ recipes: GPTQ rounding (every layer of a trained bundled model gets a lower output error than RTN,
on the inputs it was fitted on and on held-out inputs), GPTQ builds export the same INT4 layout as RTN builds,
AWQ scaling is exact in float, recipe parsing, and the default build (TCEC with its held-out check)."""

import math

import onnx
import pytest
import torch
from onnx import numpy_helper

from qdc_export.capture import capture
from qdc_export.compensation.stage import VALIDATION_MIN_SEEDS, held_out_seeds
from qdc_export.config import BuildConfig
from qdc_export.errors import UserError
from qdc_export.load.models import load_model
from qdc_export.manifest import read_manifest
from qdc_export.precision import DEFAULT_PTQ, PTQ_RECIPES, parse_ptq
from qdc_export.quantize.awq import AwqOptions, awq_
from qdc_export.quantize.calibrate import run_calibration
from qdc_export.quantize.cleanup import remove_inference_noops_
from qdc_export.quantize.fake_quant import dequantize_blockwise, quantize_blockwise
from qdc_export.quantize.gptq import GptqOptions, gptq_quantize, hessian, quantize_layer_gptq
from qdc_export.quantize.graph import quantization_plan
from qdc_export.quantize.int4 import (
    compute_layers,
    input_rows,
    insert_recorders_,
    remove_recorders_,
    select_layers,
    weight_value,
)


def _recorded_graph(name: str, steps: int, seeds: tuple[int, ...], items: int = 4):
    """A bundled model's captured graph, its INT4 layer names, and per seed the layer inputs recorded on
    calibration trajectories (as the build records them for GPTQ: several batch items per call)."""
    model = load_model(name)
    gm, _ = capture(model.unet, model.adapter)
    gm = remove_inference_noops_(gm).module
    quantized, _ = select_layers(gm, quantization_plan(BuildConfig(precision="w4a16"), model).float_layers, ())
    recorded = []
    for seed in seeds:
        insert_recorders_(gm, quantized, items=items)
        run_calibration(gm, model, scheduler_name="ddim", steps=steps, seed=seed, samples=2)
        recorded.append(remove_recorders_(gm).products["activations"])
    return model, gm, quantized, recorded


def _output_error(node, weight_shape, w, w_hat, samples) -> float:
    """||X W^T - X W_hat^T||^2 computed directly from the unfolded inputs (independent of the Hessian route)."""
    rows = input_rows(node, weight_shape, samples, max_rows=10**9).double()
    return float(((rows @ (w - w_hat).double().T) ** 2).sum())


def test_gptq_lowers_layer_output_error_vs_rtn_for_every_layer_of_digits_uncond():
    """Every INT4 layer of the trained digits-uncond UNet, same scales (RTN's, clip ratio 1): GPTQ's rounding
    has a lower layer output error than round-to-nearest on the recorded inputs it was fitted on, and on
    inputs recorded from other seeds (not an average: each layer). Measured with 20 steps: ratio 0.01-0.25 on
    the fitted inputs, 0.03-0.45 held out, over the 42 layers."""
    _, gm, quantized, (fit, held) = _recorded_graph("digits-uncond", steps=8, seeds=(0, 5))
    nodes = dict(compute_layers(gm))
    ratios = {}
    for name in quantized:
        node = nodes[name]
        w = weight_value(gm, node.args[1]).detach().float()
        w2d = w.reshape(w.shape[0], -1)
        q_rtn, scale = quantize_blockwise(w2d, 64)
        q_gptq = gptq_quantize(w2d, hessian(node, w.shape, fit[name]), scale, 64, GptqOptions())
        assert q_gptq.dtype == torch.int8 and q_gptq.shape == q_rtn.shape
        assert int(q_gptq.min()) >= -8 and int(q_gptq.max()) <= 7
        rtn_hat, gptq_hat = dequantize_blockwise(q_rtn, scale, 64), dequantize_blockwise(q_gptq, scale, 64)
        ratios[name] = tuple(_output_error(node, w.shape, w2d, gptq_hat, inputs[name]) /
                             _output_error(node, w.shape, w2d, rtn_hat, inputs[name]) for inputs in (fit, held))
    worst_fit = max(r[0] for r in ratios.values())
    worst_held = max(r[1] for r in ratios.values())
    print(f"GPTQ / RTN layer output error over {len(ratios)} layers: fitted max {worst_fit:.3f}, "
          f"held-out max {worst_held:.3f}")
    assert len(ratios) == len(quantized) > 30
    not_lower = {k: v for k, v in ratios.items() if not (v[0] < 1.0 and v[1] < 1.0)}
    assert not not_lower, f"GPTQ not below RTN (fitted, held-out ratio) in: {not_lower}"


def test_gptq_with_a_diagonal_hessian_is_round_to_nearest():
    """Closed form: with H diagonal the inverse Hessian has no off-diagonal terms, so no error is propagated
    and GPTQ must round every weight to nearest, in any column order."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 200, generator=g)
    _, scale = quantize_blockwise(w, 64, 0.9)
    rtn = torch.clamp(torch.round(w / scale.repeat_interleave(64, 1)[:, :200]), -8, 7).to(torch.int8)
    h = torch.diag(torch.rand(200, generator=g, dtype=torch.float64) + 0.5)
    for act_order in (True, False):
        for lazy in (128, 7):
            q = gptq_quantize(w, h, scale, 64, GptqOptions(act_order=act_order, lazy_block=lazy))
            assert torch.equal(q, rtn), f"act_order={act_order}, lazy_block={lazy}"


def test_gptq_lazy_blocks_do_not_change_the_result_and_beat_rtn_on_correlated_inputs():
    g = torch.Generator().manual_seed(1)
    mixing = torch.randn(96, 96, generator=g)
    x = torch.randn(2000, 96, generator=g) @ mixing  # correlated input channels
    w = torch.randn(32, 96, generator=g)
    h = x.double().T @ x.double()
    _, scale = quantize_blockwise(w, 64)
    one = gptq_quantize(w, h, scale, 64, GptqOptions(lazy_block=1))
    many = gptq_quantize(w, h, scale, 64, GptqOptions(lazy_block=128))
    assert (one != many).float().mean() < 0.01  # same algorithm; float summation order may flip a rare tie
    result = quantize_layer_gptq(w, h, 64, (1.0, 0.9))
    assert result.method == "gptq" and result.error < 0.5 * result.rtn_error, (result.error, result.rtn_error)


@pytest.mark.slow  # two tiny-sd builds with parity checks (the default one is shared with test_int4.py)
def test_gptq_build_exports_the_same_int4_layout_as_rtn(build_factory):
    """Names, dtypes and shapes of every initializer, and the DequantizeLinear attributes, are those of the RTN
    build: only the INT4 values (and scales, by their clip ratio) differ."""
    assert DEFAULT_PTQ["w4a16"] == "gptq"
    rtn = build_factory("tiny-sd", "w4a16", ptq="rtn")
    gptq = build_factory("tiny-sd", "w4a16")  # the default recipe
    assert read_manifest(gptq.out)["build"]["ptq"] == "gptq"
    passes = {p["name"]: p for p in read_manifest(gptq.out)["quantization"]["passes"]}
    assert passes["quantize_int4"]["rounding"] == "gptq" and passes["quantize_int4"]["gptq_layers"] > 0
    protos = [onnx.load(str(b.out / "model.onnx")) for b in (rtn, gptq)]
    layouts = [{i.name: (i.data_type, tuple(i.dims)) for i in p.graph.initializer} for p in protos]
    assert layouts[0] == layouts[1]
    dq = [sorted((n.input[0], tuple((a.name, onnx.helper.get_attribute_value(a)) for a in n.attribute))
                 for n in p.graph.node if n.op_type == "DequantizeLinear") for p in protos]
    assert dq[0] == dq[1]
    int4 = [i.name for i in protos[0].graph.initializer if i.data_type == onnx.TensorProto.INT4]
    assert int4
    values = [{i.name: numpy_helper.to_array(i) for i in p.graph.initializer if i.name in int4} for p in protos]
    assert any((values[0][k] != values[1][k]).any() for k in int4), "GPTQ changed no INT4 value"


def test_awq_scaling_is_exact_in_float_before_rounding():
    """The AWQ pass alone (no rounding): the graph's outputs equal the original graph's to float32 precision,
    while the weights it left are scaled (alpha > 0 on some layers)."""
    model, gm, quantized, (recorded,) = _recorded_graph("digits-cond", steps=4, seeds=(0,), items=2)
    names = [spec.name for spec in model.conditioning.specs]
    shape = model.adapter.input_specs(model.unet)[0].concrete(2)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    cond, _ = model.conditioning.for_samples([0, 1])
    args = (x, torch.tensor([500.0, 120.0]), *(cond[n] for n in names))
    with torch.no_grad():
        before = gm(*args)
        result = awq_(gm, quantized, recorded, AwqOptions(activation="int8-tensor"))
        scaled = result.products["activations"]
        after = gm(*args)
    before, after = (t[0] if isinstance(t, (tuple, list)) else t for t in (before, after))
    alphas = [v["alpha"] for v in result.details["layers"].values()]
    assert result.modified and sum(a > 0 for a in alphas) >= len(alphas) // 4, alphas
    assert all(v["error"] <= v["error_unscaled"] for v in result.details["layers"].values())
    diff = (after - before).abs()
    scale = before.abs().max()
    print(f"AWQ float: max abs {diff.max():.3g}, mean {diff.mean():.3g}, p99 {diff.flatten().quantile(0.99):.3g}, "
          f"output max {scale:.3g}")
    assert float(diff.max()) <= 1e-4 * float(scale)  # float32 reassociation only (tolerance 1e-4 relative)
    layer = next(k for k, v in result.details["layers"].items() if v["alpha"] > 0)
    assert not torch.equal(scaled[layer][0], recorded[layer][0])  # the INT4 pass sees x / s


@pytest.mark.parametrize("text,precision,canonical", [
    ("rtn", "w4a16", "rtn"), ("GPTQ", "w4a16", "gptq"), ("gptq+awq", "w4a8", "awq+gptq"),
    ("awq+rtn", "w4a16", "awq"), ("svdquant+gptq", "w4a4", "svdquant+gptq"), ("rtn", "w8a8", "rtn"),
])
def test_ptq_recipes_parse_to_canonical_forms(text, precision, canonical):
    assert parse_ptq(text, precision) == canonical
    assert canonical in PTQ_RECIPES
    config = BuildConfig(precision=precision, ptq=text)
    assert config.ptq == canonical and BuildConfig.from_dict(config.to_dict()).ptq == canonical


@pytest.mark.parametrize("text,precision,needle", [
    ("gptq+", "w4a16", "empty part"), ("foo", "w4a16", "unknown part 'foo'"), ("awq+svdquant", "w4a8", "at most one"),
    ("gptq+rtn", "w4a16", "at most one"), ("awq", "w4a4", "awq applies to w4a16 and w4a8"),
    ("svdquant", "w8a8", "INT4 weights"), ("gptq", "w8a8", "INT4 weights"),
])
def test_bad_ptq_recipes_are_one_line_user_errors(text, precision, needle):
    with pytest.raises(UserError, match=needle) as info:
        BuildConfig(precision=precision, ptq=text)
    assert "\n" not in str(info.value)


def test_defaults_build_with_tcec_and_the_best_recipe():
    config = BuildConfig()
    assert config.compensation == "tcec" and config.comp_validate
    assert BuildConfig(precision="fp32").compensation == "none"
    assert BuildConfig(precision="w4a16").ptq != "rtn"  # a measured recipe, not plain rounding
    assert BuildConfig(precision="w8a8").ptq == "rtn"


def test_held_out_check_covers_every_class_with_at_least_16_seeds():
    model = load_model("digits-cond")
    seeds = held_out_seeds(BuildConfig(calib_samples=2), model.conditioning.num_classes)
    assert len(seeds) >= VALIDATION_MIN_SEEDS
    assert set(model.conditioning.labels(seeds)) == set(range(model.conditioning.num_classes))
    assert model.conditioning.num_classes > 1 and math.isfinite(len(seeds))
