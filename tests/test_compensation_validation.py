"""The build's held-out check of fitted compensation tables (compensate.validate_compensation): tables that
lower the final-image PSNR against FP on unseen seeds are rejected, tables that raise it by more than twice the
gain's standard error, on >= 64 seeds, are accepted.

The "quantized" model here is the captured FP graph with its output scaled by 1.25 (a known, systematic
error), so the right tables are known exactly: scale 0.8 restores FP; scale 0.5 makes things worse."""

import json

import numpy as np
import torch

from qdc_export.capture import capture
from qdc_export.check.folder import load_reference
from qdc_export.compensation import CompensationTables
from qdc_export.compensation.fold import fold_compensation
from qdc_export.compensation.stage import VALIDATION_BATCH, VALIDATION_MIN_SEEDS, validate_compensation
from qdc_export.config import BuildConfig
from qdc_export.load.models import load_model
from qdc_export.metrics import psnr
from qdc_export.sampling import (
    TorchDenoiser,
    initial_latents,
    latents_to_images,
    make_scheduler,
    run_sampler,
    schedule_timesteps,
)

CONFIG = BuildConfig(precision="w8a8", compensation="tcec", steps=4, calib_samples=2)
HELD_OUT_ATOL_DB = 1e-4  # the saved and reloaded graph against the in-memory one: same kernels, same order


class ScaledOutput(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module, factor: float) -> None:
        super().__init__()
        self.inner, self.factor = inner, factor

    def forward(self, *args):
        return self.inner(*args) * self.factor


def _tables(model, scale: float) -> CompensationTables:
    scheduler = make_scheduler(CONFIG.scheduler, model.scheduler_config)
    timesteps = schedule_timesteps(scheduler, CONFIG.steps)
    channels = model.unet.config.out_channels
    rows = np.full((len(timesteps), channels), scale)
    return CompensationTables.from_rows("tcec-m0", timesteps, rows, np.zeros_like(rows), np.zeros_like(rows))


def test_validation_accepts_tables_that_restore_fp_and_rejects_tables_that_hurt():
    model = load_model("tiny-unet2d")
    gm, example = capture(model.unet, model.adapter)
    broken = ScaledOutput(gm, 1.25)
    verdicts = {}
    for scale in (0.8, 0.5):
        folded = fold_compensation(broken, _tables(model, scale), example)
        assert folded.modified
        verdicts[scale] = validate_compensation(broken, folded.module, False, model, CONFIG)
    good, bad = verdicts[0.8], verdicts[0.5]
    assert good["accepted"] and good["psnr_with_db"] > good["psnr_without_db"] + 10, good
    assert good["psnr_with_db"] > 60, good  # 1.25 * 0.8 = 1: FP up to float rounding
    assert not bad["accepted"] and bad["psnr_with_db"] < bad["psnr_without_db"], bad
    assert bad["seeds"] == good["seeds"] and len(bad["seeds"]) == max(VALIDATION_MIN_SEEDS, CONFIG.calib_samples)


def _held_out_psnr_of_reference(out, model, config: BuildConfig, seeds: list[int], stateful: bool) -> float:
    """Mean final-image PSNR vs FP of the build's shipped PyTorch graph (reference.pt2) on ``seeds``."""
    names = [spec.name for spec in model.conditioning.specs]
    scheduler = make_scheduler(config.scheduler, model.scheduler_config)
    shape = model.adapter.input_specs(model.unet)[0].concrete(1)[1:]

    def images(denoiser: TorchDenoiser) -> torch.Tensor:
        finals = []  # in the check's batches: a quantized graph's rounding can depend on the batch it runs in
        for start in range(0, len(seeds), VALIDATION_BATCH):
            chunk = seeds[start:start + VALIDATION_BATCH]
            cond, uncond = model.conditioning.for_samples(chunk)
            finals.append(run_sampler(denoiser, scheduler, config.steps, initial_latents(shape, chunk), cond, uncond,
                                      model.conditioning.guidance_scale, record=False).final)
        return latents_to_images(torch.cat(finals))

    fp = images(TorchDenoiser(model.adapter.wrap(model.unet).eval(), names))
    shipped = images(TorchDenoiser(load_reference(out / "reference.pt2"), names, stateful=stateful))
    return float(psnr(fp, shipped).clamp(max=100.0).mean())


def test_build_records_the_held_out_check_and_folds_only_accepted_tables(build_factory):
    """The recorded held-out numbers are recomputed from what the build shipped: the reference graph on the recorded
    seeds must score the "with tables" number when the tables were folded and the "without" number when they
    were rejected (a build that folded rejected tables, or recorded the numbers the wrong way round, fails)."""
    result = build_factory("tiny-unet2d", "w8a8", compensation="tcec", tcec_variant="m0", write_report=True)
    compensation = result.manifest["compensation"]
    validation = compensation["validation"]
    assert len(validation["seeds"]) >= VALIDATION_MIN_SEEDS
    inputs = [i["name"] for i in result.manifest["io"]["inputs"]]
    folded = bool(compensation.get("folded"))
    config = BuildConfig.from_dict(result.manifest["build"])
    recomputed = _held_out_psnr_of_reference(result.out, load_model("tiny-unet2d"), config, validation["seeds"],
                                             stateful="comp_state" in inputs)
    shipped, other = ((validation["psnr_with_db"], validation["psnr_without_db"]) if folded
                      else (validation["psnr_without_db"], validation["psnr_with_db"]))
    print(f"held-out PSNR of reference.pt2 {recomputed:.6f} dB; recorded: shipped {shipped:.6f}, other {other:.6f} "
          f"(folded={folded}, tolerance {HELD_OUT_ATOL_DB} dB)")
    assert abs(other - shipped) > 10 * HELD_OUT_ATOL_DB  # the two outcomes are distinguishable here
    assert abs(recomputed - shipped) <= HELD_OUT_ATOL_DB
    assert folded == bool(validation["accepted"])
    if folded:
        assert (result.out / "compensation").is_dir()
    else:  # the engine is the plain quantized one, and the build says so
        assert compensation["rejected"]
        assert not (result.out / "compensation").exists() and "comp_state" not in inputs
        summary = json.loads((result.out / "report" / "report.json").read_text())
        assert summary["compensation_rejected"] == validation and summary["method"] == "none"
