"""The fidelity library on a tiny preset (4 images, 4 steps): FP against itself is exact, and a row's numbers
(per-image PSNR, its mean/min/max, the latent error curve) equal the same quantities recomputed here from the
row's own ONNX engine with a sampler loop, ONNX Runtime session and PSNR written out in the test."""

from __future__ import annotations

import math

import diffusers
import numpy as np
import pytest
import torch

from qdc_export.config import BuildConfig
from qdc_export.engines.providers import create_session
from qdc_export.load.models import load_model
from qdc_export.report.fidelity import Case, compare, evaluate_case, fp_latents, method_config

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


PSNR_ATOL_DB = 1e-6  # the same float32 trajectories; only summation order differs


def _trajectory_by_hand(step, model, steps: int, seeds: list[int]) -> np.ndarray:
    """DDIM (diffusers' own scheduler with the model's own configuration, clipping included where it says so, and
    no qdc_export sampling code) from per-seed unit noise; every latent."""
    scheduler = diffusers.DDIMScheduler.from_config(model.scheduler_config)
    scheduler.set_timesteps(steps)
    shape = tuple(model.unet.config.in_channels if i == 0 else model.unet.config.sample_size for i in range(3))
    x = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
    x = x * float(scheduler.init_noise_sigma)
    latents = [x]
    for t in scheduler.timesteps:
        eps = step(x, torch.full((x.shape[0],), float(t), dtype=torch.float32))
        x = scheduler.step(eps, t, x, return_dict=False)[0]
        latents.append(x)
    return torch.stack(latents).double().numpy()


def _psnr_by_hand(reference: np.ndarray, actual: np.ndarray) -> np.ndarray:
    ref, act = (np.clip(reference, -1, 1) + 1) / 2, (np.clip(actual, -1, 1) + 1) / 2
    mse = ((ref - act) ** 2).reshape(len(ref), -1).mean(axis=1)
    return 10 * np.log10(1.0 / mse)


def test_w8a8_engine_row_matches_an_independent_recomputation(tmp_path):
    rows = evaluate_case(
        Case("tiny-unet2d", "w8a8", "ddim", STEPS),
        ["none", "tcec-m0"],
        num_images=NUM,
        cache_dir=tmp_path,
        base_config=BuildConfig(calib_samples=2),
    )
    assert [r["method"] for r in rows] == ["none", "tcec-m0"]
    model = load_model("tiny-unet2d")
    seeds = list(range(NUM))

    def fp_step(x, t):
        with torch.no_grad():
            return model.unet(x, t).sample

    fp = _trajectory_by_hand(fp_step, model, STEPS, seeds)
    for row in rows:
        # the build's own session settings: with other graph optimizations ONNX Runtime picks other kernels, and one
        # INT8 rounding flip then moves a whole trajectory (this recomputes the scoring, not the runtime)
        session = create_session(f"{row['engine']}/model.onnx")

        def engine_step(x, t, session=session):
            return torch.from_numpy(session.run(None, {"sample": x.numpy(), "timestep": t.numpy()})[0])

        engine = _trajectory_by_hand(engine_step, model, STEPS, seeds)
        expected = _psnr_by_hand(fp[-1], engine[-1])
        diff = np.abs(np.asarray(row["psnr_per_image"]) - expected)
        print(f"{row['method']}: PSNR per image {np.round(expected, 3)}; |row - by hand| max {diff.max():.2e} "
              f"mean {diff.mean():.2e} dB (tolerance {PSNR_ATOL_DB})")
        assert diff.max() <= PSNR_ATOL_DB
        p = row["psnr_db"]
        assert p["mean"] == pytest.approx(expected.mean(), abs=PSNR_ATOL_DB)
        assert (p["min"], p["max"]) == pytest.approx((expected.min(), expected.max()), abs=PSNR_ATOL_DB)
        rel = [float((np.linalg.norm((e - f).reshape(NUM, -1), axis=1)
                      / np.linalg.norm(f.reshape(NUM, -1), axis=1)).mean()) for f, e in zip(fp, engine)]
        assert row["latent_rel_error"] == pytest.approx(rel, rel=1e-5, abs=1e-12)
        assert row["final_latent_rel_error"] == row["latent_rel_error"][-1] and rel[0] == 0.0 and rel[-1] > 0
        assert 0 < row["ssim"]["mean"] < 1
    assert rows[1]["tables"]["max_abs_K"] > 0  # the compensated engine carries non-identity tables
    assert rows[0]["psnr_per_image"] != rows[1]["psnr_per_image"]


def test_method_config_resets_variant_fields():
    base = BuildConfig(compensation="tcec", tcec_variant="m1-fitted", comp_fit_bias=True)
    assert method_config(base, "none").compensation == "none"
    assert method_config(base, "tcec-m0").comp_fit_bias is False
    assert method_config(base, "tcec-m0-bias").comp_fit_bias is True
    assert method_config(base, "tcec-m1-fitted-cumulative").comp_target == "cumulative"
