"""report.html: written by the build, references PNGs that exist, and its PSNR numbers are metrics.psnr of the
FP model's images and the engine's images, recomputed here independently of the report code."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from qdc_export.cli import main
from qdc_export.engines.onnxruntime import OrtDenoiser
from qdc_export.load.models import load_model
from qdc_export.manifest import write_manifest
from qdc_export.metrics import psnr
from qdc_export.report.writer import REPORT_DIR, REPORT_FILE, write_report
from qdc_export.sampling import TorchDenoiser, initial_latents, latents_to_images, make_scheduler, run_sampler

PSNR_ATOL_DB = 1e-6  # same computation on the same float32 images: only summation-order noise is allowed
NUM = 4


def _referenced_files(html: str) -> list[str]:
    return re.findall(r"(?:src|href)='([^']+)'", html)


def _finals(denoiser, model, scheduler_name: str, steps: int, seeds: list[int]) -> torch.Tensor:
    scheduler = make_scheduler(scheduler_name, model.scheduler_config)
    shape = model.adapter.input_specs(model.unet)[0].concrete(1)[1:]
    latents = initial_latents(shape, seeds)
    traj = run_sampler(denoiser, scheduler, steps, latents, {}, None, 1.0, record=False)
    return latents_to_images(traj.final)


@pytest.fixture(scope="module")
def compensated(build_factory):
    # a build whose engine carries the head (the held-out check would reject it on this random-weight model)
    return build_factory("tiny-unet2d", "w8a8", compensation="tcec", tcec_variant="m0", write_report=True,
                         comp_validate=False)


def test_build_writes_report_with_existing_pngs(compensated):
    html_path = compensated.out / REPORT_FILE
    assert html_path.is_file()
    html = html_path.read_text()
    refs = _referenced_files(html)
    pngs = [r for r in refs if r.endswith(".png")]
    assert {Path(p).name for p in pngs} >= {"images.png", "latent_error.png", "layer_sensitivity.png"}
    for ref in refs:
        assert (compensated.out / ref).is_file(), f"report references missing {ref}"
    assert _parity_verdict(html) == ("PASS" if json.loads((compensated.out / "parity.json").read_text())["passed"]
                                     else "FAIL")


def _parity_verdict(html: str) -> str:
    """PASS or FAIL as the report's parity section shows it (the only verdict word in that section)."""
    section = html.split("<h2>Parity</h2>", 1)[1]
    words = set(re.findall(r"\b(PASS|FAIL)\b", section))
    assert len(words) == 1, f"parity section shows {words or 'no verdict'}"
    return words.pop()


def test_report_shows_the_verdict_of_parity_json(compensated, tmp_path):
    """The same build with its parity.json turned to a failure (manifest rewritten to match) must report FAIL:
    the verdict comes from the record, whatever it says."""
    folder = tmp_path / "flipped"
    shutil.copytree(compensated.out, folder)
    parity = json.loads((folder / "parity.json").read_text())
    (folder / "parity.json").write_text(json.dumps({**parity, "passed": not parity["passed"]}))
    manifest = json.loads((folder / "manifest.json").read_text())
    write_manifest(folder, {k: v for k, v in manifest.items() if k not in ("artifacts", "content_sha256")})
    write_report(folder, num=1, force=True, sensitivity=False)
    assert _parity_verdict((folder / REPORT_FILE).read_text()) == ("FAIL" if parity["passed"] else "PASS")


def test_report_psnr_matches_metrics_psnr(compensated):
    out = compensated.out
    model = load_model("tiny-unet2d")
    manifest = json.loads((out / "manifest.json").read_text())
    steps, sched = manifest["build"]["steps"], manifest["build"]["scheduler"]
    summary = json.loads((out / REPORT_DIR / "report.json").read_text())
    seeds = summary["seeds"]
    fp = _finals(TorchDenoiser(model.adapter.wrap(model.unet).eval(), []), model, sched, steps, seeds)
    engine = _finals(OrtDenoiser.from_path(out / "model.onnx"), model, sched, steps, seeds)
    expected = psnr(fp, engine)
    reported = torch.tensor(summary["psnr_db"]["compensated"], dtype=torch.float64)
    diff = (expected - reported).abs()
    assert float(diff.max()) <= PSNR_ATOL_DB, f"max |dPSNR| {float(diff.max()):.3g} dB > {PSNR_ATOL_DB}"
    # the HTML shows the same values (2 decimals) and carries them in full in data-psnr
    html = (out / REPORT_FILE).read_text()
    shown = [float(v) for v in re.findall(r"data-psnr='([^']+)'", html)]
    assert len(shown) == 2 * len(seeds)  # two quantized columns
    for value in summary["psnr_db"]["compensated"]:
        assert any(abs(value - s) <= PSNR_ATOL_DB for s in shown)
    assert f"{float(expected[0]):.2f}" in html


UNDO_ATOL = 1e-5  # (s * y - b + b) / s in float32: a few ulps of |y| <= ~10 (noise predictions)


def test_uncompensated_column_undoes_the_head(compensated, build_factory):
    """Column 2 of a compensated build (head undone) is the engine of the same build without compensation: the
    quantized graph is identical (same calibration), only the head differs. Compared call by call at identical
    inputs (every step of the plain engine's own trajectory), where only float rounding of the undo can differ;
    whole trajectories are not compared, since one rounding flip in a quantized graph cascades over the steps."""
    from qdc_export.compensation import CompensationTables
    from qdc_export.report.writer import UncompensatedOrt

    plain = build_factory("tiny-unet2d", "w8a8")
    model = load_model("tiny-unet2d")
    steps = json.loads((plain.out / "manifest.json").read_text())["build"]["steps"]
    seeds = json.loads((compensated.out / REPORT_DIR / "report.json").read_text())["seeds"]
    plain_engine = OrtDenoiser.from_path(plain.out / "model.onnx")
    tables = CompensationTables.load(compensated.out / "compensation")
    assert not tables.is_identity  # the head does something, so undoing it is tested
    undone = UncompensatedOrt(OrtDenoiser.from_path(compensated.out / "model.onnx").session, tables)
    scheduler = make_scheduler("ddim", model.scheduler_config)
    shape = model.adapter.input_specs(model.unet)[0].concrete(1)[1:]
    traj = run_sampler(plain_engine, scheduler, steps, initial_latents(shape, seeds), {}, None, 1.0)
    scheduler.set_timesteps(steps)
    errors = []
    for x, t, eps_plain in zip(traj.latents, scheduler.timesteps, traj.outputs):
        tvec = torch.full((x.shape[0],), float(t))
        model_in = scheduler.scale_model_input(x, t)
        errors.append((undone(model_in, tvec, {}) - eps_plain).abs())
    err = torch.cat([e.flatten() for e in errors])
    assert float(err.max()) <= UNDO_ATOL, (f"max {float(err.max()):.3g} mean {float(err.mean()):.3g} "
                                           f"p99 {float(err.quantile(0.99)):.3g} > atol {UNDO_ATOL}")
    # and the report's column is that undone engine's trajectory, scored like the compensated column
    fp = _finals(TorchDenoiser(model.adapter.wrap(model.unet).eval(), []), model, "ddim", steps, seeds)
    expected = psnr(fp, _finals(undone, model, "ddim", steps, seeds))
    reported = torch.tensor(json.loads((compensated.out / REPORT_DIR / "report.json").read_text())
                            ["psnr_db"]["no_compensation"], dtype=torch.float64)
    diff = (expected - reported).abs()
    assert float(diff.max()) <= PSNR_ATOL_DB, f"max |dPSNR| {float(diff.max()):.3g} dB > {PSNR_ATOL_DB}"


def test_report_cli_refuses_overwrite_then_forces(compensated, tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["report", str(compensated.out), "--num", "2"])
    assert result.exit_code == 1 and "--force" in result.output
    result = runner.invoke(main, ["report", str(tmp_path / "missing")])
    assert result.exit_code == 1 and "not a folder" in result.output


def test_report_without_compensation_fits_m0_on_the_fly(build_factory, tmp_path):
    plain = build_factory("tiny-unet2d", "w8a8")
    import shutil

    folder = tmp_path / "build"
    shutil.copytree(plain.out, folder)
    path = write_report(folder, num=2, force=True, sensitivity=False)
    summary = json.loads((folder / REPORT_DIR / "report.json").read_text())
    assert "tcec-m0" in summary["third_column"] and "outside the engine" in summary["third_column"]
    assert len(summary["psnr_db"]["compensated"]) == 2
    assert all(torch.isfinite(torch.tensor(v)).all() for v in summary["latent_rel_error"].values())
    assert "layer_sensitivity.png" not in path.read_text()
