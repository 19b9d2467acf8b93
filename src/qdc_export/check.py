"""Parity: the exported ONNX model against the PyTorch graph it came from, through Polygraphy.

(a) fp32: elementwise on step inputs taken from a real trajectory (Polygraphy ``CompareFunc.simple``).
(b) quantized: Q/DQ graphs are not bit-exact across runtimes (one rounding flip cascades), so the
    per-step outputs are compared at identical inputs by SNR and cosine (Polygraphy's SNR and cosine
    compare functions), and whole trajectories by final-image PSNR against the FP model: ONNX Runtime's
    PSNR must be within a margin of the PyTorch Q/DQ graph's PSNR."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from polygraphy.backend.onnxrt import OnnxrtRunner
from polygraphy.comparator import Comparator, CompareFunc, IterationResult, RunResults
from polygraphy.logger import G_LOGGER
from polygraphy.comparator.compare import CosineSimilarityCompareFunc, SnrCompareFunc

from .memory import log_resident, release_memory
from .metrics import error_stats, psnr
from .plugins.base import COMP_STATE, COMP_STATE_OUT, NOISE_PRED, SAMPLE, TIMESTEP
from .engines.onnxruntime import OrtDenoiser
from .sampling import Denoiser, TorchDenoiser, Trajectory, initial_latents, latents_to_images, run_sampler


REFERENCE_RUNNER = "pytorch"


@dataclass(frozen=True, kw_only=True)
class ParityTolerances:
    """Stated in every parity report. fp32: elementwise. Quantized: statistical."""

    fp32_atol: float = 1e-4
    fp32_rtol: float = 1e-3
    step_min_snr_db: float = 25.0
    step_min_cosine: float = 0.998
    trajectory_psnr_margin_db: float = 1.0


class RecordingDenoiser:
    """Wraps the reference graph's Denoiser and records every step's engine feed (inputs incl. comp_state) and
    its outputs, as Polygraphy iteration results: the reference is run once, on the trajectory it makes, and
    can be released before the engine is opened (the two never hold their weights at the same time)."""

    def __init__(self, inner: Any, cond_names: list[str]) -> None:
        self.inner, self.cond_names = inner, cond_names
        self.feeds: list[OrderedDict[str, np.ndarray]] = []
        self.outputs: list[IterationResult] = []

    def reset(self, batch: int) -> None:
        self.inner.reset(batch)

    def __call__(self, sample, timestep, cond):
        feed = OrderedDict([(SAMPLE, sample.numpy().copy()), (TIMESTEP, timestep.numpy().copy())])
        for name in self.cond_names:
            feed[name] = cond[name].numpy().copy()
        if getattr(self.inner, "stateful", False):
            state = self.inner.state
            feed[COMP_STATE] = (np.zeros_like(feed[SAMPLE]) if state is None or state.shape != sample.shape
                                else np.asarray(state).copy())
        self.feeds.append(feed)
        start = time.perf_counter()
        out = self.inner(sample, timestep, cond)
        outputs = OrderedDict([(NOISE_PRED, out.numpy().copy())])
        if getattr(self.inner, "stateful", False):
            outputs[COMP_STATE_OUT] = np.asarray(self.inner.state).copy()
        self.outputs.append(IterationResult(outputs, time.perf_counter() - start, REFERENCE_RUNNER))
        return out


@dataclass
class ParityCase:
    """What parity needs. The FP model, the PyTorch reference graph and the engine are opened one after the
    other and the FP model is released before the other two are opened, so the three are never resident
    together (SDXL: 10.3 GB FP32 UNet + 2.6 GB INT8 reference graph + 2.6 GB INT8 session)."""

    fp: Callable[[], Denoiser]  # the eager FP model, used for quantized builds only
    release_fp: Callable[[], None]  # frees the FP model's weights once its trajectories are taken
    open_reference: Callable[[], Any]  # -> the PyTorch reference graph (positional inputs)
    open_engine: Callable[[], Any]  # -> the ONNX Runtime session
    cond_names: list[str]
    stateful: bool
    scheduler: Any
    steps: int
    latent_shape: tuple[int, ...]
    conditioning: Any
    quantized: bool
    int4_activations: bool = False  # w4a4: the report adds the reference's self-sensitivity (informational)


@dataclass
class ParityRun:
    """The parity report, and the step feeds and Polygraphy results behind it (for goldens)."""

    report: dict[str, Any]
    feeds: list[OrderedDict[str, np.ndarray]]
    results: Any


def _trajectories(case: ParityCase, seeds: list[int], denoiser: Denoiser) -> Trajectory:
    cond, uncond = case.conditioning.for_samples(seeds)
    latents = initial_latents(case.latent_shape, seeds)
    return run_sampler(denoiser, case.scheduler, case.steps, latents, cond, uncond,
                       case.conditioning.guidance_scale)


def _self_sensitivity(module: Any, feeds: list[OrderedDict[str, np.ndarray]], reference_iters: Any) -> dict:
    """Why: with 4-bit activations one rounding flip moves an activation by a whole INT4 step and flips more
    downstream, so the Q/DQ graph may not agree with itself when its input moves by one ulp. That SNR is the
    scale to read ONNX Runtime vs PyTorch per-step SNR against. Informational: never changes ``passed``.
    Both directions: a flip needs a value on the matching side of a rounding boundary (tiny-unet2d W4A4 +
    SVDQuant, 1 thread: -1 ulp gives 14.7 dB at step 0, +1 ulp 127 dB)."""
    snrs: dict[str, list[float]] = {"up": [], "down": []}
    with torch.no_grad():
        for feed, ref in zip(feeds, reference_iters):
            for direction, to in (("up", np.inf), ("down", -np.inf)):
                nudged = [np.nextafter(a, np.float32(to)) if n == SAMPLE else a for n, a in feed.items()]
                out = module(*[torch.from_numpy(np.ascontiguousarray(a)) for a in nudged])
                out = out[0] if isinstance(out, (tuple, list)) else out  # NOISE_PRED is the first output
                snrs[direction].append(error_stats(ref[NOISE_PRED], out.numpy())["snr_db"])
    per_step = [min(u, d) for u, d in zip(snrs["up"], snrs["down"])]
    return {"what": "per-step SNR of the PyTorch reference against itself with the sample input nudged by "
                    "one ulp (worse of towards +inf and -inf): how far the 4-bit-activation graph moves under it",
            "min_snr_db": min(per_step), "per_step_snr_db": per_step, "by_direction": snrs}


def run_parity(case: ParityCase, seeds: list[int], tol: ParityTolerances | None = None) -> ParityRun:
    tol = tol or ParityTolerances()
    # 1. FP model: trajectories, then its weights go
    fp_images = latents_to_images(_trajectories(case, seeds, case.fp()).final) if case.quantized else None
    case.release_fp()
    # 2. PyTorch reference graph: its own trajectory, recording each step's feed and outputs
    reference_module = case.open_reference()
    recorder = RecordingDenoiser(TorchDenoiser(reference_module, case.cond_names, stateful=case.stateful),
                                 case.cond_names)
    ref_traj = _trajectories(case, seeds, recorder)
    torch_iters = recorder.outputs
    log_resident("check: reference trajectory run")
    sensitivity = (_self_sensitivity(reference_module, recorder.feeds, torch_iters)
                   if case.int4_activations else None)
    del reference_module, recorder.inner
    release_memory()
    # 3. the engine on the same feeds (Polygraphy), then its own trajectory
    session = case.open_engine()
    with G_LOGGER.verbosity(G_LOGGER.ERROR):  # per-iteration logs go to the JSON report instead
        results = Comparator.run([OnnxrtRunner(session, name="onnxruntime")], data_loader=recorder.feeds)
    results = RunResults([(REFERENCE_RUNNER, torch_iters), *results.items()])
    ort_iters = list(results.values())[1]
    if case.quantized:
        funcs = [SnrCompareFunc(snr_threshold=tol.step_min_snr_db),
                 CosineSimilarityCompareFunc(cosine_similarity_threshold=tol.step_min_cosine)]
    else:
        funcs = [CompareFunc.simple(atol=tol.fp32_atol, rtol=tol.fp32_rtol, check_error_stat="elemwise")]
    with G_LOGGER.verbosity(G_LOGGER.ERROR):
        accuracy = Comparator.compare_accuracy(results, compare_func=funcs)
    per_step = [error_stats(a[NOISE_PRED], b[NOISE_PRED]) for a, b in zip(torch_iters, ort_iters)]
    report: dict[str, Any] = {
        "mode": "statistical" if case.quantized else "elementwise",
        "tolerances": asdict(tol),
        "seeds": seeds,
        "steps": case.steps,
        "per_step": per_step,
        "worst": {
            "max_abs": max(s["max_abs"] for s in per_step),
            "p99_abs": max(s["p99_abs"] for s in per_step),
            "mean_abs": float(np.mean([s["mean_abs"] for s in per_step])),
            "min_snr_db": min(s["snr_db"] for s in per_step),
            "min_cosine": min(s["cosine"] for s in per_step),
        },
        "polygraphy_passed": bool(accuracy),
    }
    if sensitivity is not None:
        report["reference_self_sensitivity"] = sensitivity
    passed = bool(accuracy)
    if fp_images is not None:
        ort_images = latents_to_images(_trajectories(case, seeds, OrtDenoiser(session)).final)
        ref_images = latents_to_images(ref_traj.final)
        psnr_ref = psnr(fp_images, ref_images).clamp(max=100.0)
        psnr_ort = psnr(fp_images, ort_images).clamp(max=100.0)
        gap = abs(float(psnr_ort.mean()) - float(psnr_ref.mean()))
        report["trajectory"] = {
            "psnr_vs_fp_pytorch_db": [float(v) for v in psnr_ref],
            "psnr_vs_fp_onnxruntime_db": [float(v) for v in psnr_ort],
            "mean_psnr_pytorch_db": float(psnr_ref.mean()),
            "mean_psnr_onnxruntime_db": float(psnr_ort.mean()),
            "gap_db": gap,
        }
        passed = passed and gap <= tol.trajectory_psnr_margin_db
    report["passed"] = passed
    return ParityRun(report, recorder.feeds, results)


def summarize(report: dict[str, Any]) -> str:
    w = report["worst"]
    tol = report["tolerances"]
    if report["mode"] == "elementwise":
        line = (f"fp32 parity (atol {tol['fp32_atol']:g}, rtol {tol['fp32_rtol']:g}): max {w['max_abs']:.3g} "
                f"mean {w['mean_abs']:.3g} p99 {w['p99_abs']:.3g}")
    else:
        t = report["trajectory"]
        line = (f"quantized parity: per-step SNR min {w['min_snr_db']:.1f} dB (>= {tol['step_min_snr_db']}), "
                f"cosine min {w['min_cosine']:.5f} (>= {tol['step_min_cosine']}); final-image PSNR vs FP: "
                f"PyTorch {t['mean_psnr_pytorch_db']:.2f} dB, ONNX Runtime {t['mean_psnr_onnxruntime_db']:.2f} dB, "
                f"gap {t['gap_db']:.2f} dB (<= {tol['trajectory_psnr_margin_db']}); max abs {w['max_abs']:.3g} "
                f"mean {w['mean_abs']:.3g} p99 {w['p99_abs']:.3g}")
    if "reference_self_sensitivity" in report:
        line += (f"; PyTorch vs itself at a 1-ulp sample nudge (+/-): SNR min "
                 f"{report['reference_self_sensitivity']['min_snr_db']:.1f} dB (informational)")
    return ("PASS " if report["passed"] else "FAIL ") + line
