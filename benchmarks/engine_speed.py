"""Engine speed on the CPU: per engine call and per whole generation (DDIM 20), FP32 export vs each quantized form
(reference onnxruntime form / CPU form / TensorRT-shaped form) on ONNX Runtime and OpenVINO, plus NNCF INT8 PTQ of
the same FP32 ONNX on OpenVINO, at several batch sizes; each engine's fidelity (final-image PSNR vs the FP model,
DDIM 20, bundled models) beside its speed, and the compensation head's share of an engine call.

    python benchmarks/engine_speed.py --quick            # smoke run: digits-uncond, batch 1, few repeats
    python benchmarks/engine_speed.py                    # digits-uncond, digits-cond, sd15 (latent 64), batch 1 2 8

Timing: engines of one runtime are open together and take turns call by call (``--calls`` rounds; medians with
p10/p90); the two runtimes run one after the other (their FP32 rows are each group's baseline, so ratios against
the other runtime compare separate blocks). Threads: ``--threads`` for ONNX Runtime (intra-op), OpenVINO
(INFERENCE_NUM_THREADS) and torch. Builds (a ``qdc-export build`` subprocess each), NNCF models, FP trajectories
and finished models' rows are cached under ``--cache`` (benchmarks/.cache, git-ignored): a rerun resumes.
Writes benchmarks/results/engine_speed.{json,md} with the run's provenance (qdc_export.infra.provenance)."""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import engine_speed_engines as E

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ("digits-uncond", "digits-cond")
# SD 1.5 at latent 64 with random weights, built to be timed: an engine call costs the same whatever the steps and
# calibration it was built with, so 4 steps and 1 calibration sample; no parity check (benchmarks/results/scale.md
# checks that size); the compensation folded without the held-out check (random weights: the head is there to be
# timed). Its fidelity is measured on the trained models only.
SD15_BUILD = {"steps": 4, "calib_samples": 1, "parity_samples": 1, "comp_validate": False}
QUICK_BUILD = {"steps": 20, "calib_samples": 2, "parity_samples": 1, "comp_validate": False}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="digits-uncond,digits-cond,sd15")
    p.add_argument("--batches", default="1,2,8")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--calls", type=int, default=20, help="interleaved rounds of engine calls per batch")
    p.add_argument("--generations", type=int, default=3, help="interleaved rounds of whole generations per batch")
    p.add_argument("--generation-batches", default="1,2,8", help="batches whose whole generations are timed")
    p.add_argument("--images", type=int, default=64, help="images of the fidelity measurement (bundled models)")
    p.add_argument("--nncf-samples", type=int, default=E.NNCF_SUBSET)
    p.add_argument("--cache", type=Path, default=ROOT / "benchmarks" / ".cache" / "engine_speed")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--forms", default=",".join(E.FORMS), help="forms to build and time (fp32 is the baseline)")
    p.add_argument("--no-nncf", action="store_true", help="leave out the NNCF INT8 row")
    p.add_argument("--quick", action="store_true", help="digits-uncond, batch 1, 3 calls, 1 generation, 4 images")
    p.add_argument("--fresh", action="store_true", help="ignore cached rows (builds stay cached)")
    p.add_argument("--reuse-builds", action="store_true",
                   help="use cached builds made by other source versions (the record names each build's commit)")
    p.add_argument("--shrink-arena", action="store_true",
                   help="after each timed call ONNX Runtime returns its arena and OpenVINO its intermediate buffers "
                        "(large models at batch > 1)")
    p.add_argument("--label", default=None, help="the record's name for this run of one model (default: the "
                   "model); a run under another label sits beside the model's earlier one instead of replacing it")
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.batches, args.calls, args.generations = "digits-uncond", "1", 3, 1
        args.images, args.nncf_samples = 4, 8
    return args


def build_args(model: str, quick: bool) -> tuple[dict[str, Any], bool]:
    """(BuildConfig fields on top of each form's, run the parity check?)"""
    if quick:
        return QUICK_BUILD, False
    if model in BUNDLED:
        return {"steps": 20}, True
    return SD15_BUILD, False


def fidelity(engine: E.Engine, model: Any, images: int, cache: Path) -> dict[str, float]:
    from qdc_export.report.fidelity import compare, evaluation_seeds, fp_latents, sample_latents

    seeds = evaluation_seeds(images)
    reference = fp_latents(model, "ddim", 20, seeds, cache_dir=cache / "fp")
    scores = compare(reference, sample_latents(engine.denoiser, model, "ddim", 20, seeds))
    return {"psnr_db_mean": scores["psnr_db"]["mean"], "psnr_db_min": scores["psnr_db"]["min"], "images": images}


def measure_group(engines: list[E.Engine], model: Any, shapes: dict[str, list[int]], timestep: float,
                  args: argparse.Namespace, log: Any) -> list[dict[str, Any]]:
    from qdc_export.report.fidelity import sample_latents

    rows: dict[str, dict[str, Any]] = {e.label: {"runtime": e.runtime, "form": e.form, "kernels": e.kernels,
                                                 "per_call": {}, "per_generation": {}} for e in engines}
    for batch in [int(b) for b in args.batches.split(",")]:
        feeds = {e.label: E.random_feeds(e.input_names, shapes, batch, timestep) for e in engines}
        calls = {e.label: (lambda e=e, f=feeds: e.run(f[e.label])) for e in engines}
        after = {e.label: e.release for e in engines}
        for label, times in E.interleaved(calls, args.calls, after=after).items():
            rows[label]["per_call"][str(batch)] = E.spread(times)
        seeds = list(range(batch))
        gens = {e.label: (lambda e=e, s=seeds, b=batch: sample_latents(e.denoiser, model, "ddim", 20, s, batch=b))
                for e in engines}
        if args.generations > 0 and str(batch) in args.generation_batches.split(","):
            for label, times in E.interleaved(gens, args.generations, warmup=0, after=after).items():
                rows[label]["per_generation"][str(batch)] = E.spread(times)
        log(f"  batch {batch}: " + ", ".join(f"{k} {v['per_call'][str(batch)]['median_ms']:.1f} ms"
                                              for k, v in rows.items()))
    if model.source.get("kind") != "config-preset":  # fidelity on the trained models only
        for e in engines:
            rows[e.label]["fidelity"] = fidelity(e, model, args.images, args.cache)
            log(f"  {e.label}: PSNR vs FP {rows[e.label]['fidelity']['psnr_db_mean']:.2f} dB")
    return list(rows.values())


def measure_model(name: str, args: argparse.Namespace, log: Any) -> dict[str, Any]:
    import torch

    from qdc_export.load.models import load_model
    from qdc_export.manifest import read_manifest

    extra, check = build_args(name, args.quick)
    forms = args.forms.split(",")
    built = {form: E.build_form(name, form, args.cache, extra, check, log, args.reuse_builds) for form in forms}
    folders = {form: folder for form, (folder, _) in built.items()}
    manifest = read_manifest(folders["reference"])
    shapes = {i["name"]: i["shape"] for i in manifest["io"]["inputs"]}
    timestep = float(manifest["scheduler"]["timesteps"][len(manifest["scheduler"]["timesteps"]) // 2])
    model = load_model(name)
    nncf_xml = None
    try:  # before the engines open, and before SD 1.5's torch weights go: the calibration runs the FP model
        if args.no_nncf:
            raise ImportError("--no-nncf")
        import nncf  # noqa: F401

        nncf_out = args.cache / "nncf" / folders["fp32"].name / str(args.nncf_samples)
        nncf_xml = E.nncf_int8(folders["fp32"] / "model.onnx", nncf_out,
                               lambda: E.calibration_feeds(model, 20, args.nncf_samples, log), log)
    except ImportError:
        nncf_xml = None
    gc.collect()
    if model.source.get("kind") == "config-preset":  # random weights: only the config and scheduler are used here
        model.unet.to("meta")  # (SD 1.5: 3.4 GB returned before the engines open)
        gc.collect()
    torch.set_num_threads(args.threads)
    result: dict[str, Any] = {"model": name, "build_options": extra, "builds": {f: str(p) for f, p in folders.items()},
                              "built_from": {f: b for f, (_, b) in built.items()},
                              "compensation": {f: read_manifest(p).get("compensation", {}).get("method")
                                               for f, p in folders.items()},
                              "parity_passed": {f: read_manifest(p).get("parity_summary") for f, p in folders.items()},
                              "rows": []}
    if nncf_xml is None:
        result["nncf"] = "left out (--no-nncf)" if args.no_nncf else "not installed"
    log(f"{name}: ONNX Runtime group")
    scratch = args.cache / "ort-optimized"
    group = [E.ort_engine(form, folders[form], args.threads, scratch, args.shrink_arena) for form in forms]
    result["rows"] += measure_group(group, model, shapes, timestep, args, log)
    del group
    gc.collect()
    log(f"{name}: OpenVINO group")
    release = args.shrink_arena
    group = [E.ov_engine(form, folders[form] / "model.onnx", args.threads, release_memory=release) for form in forms]
    group.append(E.ov_engine("fp32", folders["fp32"] / "model.onnx", args.threads, hint="bf16",
                             release_memory=release))
    if nncf_xml is not None:
        group.append(E.ov_engine("nncf-int8", nncf_xml, args.threads, release_memory=release))
    result["rows"] += measure_group(group, model, shapes, timestep, args, log)
    del group
    gc.collect()
    result["head_share"] = [E.head_share(folders["reference"], args.threads, b, max(args.calls, 5))
                            for b in [int(b) for b in args.batches.split(",")][:2]]
    result["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 1)
    return result


def ratios(result: dict[str, Any]) -> None:
    """Speed-up of every row against ONNX Runtime FP32 and OpenVINO FP32 (f32 and bf16 hints) at the same batch."""
    by = {(r["runtime"], r["form"]): r for r in result["rows"]}
    for row in result["rows"]:
        row["speedup"] = {}
        for batch, stats in row["per_call"].items():
            row["speedup"][batch] = {
                base: by[key]["per_call"][batch]["median_ms"] / stats["median_ms"]
                for base, key in (("vs_ort_fp32", ("onnxruntime", "fp32")), ("vs_ov_fp32", ("openvino", "fp32")),
                                  ("vs_ov_bf16", ("openvino-bf16", "fp32"))) if key in by}


def _built_from(result: dict[str, Any]) -> str:
    """Which code made each build (records before the ``built_from`` stamp: the run's own commit)."""
    built = result.get("built_from")
    if not built:
        return ""
    text = " Builds made at " + ", ".join(
        f"{form} {str(b.get('commit'))[:7]}{' (dirty)' if b.get('dirty') else ''}" for form, b in built.items()) + "."
    if "peak_rss_gb" in result:
        text += f" Peak resident memory {result['peak_rss_gb']} GB."
    return text


def write_markdown(payload: dict[str, Any], path: Path) -> None:
    meta = payload["meta"]
    lines = ["# Engine speed on the CPU", "",
             (f"Command: `{meta['run']['command']}` (commit {meta['run']['git_commit']}, dirty "
             f"{meta['run']['git_dirty']}); threads {meta['threads']} (ONNX Runtime intra-op, OpenVINO, torch); "
             f"CPU: {meta['cpu']}. Per call: median of {meta['calls']} interleaved calls [p10, p90]; per generation: "
             f"DDIM 20, median of {meta['generations']} interleaved generations. Speed-up = ONNX Runtime FP32 median "
             "/ this median (same batch). openvino = f32 inference precision; openvino-bf16 = OpenVINO's default "
             "hint on this CPU (bf16). Forms: reference = the onnxruntime form (TensorRT-style Q/DQ on inputs; "
              "openvino / reference is what `--target openvino` builds run), cpu = `--target onnxruntime-cpu`, "
              "tensorrt = `--target tensorrt` (FP16 network), nncf-int8 = NNCF PTQ of the FP32 ONNX. PSNR: final "
              "image vs the FP model, DDIM 20 (bundled models; the builds' default compensation)."), ""]
    for result in payload["models"]:
        batches = list(result["rows"][0]["per_call"])
        settings, run = result.get("settings", {}), result.get("run", meta["run"])
        lines += [f"## {result.get('label', result['model'])}", "",
                  f"`{run['command']}` (commit {str(run['git_commit'])[:7]}): " + ", ".join(
                      f"{k} {v}" for k, v in settings.items()) + f"; build options {result['build_options']}."
                  + _built_from(result), "", "| runtime / form | " + " | ".join(
            f"call b{b} ms | x ORT FP32 | x OV FP32 | x OV bf16 | gen b{b} s" for b in batches)
            + " | PSNR dB | kernels |", "|---|" + "---:|---:|---:|---:|---:|" * len(batches) + "---:|---|"]
        for row in result["rows"]:
            cells = []
            for b in batches:
                c, g, s = row["per_call"][b], row["per_generation"].get(b), row["speedup"][b]
                cells.append(f"{c['median_ms']:.1f} [{c['p10_ms']:.1f}, {c['p90_ms']:.1f}] | "
                             f"{s.get('vs_ort_fp32', float('nan')):.2f} | {s.get('vs_ov_fp32', float('nan')):.2f} | "
                             f"{s.get('vs_ov_bf16', float('nan')):.2f} | "
                             + (f"{g['median_ms'] / 1e3:.2f}" if g else "not run"))
            psnr = row.get("fidelity", {}).get("psnr_db_mean")
            kernels = ", ".join(f"{k} {v}" for k, v in row["kernels"].items())
            lines.append(f"| {row['runtime']} / {row['form']} | " + " | ".join(cells) +
                         f" | {'' if psnr is None else f'{psnr:.2f}'} | {kernels} |")
        for share in result.get("head_share") or []:
            if share:
                lines.append(f"\nCompensation head ({share['form']} form, batch {share['batch']}): "
                             f"{share['head']['median_ms']:.3f} ms of a {share['engine']['median_ms']:.1f} ms engine "
                             f"call ({share['share_percent']:.3f} %).")
        lines.append("")
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    from qdc_export.cli import _quiet_third_party
    from qdc_export.infra.provenance import run_provenance

    _quiet_third_party()
    args = parse_args(argv)
    run = run_provenance("python benchmarks/engine_speed.py", sys.argv[1:] if argv is None else list(argv))
    args.cache.mkdir(parents=True, exist_ok=True)
    (args.cache.parent / ".gitignore").write_text("*\n")

    def log(line: str) -> None:
        print(line, flush=True)

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), "unknown")
    models = []
    for name in args.models.split(","):
        key = hashlib.sha256(json.dumps([name, vars(args) | {"cache": "", "out": ""}, run["code_version"]],
                                        default=str, sort_keys=True).encode()).hexdigest()[:12]
        done = args.cache / f"rows-{name}-{key}.json"
        if done.is_file() and not args.fresh:
            log(f"{name}: cached rows {done.name}")
            models.append(json.loads(done.read_text()))
            continue
        start = time.perf_counter()
        result = measure_model(name, args, log)
        ratios(result)
        result["run"] = run
        result["label"] = args.label or name
        result["settings"] = {k: getattr(args, k) for k in ("threads", "batches", "calls", "generations", "images",
                                                            "forms", "no_nncf", "nncf_samples", "shrink_arena",
                                                            "generation_batches")}
        result["wall_s"] = round(time.perf_counter() - start, 1)
        done.write_text(json.dumps(result, indent=1))
        models.append(result)
    stem = "engine_speed_quick" if args.quick else "engine_speed"
    previous = args.out / f"{stem}.json"
    if previous.is_file():  # models measured by an earlier invocation (other settings) stay in the record
        done_names = {m.get("label", m["model"]) for m in models}
        earlier = json.loads(previous.read_text())
        for m in earlier["models"]:  # records written before models carried their own run and settings
            m.setdefault("run", earlier["meta"]["run"])
            m.setdefault("settings", {k: earlier["meta"][k] for k in ("threads", "calls", "generations")})
        models = [m for m in earlier["models"] if m.get("label", m["model"]) not in done_names] + models
    payload = {"meta": {"run": run, "threads": args.threads, "calls": args.calls, "generations": args.generations,
                        "cpu": cpu, "quick": args.quick}, "models": models}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(payload, indent=1))
    write_markdown(payload, args.out / f"{stem}.md")
    log(f"wrote {args.out / (stem + '.json')} and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
