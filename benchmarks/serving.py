"""Serving overhead and agreement (issue 12): what the diffusers drop-in (qdc_export.serving.EngineUNet) costs per
denoising step over a bare ONNX Runtime session call, and whether a diffusers pipeline with the drop-in gives the
same images as the project's own sampler loop. Timings are reported, never asserted.

    python benchmarks/serving.py                        # digits-uncond and digits-cond, W8A8 + TCEC m1-fitted, DDIM 20
    python benchmarks/serving.py --repeats 31 --threads 1

Per-step overhead: one generation (all steps of the build's schedule) through the drop-in (torch tensors in and
out, timestep handling, schedule tracking, state fed back) and one through the *same* InferenceSession called
directly with prepared numpy feeds and the state fed back by hand; the two are interleaved (A, B, A, B, ...)
after warmup, and per-step time = generation time / steps; medians of the repeats are reported, and the paired
median of (drop-in - bare) per round. Agreement: DDIMPipeline (the bundled model's shipped scheduler) with the
drop-in against qdc-export's run_sampler over an OrtDenoiser, same seeds and noise, plus each one's PSNR vs the
FP pipeline. Writes benchmarks/results/serving.json and serving.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CONFIG = dict(precision="w8a8", compensation="tcec", tcec_variant="m1-fitted", comp_validate=False, steps=20,
              calib_samples=8, parity_samples=4)


def build_once(model: str, cache: Path) -> Path:
    from qdc_export.build import build
    from qdc_export.config import BuildConfig

    out = cache / f"{model}-w8a8-tcec-m1-ddim20"
    if not (out / "manifest.json").is_file():
        build(model, BuildConfig(**CONFIG), out, force=True, write_report=False)
    return out


def session(path: Path, threads: int):
    import onnx
    import onnxruntime as ort

    from qdc_export.engines.providers import make_session_options

    options, providers = make_session_options(onnx.load(str(path), load_external_data=False), provider="cpu")
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    return ort.InferenceSession(str(path), options, providers=providers)


def overhead(build_dir: Path, *, repeats: int, warmup: int, threads: int) -> dict[str, Any]:
    from qdc_export.engines.onnxruntime import OrtDenoiser
    from qdc_export.load.models import conditioning_from_build
    from qdc_export.load.plugins.base import COMP_STATE
    from qdc_export.manifest import read_manifest
    from qdc_export.sampling import make_scheduler
    from qdc_export.serving import EngineUNet2DConditionModel, EngineUNet2DModel

    manifest = read_manifest(build_dir)
    sched = manifest["scheduler"]
    scheduler = make_scheduler(sched["name"], sched["config"])
    scheduler.set_timesteps(sched["steps"])
    sess = session(build_dir / "model.onnx", threads)
    kinds = {"UNet2DModel": EngineUNet2DModel, "UNet2DConditionModel": EngineUNet2DConditionModel}
    unet = kinds[manifest["model"]["unet_class"]](build_dir, manifest, OrtDenoiser(sess), scheduler=scheduler)
    conditioning = conditioning_from_build(build_dir, manifest)
    cond, uncond = conditioning.for_samples([0])
    cfg = bool(cond) and conditioning.guidance_scale != 1.0
    cond = {k: torch.cat([uncond[k], cond[k]]) for k in cond} if cfg else cond  # the batch a CFG pipeline sends
    batch = 2 if cfg else 1
    shape = (batch, *manifest["io"]["inputs"][0]["shape"][1:])
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    timesteps = scheduler.timesteps
    names = [o.name for o in sess.get_outputs()]
    stateful = any(i.name == COMP_STATE for i in sess.get_inputs())

    def dropin() -> float:
        start = time.perf_counter()
        for t in timesteps:
            if cond:
                unet(x, t, encoder_hidden_states=cond["encoder_hidden_states"],
                     added_cond_kwargs={k: v for k, v in cond.items() if k != "encoder_hidden_states"} or None)
            else:
                unet(x, t)
        return time.perf_counter() - start

    feeds = {"sample": x.numpy(), **{k: v.numpy() for k, v in cond.items()}}

    def bare() -> float:
        state = np.zeros(shape, np.float32)
        start = time.perf_counter()
        for t in timesteps:
            feeds["timestep"] = np.full((batch,), float(t), np.float32)
            if stateful:
                feeds[COMP_STATE] = state
            outputs = sess.run(names, feeds)
            if stateful:
                state = outputs[1]
        return time.perf_counter() - start

    for _ in range(warmup):
        bare(), dropin()
    rounds = []
    for r in range(repeats):
        pair = (bare(), dropin()) if r % 2 == 0 else tuple(reversed((dropin(), bare())))
        rounds.append(pair)
    steps = len(timesteps)
    bare_ms = statistics.median(b for b, _ in rounds) / steps * 1e3
    drop_ms = statistics.median(d for _, d in rounds) / steps * 1e3
    paired_ms = statistics.median(d - b for b, d in rounds) / steps * 1e3
    return {"batch": batch, "steps": steps, "stateful": stateful, "bare_ms_per_step": bare_ms,
            "dropin_ms_per_step": drop_ms, "overhead_ms_per_step": drop_ms - bare_ms,
            "overhead_pct": 100 * (drop_ms / bare_ms - 1), "paired_overhead_ms_per_step": paired_ms,
            "paired_overhead_pct": 100 * paired_ms / bare_ms}


def agreement(build_dir: Path, seeds: list[int]) -> dict[str, Any]:
    from diffusers import DDIMPipeline, DDPMScheduler, UNet2DModel

    from qdc_export.engines.onnxruntime import OrtDenoiser
    from qdc_export.load.models import MODELS_DIR
    from qdc_export.manifest import read_manifest
    from qdc_export.metrics import psnr
    from qdc_export.sampling import initial_latents, make_scheduler, run_sampler
    from qdc_export.serving import EngineUNet

    manifest = read_manifest(build_dir)
    sched, steps = manifest["scheduler"], manifest["scheduler"]["steps"]
    pipe = DDIMPipeline(unet=UNet2DModel.from_pretrained(MODELS_DIR / "digits-uncond" / "unet").eval(),
                        scheduler=DDPMScheduler.from_pretrained(MODELS_DIR / "digits-uncond" / "scheduler"))
    pipe.set_progress_bar_config(disable=True)

    def run_pipe() -> torch.Tensor:
        return torch.cat([torch.from_numpy(pipe(generator=torch.Generator().manual_seed(s), num_inference_steps=steps,
                                                output_type="np").images).permute(0, 3, 1, 2) for s in seeds])

    fp = run_pipe()
    pipe.unet = EngineUNet.from_build(build_dir)
    served = run_pipe()
    engine, scheduler = OrtDenoiser.from_path(build_dir / "model.onnx"), make_scheduler(sched["name"], sched["config"])
    shape = tuple(manifest["io"]["inputs"][0]["shape"][1:])
    own = torch.cat([((run_sampler(engine, scheduler, steps, initial_latents(shape, [s]), {}, None, record=False)
                       .final.clamp(-1, 1) + 1) / 2) for s in seeds])
    diff = (served.double() - own.double()).abs()
    return {"pipeline": "DDIMPipeline", "seeds": seeds, "max_abs_diff": float(diff.max()),
            "mean_abs_diff": float(diff.mean()),
            "psnr_vs_fp_pipeline_db": float(psnr(fp, served).clamp(max=100).mean()),
            "psnr_vs_fp_own_loop_db": float(psnr(fp, own).clamp(max=100).mean()),
            "build_parity_psnr_db": json.loads((build_dir / "parity.json").read_text())["trajectory"][
                "mean_psnr_onnxruntime_db"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="digits-uncond,digits-cond")
    p.add_argument("--repeats", type=int, default=21)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="ORT intra-op threads (1: steadier on a shared machine)")
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--cache", type=Path, default=Path("/tmp/qdc-export-serving-builds"), help="build folders (reused)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from qdc_export.cli import _quiet_third_party
    from qdc_export.manifest import package_versions

    _quiet_third_party()
    import onnxruntime as ort

    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    meta = {"command": "python " + " ".join(sys.argv), "git_commit": commit, "threads": args.threads,
            "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "package_versions": {**package_versions(), "transformers": _version("transformers")},
            "load_average_start": os.getloadavg(), "build_config": CONFIG,
            "machine_note": "shared machine: 2 CPU cores shared by 4 engineers' jobs; medians of interleaved runs"}
    results: dict[str, Any] = {"meta": meta, "overhead": [], "agreement": None}
    for model in args.models.split(","):
        folder = build_once(model, args.cache)
        row = {"model": model, **overhead(folder, repeats=args.repeats, warmup=args.warmup, threads=args.threads)}
        results["overhead"].append(row)
        print(f"{model}: bare {row['bare_ms_per_step']:.3f} ms/step, drop-in {row['dropin_ms_per_step']:.3f}, "
              f"overhead {row['overhead_ms_per_step']:+.3f} ms ({row['overhead_pct']:+.2f} %), paired "
              f"{row['paired_overhead_ms_per_step']:+.3f} ms ({row['paired_overhead_pct']:+.2f} %)", flush=True)
        if model == "digits-uncond":
            results["agreement"] = agreement(folder, list(range(args.seeds)))
            print("agreement:", results["agreement"], flush=True)
    meta["load_average_end"] = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serving.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / "serving.md").write_text(markdown(results, ort.__version__))


def _version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "absent"


def markdown(results: dict[str, Any], ort_version: str) -> str:
    meta = results["meta"]
    lines = [
        "# Serving: drop-in overhead and pipeline agreement", "",
        f"Generated by `{meta['command']}` at commit `{meta['git_commit'][:12]}`; ONNX Runtime {ort_version} "
        f"CPUExecutionProvider, {meta['threads']} intra-op thread(s), torch {meta['package_versions']['torch']} "
        f"({meta['torch_threads']} thread(s)), diffusers {meta['package_versions']['diffusers']}. "
        f"Machine: {meta['machine_note']} (load average {meta['load_average_start'][0]:.1f} at start, "
        f"{meta['load_average_end'][0]:.1f} at end): read differences of a few percent as noise. Builds: "
        f"W8A8 + TCEC m1-fitted (stateful: comp_state fed back), DDIM 20 steps.", "",
        "## Per-step overhead of `EngineUNet` over a bare `InferenceSession.run`", "",
        "Same session; one generation (all 20 steps) per run, runs interleaved, median per step. 'paired' = median "
        "over rounds of (drop-in - bare) within the round. Batch 2 for the conditional model: the [uncond; cond] "
        "batch of classifier-free guidance.", "",
        "| model | batch | bare ms/step | drop-in ms/step | overhead ms/step | overhead % | paired ms/step | paired % |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results["overhead"]:
        lines.append(f"| {r['model']} | {r['batch']} | {r['bare_ms_per_step']:.3f} | {r['dropin_ms_per_step']:.3f} | "
                     f"{r['overhead_ms_per_step']:+.3f} | {r['overhead_pct']:+.2f} | "
                     f"{r['paired_overhead_ms_per_step']:+.3f} | {r['paired_overhead_pct']:+.2f} |")
    a = results["agreement"]
    if a:
        lines += ["", "## Pipeline vs own loop (digits-uncond, shipped scheduler: clip_sample on)", "",
                  f"{a['pipeline']} with the drop-in against `run_sampler` over an `OrtDenoiser`, seeds "
                  f"{a['seeds'][0]}..{a['seeds'][-1]} (same starting noise): images in [0, 1].", "",
                  "| max abs diff | mean abs diff | PSNR vs FP pipeline: drop-in | own loop | build's parity (its seeds) |",
                  "|---|---|---|---|---|",
                  f"| {a['max_abs_diff']:.3g} | {a['mean_abs_diff']:.3g} | {a['psnr_vs_fp_pipeline_db']:.2f} dB | "
                  f"{a['psnr_vs_fp_own_loop_db']:.2f} dB | {a['build_parity_psnr_db']:.2f} dB |"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
