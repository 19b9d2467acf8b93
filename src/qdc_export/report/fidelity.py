"""Image fidelity of deployed engines against the FP model (docs/method.md, "How it is judged").

For one (model, precision, sampler, steps): the quantized graph is built once (capture, calibration, Q/DQ),
then every compensation method is fitted on it, folded and exported to ONNX; each ONNX model is sampled in
ONNX Runtime (:class:`OrtDenoiser`, what users deploy) from the same evaluation seeds as the FP model
(eager PyTorch), and compared image by image (PSNR, SSIM on [0, 1] images) and step by step
(||x~_n - x_n|| / ||x_n||, the error-accumulation curve; point 0 is the shared starting noise, so 0).

Evaluation seeds are 0..num_images-1; calibration and compensation fits use the calibration seeds of
:mod:`qdc_export.quantize.calibrate` (offset 100 000), so no image that is scored was seen by a fit.
The parity check is not run here (that is ``qdc-export check``'s job)."""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qdc_export.compensation.stage import add_compensation
from qdc_export.config import BuildConfig
from qdc_export.engines.select import denoiser_for_target
from qdc_export.errors import UserError
from qdc_export.export.to_onnx import export_onnx
from qdc_export.infra.provenance import source_hash
from qdc_export.load.models import LoadedModel, io_description, load_model
from qdc_export.metrics import psnr, relative_latent_error, ssim
from qdc_export.precision import PrecisionPlan
from qdc_export.quantize.graph import build_graph
from qdc_export.sampling import (
    Denoiser,
    Episode,
    TorchDenoiser,
    latents_to_images,
    make_scheduler,
    run_episode,
)

# Named compensation methods -> BuildConfig fields. "none" is the plain quantized engine.
METHODS: dict[str, dict[str, Any]] = {
    "none": {"compensation": "none"},
    "ptqd": {"compensation": "ptqd"},
    "tac": {"compensation": "tac"},
    "tcec-m0": {"compensation": "tcec", "tcec_variant": "m0"},
    "tcec-m1-analytic": {"compensation": "tcec", "tcec_variant": "m1-analytic"},
    "tcec-m1-fitted": {"compensation": "tcec", "tcec_variant": "m1-fitted"},
    "tcec-m0-bias": {"compensation": "tcec", "tcec_variant": "m0", "comp_fit_bias": True},
    "tcec-m1-fitted-cumulative": {
        "compensation": "tcec",
        "tcec_variant": "m1-fitted",
        "comp_target": "cumulative",
    },
    # what `qdc-export build` does by default: TCEC m=0 + bias, folded only if its held-out gain exceeds its s.e.
    "tcec-default": {"compensation": "tcec", "tcec_variant": "m0", "comp_fit_bias": True, "comp_validate": True},
    "tcec-m1-fitted-cumulative-bias": {
        "compensation": "tcec",
        "tcec_variant": "m1-fitted",
        "comp_target": "cumulative",
        "comp_fit_bias": True,
    },
}
DEFAULT_METHODS = ("none", "ptqd", "tac", "tcec-m0", "tcec-m1-analytic", "tcec-m1-fitted")
# Named samplers -> (scheduler, steps).
SAMPLERS: dict[str, tuple[str, int]] = {
    "ddim20": ("ddim", 20),
    "ddim50": ("ddim", 50),
    "dpmsolver++20": ("dpmsolver++", 20),
    "euler30": ("euler", 30),
}
DEFAULT_SAMPLERS = ("ddim20", "ddim50", "dpmsolver++20", "euler30")
def precision_fields(label: str) -> dict[str, Any]:
    """BuildConfig fields of a row's precision label, "<precision>[+<PTQ recipe>]": "w4a8" is round-to-nearest
    (the rows measured before recipes existed keep their meaning), "w4a8+svdquant+gptq" that recipe."""
    precision, _, recipe = label.partition("+")
    return {"precision": precision, "ptq": recipe or "rtn"}

Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


MAX_EVALUATION_IMAGES = 10_000  # evaluation seeds 0..N-1 stay below the parity seeds (50 000 + i)


def evaluation_seeds(num_images: int) -> list[int]:
    if not 1 <= num_images <= MAX_EVALUATION_IMAGES:
        raise UserError(f"number of evaluation images must be in 1..{MAX_EVALUATION_IMAGES}, got {num_images}")
    return list(range(num_images))


def model_fingerprint(model: LoadedModel) -> str:
    """sha256 over the UNet's parameters and config (a retrained reference model gets a new cache key)."""
    # Private keys (_name_or_path: where the folder was read from) do not change the model.
    config = {k: v for k, v in model.unet.config.items() if not k.startswith("_")}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.unet.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def sample_latents(
    denoiser: Denoiser,
    model: LoadedModel,
    scheduler_name: str,
    steps: int,
    seeds: list[int],
    *,
    batch: int = 16,
) -> torch.Tensor:
    """Every latent of the trajectory: [steps + 1, len(seeds), C, H, W] (index 0 = the starting noise)."""
    scheduler = make_scheduler(scheduler_name, model.scheduler_config)
    shape = model.adapter.input_specs(model.unet)[0].concrete(1)[1:]
    chunks = []
    for start in range(0, len(seeds), batch):
        chunk = seeds[start : start + batch]
        traj = run_episode(denoiser, Episode.from_seeds(scheduler, steps, model.conditioning, shape, chunk))
        chunks.append(torch.stack(traj.latents))
    return torch.cat(chunks, dim=1)


def fp_denoiser(model: LoadedModel) -> TorchDenoiser:
    return TorchDenoiser(model.adapter.wrap(model.unet).eval(), [s.name for s in model.conditioning.specs])


def fp_latents(
    model: LoadedModel, scheduler_name: str, steps: int, seeds: list[int], *, cache_dir: Path | None = None
) -> torch.Tensor:
    """FP (eager PyTorch) trajectories, cached per (model weights, scheduler config, sampler, steps, seeds)."""
    path = None
    if cache_dir is not None:
        key = hashlib.sha256(
            json.dumps(
                [model_fingerprint(model), scheduler_name, steps, seeds, "init-sigma-after-set",
                 model.scheduler_config], sort_keys=True, default=str
            ).encode()
        )
        path = Path(cache_dir) / f"fp-{scheduler_name}{steps}-{key.hexdigest()[:16]}.pt"
        if path.is_file():
            cached: torch.Tensor = torch.load(path)
            return cached
    latents = sample_latents(fp_denoiser(model), model, scheduler_name, steps, seeds)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(latents, tmp)
        tmp.replace(path)
    return latents


def _stats(values: torch.Tensor) -> dict[str, float]:
    v = values.double()
    finite = bool(torch.isfinite(v).all())
    return {
        "mean": float(v.mean()),
        "std": float(v.std()) if v.numel() > 1 and finite else 0.0,
        "min": float(v.min()),
        "max": float(v.max()),
    }


def compare(reference: torch.Tensor, actual: torch.Tensor) -> dict[str, Any]:
    """Score trajectories [steps + 1, B, C, H, W] (final images from the last latent) against the reference."""
    if reference.shape != actual.shape:
        raise UserError(f"trajectory shapes differ: {tuple(reference.shape)} vs {tuple(actual.shape)}")
    ref_img, img = latents_to_images(reference[-1]), latents_to_images(actual[-1])
    p, s = psnr(ref_img, img), ssim(ref_img, img)
    curve = relative_latent_error(list(reference), list(actual))
    return {
        "psnr_db": _stats(p),
        "ssim": _stats(s),
        "psnr_per_image": [float(x) for x in p],
        "latent_rel_error": curve,
        "final_latent_rel_error": curve[-1],
        "num_images": int(reference.shape[1]),
    }


# ---- engines: one quantized graph, one ONNX model per compensation method ------------------------------------
def method_config(base: BuildConfig, method: str) -> BuildConfig:
    if method not in METHODS:
        raise UserError(f"unknown compensation method {method!r}; choose from: {', '.join(METHODS)}")
    fields = {
        **base.to_dict(),
        "compensation": "none",
        "tcec_variant": "m0",
        "comp_fit_bias": False,
        "comp_target": "same-input",
        "comp_validate": False,  # the methods as such; "tcec-default" adds the build's held-out check
        **METHODS[method],
    }
    return BuildConfig.from_dict(fields)


def export_engine(
    gm: torch.fx.GraphModule,
    example: tuple[torch.Tensor, ...],
    model: LoadedModel,
    config: BuildConfig,
    folder: Path,
) -> dict[str, Any]:
    """Fit ``config``'s compensation on the quantized graph, fold it, export ``folder/model.onnx`` (the same
    library calls as :func:`qdc_export.build.build`, minus the parity check and the manifest)."""
    folder.mkdir(parents=True, exist_ok=True)
    io = io_description(model)
    description: dict[str, Any] = {"method": "none"}
    graph = gm
    t0 = time.perf_counter()
    if config.compensation != "none":
        graph, example, description = add_compensation(gm, example, model, config, folder, io)
    t1 = time.perf_counter()
    tmp = folder / "model.onnx.tmp"
    export_onnx(
        graph,
        example,
        tmp,
        input_names=[i["name"] for i in io["inputs"]],
        output_names=[o["name"] for o in io["outputs"]],
        int4_weights=config.plan.int4_weights,
    )
    tmp.replace(folder / "model.onnx")
    info = {
        "config": config.to_dict(),
        "compensation": description,
        "fit_s": round(t1 - t0, 2),
        "export_s": round(time.perf_counter() - t1, 2),
    }
    (folder / "engine.json").write_text(json.dumps(info, indent=2, default=str))
    return info


def _table_stats(folder: Path) -> dict[str, Any]:
    from qdc_export.compensation import CompensationTables

    if not (folder / "compensation").is_dir():
        return {}
    tables = CompensationTables.load(folder / "compensation")
    n = tables.num_steps
    return {
        "max_abs_K": float(np.abs(1 - tables.scale[:n]).max()),
        "max_abs_L": float(np.abs(tables.prev[:n]).max()),
        "max_abs_bias": float(np.abs(tables.bias[:n]).max()),
        "fit_final_latent_rel_error": tables.stats.get("final_latent_rel_error"),
    }


def engine_key(config: BuildConfig) -> str:
    """Cache key of an exported engine: its build config and the code version (an engine built by other code is
    rebuilt, not reused)."""
    payload = json.dumps([config.to_dict(), source_hash()], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Case:
    model: str
    precision: str
    scheduler: str
    steps: int

    @property
    def sampler(self) -> str:
        """The row label: "ddim20", "dpmsolver++20", ... (the SAMPLERS keys)."""
        return f"{self.scheduler}{self.steps}"

    @classmethod
    def named(cls, model: str, precision: str, sampler: str) -> Case:
        if sampler not in SAMPLERS:
            raise UserError(f"unknown sampler {sampler!r}; choose from: {', '.join(SAMPLERS)}")
        return cls(model, precision, *SAMPLERS[sampler])


def evaluate_case(
    case: Case,
    methods: Iterable[str],
    *,
    num_images: int,
    cache_dir: Path,
    base_config: BuildConfig | None = None,
    model: LoadedModel | None = None,
    progress: Progress = _quiet,
) -> list[dict[str, Any]]:
    """Rows (one per method) for one (model, precision, sampler). ONNX models are cached in ``cache_dir`` by
    model weights, config and code version, so an interrupted run resumes where it stopped."""
    methods = list(methods)
    if not PrecisionPlan.parse(**precision_fields(case.precision)).quantized:
        methods = ["none"]
    model = model or load_model(case.model)
    fingerprint = model_fingerprint(model)
    seeds = evaluation_seeds(num_images)
    base = base_config or BuildConfig()
    base = BuildConfig.from_dict(
        {**base.to_dict(), **precision_fields(case.precision), "scheduler": case.scheduler, "steps": case.steps}
    )
    cache_dir = Path(cache_dir)
    t0 = time.perf_counter()
    reference = fp_latents(model, case.scheduler, case.steps, seeds, cache_dir=cache_dir / "fp")
    progress(f"  FP trajectories ({num_images} images): {time.perf_counter() - t0:.0f} s")
    case_dir = cache_dir / "engines" / f"{case.model}-{fingerprint}" / f"{case.precision}-{case.sampler}"
    graph: tuple[Any, Any] | None = None
    rows = []
    for method in methods:
        config = method_config(base, method)
        folder = case_dir / f"{method}-{engine_key(config)}"
        t1 = time.perf_counter()
        if not (folder / "engine.json").is_file():
            if graph is None:
                progress(f"  building the {case.precision} graph (capture, calibration, Q/DQ)")
                gm, example, _ = build_graph(model, config)
                graph = (gm, example)
            export_engine(graph[0], graph[1], model, config, folder)
        info = json.loads((folder / "engine.json").read_text())
        t2 = time.perf_counter()
        actual = sample_latents(  # run as a build of config.target runs (engines/select.py)
            denoiser_for_target(folder / "model.onnx", config.target), model, case.scheduler, case.steps, seeds
        )
        scores = compare(reference, actual)
        t3 = time.perf_counter()
        row = {
            "model": case.model,
            "model_fingerprint": fingerprint,  # the reference models get retrained: rows name the weights
            "precision": case.precision,
            "sampler": case.sampler,
            "scheduler": case.scheduler,
            "steps": case.steps,
            "method": method,
            **({"target": config.target} if config.target != "onnxruntime" else {}),
            **scores,
            "tables": _table_stats(folder),
            # the build's held-out check (tcec-default), None where the method ran without it
            "compensation_validation": info["compensation"].get("validation"),
            "engine": str(folder),
            "timings_s": {
                "fit": info["fit_s"],
                "export": info["export_s"],
                "prepare": round(t2 - t1, 1),
                "sample_and_score": round(t3 - t2, 1),
            },
        }
        rows.append(row)
        progress(
            f"  {method:>26}: PSNR {scores['psnr_db']['mean']:.2f} +- {scores['psnr_db']['std']:.2f} dB "
            f"(min {scores['psnr_db']['min']:.2f}), SSIM {scores['ssim']['mean']:.4f}, final latent rel. err "
            f"{scores['final_latent_rel_error']:.2e}  [{t3 - t1:.0f} s]"
        )
    return rows


def format_db(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.2f}"
