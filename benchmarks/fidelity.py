"""Fidelity benchmark: PSNR / SSIM of deployed (ONNX Runtime) engines against the FP model, and the per-step
latent error curves, for every model x precision x compensation method x sampler.

    python benchmarks/fidelity.py                       # everything (slow on CPU)
    python benchmarks/fidelity.py --quick               # 16 images, DDIM 20, none + tcec-m0
    python benchmarks/fidelity.py --models digits-uncond --samplers ddim20 --methods none,tcec-m0

Results are merged into benchmarks/results/fidelity.json (rows keyed by model, precision, sampler, method), so
separate runs accumulate; fidelity.md and the PNG plots are regenerated from the merged rows after every case.
ONNX models and FP trajectories are cached under --cache (default benchmarks/.cache), keyed by the model weights.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
ROW_KEY = ("model", "precision", "sampler", "method")


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from qdc_export.report.fidelity import DEFAULT_METHODS, DEFAULT_SAMPLERS, METHODS, SAMPLERS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="digits-uncond,digits-cond")
    p.add_argument("--precisions", default="w8a8")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"from: {', '.join(METHODS)}")
    p.add_argument("--samplers", default=",".join(DEFAULT_SAMPLERS), help=f"from: {', '.join(SAMPLERS)}")
    p.add_argument("--num-images", type=int, default=64)
    p.add_argument("--calib-samples", type=int, default=8)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--cache", type=Path, default=ROOT / "benchmarks" / ".cache")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--target", default="onnxruntime",
                   help="deployment form whose engine is scored: onnxruntime, onnxruntime-cpu, openvino (rows say so)")
    p.add_argument("--quick", action="store_true", help="16 images, DDIM 20, methods none and tcec-m0")
    p.add_argument("--fresh", action="store_true", help="do not merge into an existing fidelity.json")
    p.add_argument(
        "--replot", action="store_true", help="only rewrite fidelity.md and the plots from fidelity.json"
    )
    p.add_argument(
        "--merge-from", type=Path, nargs="+", default=None, metavar="DIR",
        help="merge the rows of DIR/fidelity.json (runs with another --out, e.g. in parallel) into --out, then replot",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.num_images, args.samplers, args.methods = 16, "ddim20", "none,tcec-m0"
    return args


def load_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return json.loads(path.read_text()).get("rows", [])


def _row_key(r: dict[str, Any]) -> tuple:
    return (*(r[k] for k in ROW_KEY), r.get("target", "onnxruntime"))


def merge(rows: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    keyed = {_row_key(r): r for r in rows}
    for r in new:
        keyed[_row_key(r)] = r
    return list(keyed.values())


def _precision_rank(label: str, precisions: tuple[str, ...]) -> tuple[int, int]:
    """fp32, w8a8, w4a16, w4a16+gptq, ..., w4a8, w4a8+svdquant, ...: precision, then PTQ recipe order."""
    from qdc_export.precision import PTQ_RECIPES

    base, _, recipe = label.partition("+")
    return precisions.index(base) if base in precisions else 99, _rank(recipe or "rtn", PTQ_RECIPES)


def _rank(name: str, names: Any) -> int:
    """Position of ``name`` in a known ordering (SAMPLERS, METHODS); unknown names last."""
    return list(names).index(name) if name in names else 99


def _order(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    from qdc_export.precision import PRECISIONS
    from qdc_export.report.fidelity import METHODS, SAMPLERS

    def key(r: dict[str, Any]) -> tuple:
        return (
            r["model"],
            _precision_rank(r["precision"], PRECISIONS),
            _rank(r["sampler"], SAMPLERS),
            _rank(r["method"], METHODS),
        )

    return sorted(rows, key=key)


def _db(v: float) -> str:
    return "inf" if math.isinf(v) else f"{v:.2f}"


def paired_gain(row: dict[str, Any], none: dict[str, Any] | None) -> tuple[float, float]:
    """Mean over images of PSNR(method) - PSNR(none) (same seeds) and its standard error; (nan, 0) without a pair."""
    if none is None or len(none["psnr_per_image"]) != len(row["psnr_per_image"]):
        return math.nan, 0.0
    d = [a - b for a, b in zip(row["psnr_per_image"], none["psnr_per_image"])]
    if not all(math.isfinite(v) for v in d):
        return math.nan, 0.0
    mean = sum(d) / len(d)
    var = sum((v - mean) ** 2 for v in d) / max(len(d) - 1, 1)
    return mean, math.sqrt(var / len(d))


def write_markdown(rows: list[dict[str, Any]], path: Path, meta: dict[str, Any]) -> None:
    lines = [
        "# Image fidelity of deployed engines vs the FP model",
        "",
        (
            f"{meta['num_images']} images per row (evaluation seeds 0..{meta['num_images'] - 1}); FP = eager PyTorch, "
            "engine = exported ONNX model in ONNX Runtime (CPU). PSNR and SSIM on [0, 1] images (data range 1); "
            "mean +- std (min) over images; the gain over 'none' is the mean over images of the per-image PSNR "
            "difference (same seed), +- its standard error. Final latent rel. error = mean over images of ||x~_0 - x_0|| / ||x_0||. "
            "Compensation tables are fitted on calibration seeds, never on evaluation seeds. The code after the model "
            "name is its weights' fingerprint (qdc_export.report.fidelity.model_fingerprint). "
            f"Generated by `{meta['command']}`."
        ),
        "",
        (
            "| model | precision | sampler | method | PSNR dB mean +- std (min) | PSNR gain vs none (paired, +- s.e.) | SSIM mean (min) "
            "| final latent rel. error |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    none = {
        (r["model"], r.get("model_fingerprint"), r["precision"], r["sampler"], r.get("target")): r
        for r in rows
        if r["method"] == "none"
    }
    for r in _order(rows):
        p, s = r["psnr_db"], r["ssim"]
        base = none.get((r["model"], r.get("model_fingerprint"), r["precision"], r["sampler"], r.get("target")))
        weights = r.get("model_fingerprint", "?")[:8]
        gain, sem = paired_gain(r, base)
        delta = "" if r["method"] == "none" or math.isnan(gain) else f"{gain:+.2f} +- {sem:.2f}"
        lines.append(
            f"| {r['model']} `{weights}` | {r['precision']}{' @ ' + r['target'] if r.get('target') else ''} | {r['sampler']} | {r['method']} | {_db(p['mean'])} +- "
            f"{p['std']:.2f} ({_db(p['min'])}) | {delta} | {s['mean']:.4f} ({s['min']:.4f}) | "
            f"{r['final_latent_rel_error']:.3e} |"
        )
    lines += [
        "",
        (
            "Plots: `fidelity_psnr.png` (PSNR by method), `fidelity_error_<model>_<precision>_<sampler>.png` "
            "(per-step latent error, one line per method), `fidelity_gain_overview.png` (every gain in one picture)."
        ),
        "",
    ]
    path.write_text("\n".join(lines))


def plot(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    from qdc_export.report.fidelity import METHODS

    written = []
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in _order(rows):
        groups.setdefault((r["model"], r["precision"], r["sampler"]), []).append(r)
    for (model, precision, sampler), group in groups.items():
        fig, (ax, axr) = plt.subplots(
            2, 1, figsize=(8, 7), dpi=110, sharex=True, gridspec_kw={"height_ratios": [1.4, 1]}
        )
        none = next((r["latent_rel_error"] for r in group if r["method"] == "none"), None)
        for r in group:
            curve = r["latent_rel_error"]
            style = {
                "marker": "o",
                "markersize": 2.5,
                "linewidth": 1.4,
                "linestyle": "--" if r["method"] == "none" else "-",
                "color": plt.get_cmap("tab20")(
                    list(METHODS).index(r["method"]) % 20
                ),  # same colour in every plot
            }
            ax.plot(
                range(1, len(curve)),
                curve[1:],
                label=f"{r['method']} ({_db(r['psnr_db']['mean'])} dB)",
                **style,
            )
            if none is not None and len(none) == len(curve):
                axr.plot(range(1, len(curve)), [a / b for a, b in zip(curve[1:], none[1:])], **style)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_yscale("log")
        ax.set_ylabel("||x~_n - x_n|| / ||x_n||")
        ax.set_title(f"latent error vs FP: {model}, {precision}, {sampler}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, title="method (mean PSNR)", title_fontsize=8)
        axr.axhline(1.0, color="black", linewidth=0.8)
        axr.set_ylabel("error / error without\ncompensation")
        axr.set_xlabel("sampler steps taken (error is 0 at step 0, the shared starting noise)")
        axr.grid(True, alpha=0.3)
        fig.tight_layout()
        path = out / f"fidelity_error_{model}_{precision}_{sampler}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    # PSNR panels, one per (model, precision): left, mean PSNR per method and sampler; right, the paired gain
    # over "none" (mean over images of PSNR_method - PSNR_none, +- its standard error), which is what separates
    # methods whose image-to-image spread (std ~2 dB) dwarfs their differences.
    panels = list(dict.fromkeys((r["model"], r["precision"]) for r in _order(rows)))
    if panels:
        fig, axes = plt.subplots(
            len(panels),
            2,
            figsize=(14, 3.8 * len(panels)),
            dpi=110,
            squeeze=False,
            gridspec_kw={"width_ratios": [1, 1.2]},
        )
        methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
        colours = plt.get_cmap("tab20")
        for (ax, axd), (model, precision) in zip(axes, panels):
            sel = [r for r in rows if r["model"] == model and r["precision"] == precision]
            samplers = list(dict.fromkeys(r["sampler"] for r in _order(sel)))
            width = 0.8 / max(len(methods), 1)
            finite = [r["psnr_db"]["mean"] for r in sel if math.isfinite(r["psnr_db"]["mean"])]
            floor = math.floor(min(finite) - 1) if finite else 0
            for j, m in enumerate(methods):
                xs, ys, ds, es = [], [], [], []
                for i, s in enumerate(samplers):
                    hit = [r for r in sel if r["sampler"] == s and r["method"] == m]
                    none = [r for r in sel if r["sampler"] == s and r["method"] == "none"]
                    if hit:
                        xs.append(i + (j - (len(methods) - 1) / 2) * width)
                        ys.append(hit[0]["psnr_db"]["mean"] - floor)
                        gain, sem = paired_gain(hit[0], none[0] if none else None)
                        ds.append(gain)
                        es.append(sem)
                colour = colours(list(METHODS).index(m) % 20)
                ax.bar(xs, ys, width, bottom=floor, label=m, color=colour)
                axd.bar(xs, ds, width, yerr=es, capsize=2, label=m, color=colour)
            for a in (ax, axd):
                a.set_xticks(range(len(samplers)), samplers)
                a.grid(True, axis="y", alpha=0.3)
            ax.set_ylabel("mean PSNR vs FP (dB)")
            ax.set_title(f"{model}, {precision}: mean PSNR", fontsize=10)
            axd.axhline(0, color="black", linewidth=0.8)
            axd.set_ylabel("PSNR gain over 'none' (dB)")
            axd.set_title(f"{model}, {precision}: paired gain over no compensation (+- s.e.)", fontsize=10)
            axd.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.tight_layout()
        path = out / "fidelity_psnr.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    written += plot_gain_overview(rows, out)
    return written


def plot_gain_overview(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    """One picture of the whole table: per model, rows = precision, columns = sampler x method, cell = paired
    PSNR gain over no compensation (dB; blue helps, red hurts), with the uncompensated PSNR on the left."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from qdc_export.report.fidelity import METHODS, SAMPLERS

    models = list(dict.fromkeys(r["model"] for r in _order(rows)))
    if not models:
        return []
    fig, axes = plt.subplots(len(models), 1, figsize=(16, 3.2 * len(models) + 1), dpi=110, squeeze=False)
    for ax, model in zip(axes[:, 0], models):
        sel = _order([r for r in rows if r["model"] == model])
        precisions = list(dict.fromkeys(r["precision"] for r in sel))
        columns = sorted({(r["sampler"], r["method"]) for r in sel if r["method"] != "none"},
                         key=lambda c: (_rank(c[0], SAMPLERS), _rank(c[1], METHODS)))
        none = {(r["precision"], r["sampler"]): r for r in sel if r["method"] == "none"}
        grid = np.full((len(precisions), len(columns)), np.nan)
        for r in sel:
            if r["method"] != "none":
                gain, _ = paired_gain(r, none.get((r["precision"], r["sampler"])))
                grid[precisions.index(r["precision"]), columns.index((r["sampler"], r["method"]))] = gain
        limit = max(1.0, float(np.nanmax(np.abs(grid))) if np.isfinite(grid).any() else 1.0)
        cmap = plt.get_cmap("RdBu").copy()
        cmap.set_bad("#dddddd")  # not run
        ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=-limit, vmax=limit, aspect="auto")
        for (i, j), v in np.ndenumerate(grid):
            if math.isfinite(v):
                ax.text(j, i, f"{v:+.2f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(columns)), [f"{s}\n{m}" for s, m in columns], fontsize=6.5, rotation=90)
        labels = []
        for p in precisions:
            base = [none[(p, s)]["psnr_db"]["mean"] for (q, s) in none if q == p]
            labels.append(f"{p}  (none: {', '.join(f'{b:.1f}' for b in base)} dB)")  # in sampler order
        ax.set_yticks(range(len(precisions)), labels, fontsize=8)
        ax.set_title(f"{model}: PSNR gain over no compensation (dB, paired, 64 images); grey = not run", fontsize=10)
    fig.tight_layout()
    path = out / "fidelity_gain_overview.png"
    fig.savefig(path)
    plt.close(fig)
    return [path]


def merge_results(out: Path, sources: list[Path]) -> None:
    """Rows of other result folders (same number of images) into ``out``; their commands join the meta."""
    payload = json.loads((out / "fidelity.json").read_text())
    rows, commands = payload["rows"], payload["meta"]["command"].split("; ")
    for source in sources:
        extra = json.loads((source / "fidelity.json").read_text())
        rows = merge(rows, [r for r in extra["rows"] if r.get("num_images") == payload["meta"]["num_images"]])
        commands += [c for c in extra["meta"]["command"].split("; ") if c not in commands]  # full commands
    payload["meta"]["command"] = "; ".join(commands)
    write_all(rows, out, payload["meta"])
    print(f"{len(rows)} rows in {out / 'fidelity.json'}")


def write_all(rows: list[dict[str, Any]], out: Path, meta: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta, "rows": _order(rows)}
    tmp = out / "fidelity.json.tmp"
    tmp.write_text(json.dumps(payload, indent=1, allow_nan=True))
    tmp.replace(out / "fidelity.json")
    write_markdown(rows, out / "fidelity.md", meta)
    plot(rows, out)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    from qdc_export.cli import _quiet_third_party

    _quiet_third_party()
    args = parse_args(argv)
    if args.merge_from:
        merge_results(args.out, args.merge_from)
        return 0
    if args.replot:
        payload = json.loads((args.out / "fidelity.json").read_text())
        write_all(payload["rows"], args.out, payload["meta"])
        return 0
    torch.set_num_threads(args.threads)
    from qdc_export.config import BuildConfig
    from qdc_export.infra.provenance import run_provenance
    from qdc_export.load.models import load_model
    from qdc_export.report.fidelity import Case, evaluate_case

    models, precisions = _csv(args.models), _csv(args.precisions)
    methods, samplers = _csv(args.methods), _csv(args.samplers)
    # every row carries its run: full command (all arguments), threads, git commit, code version, packages
    run = run_provenance("python benchmarks/fidelity.py", sys.argv[1:] if argv is None else list(argv))
    meta = {
        "num_images": args.num_images,
        "calib_samples": args.calib_samples,
        "command": run["command"],
        "torch_threads": args.threads,
        "torch": torch.__version__,
    }
    args.cache.mkdir(parents=True, exist_ok=True)
    (args.cache / ".gitignore").write_text("*\n")  # cached engines and trajectories are never committed
    rows = (
        []
        if args.fresh
        else [r for r in load_rows(args.out / "fidelity.json") if r.get("num_images") == args.num_images]
    )
    start = time.perf_counter()
    for sampler in samplers:
        for model_name in models:
            model = load_model(
                model_name
            )  # reloaded per case: the reference models may be retrained meanwhile
            for precision in precisions:
                case = Case.named(model_name, precision, sampler)
                print(
                    f"[{time.perf_counter() - start:7.0f} s] {model_name} {precision} {sampler}", flush=True
                )
                try:
                    new = evaluate_case(
                        case,
                        methods,
                        num_images=args.num_images,
                        cache_dir=args.cache,
                        base_config=BuildConfig(calib_samples=args.calib_samples, target=args.target),
                        model=model,
                        progress=lambda line: print(line, flush=True),
                    )
                except Exception as exc:  # noqa: BLE001  one broken case (e.g. a precision still in progress) must not stop the rest
                    print(
                        f"  FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}",
                        flush=True,
                    )
                    continue
                rows = merge(rows, [{**row, "run": run} for row in new])
                meta["wall_s"] = round(time.perf_counter() - start, 1)
                write_all(rows, args.out, meta)
    print(
        f"done in {time.perf_counter() - start:.0f} s; wrote {args.out / 'fidelity.json'}, fidelity.md, PNG plots",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
