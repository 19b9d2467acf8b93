"""The drop-in in real diffusers pipelines: DDPMPipeline / DDIMPipeline on the bundled unconditional model with
its shipped scheduler, and tiny StableDiffusionPipeline / StableDiffusionXLPipeline assembled locally. Each build
is W8A8 with TCEC (m1-fitted: the stateful variant, so the state plumbing is exercised).

Independent references: the build's own parity check (parity.json: per-seed final-image PSNR of the ONNX
Runtime trajectory against FP, from the same starting noise and conditioning), the project's own sampler loop
(run_sampler over an OrtDenoiser), and the FP pipeline itself."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DDIMPipeline, DDPMPipeline, DDPMScheduler, UNet2DModel
from tiny_pipelines import sd_pipeline, sdxl_pipeline

from qdc_export.engines.onnxruntime import OrtDenoiser
from qdc_export.load.models import MODELS_DIR, conditioning_from_build
from qdc_export.manifest import read_manifest
from qdc_export.metrics import psnr
from qdc_export.sampling import initial_latents, latents_to_images, make_scheduler, run_sampler
from qdc_export.serving import EngineUNet, ScheduleMismatchError

# The DDIMPipeline test runs in the default suite (one small build, 4 steps); the other three builds and their
# pipelines are marked slow: several minutes on 2 cores.

TCEC = dict(compensation="tcec", tcec_variant="m1-fitted", comp_validate=False)
PSNR_AGREEMENT_DB = 0.05  # same noise, same conditioning, same engine: only float summation order differs
SAME_IMAGE_ATOL = 1e-5


def _errors(a: torch.Tensor, b: torch.Tensor) -> str:
    d = (a.double() - b.double()).abs().flatten()
    return f"max {float(d.max()):.3g} mean {float(d.mean()):.3g} p99 {float(d.quantile(0.99)):.3g}"


def _parity(result) -> dict:
    return json.loads((result.out / "parity.json").read_text())


def _assert_reported_fidelity(fp: torch.Tensor, served: torch.Tensor, parity: dict) -> None:
    """Final-image PSNR of the served images vs FP equals, seed by seed, what the build's parity check measured."""
    got = psnr(latents_to_images(fp), latents_to_images(served)).clamp(max=100.0)
    want = torch.tensor(parity["trajectory"]["psnr_vs_fp_onnxruntime_db"], dtype=got.dtype)
    assert torch.allclose(got, want, atol=PSNR_AGREEMENT_DB), f"PSNR vs FP {got.tolist()} != build's {want.tolist()}"


def _own_loop(result, seeds: list[int], cond=None, uncond=None, guidance: float = 1.0) -> torch.Tensor:
    manifest = read_manifest(result.out)
    scheduler = make_scheduler(manifest["scheduler"]["name"], manifest["scheduler"]["config"])
    shape = tuple(manifest["io"]["inputs"][0]["shape"][1:])
    engine = OrtDenoiser.from_path(result.out / "model.onnx")
    finals = [run_sampler(engine, scheduler, manifest["scheduler"]["steps"], initial_latents(shape, [seed]),
                          {k: v[i:i + 1] for k, v in (cond or {}).items()},
                          {k: v[i:i + 1] for k, v in (uncond or {}).items()} if uncond else None,
                          guidance, record=False).final for i, seed in enumerate(seeds)]
    return torch.cat(finals)


# ---- unconditional: the bundled model with its shipped scheduler -----------------------------------------------
def _digits_pipeline(cls):
    unet = UNet2DModel.from_pretrained(MODELS_DIR / "digits-uncond" / "unet").eval()
    scheduler = DDPMScheduler.from_pretrained(MODELS_DIR / "digits-uncond" / "scheduler")
    pipe = cls(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run_uncond(pipe, seeds: list[int], steps: int) -> torch.Tensor:
    """One pipeline call per seed (batch 1: its noise is then exactly initial_latents(seed)); [-1, 1] space."""
    images = [pipe(batch_size=1, generator=torch.Generator().manual_seed(s), num_inference_steps=steps,
                   output_type="np").images for s in seeds]
    return torch.from_numpy(np.concatenate(images)).permute(0, 3, 1, 2).double() * 2 - 1


def test_ddim_pipeline_drop_in(build_factory):
    result = build_factory("digits-uncond", "w8a8", scheduler="ddim", **TCEC)
    parity, steps = _parity(result), result.manifest["scheduler"]["steps"]
    assert result.manifest["compensation"]["stateful"]
    pipe = _digits_pipeline(DDIMPipeline)
    assert pipe.scheduler.config.clip_sample  # the shipped scheduler clips x0; the build sampled the same way
    fp = _run_uncond(pipe, parity["seeds"], steps)
    pipe.unet = EngineUNet.from_build(result.out)
    served = _run_uncond(pipe, parity["seeds"], steps)
    _assert_reported_fidelity(fp, served, parity)
    again = _run_uncond(pipe, parity["seeds"], steps)  # state reset at each generation
    assert torch.equal(served, again), _errors(served, again)
    own = _own_loop(result, parity["seeds"]).clamp(-1, 1)  # the pipeline outputs clamped images
    # the pipeline returns float32 images in [0, 1] (x / 2 + 0.5); compare in that space
    assert torch.allclose(served, own.double(), atol=SAME_IMAGE_ATOL), _errors(served, own)
    with pytest.raises(ScheduleMismatchError, match=f"{steps + 1} sampling steps, the build was made for {steps}"):
        pipe(batch_size=1, generator=torch.Generator().manual_seed(0), num_inference_steps=steps + 1)


@pytest.mark.slow
def test_ddpm_pipeline_drop_in(build_factory):
    result = build_factory("digits-uncond", "w8a8", scheduler="ddpm", **TCEC)
    parity, steps = _parity(result), result.manifest["scheduler"]["steps"]
    pipe = _digits_pipeline(DDPMPipeline)
    seeds = parity["seeds"]
    fp = _run_uncond(pipe, seeds, steps)
    pipe.unet = EngineUNet.from_build(result.out)
    served = _run_uncond(pipe, seeds, steps)
    # DDPM adds fresh noise at every step from the pipeline's generator, while the build's parity run draws it
    # from the global RNG: the noise paths differ, so compare with the build's mean within its own margin.
    got = float(psnr((fp + 1) / 2, (served + 1) / 2).clamp(max=100.0).mean())
    want = parity["trajectory"]["mean_psnr_onnxruntime_db"]
    margin = parity["tolerances"]["trajectory_psnr_margin_db"]
    assert got >= want - margin, f"DDPMPipeline PSNR vs FP {got:.2f} dB, build reports {want:.2f} (margin {margin})"
    assert torch.equal(served, _run_uncond(pipe, seeds, steps))


# ---- conditional: tiny SD and SDXL pipelines ----------------------------------------------------------------------
def _embeds(result, seeds):
    conditioning = conditioning_from_build(result.out, read_manifest(result.out))
    cond, uncond = conditioning.for_samples(seeds)
    return cond, uncond, conditioning.guidance_scale


def _run_cond(pipe, seeds, steps, per_seed_kwargs) -> torch.Tensor:
    outs = [pipe(num_inference_steps=steps, generator=torch.Generator().manual_seed(s), output_type="latent",
                 **per_seed_kwargs(i)).images for i, s in enumerate(seeds)]
    return torch.cat(outs).float()


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["tiny-sd", "tiny-sdxl"])
def test_stable_diffusion_pipelines_drop_in(build_factory, tmp_path, preset):
    result = build_factory(preset, "w8a8", **TCEC)
    parity, steps = _parity(result), result.manifest["scheduler"]["steps"]
    pipe = (sd_pipeline if preset == "tiny-sd" else sdxl_pipeline)(tmp_path)
    seeds = parity["seeds"]
    cond, uncond, guidance = _embeds(result, seeds)
    size = result.manifest["conditioning"]["image_size"]

    def build_conditioning(i):  # the build's own conditioning, fed as precomputed embeddings
        kwargs = dict(prompt_embeds=cond["encoder_hidden_states"][i:i + 1],
                      negative_prompt_embeds=uncond["encoder_hidden_states"][i:i + 1], guidance_scale=guidance)
        if preset == "tiny-sdxl":
            kwargs.update(pooled_prompt_embeds=cond["text_embeds"][i:i + 1],
                          negative_pooled_prompt_embeds=uncond["text_embeds"][i:i + 1],
                          original_size=(size, size), target_size=(size, size))
        return kwargs

    fp = _run_cond(pipe, seeds, steps, build_conditioning)
    fp_unet = pipe.unet
    pipe.unet = EngineUNet.from_build(result.out)
    served = _run_cond(pipe, seeds, steps, build_conditioning)
    _assert_reported_fidelity(fp, served, parity)
    own = _own_loop(result, seeds, cond, uncond, guidance)
    assert torch.allclose(served, own, atol=SAME_IMAGE_ATOL), _errors(served, own)
    assert torch.equal(served, _run_cond(pipe, seeds, steps, build_conditioning))

    # Through the text encoders: prompts -> tokenizer -> CLIP -> engine -> VAE decode.
    prompts = dict(prompt=["a red digit"], negative_prompt=["blurry"], guidance_scale=guidance)
    images = {}
    for name, unet in (("fp", fp_unet), ("served", pipe.unet)):
        pipe.unet = unet
        images[name] = pipe(num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="pt",
                            **prompts).images
    assert images["served"].shape == images["fp"].shape and torch.isfinite(images["served"]).all()
    floor = min(parity["trajectory"]["psnr_vs_fp_onnxruntime_db"]) - parity["tolerances"]["trajectory_psnr_margin_db"]
    got = float(psnr(images["fp"].double(), images["served"].double()).clamp(max=100.0).min())
    assert got >= floor, f"prompted {preset} images: PSNR vs FP {got:.2f} dB < {floor:.2f} (build's worst - margin)"

    with pytest.raises(ScheduleMismatchError, match="sampling steps"):
        pipe(num_inference_steps=steps + 2, **prompts)
