"""The parity check has power: subtly broken engines fail it at W8A8 and at W4A4, while the honest builds they
were made from pass. Each broken engine is a valid build folder whose model.onnx differs in one place
(tests/engine_breakers.py): one layer's weight scale x2, one output channel's weights negated, the output scaled
at one step, or every compensation table read one row late. The check runs from the folder, as `qdc-export check`
does. Builds: the random-weight tiny-unet2d (4 steps, tables folded regardless of the held-out check, so the
shifted-table case has a head) and the trained digits-uncond at its default recipes and compensation (10 steps,
2 parity seeds: the suite's budget; benchmarks/results/parity_power.md has the 20-step defaults of every
precision on both trained models)."""

from __future__ import annotations

import shutil

import pytest
import torch
from engine_breakers import BREAKERS, NEEDS_TABLES
from parity_assertions import assert_statistical_parity

from qdc_export.check.folder import check_build
from qdc_export.check.noise_floor import RoundingNoise
from qdc_export.check.parity import summarize

# comp_validate=False on tiny-unet2d: the held-out check would reject tables on this random-weight model, and the
# shifted-table case needs a folded head. The head is then checked elementwise against the build's tables.
BUILDS = {
    ("tiny-unet2d", "w8a8"): dict(compensation="tcec", tcec_variant="m0", comp_validate=False),
    ("tiny-unet2d", "w4a4"): dict(compensation="tcec", tcec_variant="m0", comp_validate=False),
    ("digits-uncond", "w8a8"): dict(compensation=None, steps=10, calib_samples=2, parity_samples=2),
    ("digits-uncond", "w4a4"): dict(compensation=None, steps=10, calib_samples=2, parity_samples=2),
}
# Faults smaller than a rounding flip: measured in benchmarks/results/parity_power.md (digits-uncond W8A8 at 20
# steps: the negated channel moves the final images 1.5 dB at 54 dB agreement, the noisy reference itself agrees
# at 54.9 dB). Expected to pass; xfail without strict, so a check that gains the power to see them is welcome.
BELOW_THE_NOISE = {("digits-uncond", "w8a8", "negated-channel")}


@pytest.fixture(scope="module", params=sorted(BUILDS), ids=lambda key: "-".join(key))
def honest(request, build_factory):
    model, precision = request.param
    result = build_factory(model, precision, **BUILDS[request.param])
    result.key = request.param
    return result


def test_honest_build_passes(honest):
    report = honest.parity
    assert_statistical_parity(report)
    if "compensation_head" in report:
        head = report["compensation_head"]
        assert head["passed"] and head["max_abs"] <= head["atol"], summarize(report)


@pytest.mark.parametrize("breaker", sorted(BREAKERS))
def test_broken_engine_fails(honest, breaker, tmp_path, request):
    if breaker in NEEDS_TABLES and not honest.manifest["compensation"].get("folded"):
        pytest.skip("no compensation folded in this build (the held-out check's verdict): no table to shift")
    if (*honest.key, breaker) in BELOW_THE_NOISE:
        request.applymarker(pytest.mark.xfail(reason="a fault below the rounding noise (docs/parity.md, Limits)"))
    folder = tmp_path / "broken"
    shutil.copytree(honest.out, folder)
    what = BREAKERS[breaker](folder)
    report = check_build(folder)
    assert not report["passed"], f"{what}: {summarize(report)}"


def test_rounding_noise_flips_only_values_at_a_rounding_boundary():
    """Under the noise a quantizer sees its input moved by at most the stated ulps: values on a .5 boundary may
    round the other way (some do, over 4096 draws), values a quarter step from one never change."""
    import torchao.quantization.pt2e  # noqa: F401  registers quantized_decomposed

    quantize = torch.ops.quantized_decomposed.quantize_per_tensor.default
    on_boundary = torch.arange(-60, 60, dtype=torch.float32).repeat(64) + 0.5
    off_boundary = on_boundary - 0.25
    args = (1.0, 0, -128, 127, torch.int8)
    with RoundingNoise(seed=0, ulps=4.0):
        noisy_on, noisy_off = quantize(on_boundary, *args), quantize(off_boundary, *args)
    clean_on, clean_off = quantize(on_boundary, *args), quantize(off_boundary, *args)
    flipped = (noisy_on != clean_on)
    assert torch.equal(noisy_off, clean_off)
    assert 0 < int(flipped.sum()) < flipped.numel()  # both sides are drawn
    assert int((noisy_on.int() - clean_on.int()).abs().max()) == 1
