"""The fidelity library on a tiny preset (4 images, 4 steps): FP against itself is exact, the deployed W8A8
engine is finite and below it, and the latent error curve has steps + 1 points starting at 0."""

from __future__ import annotations

import math

import pytest

from qdc_export.config import BuildConfig
from qdc_export.fidelity import Case, compare, evaluate_case, fp_latents, method_config
from qdc_export.loading import load_model

STEPS, NUM = 4, 4


def test_fp_against_itself_is_exact(tmp_path):
    model = load_model("tiny-unet2d")
    reference = fp_latents(model, "ddim", STEPS, list(range(NUM)), cache_dir=tmp_path)
    assert reference.shape[0] == STEPS + 1 and reference.shape[1] == NUM
    again = fp_latents(model, "ddim", STEPS, list(range(NUM)), cache_dir=tmp_path)  # from the cache
    scores = compare(reference, again)
    assert math.isinf(scores["psnr_db"]["mean"]) and math.isinf(scores["psnr_db"]["min"])
    assert scores["ssim"]["mean"] == pytest.approx(1.0, abs=1e-12)
    assert scores["latent_rel_error"] == [0.0] * (STEPS + 1)


def test_w8a8_engine_row(tmp_path):
    rows = evaluate_case(
        Case("tiny-unet2d", "w8a8", "ddim", STEPS),
        ["none", "tcec-m0"],
        num_images=NUM,
        cache_dir=tmp_path,
        base_config=BuildConfig(calib_samples=2),
    )
    assert [r["method"] for r in rows] == ["none", "tcec-m0"]
    for row in rows:
        p, s = row["psnr_db"], row["ssim"]
        assert math.isfinite(p["mean"]) and p["max"] < math.inf  # below FP-vs-FP (inf)
        assert math.isfinite(p["mean"]) and math.isfinite(p["min"]) and p["min"] <= p["mean"] <= p["max"]
        assert 0 < s["mean"] < 1
        curve = row["latent_rel_error"]
        assert len(curve) == STEPS + 1 and curve[0] == 0.0 and curve[-1] > 0
        assert curve[-1] == row["final_latent_rel_error"]
        assert len(row["psnr_per_image"]) == NUM
    assert rows[1]["tables"]["max_abs_K"] > 0  # the compensated engine carries non-identity tables


def test_method_config_resets_variant_fields():
    base = BuildConfig(compensation="tcec", tcec_variant="m1-fitted", comp_fit_bias=True)
    assert method_config(base, "none").compensation == "none"
    assert method_config(base, "tcec-m0").comp_fit_bias is False
    assert method_config(base, "tcec-m0-bias").comp_fit_bias is True
    assert method_config(base, "tcec-m1-fitted-cumulative").comp_target == "cumulative"
