"""``report.html`` for a build folder: what quantization did to the images, step by step and layer by layer.

Sections (PNGs in ``report/``, referenced relatively, so the folder is self-contained):

1. Image grid, evaluation seeds 0..num-1: FP model (eager PyTorch) | quantized engine without compensation |
   quantized engine with compensation, per-image PSNR (dB, [0, 1] images) under each image; 32x32 images are
   upscaled x4 (nearest). Both quantized columns are the build's ONNX model in ONNX Runtime:
   * build with compensation: column 3 is the engine as built; column 2 is the same engine with the head undone
     (stateful tables: the raw output ``comp_state_out``; stateless: (noise_pred + bias[r]) / scale[r], exact up
     to float32 rounding), stepped along its own, uncompensated trajectory;
   * build without compensation: column 2 is the engine as built; column 3 applies TCEC m = 0 tables fitted now
     (on the build's calibration-fit seeds, with the build's reference graph) outside the engine, with the same
     formula as the folded head. The report labels which case it is.
2. Per-step latent error ||x~_n - x_n|| / ||x_n|| (mean over the images) with and without compensation.
3. Per-layer sensitivity: SQNR (dB) of each quantized layer's output when only that layer's input and weight are
   quantized, on inputs recorded from FP calibration trajectories; the 30 worst layers as a bar chart. The
   quantizers are re-created from the build config (weights: symmetric per output channel at 8 bits, per group of
   ``weight_block_size`` input channels at 4 bits; activations: symmetric per tensor at 8 bits with the build's
   observer range (percentile or max; mse falls back to max), per group of 64 channels at 4 bits, none for a16).
   It ranks layers; it is not the build's exact graph.
4. The parity summary from ``parity.json``.

``report.json`` holds every number shown (full precision). The report is written after the manifest: it is
derived, not an artifact, and is not hashed."""

from __future__ import annotations

import base64
import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .build import COMPENSATION_DIR, MODEL_FILE, PARITY_FILE
from .calibrate import calibration_seeds
from .compensation import CompensationTables
from .config import BuildConfig
from .engines.onnxruntime import OrtDenoiser
from .engines.select import denoiser_from_build
from .errors import OutputExistsError, UserError
from .fidelity import evaluation_seeds, fp_denoiser, sample_latents
from .loading import LoadedModel
from .manifest import read_manifest, verify_artifacts
from .metrics import psnr, relative_latent_error
from .plugins.base import COMP_STATE, COMP_STATE_OUT, NOISE_PRED, SAMPLE, TIMESTEP
from .report_html import REPORT_DIR, column_titles, render_html
from .sample_images import to_pil
from .sampling import latents_to_images, make_scheduler, run_sampler

REPORT_FILE = "report.html"
UPSCALE = 4
WORST_LAYERS = 30


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
        out = torch.from_numpy(self.run(feeds)[0])
        rows = [self.tables.row_for(float(t)) for t in timestep]
        view = (len(rows), out.shape[1]) + (1,) * (out.dim() - 2)
        scale = torch.from_numpy(self.tables.scale[rows]).reshape(view)
        bias = torch.from_numpy(self.tables.bias[rows]).reshape(view)
        return (out + bias) / scale


class HeadApplied:
    """An uncompensated denoiser followed by a compensation head evaluated in PyTorch (same formula as the graph)."""

    def __init__(self, inner: Any, tables: CompensationTables) -> None:
        self.inner, self.head = inner, tables.head()
        self.state: torch.Tensor | None = None

    def reset(self, batch: int) -> None:
        self.inner.reset(batch)
        self.state = None

    @torch.no_grad()
    def __call__(
        self, sample: torch.Tensor, timestep: torch.Tensor, cond: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        eps = self.inner(sample, timestep, cond).float()
        if self.state is None or self.state.shape != eps.shape:
            self.state = torch.zeros_like(eps)
        out, self.state = self.head(eps, timestep, self.state)
        result: torch.Tensor = out
        return result


# ---- per-layer sensitivity -------------------------------------------------------------------------------------
def _fake_quant(x: torch.Tensor, amax: torch.Tensor, bits: int) -> torch.Tensor:
    qmax = 2 ** (bits - 1) - 1
    scale = (amax / qmax).clamp_min(1e-12)
    q: torch.Tensor = (x / scale).round().clamp(-qmax - 1, qmax) * scale
    return q


def _group_quant(x: torch.Tensor, bits: int, group: int, dim: int) -> torch.Tensor:
    """Symmetric quantization with one scale per ``group`` consecutive entries along ``dim``."""
    moved = x.movedim(dim, -1)
    size = moved.shape[-1]
    pad = (-size) % group
    padded = torch.nn.functional.pad(moved, (0, pad))
    grouped = padded.reshape(*padded.shape[:-1], -1, group)
    q = _fake_quant(grouped, grouped.abs().amax(-1, keepdim=True), bits)
    return q.reshape(padded.shape)[..., :size].movedim(-1, dim)


def _quantize_weight(w: torch.Tensor, config: BuildConfig) -> torch.Tensor:
    if config.precision.startswith("w4"):
        return _group_quant(w, 4, config.weight_block_size, dim=1)
    return _fake_quant(w, w.abs().flatten(1).amax(1).reshape(-1, *([1] * (w.dim() - 1))), 8)


def _quantize_activation(x: torch.Tensor, config: BuildConfig) -> torch.Tensor:
    if config.precision in ("w4a16", "fp32"):
        return x
    if config.precision == "w4a4":
        return _group_quant(x, 4, 64, dim=1)
    flat = x.abs().flatten().double()
    if config.observer == "percentile":
        sample = flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))[:1_000_000]]
        amax = torch.quantile(sample, config.percentile / 100).float()
    else:
        amax = flat.max().float()
    return _fake_quant(x, amax, 8)


def _layer_output(
    module: torch.nn.Conv2d | torch.nn.Linear, x: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    if isinstance(module, torch.nn.Conv2d):
        out: torch.Tensor = module._conv_forward(x, weight, module.bias)
        return out
    return torch.nn.functional.linear(x, weight, module.bias)


def sqnr_db(reference: torch.Tensor, actual: torch.Tensor) -> float:
    noise = float((reference.double() - actual.double()).pow(2).sum())
    signal = float(reference.double().pow(2).sum())
    return math.inf if noise == 0 else 10 * math.log10(max(signal, 1e-30) / noise)


def layer_sensitivity(
    model: LoadedModel, config: BuildConfig, layers: list[str], *, samples: int = 2, keep_steps: int = 4
) -> list[dict[str, Any]]:
    """SQNR of each named layer's output with only that layer quantized (see the module docstring)."""
    modules = dict(model.unet.named_modules())
    chosen = [n for n in layers if isinstance(modules.get(n), (torch.nn.Conv2d, torch.nn.Linear))]
    scheduler = make_scheduler(config.scheduler, model.scheduler_config)
    keep = set(np.linspace(0, config.steps - 1, min(keep_steps, config.steps)).round().astype(int).tolist())
    recorded: dict[str, list[torch.Tensor]] = {n: [] for n in chosen}
    state = {"step": -1}

    def hook(name: str) -> Callable[..., None]:
        def fn(_module: Any, inputs: tuple[torch.Tensor, ...], _output: Any) -> None:
            if state["step"] in keep:
                recorded[name].append(inputs[0].detach().clone())

        return fn

    class Counting:
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def reset(self, batch: int) -> None:
            state["step"] = -1

        def __call__(
            self, sample: torch.Tensor, timestep: torch.Tensor, cond: dict[str, torch.Tensor]
        ) -> Any:
            state["step"] += 1
            return self.inner(sample, timestep, cond)

    handles = [modules[n].register_forward_hook(hook(n)) for n in chosen]
    try:
        seeds = calibration_seeds(config.seed, samples)
        cond, uncond = model.conditioning.for_samples(seeds)
        shape = model.adapter.input_specs(model.unet)[0].concrete(1)[1:]
        from .sampling import initial_latents

        latents = initial_latents(shape, seeds)
        run_sampler(
            Counting(fp_denoiser(model)),
            scheduler,
            config.steps,
            latents,
            cond,
            uncond,
            model.conditioning.guidance_scale,
            record=False,
        )
    finally:
        for h in handles:
            h.remove()
    rows = []
    with torch.no_grad():
        for name in chosen:
            if not recorded[name]:
                continue
            module = modules[name]
            x = torch.cat(recorded[name])
            ref = _layer_output(module, x, module.weight)
            out = _layer_output(
                module, _quantize_activation(x, config), _quantize_weight(module.weight, config)
            )
            rows.append({"layer": name, "type": type(module).__name__, "sqnr_db": sqnr_db(ref, out)})
            recorded[name] = []
    return sorted(rows, key=lambda r: r["sqnr_db"])


# ---- pictures --------------------------------------------------------------------------------------------------
def _font(size: int) -> Any:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def image_grid(
    columns: list[tuple[str, torch.Tensor, list[float] | None]], path: Path, *, per_row: int = 4
) -> None:
    """Images in groups of ``per_row`` seeds; within a group one row per column kind (FP, quantized, ...), each
    tile upscaled x4 with its PSNR (dB) underneath."""
    n = columns[0][1].shape[0]
    size = columns[0][1].shape[-1] * UPSCALE
    label_w, cap_h, pad = 150, 20, 6
    groups = math.ceil(n / per_row)
    width = label_w + per_row * (size + pad) + pad
    height = groups * (len(columns) * (size + cap_h + pad) + 14) + 24
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    font, small = _font(14), _font(13)
    for g in range(groups):
        y0 = 24 + g * (len(columns) * (size + cap_h + pad) + 14)
        for k in range(per_row):
            i = g * per_row + k
            if i < n:
                draw.text((label_w + pad + k * (size + pad), y0 - 18), f"seed {i}", fill="black", font=small)
        for c, (title, images, values) in enumerate(columns):
            y = y0 + c * (size + cap_h + pad)
            for line_no, part in enumerate(title.split("\n")):
                draw.text((6, y + size // 2 - 16 + 16 * line_no), part, fill="black", font=small)
            for k in range(per_row):
                i = g * per_row + k
                if i >= n:
                    continue
                x = label_w + pad + k * (size + pad)
                tile = to_pil(images[i]).convert("RGB").resize((size, size), Image.Resampling.NEAREST)
                canvas.paste(tile, (x, y))
                caption = (
                    "reference"
                    if values is None
                    else ("identical" if math.isinf(values[i]) else f"{values[i]:.2f} dB")
                )
                draw.text((x + 4, y + size + 2), caption, fill="black", font=font)
    canvas.save(path)


def plot_error_curves(curves: dict[str, list[float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=110)
    for label, curve in curves.items():  # step 0 (the shared starting noise) has error 0: not on a log axis
        ax.plot(range(1, len(curve)), curve[1:], marker="o", markersize=3, label=label)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_yscale("log")
    ax.set_xlabel("sampler steps taken (error is 0 at step 0, the shared starting noise)")
    ax.set_ylabel("||x~_n - x_n|| / ||x_n||")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_sensitivity(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    worst = rows[:WORST_LAYERS][::-1]
    fig, ax = plt.subplots(figsize=(8, 0.28 * max(len(worst), 4) + 1.2), dpi=110)
    values = [min(r["sqnr_db"], 200.0) for r in worst]
    ax.barh(range(len(worst)), values, color="tab:red")
    ax.set_yticks(range(len(worst)), [r["layer"] for r in worst], fontsize=7)
    ax.set_xlabel("output SQNR with only this layer quantized (dB; lower = more sensitive)")
    ax.set_title(title, fontsize=10)
    for k, v in enumerate(values):
        ax.text(v, k, f" {v:.1f}", va="center", fontsize=7)
    ax.set_xlim(0, max(values + [1.0]) * 1.12)
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---- the report ------------------------------------------------------------------------------------------------
def _layers_of(manifest: dict[str, Any], model: LoadedModel) -> list[str]:
    layers = manifest.get("quantization", {}).get("quantized_layers")
    if layers:
        return list(layers)
    floats = set(manifest.get("quantization", {}).get("float_layers", []))
    return [
        n
        for n, m in model.unet.named_modules()
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and n not in floats
    ]


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
    from .checking import load_reference, model_for_build
    from .compensate import fit_compensation

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
    engine_path = build_dir / MODEL_FILE
    reference = sample_latents(fp_denoiser(model), model, sched_name, steps, seeds)
    engine = denoiser_from_build(build_dir)  # the runtime the manifest's target names (engines/select.py)
    built_latents = sample_latents(engine, model, sched_name, steps, seeds)
    compensation = manifest.get("compensation", {})
    method = "none" if compensation.get("rejected") else compensation.get("method", "none")  # not in the engine
    quantized = config.quantized
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
        layer_rows = layer_sensitivity(model, config, _layers_of(manifest, model))
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


def embed_png(path: Path) -> str:
    """A data: URI for a PNG (for callers that want a single-file HTML)."""
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
