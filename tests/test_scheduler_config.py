"""Builds sample as the client does: the scheduler config is read where diffusers finds it, the model's
scheduler runs as configured (x0 clipping included), overrides are explicit and recorded, and the compensation
fit treats clipped pixels as what they are (independent of the model output)."""

from __future__ import annotations

import json

import diffusers
import pytest
import torch
from click.testing import CliRunner
from diffusers import DDIMPipeline, DDPMScheduler, DPMSolverMultistepScheduler

from qdc_export.build import build
from qdc_export.check.folder import check_build
from qdc_export.cli import main
from qdc_export.compensation.fit import _output_gain
from qdc_export.config import BuildConfig
from qdc_export.errors import ModelLoadError, UserError
from qdc_export.load.models import MODELS_DIR, build_preset, load_model
from qdc_export.manifest import read_manifest
from qdc_export.report.fidelity import fp_denoiser, sample_latents
from qdc_export.sampling import make_scheduler

# What a bare UNet folder's own scheduler says (issue 12's example): not diffusers' DDPMScheduler defaults.
COSINE_LEADING = {"_class_name": "DDPMScheduler", "beta_schedule": "squaredcos_cap_v2", "timestep_spacing": "leading",
                  "clip_sample": True, "num_train_timesteps": 1000, "prediction_type": "epsilon"}
QUICK = dict(precision="fp32", steps=5, calib_samples=1, parity_samples=1)


@pytest.fixture(scope="module")
def bare_unet(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bare") / "unet"
    build_preset("tiny-unet2d").save_pretrained(folder, safe_serialization=True)
    return folder


def _one_line_error(result, needle: str) -> None:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in result.output, result.output


def test_bare_unet_without_scheduler_config_is_refused(bare_unet, tmp_path):
    with pytest.raises(ModelLoadError, match="--scheduler-config"):
        load_model(str(bare_unet))
    result = CliRunner().invoke(main, ["build", str(bare_unet), "--precision", "fp32", "--out", str(tmp_path / "b")])
    _one_line_error(result, "pass --scheduler-config PATH")
    assert not (tmp_path / "b").exists()


def test_scheduler_config_beside_the_unet_is_the_one_built(bare_unet, tmp_path):
    config_file = bare_unet / "scheduler_config.json"
    config_file.write_text(json.dumps(COSINE_LEADING))
    try:
        result = build(str(bare_unet), BuildConfig(scheduler="dpmsolver++", **QUICK), tmp_path / "b",
                       run_check=False, write_report=False)
        client = DPMSolverMultistepScheduler.from_pretrained(bare_unet)  # diffusers' own loader, same folder
    finally:
        config_file.unlink()
    recorded = result.manifest["scheduler"]
    assert recorded["source_config"] == COSINE_LEADING
    for key, value in client.config.items():
        if not key.startswith("_"):
            assert recorded["config"][key] == (list(value) if isinstance(value, tuple) else value), key
    assert recorded["config"]["beta_schedule"] == "squaredcos_cap_v2"
    client.set_timesteps(QUICK["steps"])
    assert recorded["timesteps"] == [float(t) for t in client.timesteps]


def test_explicit_scheduler_config_for_a_bare_unet(bare_unet, tmp_path):
    path = tmp_path / "sched.json"
    path.write_text(json.dumps(COSINE_LEADING))
    out = tmp_path / "b"
    result = CliRunner().invoke(main, ["build", str(bare_unet), "--precision", "fp32", "--steps", "5",
                                       "--scheduler-config", str(path), "--no-check", "--out", str(out)])
    assert result.exit_code == 0, result.output
    manifest = read_manifest(out)
    assert manifest["scheduler"]["source_config"] == COSINE_LEADING
    assert manifest["model"]["source"]["scheduler_config"] == str(path.resolve())
    path.unlink()  # a later check samples with the recorded config, not with a file it may not find again
    report = check_build(out, seeds=[5])
    assert report["passed"]


def test_scheduler_runs_as_configured_and_overrides_are_explicit():
    shipped = load_model("digits-uncond").scheduler_config
    assert shipped["clip_sample"] is True
    assert make_scheduler("ddim", shipped).config.clip_sample is True  # no silent override any more
    assert make_scheduler("ddim", shipped, {"clip_sample": False}).config.clip_sample is False
    with pytest.raises(UserError, match="not a DDIMScheduler config field"):
        make_scheduler("ddim", shipped, {"clip_samples": False})
    config = BuildConfig(scheduler_overrides={"clip_sample": False})
    assert BuildConfig.from_dict(config.to_dict()) == config  # recorded in the manifest, read back


def test_bad_scheduler_override_is_one_line(tmp_path):
    result = CliRunner().invoke(main, ["build", "tiny-unet2d", "--precision", "fp32", "--scheduler-override",
                                       "nonsense=1", "--out", str(tmp_path / "b")])
    _one_line_error(result, "not a DDIMScheduler config field")


def test_fp_images_are_the_models_own_pipeline_images():
    """The FP images of the report (and of the fidelity benchmark) are what DDIMPipeline with the shipped
    scheduler makes from the same noise; the old clip_sample=False override fails this (checked too)."""
    model = load_model("digits-uncond")
    seeds, steps = [0, 1], 5
    ours = sample_latents(fp_denoiser(model), model, "ddim", steps, seeds)[-1].clamp(-1, 1)
    pipe = DDIMPipeline(unet=model.unet, scheduler=DDPMScheduler.from_pretrained(MODELS_DIR / "digits-uncond" / "scheduler"))
    pipe.set_progress_bar_config(disable=True)
    theirs = torch.cat([torch.from_numpy(pipe(generator=torch.Generator().manual_seed(s), num_inference_steps=steps,
                                              output_type="np").images).permute(0, 3, 1, 2) for s in seeds]) * 2 - 1
    err = (ours - theirs).abs()
    assert float(err.max()) <= 1e-4, f"max {float(err.max()):.3g} mean {float(err.mean()):.3g}"
    model.scheduler_config = {**model.scheduler_config, "clip_sample": False}
    unclipped = sample_latents(fp_denoiser(model), model, "ddim", steps, seeds)[-1].clamp(-1, 1)
    assert float((unclipped - theirs).abs().max()) > 1e-2  # the comparison can tell the two apart


def _clipped_case(cls):
    sched = cls(clip_sample=True)
    sched.set_timesteps(10)
    t = sched.timesteps[3]
    gen = torch.Generator().manual_seed(0)
    x, eps = 2.5 * torch.randn(2, 3, 8, 8, generator=gen), torch.randn(2, 3, 8, 8, generator=gen)
    abar = float(sched.alphas_cumprod[int(t)])
    clipped = ((x - (1 - abar) ** 0.5 * eps) / abar ** 0.5).abs() > 1.0
    assert 0 < float(clipped.float().mean()) < 1  # both kinds of pixel present
    return sched, t, x, eps, abar, clipped


def test_fit_weights_ddpm_clipped_pixels_zero():
    """DDPM's update ignores the output where x0 is clipped: the fit's weight is 0 exactly there, and the
    scheduler's step is unchanged by an output change confined to those pixels (pushing x0 further out)."""
    sched, t, x, eps, abar, clipped = _clipped_case(diffusers.DDPMScheduler)
    weights = _output_gain(sched, x, eps, t, seed=1)
    assert torch.equal(weights == 0, clipped), "zero weight exactly where x0 is clipped"
    x0_sign = torch.sign((x - (1 - abar) ** 0.5 * eps) / abar ** 0.5)
    step = lambda out: sched.step(out, t, x, generator=torch.Generator().manual_seed(1)).prev_sample  # noqa: E731
    assert torch.equal(step(eps), step(eps - 0.01 * x0_sign * clipped.float()))


def test_fit_weights_ddim_follow_its_direction_term():
    """DDIM (use_clipped_model_output=False, as DDIMPipeline calls it) keeps the raw output in its direction term:
    squared gain 1 - abar_prev where x0 is clipped, B^2 of the linear update elsewhere (closed form)."""
    sched, t, x, eps, abar, clipped = _clipped_case(diffusers.DDIMScheduler)
    prev_t = int(t) - sched.config.num_train_timesteps // sched.num_inference_steps
    abar_prev = float(sched.alphas_cumprod[prev_t])
    linear_b = (1 - abar_prev) ** 0.5 - abar_prev ** 0.5 * (1 - abar) ** 0.5 / abar ** 0.5
    expected = torch.where(clipped, torch.tensor(1 - abar_prev, dtype=torch.float64),
                           torch.tensor(linear_b ** 2, dtype=torch.float64))
    weights = _output_gain(sched, x, eps, t, seed=1)
    err = (weights - expected).abs()
    assert torch.allclose(weights, expected, rtol=1e-4, atol=1e-6), \
        f"max {float(err.max()):.3g} mean {float(err.mean()):.3g} p99 {float(err.flatten().quantile(0.99)):.3g}"
    assert _output_gain(diffusers.DDIMScheduler(clip_sample=False), x, eps, t, seed=1) is None
