"""The parity check has power: subtly broken engines fail it at W8A8 and at W4A4, while the honest builds they
were made from pass. Each broken engine is a valid build folder whose model.onnx differs in one place
(tests/engine_breakers.py): one layer's weight scale x2, one output channel's weights negated, or every
compensation table read one row late. The check runs from the folder, as `qdc-export check` does."""

from __future__ import annotations

import shutil

import pytest

from engine_breakers import BREAKERS
from parity_assertions import assert_statistical_parity
from qdc_export.check import summarize
from qdc_export.checking import check_build

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
