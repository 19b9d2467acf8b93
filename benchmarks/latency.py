"""Compensation overhead: ONNX Runtime CPU latency of one engine call with and without the compensation
subgraph (issue 4's "< 0.5 % overhead" measurement). Timings are reported, never asserted.

    python benchmarks/latency.py                      # digits-uncond, w8a8, DDIM 20; none vs tcec-m0 vs tcec-m1-fitted
    python benchmarks/latency.py --runs 50 --threads 1

The engines come from the fidelity benchmark's cache (benchmarks/.cache) when present, else they are built
(one quantized graph, one ONNX model per method). Runs of the engines being compared are *interleaved*
(A, B, C, A, B, C, ...) after warmup, so slow drift of a shared machine hits every engine alike; the median of
each engine's runs is reported, and the overhead is (median_method / median_none - 1). The added graph nodes are
counted too: the analytic cost of the head is a few element-wise ops per output element.
Writes benchmarks/results/latency.json and latency.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def find_or_build(
    model_name: str, precision: str, sampler: str, methods: list[str], cache: Path
) -> dict[str, Path]:
    import hashlib

    from qdc_export.config import BuildConfig
    from qdc_export.load.models import load_model
    from qdc_export.quantize.graph import build_graph
    from qdc_export.report.fidelity import SAMPLERS, export_engine, method_config, model_fingerprint

    model = load_model(model_name)
    scheduler, steps = SAMPLERS[sampler]
    base = BuildConfig(precision=precision, scheduler=scheduler, steps=steps)
    case_dir = cache / "engines" / f"{model_name}-{model_fingerprint(model)}" / f"{precision}-{sampler}"
    paths, graph = {}, None
    for method in methods:
        config = method_config(base, method)
        key = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[
            :12
        ]
        folder = case_dir / f"{method}-{key}"
        if not (folder / "engine.json").is_file():
            if graph is None:
                print(f"building the {precision} graph of {model_name}", flush=True)
                graph = build_graph(model, config)[:2]
            print(f"exporting {method}", flush=True)
            export_engine(graph[0], graph[1], model, config, folder)
        paths[method] = folder / "model.onnx"
    return paths


def session(path: Path, threads: int):
    import onnx
    import onnxruntime as ort

    from qdc_export.engines.providers import make_session_options

    options, providers = make_session_options(onnx.load(str(path), load_external_data=False), provider="cpu")
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=providers)


def feeds_for(sess, batch: int, timestep: float) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {}
    for inp in sess.get_inputs():
        shape = [batch if not isinstance(d, int) else d for d in inp.shape]
        if inp.name == "timestep":
            feeds[inp.name] = np.full(shape, timestep, np.float32)
        else:
            feeds[inp.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def graph_nodes(path: Path) -> int:
    import onnx

    return len(onnx.load(str(path), load_external_data=False).graph.node)


def measure(
    paths: dict[str, Path], *, batch: int, runs: int, warmup: int, threads: int, timestep: float
) -> dict[str, Any]:
    sessions = {m: session(p, threads) for m, p in paths.items()}
    feeds = {m: feeds_for(s, batch, timestep) for m, s in sessions.items()}
    for _ in range(warmup):
        for m, s in sessions.items():
            s.run(None, feeds[m])
    times: dict[str, list[float]] = {m: [] for m in sessions}
    for _ in range(runs):
        for m, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, feeds[m])
            times[m].append((time.perf_counter() - t0) * 1e3)
    base = statistics.median(times["none"])
    out = {}
    for m, ts in times.items():
        med = statistics.median(ts)
        q1, q3 = np.quantile(ts, [0.25, 0.75])
        paired = statistics.median(a - b for a, b in zip(ts, times["none"]))  # same round: same machine load
        out[m] = {
            "median_ms": round(med, 4),
            "iqr_ms": [round(float(q1), 4), round(float(q3), 4)],
            "min_ms": round(min(ts), 4),
            "runs": len(ts),
            "overhead_pct": round(100 * (med / base - 1), 3),
            "overhead_min_pct": round(100 * (min(ts) / min(times["none"]) - 1), 3),
            "paired_median_diff_ms": round(paired, 4),
            "paired_overhead_pct": round(100 * paired / base, 3),
        }
    return out


class _Passthrough(torch.nn.Module):
    """Stands in for the UNet: returns the sample, so the exported graph is the compensation head alone."""

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return sample * 1.0


def head_only_ms(engine_dir: Path, batch: int, runs: int, threads: int, tmp: Path) -> float | None:
    """Median time of the folded head alone (same fold pass, same ops, passthrough model) in ONNX Runtime."""
    from qdc_export.compensation import CompensationTables
    from qdc_export.compensation.fold import fold_compensation
    from qdc_export.export.to_onnx import export_onnx

    if not (engine_dir / "compensation").is_dir():
        return None
    tables = CompensationTables.load(engine_dir / "compensation")
    sample = torch.randn(2, tables.channels, 32, 32)
    example = (sample, torch.full((2,), float(tables.timesteps[0])))
    gm = torch.export.export(_Passthrough(), example, strict=False).module()
    folded = fold_compensation(gm, tables, example)
    example = folded.products["example"]
    names = ["sample", "timestep"] + (["comp_state"] if tables.uses_state else [])
    outs = ["noise_pred"] + (["comp_state_out"] if tables.uses_state else [])
    path = tmp / f"head-{engine_dir.name}.onnx"
    export_onnx(folded.module, example, path, input_names=names, output_names=outs, int4_weights=False)
    sess = session(path, threads)
    feeds = feeds_for(sess, batch, float(tables.timesteps[0]))
    for _ in range(20):
        sess.run(None, feeds)
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    from qdc_export.cli import _quiet_third_party

    _quiet_third_party()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="digits-uncond")
    p.add_argument("--precision", default="w8a8")
    p.add_argument("--sampler", default="ddim20")
    p.add_argument(
        "--methods", default="none,tcec-m0,tcec-m1-fitted", help="'none' must be included (the baseline)"
    )
    p.add_argument("--batches", default="1,2")
    p.add_argument("--runs", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument(
        "--threads", type=int, default=1, help="ORT intra-op threads (1: steadier on a shared machine)"
    )
    p.add_argument("--cache", type=Path, default=ROOT / "benchmarks" / ".cache")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if "none" not in methods:
        methods.insert(0, "none")
    import onnxruntime as ort

    results: dict[str, Any] = {
        "meta": {
            "command": "python benchmarks/latency.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "onnxruntime": ort.__version__,
            "provider": "CPUExecutionProvider",
            "threads": args.threads,
            "runs": args.runs,
            "warmup": args.warmup,
            "machine": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "note": "shared machine; runs interleaved across engines",
        },
        "rows": [],
    }
    for model_name in [m.strip() for m in args.models.split(",") if m.strip()]:
        paths = find_or_build(model_name, args.precision, args.sampler, methods, args.cache)
        nodes = {m: graph_nodes(p) for m, p in paths.items()}
        for batch in [int(b) for b in args.batches.split(",")]:
            stats = measure(
                paths, batch=batch, runs=args.runs, warmup=args.warmup, threads=args.threads, timestep=500.0
            )
            for m in list(stats):
                head = head_only_ms(
                    paths[m].parent, batch, 10 * args.runs, args.threads, args.out.parent / ".cache"
                )
                stats[m]["head_only_ms"] = None if head is None else round(head, 5)
                base = stats["none"]["median_ms"]
                stats[m]["head_only_pct"] = None if head is None else round(100 * head / base, 4)
            for m, s in stats.items():
                row = {
                    "model": model_name,
                    "precision": args.precision,
                    "sampler": args.sampler,
                    "batch": batch,
                    "method": m,
                    "graph_nodes": nodes[m],
                    "added_nodes": nodes[m] - nodes["none"],
                    **s,
                }
                results["rows"].append(row)
                print(
                    f"{model_name} b{batch} {m:>16}: median {s['median_ms']:.3f} ms "
                    f"(IQR {s['iqr_ms'][0]:.3f}-{s['iqr_ms'][1]:.3f}), overhead {s['overhead_pct']:+.2f} % "
                    f"(by min {s['overhead_min_pct']:+.2f} %, paired {s['paired_overhead_pct']:+.2f} %), "
                    f"+{row['added_nodes']} nodes, head alone {s['head_only_ms']} ms = {s['head_only_pct']} %",
                    flush=True,
                )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latency.json").write_text(json.dumps(results, indent=1))
    lines = [
        "# Compensation overhead: ONNX Runtime CPU latency per engine call",
        "",
        (
            f"Median of {args.runs} runs after {args.warmup} warmup runs, runs interleaved across engines, "
            f"{args.threads} intra-op thread(s), ONNX Runtime {ort.__version__}, CPUExecutionProvider, on a shared "
            f"{os.cpu_count()}-core machine (other jobs running: read whole-engine differences under ~1-2 % as "
            "noise). 'paired' = median over rounds of (t_method - t_none) within the same round. 'head alone' = "
            "the folded compensation head exported by itself (same fold pass and ops, a passthrough in place of "
            f"the UNet), median of {10 * args.runs} runs: the overhead measured without the UNet's noise. "
            f"Generated by `{results['meta']['command'].strip()}`."
        ),
        "",
        (
            "| model | precision | batch | method | median ms (IQR) | overhead vs none: medians | by min | paired "
            "| head alone ms | head alone % of engine | added ONNX nodes |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        lines.append(
            f"| {r['model']} | {r['precision']} | {r['batch']} | {r['method']} | {r['median_ms']:.3f} "
            f"({r['iqr_ms'][0]:.3f}-{r['iqr_ms'][1]:.3f}) | {r['overhead_pct']:+.2f} % | "
            f"{r['overhead_min_pct']:+.2f} % | {r['paired_overhead_pct']:+.2f} % | "
            f"{'-' if r['head_only_ms'] is None else format(r['head_only_ms'], '.4f')} | "
            f"{'-' if r['head_only_pct'] is None else format(r['head_only_pct'], '.3f') + ' %'} | {r['added_nodes']} |"
        )
    (args.out / "latency.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
