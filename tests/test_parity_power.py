"""The parity check has power: subtly broken engines fail it at W8A8 and at W4A4, while the honest builds they
were made from pass. Each broken engine is a valid build folder whose model.onnx differs in one place
(tests/engine_breakers.py): one layer's weight scale x2, one output channel's weights negated, or every
compensation table read one row late. The check runs from the folder, as `qdc-export check` does."""

from __future__ import annotations

import shutil

import pytest
import torch
from engine_breakers import BREAKERS
from parity_assertions import assert_statistical_parity

from qdc_export.check.folder import check_build
from qdc_export.check.noise_floor import RoundingNoise
from qdc_export.check.parity import summarize

MODEL = "tiny-unet2d"
# comp_validate=False: the held-out check would reject tables on this random-weight model, and the shifted-table
# case needs a folded head. The head is then checked elementwise against the build's tables.
BUILD = dict(compensation="tcec", tcec_variant="m0", comp_validate=False)


@pytest.fixture(scope="module", params=["w8a8", "w4a4"])
def honest(request, build_factory):
    result = build_factory(MODEL, request.param, **BUILD)
    assert result.manifest["compensation"]["folded"], result.manifest["compensation"]
    return result


def test_honest_build_passes(honest):
    report = honest.parity
    assert_statistical_parity(report)
    head = report["compensation_head"]
    assert head["passed"] and head["max_abs"] <= head["atol"], summarize(report)


@pytest.mark.parametrize("breaker", sorted(BREAKERS))
def test_broken_engine_fails(honest, breaker, tmp_path):
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
