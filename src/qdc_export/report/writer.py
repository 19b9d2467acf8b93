"""``report.html`` for a build folder: what quantization did to the images, step by step and layer by layer.

Sections (PNGs in ``report/``, referenced relatively, so the folder is self-contained):

1. Image grid, evaluation seeds 0..num-1: FP model (eager PyTorch) | quantized engine without compensation |
   quantized engine with compensation, per-image PSNR (dB, [0, 1] images) under each image; 32x32 images are
   upscaled x4 (nearest). Both quantized columns are the build's ONNX model in ONNX Runtime:
   * build with compensation: column 3 is the engine as built; column 2 is the same engine with the head undone
     (stateful tables: the raw output ``comp_state_out``; stateless: ``CompensationTables.undo``,
     (noise_pred + bias[r]) / scale[r], exact up to float32 rounding), stepped along its own, uncompensated trajectory;
   * build without compensation: column 2 is the engine as built; column 3 applies TCEC m = 0 tables fitted now
     (on the build's calibration-fit seeds, with the build's reference graph) outside the engine by ``CompensationTables.apply``,
     the same head module the graph folds. The report labels which case it is.
2. Per-step latent error ||x~_n - x_n|| / ||x_n|| (mean over the images) with and without compensation.
3. Per-layer sensitivity (:mod:`qdc_export.report.sensitivity`): SQNR (dB) of each quantized layer's output when
   only that layer is quantized; the 30 worst layers as a bar chart.
4. The parity summary from ``parity.json``.

``report.json`` holds every number shown (full precision). The report is written after the manifest: it is
derived, not an artifact, and is not hashed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qdc_export.compensation import CompensationTables
from qdc_export.config import BuildConfig
from qdc_export.engines.onnxruntime import OrtDenoiser
from qdc_export.engines.select import denoiser_from_build
from qdc_export.errors import OutputExistsError, UserError
from qdc_export.load.models import LoadedModel
from qdc_export.load.plugins.base import COMP_STATE, COMP_STATE_OUT, NOISE_PRED, SAMPLE, TIMESTEP
from qdc_export.manifest import COMPENSATION_DIR, PARITY_FILE, read_manifest, verify_artifacts
from qdc_export.metrics import psnr, relative_latent_error
from qdc_export.report.fidelity import evaluation_seeds, fp_denoiser, sample_latents
from qdc_export.report.figures import WORST_LAYERS, image_grid, plot_error_curves, plot_sensitivity
from qdc_export.report.html import REPORT_DIR, column_titles, render_html
from qdc_export.report.sensitivity import layer_sensitivity, quantized_layers
from qdc_export.sampling import latents_to_images

REPORT_FILE = "report.html"


# ---- denoisers around the engine ------------------------------------------------------------------------------
class UncompensatedOrt(OrtDenoiser):
    """The build's engine with its folded compensation head undone: the raw quantized output eps~."""

    def __init__(self, session: Any, tables: CompensationTables) -> None:
        super().__init__(session)
        self.tables = tables
        if self.stateful:
            self.output_names = [NOISE_PRED, COMP_STATE_OUT]

    def __call__(
        self, sample: torch.Tensor, timestep: torch.Tensor, cond: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        feeds = {SAMPLE: sample.float().numpy(), TIMESTEP: timestep.float().numpy()}
        for name in self.cond_names:
            feeds[name] = cond[name].float().numpy()
        if self.stateful:
            feeds[COMP_STATE] = np.zeros_like(feeds[SAMPLE])  # the raw output does not depend on the state
            return torch.from_numpy(self.run(feeds)[1])
        return self.tables.undo(torch.from_numpy(self.run(feeds)[0]), timestep.float())


class HeadApplied:
    """An uncompensated denoiser followed by the tables' head evaluated in PyTorch (``CompensationTables.apply``)."""

    def __init__(self, inner: Any, tables: CompensationTables) -> None:
        self.inner, self.tables = inner, tables
        self.state: torch.Tensor | None = None

    def reset(self, batch: int) -> None:
        self.inner.reset(batch)
        self.state = None

    @torch.no_grad()
    def __call__(
        self, sample: torch.Tensor, timestep: torch.Tensor, cond: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        eps = self.inner(sample, timestep, cond).float()
        state = self.state if self.state is not None and self.state.shape == eps.shape else None
        out, self.state = self.tables.apply(eps, timestep, state)
        return out


def _psnr_list(reference: torch.Tensor, latents: torch.Tensor) -> list[float]:
    return [float(v) for v in psnr(latents_to_images(reference[-1]), latents_to_images(latents[-1]))]


def write_report(
    build_dir: Path,
    *,
    num: int = 8,
    force: bool = False,
    model: LoadedModel | None = None,
    sensitivity: bool = True,
) -> Path:
    """Write ``build_dir/report.html`` and ``build_dir/report/``; returns the HTML path."""
    from qdc_export.check.folder import load_reference, model_for_build
    from qdc_export.compensation.stage import fit_compensation

    build_dir = Path(build_dir)
    if num < 1:
        raise UserError(f"--num must be >= 1, got {num}")
    manifest = read_manifest(build_dir)
    verify_artifacts(build_dir, manifest)
    html_path, assets = build_dir / REPORT_FILE, build_dir / REPORT_DIR
    if (html_path.exists() or assets.exists()) and not force:
        raise OutputExistsError(f"{html_path} exists; pass --force to replace it")
    shutil.rmtree(assets, ignore_errors=True)
    assets.mkdir(parents=True)
    config = BuildConfig.from_dict(manifest["build"])
    model = model or model_for_build(manifest)
    seeds = evaluation_seeds(num)
    steps, sched_name = config.steps, config.scheduler
    reference = sample_latents(fp_denoiser(model), model, sched_name, steps, seeds)
    engine = denoiser_from_build(build_dir)  # the runtime the manifest's target names (engines/select.py)
    built_latents = sample_latents(engine, model, sched_name, steps, seeds)
    compensation = manifest.get("compensation", {})
    method = "none" if compensation.get("rejected") else compensation.get("method", "none")  # not in the engine
    quantized = config.plan.quantized
    columns: list[tuple[str, torch.Tensor, list[float] | None]] = [
        ("FP model\n(eager PyTorch)", reference[-1], None)
    ]
    curves: dict[str, list[float]] = {}
    summary: dict[str, Any] = {
        "seeds": seeds,
        "method": method,
        "precision": config.precision,
        "scheduler": sched_name,
        "steps": steps,
    }
    if compensation.get("rejected"):
        summary["compensation_rejected"] = compensation["validation"]

    def titles_for(column: str) -> str:
        return column_titles(config.precision, method, quantized)[column]

    if not quantized:
        columns.append((titles_for("engine"), built_latents[-1], _psnr_list(reference, built_latents)))
        curves["engine"] = relative_latent_error(list(reference), list(built_latents))
        summary["third_column"] = "none (fp32 build: no quantization, no compensation)"
        summary["psnr_db"] = {"engine": columns[-1][2]}
    elif method != "none":
        tables = CompensationTables.load(build_dir / COMPENSATION_DIR)
        raw = UncompensatedOrt(engine.session, tables)
        raw_latents = sample_latents(raw, model, sched_name, steps, seeds)
        p_raw, p_comp = _psnr_list(reference, raw_latents), _psnr_list(reference, built_latents)
        columns += [
            (titles_for("no_compensation"), raw_latents[-1], p_raw),
            (titles_for("compensated"), built_latents[-1], p_comp),
        ]
        curves = {
            "no compensation": relative_latent_error(list(reference), list(raw_latents)),
            f"{method} (as built)": relative_latent_error(list(reference), list(built_latents)),
        }
        summary["third_column"] = f"the build's engine with its folded {method} head"
        summary["psnr_db"] = {"no_compensation": p_raw, "compensated": p_comp}
    else:
        m0_config = BuildConfig.from_dict({**config.to_dict(), "compensation": "tcec", "tcec_variant": "m0"})
        tables = fit_compensation(load_reference(build_dir / "reference.pt2"), model, m0_config)
        comp_latents = sample_latents(
            HeadApplied(OrtDenoiser(engine.session), tables), model, sched_name, steps, seeds
        )
        p_raw, p_comp = _psnr_list(reference, built_latents), _psnr_list(reference, comp_latents)
        columns += [
            (titles_for("no_compensation"), built_latents[-1], p_raw),
            (titles_for("compensated"), comp_latents[-1], p_comp),
        ]
        curves = {
            "no compensation (as built)": relative_latent_error(list(reference), list(built_latents)),
            "tcec-m0 (fitted for this report)": relative_latent_error(list(reference), list(comp_latents)),
        }
        summary["third_column"] = (
            "tcec-m0 tables fitted by the report on the calibration-fit seeds and applied "
            "outside the engine (same formula as the folded head)"
        )
        summary["psnr_db"] = {"no_compensation": p_raw, "compensated": p_comp}
    summary["latent_rel_error"] = curves
    image_grid(columns, assets / "images.png")
    plot_error_curves(
        curves,
        assets / "latent_error.png",
        f"latent error vs FP, {config.precision}, {sched_name} x {steps}, {num} images",
    )
    layer_rows: list[dict[str, Any]] = []
    if sensitivity and quantized:
        layer_rows = layer_sensitivity(model, config, quantized_layers(manifest, model))
        if layer_rows:
            plot_sensitivity(
                layer_rows,
                assets / "layer_sensitivity.png",
                f"per-layer sensitivity ({config.precision}), worst {min(WORST_LAYERS, len(layer_rows))}"
                f" of {len(layer_rows)} quantized layers",
            )
    summary["layer_sensitivity"] = layer_rows
    parity = (
        json.loads((build_dir / PARITY_FILE).read_text()) if (build_dir / PARITY_FILE).is_file() else None
    )
    summary["parity"] = (
        None if parity is None else {k: parity[k] for k in ("passed", "mode", "worst") if k in parity}
    )
    (assets / "report.json").write_text(json.dumps(summary, indent=1, allow_nan=True))
    html_path.write_text(render_html(manifest, summary, parity))
    return html_path
