"""Published results from their committed records: the numbers of README.md and docs/results.md, and the example
reports' HTML. README.md quotes no figure outside a generated block (``--check`` lists any).

    python scripts/render_results.py                     # rewrite the generated blocks and report.html files
    python scripts/render_results.py --check             # exit 1 and list what differs (tests/test_render_results.py)
    python scripts/render_results.py --rebuild-reports   # rebuild docs/reports/* with the current code (slow), render
    python scripts/render_results.py --from-builds DIR   # the same from builds DIR/NAME made by REPORT_COMMANDS

README blocks sit between ``<!-- generated:NAME -->`` and ``<!-- /generated:NAME -->``; only their inside is
rewritten, from benchmarks/results/{fidelity,int4,latency,scale}.json and docs/reports/*/{manifest,parity}.json.
Each example report's report.html is re-rendered from its report/report.json, parity.json and manifest.json
(qdc_export.report.html.render_html). Rows that predate a recorded field are marked so, never filled in."""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RESULTS = ROOT / "benchmarks" / "results"
REPORTS = ROOT / "docs" / "reports"
MAIN_REPORT = "digits-uncond-w8a8-tcec"  # what the README's main command builds (default model, --compensation tcec)
# example report folder -> the command that makes it (run from the repository root)
REPORT_COMMANDS = {
    "digits-uncond-w8a8-tcec": "qdc-export build models/digits-uncond --compensation tcec",
    "digits-cond-w8a8-tcec": "qdc-export build models/digits-cond --compensation tcec",
}
REPORT_RECORDS = ("manifest.json", "parity.json", "report.html", "report")
BLOCK = re.compile(r"(<!-- generated:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /generated:(?P=name) -->)", re.S)
HEADLINE = [  # (model, precision, sampler) rows of the README's headline table, in order
    ("digits-uncond", "w8a8", "ddim20"), ("digits-uncond", "w8a8", "ddim50"),
    ("digits-uncond", "w8a8", "dpmsolver++20"), ("digits-uncond", "w8a8", "euler30"),
    ("digits-cond", "w8a8", "ddim20"), ("digits-uncond", "w4a16", "ddim20"), ("digits-cond", "w4a16", "ddim20"),
    ("digits-uncond", "w4a8", "ddim20"), ("digits-uncond", "w4a8", "ddim50"), ("digits-uncond", "w4a8", "euler30"),
    ("digits-cond", "w4a8", "ddim20"), ("digits-cond", "w4a8", "ddim50"), ("digits-cond", "w4a8", "dpmsolver++20"),
    ("digits-uncond", "w4a4+svdquant", "ddim20"), ("digits-cond", "w4a4+svdquant", "ddim20"),
    ("digits-cond", "w4a4", "ddim20"),
]
HEADLINE_METHOD = "tcec-m0-bias"  # what `--compensation tcec` fits
SAMPLER_NAMES = {"ddim20": "DDIM 20", "ddim50": "DDIM 50", "dpmsolver++20": "DPM-Solver++ 20", "euler30": "Euler 30"}


def _json(path: Path) -> Any:
    return json.loads(path.read_text())


def _precision(label: str) -> str:
    return label.upper().replace("+SVDQUANT", " + SVDQuant")


def _paired_gain(row: dict[str, Any], none: dict[str, Any]) -> tuple[float, float]:
    """Mean over images of PSNR(method) - PSNR(none) (same seeds) and its standard error."""
    d = [a - b for a, b in zip(row["psnr_per_image"], none["psnr_per_image"], strict=True)]
    mean = sum(d) / len(d)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in d) / max(len(d) - 1, 1) / len(d))


def _fidelity_rows() -> dict[tuple[str, str, str, str], dict[str, Any]]:
    return {(r["model"], r["precision"], r["sampler"], r["method"]): r for r in _json(RESULTS / "fidelity.json")["rows"]}


def commit_mark(run: dict[str, Any]) -> str:
    """A record's commit as published: 7 digits, and " (dirty tree)" where the tree had uncommitted changes (a
    record that does not say is marked so too: it cannot be traced to a commit alone)."""
    commit = (run.get("git_commit") or run.get("commit") or "?")[:7]
    dirty = run.get("git_dirty", run.get("dirty"))
    return commit + ("" if dirty is False else " (dirty tree)" if dirty else " (dirty flag not recorded)")


def _run_note(row: dict[str, Any]) -> str:
    run = row.get("run")
    if not run:
        return "not recorded"
    return f"{commit_mark(run)}, {run['torch_threads']} thr."


def block_fidelity_headline() -> str:
    payload = _json(RESULTS / "fidelity.json")
    rows, meta = _fidelity_rows(), payload["meta"]
    n = meta["num_images"]
    lines = [
        f"Fidelity of the deployed engine (ONNX Runtime) against the FP model, {n} images, evaluation seeds "
        f"0..{n - 1}, compensation fitted on separate calibration seeds; gain = mean per-image PSNR difference "
        "against the same engine without compensation (+- standard error). Full table "
        f"({len(payload['rows'])} rows), error curves and plots: `benchmarks/results/fidelity.md`; every gain in "
        "one picture: `benchmarks/results/fidelity_gain_overview.png`. \"run\" is the commit and torch threads a "
        "row was measured with; rows measured before runs were recorded say \"not recorded\" (their commands are "
        "only in `meta.command`, without per-row threads or commit).",
        "",
        f"Headline rows, TCEC m=0 + per-channel bias (`{HEADLINE_METHOD}`, what `--compensation tcec` fits):",
        "",
        "| model | precision | sampler | no compensation | TCEC | gain | run |",
        "|---|---|---|---|---|---|---|",
    ]
    for model, precision, sampler in HEADLINE:
        none, comp = rows[(model, precision, sampler, "none")], rows[(model, precision, sampler, HEADLINE_METHOD)]
        gain, se = _paired_gain(comp, none)
        cell = f"{gain:+.2f} +- {se:.2f} dB"
        if gain + 2 * se < 0:  # hurts beyond noise
            cell = f"**{cell}**"
        runs = sorted({_run_note(none), _run_note(comp)})
        lines.append(f"| {model} | {_precision(precision)} | {SAMPLER_NAMES[sampler]} | "
                     f"{none['psnr_db']['mean']:.2f} dB | {comp['psnr_db']['mean']:.2f} dB | {cell} | "
                     f"{' / '.join(runs)} |")
    return "\n".join(lines)


def block_table_findings() -> str:
    """The bullets under the headline table: every number from fidelity.json rows."""
    rows = _fidelity_rows()

    def gain(model: str, precision: str, method: str, sampler: str = "ddim20") -> float:
        return _paired_gain(rows[(model, precision, sampler, method)], rows[(model, precision, sampler, "none")])[0]

    def reduction(model: str, precision: str, sampler: str) -> float:
        """% of the final latent error that TCEC m=0 + bias removes."""
        comp, none = rows[(model, precision, sampler, HEADLINE_METHOD)], rows[(model, precision, sampler, "none")]
        return 100 * (1 - comp["final_latent_rel_error"] / none["final_latent_rel_error"])

    def span(values: list[float]) -> str:
        return f"{min(values):.0f}-{max(values):.0f} %"

    models = ("digits-uncond", "digits-cond")
    at20 = [reduction(m, p, "ddim20") for m in models for p in ("w4a16", "w4a8")]
    at50 = [reduction(m, "w4a8", "ddim50") for m in models]
    others = [reduction(m, "w4a8", s) for m in models for s in ("euler30", "dpmsolver++20")]
    m1 = [gain(m, "w4a8", v) - gain(m, "w4a8", "tcec-m0") for m in models
          for v in ("tcec-m1-analytic", "tcec-m1-fitted")]
    hurt = ("digits-cond", "w4a4")
    k = rows[(*hurt, "ddim20", "tcec-m0")]["tables"]["max_abs_K"]
    return "\n".join([
        "- Error accumulates over steps (W4A8 is worse at 50 steps than at 20) and the compensation gains grow",
        f"  with it: with RTN 4-bit weights (W4A16, W4A8) it removes {span(at20)} of the final latent error at "
        f"DDIM 20 and {span(at50)}",
        f"  at DDIM 50 (W4A8; {span(others)} for the other samplers).",
        "- The per-channel *bias* does the work. The paper's per-channel scale K alone (TCEC m=0) gives",
        f"  {gain('digits-uncond', 'w4a8', 'tcec-m0'):+.2f} dB (W4A8 uncond) / "
        f"{gain('digits-cond', 'w4a8', 'tcec-m0'):+.2f} dB (W4A8 cond); m=1 analytic and fitted are within "
        f"+-{max(abs(v) for v in m1):.2f} dB of m=0;",
        "  PTQD, which also fits a bias, equals TCEC m=0 + bias (W4A8: "
        f"{gain('digits-uncond', 'w4a8', 'ptqd'):+.2f} vs {gain('digits-uncond', 'w4a8', HEADLINE_METHOD):+.2f} "
        f"uncond, {gain('digits-cond', 'w4a8', 'ptqd'):+.2f} vs {gain('digits-cond', 'w4a8', HEADLINE_METHOD):+.2f}"
        " cond).",
        "- Compensation can hurt. On plain W4A4 digits-cond (the noisiest engine) the paper's K, a regression of",
        f"  the error on the noisy output eps~, shrinks eps~ instead of correcting it (max |1 - K| = {k:.2f}): TCEC",
        f"  m=0 costs {-gain(*hurt, 'tcec-m0'):.1f} dB, m=0 + bias {-gain(*hurt, HEADLINE_METHOD):.1f} dB. "
        "Estimators that do not regress on eps~ do not: PTQD (slope on the",
        f"  FP output) {gain(*hurt, 'ptqd'):+.2f} dB, the m=1 fit along the compensated trajectory (cumulative "
        f"target) {gain(*hurt, 'tcec-m1-fitted-cumulative'):+.2f} dB.",
    ])


def block_svdquant() -> str:
    rows = _fidelity_rows()

    def lift(model: str, precision: str) -> float:
        return (rows[(model, f"{precision}+svdquant", "ddim20", "none")]["psnr_db"]["mean"]
                - rows[(model, precision, "ddim20", "none")]["psnr_db"]["mean"])

    return (f"- SVDQuant beats plain W4A4 by {lift('digits-cond', 'w4a4'):.1f} dB (digits-cond) and "
            f"{lift('digits-uncond', 'w4a4'):.1f} dB (digits-uncond); W4A8 + SVDQuant by\n"
            f"  {lift('digits-cond', 'w4a8'):.1f} / {lift('digits-uncond', 'w4a8'):.1f} dB over plain W4A8 "
            "(no compensation, DDIM 20).")


def block_held_out() -> str:
    """What the build's held-out check did on the W4A4 rows (`tcec-default`), from the rows alone."""
    rows = _fidelity_rows()
    verdicts: dict[bool, list[str]] = {True: [], False: []}
    recorded = []
    for model in ("digits-cond", "digits-uncond"):
        for precision in ("w4a4", "w4a4+svdquant"):
            row, none = rows[(model, precision, "ddim20", "tcec-default")], rows[(model, precision, "ddim20", "none")]
            kept = bool(row["tables"])  # rejected tables leave the engine without a compensation folder
            gain, se = _paired_gain(row, none)
            validation = row.get("compensation_validation")
            if validation:
                recorded.append(f"{model} {_precision(precision)} {validation['gain_db']:+.2f} dB")
            verdicts[kept].append(f"{model} {_precision(precision)} ({row['psnr_db']['mean']:.2f} dB, "
                                  f"{gain:+.2f} +- {se:.2f} dB against no compensation)")
    held_out = (f"held-out gains: {', '.join(recorded)}" if recorded else
                "the held-out gains themselves were not recorded in these rows (fidelity rows record them from "
                "now on)")
    return (f"- The build's held-out check on the W4A4 rows (`tcec-default`, DDIM 20) rejected the tables of "
            f"{'; '.join(verdicts[False]) or 'none'} and kept those of {'; '.join(verdicts[True]) or 'none'}; "
            f"{held_out}.")


def block_int4() -> str:
    payload = _json(RESULTS / "int4.json")
    rows = {(r["precision"], r["ptq"]): r for r in payload["rows"]}
    steps = payload["settings"]["steps"]
    names = [("w4a16", "rtn", "W4A16"), ("w4a8", "rtn", "W4A8"), ("w4a8", "svdquant", "W4A8 + SVDQuant"),
             ("w4a4", "rtn", "W4A4"), ("w4a4", "svdquant", "W4A4 + SVDQuant")]
    verdict = ("every INT4 form passes `check`" if all(r["parity_passed"] for r in payload["rows"])
               else "not every INT4 form passes `check`")
    psnrs = ", ".join(f"{label} {rows[(p, q)]['psnr_vs_fp_pytorch_db']:.2f} / "
                      f"{rows[(p, q)]['psnr_vs_fp_onnxruntime_db']:.2f}" for p, q, label in names)
    fp32, w4a16, svd = rows[("fp32", "rtn")], rows[("w4a16", "rtn")], rows[("w4a4", "svdquant")]
    mb = 1e6
    return (f"{verdict}; final-image PSNR vs FP (PyTorch / ONNX Runtime, DDIM {steps}, dB): {psnrs}. The FP32 "
            f"export matches eager PyTorch at per-step SNR >= {fp32['min_step_snr_db']:.1f} dB. The W4A16 file is "
            f"{fp32['onnx_bytes'] / w4a16['onnx_bytes']:.2f}x smaller than FP32 ({fp32['onnx_bytes'] / mb:.2f} MB -> "
            f"{w4a16['onnx_bytes'] / mb:.2f} MB; `tests/test_int4_size.py` asserts >= 3.5x); the layers kept in "
            "float by the default recipe (conv_in/out, time embedding, time_emb_proj, shortcuts) are "
            f"{w4a16['weight_bytes_by_dtype']['float'] / mb:.2f} MB of it on this 1.4 M-parameter model. SVDQuant's "
            f"16-bit low-rank branch costs size (W4A4 + SVDQuant {svd['onnx_bytes'] / mb:.2f} MB).")


def block_latency() -> str:
    payload = _json(RESULTS / "latency.json")
    rows = {(r["method"], r["batch"]): r for r in payload["rows"]
            if r["model"] == "digits-uncond" and r["precision"] == "w8a8"}
    m0, m1, base = rows[("tcec-m0", 1)], rows[("tcec-m1-fitted", 1)], rows[("none", 1)]
    return (f"- Compensation overhead (`benchmarks/results/latency.md`, `{payload['meta']['command']}`): the folded "
            f"head costs {m0['head_only_ms']:.3f} ms (m=0) / {m1['head_only_ms']:.3f} ms (m=1) per call, "
            f"{m0['head_only_pct']:.2f} % / {m1['head_only_pct']:.2f} % of a {base['median_ms']:.1f} ms digits-uncond "
            f"W8A8 engine call at batch 1 on ONNX Runtime CPU ({payload['meta']['threads']} thread, "
            f"{payload['meta']['runs']} interleaved runs); paired whole-engine medians differ by "
            f"{m0['paired_overhead_pct']:+.2f} % / {m1['paired_overhead_pct']:+.2f} %.")


def block_parity() -> str:
    worst_snr, worst_gap, names = math.inf, 0.0, []
    for folder in sorted(REPORTS.iterdir()):
        parity = _json(folder / "parity.json")
        if _json(folder / "manifest.json")["build"]["precision"] != "w8a8":
            continue
        worst_snr = min(worst_snr, parity["worst"]["min_snr_db"])
        worst_gap = max(worst_gap, abs(parity["trajectory"]["gap_db"]))
        names.append(f"`docs/reports/{folder.name}`")
    return (f"- Parity of builds (`qdc-export check`; the example reports {', '.join(names)}): the W8A8 engines "
            f"agree with their PyTorch Q/DQ graph at per-step SNR >= {worst_snr:.1f} dB and final-image PSNR within "
            f"{worst_gap:.2f} dB of the graph's (the rules and their tolerances: docs/parity.md).")


def block_w4a4_parity() -> str:
    data = _json(RESULTS / "parity_matrix.json")
    rows = data["rows"]
    ok = [r for r in rows if r.get("passed")]
    parts = [f"{r['model']}{' + SVDQuant' if r['ptq'] == 'svdquant' else ''} {r['min_step_snr_db']:.1f} dB "
             f"(required {r['required_snr_db']:.1f})" for r in rows if "passed" in r]
    failed = [f"{r['model']} {r['ptq']}" for r in rows if not r.get("passed")]
    return (f"- W4A4 with `--ptq rtn` / `--ptq svdquant` and no compensation, not the default recipes "
            f"(`{data['provenance']['command']}`, commit {data['provenance']['commit']}, a rule older than "
            f"docs/parity.md's; `benchmarks/results/parity_matrix.md`): {len(ok)} of {len(rows)} "
            f"builds pass `check`; per-step SNR min against its noise-floor threshold: {', '.join(parts)}"
            + (f"; failed: {', '.join(failed)}" if failed else "") + ".")


def block_main_build() -> str:
    """What the main command did when the example report was made: its compensation verdict, parity, stage times."""
    manifest = _json(REPORTS / MAIN_REPORT / "manifest.json")
    timings = {k: v for k, v in manifest["timings_s"].items() if k != "report"}
    made = manifest.get("made_on")
    where = (f"commit {commit_mark(made)}, {made['cpu_count']} cores ({made['cpu_model']}), load "
             f"{made['load_average_1_5_15'][0]:.2f}" if made else "commit and machine load not recorded")
    comp, lines = manifest["compensation"], []
    validation = comp.get("validation")
    if validation:
        verdict = "folded" if comp.get("folded") else "**rejected** (the engine ships without it)"
        lines.append(f"- Compensation {comp['method']} {verdict}: held-out final-image PSNR vs FP "
                     f"{validation['psnr_without_db']:.2f} dB without, {validation['psnr_with_db']:.2f} dB with, gain "
                     f"{validation['gain_db']:+.2f} +- {validation['gain_se_db']:.2f} dB on {len(validation['seeds'])} "
                     f"seeds (rule: {validation.get('rule', 'not recorded: built before the rule was written down')}).")
    lines.append(f"- Parity: {manifest.get('parity_summary', 'not checked').split(';')[0]}.")
    lines.append(f"- Build stages {sum(timings.values()):.0f} s in all ("
                 + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items() if v >= 1) + f"; {where}); the report "
                 f"comes on top. Record: `docs/reports/{MAIN_REPORT}/manifest.json`, report: "
                 f"[report.html](docs/reports/{MAIN_REPORT}/report.html).")
    return "What it did when the example report was made (`python scripts/render_results.py --rebuild-reports`):\n\n" \
        + "\n".join(lines)


def block_parity_power() -> str:
    """The power of `check` on the trained models, from benchmarks/results/parity_power.json."""
    record = _json(RESULTS / "parity_power.json")
    rows, run = record["rows"], record["run"]
    broken = [(r["model"], r["precision"], name, v) for r in rows for name, v in r["broken"].items()]
    missed = [f"{m} {p} {name}" for m, p, name, v in broken if v["passed"]]
    honest_failed = [f"{r['model']} {r['precision']}" for r in rows if not r["honest"]["passed"]]
    builds = ", ".join(sorted({f"{r['model']} {r['precision'].upper()}" for r in rows}))
    return (f"- `check` on the trained models at each precision's default settings ({builds}): "
            f"{len(rows) - len(honest_failed)} of {len(rows)} honest builds pass; {len(broken) - len(missed)} of "
            f"{len(broken)} broken copies (one weight scale x2, a negated output channel, the output scaled at one "
            "step, the compensation tables read one row late) fail"
            + (f"; passed although broken: {', '.join(missed)}" if missed else "")
            + (f"; honest builds that failed: {', '.join(honest_failed)}" if honest_failed else "")
            + f". `{run['command']}` at {commit_mark(run)}; per-rule verdicts: "
            "[benchmarks/results/parity_power.md](benchmarks/results/parity_power.md).")


def block_scale() -> str:
    runs = _json(RESULTS / "scale.json")["runs"]
    latest: dict[tuple[str, str, int], dict[str, Any]] = {}
    for run in runs:
        if run["parity_passed"] is True:
            latest[(run["model"], run["precision"], run["sample_size"])] = run  # later runs replace earlier ones
    names = {"sd15": "SD 1.5", "sdxl": "SDXL"}
    order = {"sd15": 0, "sdxl": 1, "w8a8": 0, "w4a16": 1}
    lines = ["  | model | precision | latent | total | peak RSS | measured at |", "  |---|---|---:|---:|---:|---|"]
    shown: set[str] = set()
    for (model, precision, size), run in sorted(latest.items(), key=lambda kv: (order.get(kv[0][0], 9),
                                                                                 order.get(kv[0][1], 9), -kv[0][2])):
        name = names[model] if model in shown else f"{names[model]} ({run['params'] / 1e9:.2f} B)"
        shown.add(model)
        latent = f"{size}" if run["sample_size_reduced"] else f"{size} (published)"
        lines.append(f"  | {name} | {precision.upper()} | {latent} | {run['total_wall_s']:.0f} s | "
                     f"{run['peak_rss_gb']:.2f} GB | {run.get('label', 'not recorded')} |")
    first = next(r for r in runs if (r["model"], r["precision"], r["sample_size"]) == ("sd15", "w8a8", 64))
    final = latest[("sd15", "w8a8", 64)]
    lines += ["", f"  SD 1.5 W8A8 peak RSS went from {first['peak_rss_gb']:.2f} GB ({first.get('label')}) to "
                  f"{final['peak_rss_gb']:.2f} GB."]
    return "\n".join(lines)


CPU_TARGETS = (("--target openvino", ("openvino", "reference")), ("--target onnxruntime-cpu", ("onnxruntime", "cpu")))


def _engine_speed_lead(models: list[dict[str, Any]]) -> list[str]:
    """One line per model and batch: each CPU target's engine against both FP32 baselines, and its fidelity
    against the reference form (the onnxruntime form on ONNX Runtime)."""
    lines = ["The CPU targets against the FP32 export of the same model on both runtimes (engine call, median of "
             "interleaved calls), and their final-image PSNR against the reference W8A8 form (DDIM 20, trained models; "
             "the SD 1.5 architecture has random weights, so speed only):", ""]
    for result in models:
        by = {(r["runtime"], r["form"]): r for r in result["rows"]}
        ref_psnr = by.get(("onnxruntime", "reference"), {}).get("fidelity", {}).get("psnr_db_mean")
        for batch in list(result["rows"][0]["per_call"]):
            parts = []
            for target, key in CPU_TARGETS:
                if key not in by:
                    continue
                row = by[key]
                s = row["speedup"][batch]
                text = (f"`{target}` {s.get('vs_ov_fp32', math.nan):.2f}x OpenVINO FP32 / "
                        f"{s.get('vs_ort_fp32', math.nan):.2f}x ONNX Runtime FP32")
                psnr = row.get("fidelity", {}).get("psnr_db_mean")
                if psnr is not None and ref_psnr is not None:
                    text += f", {psnr - ref_psnr:+.2f} dB vs the reference form"
                parts.append(text)
            lines.append(f"- **{result.get('label', result['model'])}**, batch {batch}: " + "; ".join(parts) + ".")
    return [*lines, ""]


def block_engine_speed() -> str:
    """The lead of the results: each CPU engine's speed against FP32 on both runtimes, with its fidelity."""
    payload = _json(RESULTS / "engine_speed.json")
    meta = payload["meta"]
    lines = _engine_speed_lead(payload["models"]) + [
             f"Speed on this CPU ({meta['cpu']}, {meta['threads']} threads), per engine call (median of interleaved "
             "calls), against ONNX Runtime FP32 and OpenVINO FP32 (f32 precision) of the same model, with each "
             "engine's final-image PSNR against the FP model (DDIM 20, trained models only). From "
             "`benchmarks/results/engine_speed.md`, which has per-generation times, p10/p90, kernels and each "
             "model's build options.", ""]
    for result in payload["models"]:
        batches = list(result["rows"][0]["per_call"])
        run, settings = result.get("run", meta["run"]), result.get("settings", {})
        lines += [f"**{result.get('label', result['model'])}**: `{run['command']}` (commit {commit_mark(run)}), "
                  f"{settings.get('calls', meta['calls'])} calls", "",
                  "| runtime / form | " + " | ".join(f"batch {b}: ms, x ORT FP32, x OV FP32" for b in batches)
                  + " | PSNR vs FP |", "|---|" + "---|" * len(batches) + "---|"]
        for row in result["rows"]:
            cells = []
            for b in batches:
                s = row["speedup"][b]
                cells.append(f"{row['per_call'][b]['median_ms']:.1f}, {s.get('vs_ort_fp32', float('nan')):.2f}x, "
                             f"{s.get('vs_ov_fp32', float('nan')):.2f}x")
            psnr = row.get("fidelity", {}).get("psnr_db_mean")
            lines.append(f"| {row['runtime']} / {row['form']} | " + " | ".join(cells)
                         + f" | {'' if psnr is None else f'{psnr:.2f} dB'} |")
        for share in result.get("head_share") or []:
            if share:
                lines.append(f"\nCompensation head ({share['form']} form, batch {share['batch']}): "
                             f"{share['share_percent']:.3f} % of the engine call.")
        failed = [form for form, summary in (result.get("parity_passed") or {}).items()
                  if summary and str(summary).startswith("FAIL")]
        if failed:
            lines.append(f"\nBuilds of this table that failed their parity check: {', '.join(failed)} "
                         "(their manifests' parity_summary says why).")
        lines.append("")
    return "\n".join(lines).rstrip("\n")


BLOCKS: dict[str, Callable[[], str]] = {
    "engine-speed": block_engine_speed,
    "main-build": block_main_build,
    "parity-power": block_parity_power,
    "fidelity-headline": block_fidelity_headline,
    "table-findings": block_table_findings,
    "held-out": block_held_out,
    "svdquant": block_svdquant,
    "int4": block_int4,
    "latency": block_latency,
    "parity": block_parity,
    "w4a4-parity": block_w4a4_parity,
    "scale": block_scale,
}


RESULTS_DOC = ROOT / "docs" / "results.md"
DOCUMENTS = (README, RESULTS_DOC)  # the files whose generated blocks are rendered; every block lives in one of them
# A figure with a unit, the kind a results section quotes (12.3 dB, 4.5 ms, 1.3x, 21 %, 3.8 GB, 337 s, 1.1 M).
FIGURE = re.compile(r"(?<![\w.-])[-+]?\d+(?:\.\d+)?\s?(?:dB|ms|s|%|x|GB|MB|M)(?![\w])")
FENCED = re.compile(r"^```.*?^```", re.S | re.M)


def _render_blocks(text: str, found: list[str]) -> str:
    def replace(match: re.Match[str]) -> str:
        name = match["name"]
        if name not in BLOCKS:
            raise SystemExit(f"generated block {name!r} has no renderer (known: {', '.join(BLOCKS)})")
        found.append(name)
        return f"{match[1]}{BLOCKS[name]()}\n{match[4]}"

    return BLOCK.sub(replace, text)


def render_documents(texts: dict[Path, str]) -> dict[Path, str]:
    """Each document's text with its generated blocks re-rendered; a block name without a renderer, or a renderer
    whose block is in none of the documents, is an error."""
    found: list[str] = []
    rendered = {path: _render_blocks(text, found) for path, text in texts.items()}
    missing = sorted(set(BLOCKS) - set(found))
    if missing:
        raise SystemExit(f"the documents lack the generated blocks: {', '.join(missing)}")
    return rendered


def render_all() -> dict[Path, str]:
    return render_documents({path: path.read_text() for path in DOCUMENTS})


def typed_figures(text: str) -> list[str]:
    """Lines of ``text`` that quote a figure outside a generated block or a code block: numbers typed by hand."""
    text = FENCED.sub("", BLOCK.sub("", text))
    text = re.sub(r"`[^`\n]*`", "", text)  # inline code: commands and file names, not results
    return [line.strip() for line in text.splitlines() if FIGURE.search(line)]


def render_report(folder: Path) -> str:
    from qdc_export.report.html import render_html

    parity = folder / "parity.json"
    return render_html(_json(folder / "manifest.json"), _json(folder / "report" / "report.json"),
                       _json(parity) if parity.is_file() else None)


def report_problems(folder: Path) -> list[str]:
    """Ways a committed example report disagrees with its records or with the current manifest format."""
    from qdc_export.config import BuildConfig
    from qdc_export.errors import UserError
    from qdc_export.manifest import FORMAT_VERSION, PARITY_FILE, canonical_json, sha256_file

    problems, manifest = [], _json(folder / "manifest.json")
    name = folder.name
    if manifest.get("format_version") != FORMAT_VERSION:
        problems.append(f"{name}: manifest format_version {manifest.get('format_version')} != {FORMAT_VERSION}")
    try:
        config = BuildConfig.from_dict(manifest["build"])
    except UserError as exc:
        return problems + [f"{name}: manifest build config no longer loads: {exc}"]
    from qdc_export.manifest import UNHASHED_KEYS

    hashed = {k: v for k, v in manifest.items() if k not in ("content_sha256", *UNHASHED_KEYS)}
    import hashlib

    if hashlib.sha256(canonical_json(hashed).encode()).hexdigest() != manifest.get("content_sha256"):
        problems.append(f"{name}: manifest content_sha256 does not match its content (edited by hand?)")
    if sha256_file(folder / PARITY_FILE) != manifest["artifacts"].get(PARITY_FILE):
        problems.append(f"{name}: parity.json is not the one the manifest hashed")
    compensation = manifest.get("compensation", {})
    if config.compensation != "none" and config.comp_validate and compensation.get("validation") is None:
        problems.append(f"{name}: manifest has no held-out check record (built before the check; rebuild it)")
    if (folder / "report.html").read_text() != render_report(folder):
        problems.append(f"{name}: report.html differs from the one rendered from its records")
    return problems


def check_all() -> list[str]:
    problems = []
    rendered = render_all()
    for path, text in rendered.items():
        if path.read_text() != text:
            problems.append(f"{path.relative_to(ROOT)}: generated blocks differ from their records "
                            "(run scripts/render_results.py)")
    problems += [f"README.md: a figure typed by hand (render it from a record): {line}"
                 for line in typed_figures(README.read_text())]
    for folder in sorted(p for p in REPORTS.iterdir() if p.is_dir()):
        problems += report_problems(folder)
    return problems


def copy_report_records(build_dir: Path, name: str) -> None:
    """A build folder's records (not its model files) become the example report ``docs/reports/NAME``."""
    target = REPORTS / name
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    for record in REPORT_RECORDS:
        source = build_dir / record
        (shutil.copytree if source.is_dir() else shutil.copy2)(source, target / record)


def rebuild_reports(scratch: Path) -> None:
    """Rebuild every example report with the current code and copy its records into docs/reports."""
    for name, command in REPORT_COMMANDS.items():
        out = scratch / name
        subprocess.run([*command.split(), "--out", str(out), "--force"], cwd=ROOT, check=True)
        copy_report_records(out, name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 listing what differs")
    parser.add_argument("--rebuild-reports", action="store_true",
                        help="rebuild docs/reports/* with the current code first (about 10 min per report)")
    parser.add_argument("--scratch", type=Path, default=ROOT / "build" / "reports",
                        help="where --rebuild-reports builds (the folders are kept)")
    parser.add_argument("--from-builds", type=Path, default=None, metavar="DIR",
                        help="take the example reports from DIR/NAME, builds made by the REPORT_COMMANDS")
    args = parser.parse_args(argv)
    if args.check:
        problems = check_all()
        for line in problems:
            print(line)
        return 1 if problems else 0
    if args.rebuild_reports:
        rebuild_reports(args.scratch)
    elif args.from_builds is not None:
        for name in REPORT_COMMANDS:
            copy_report_records(args.from_builds / name, name)
    for path, text in render_all().items():
        path.write_text(text)
    for folder in sorted(p for p in REPORTS.iterdir() if p.is_dir()):
        (folder / "report.html").write_text(render_report(folder))
    print("rendered README.md, docs/results.md and docs/reports/*/report.html; remaining problems:",
          check_all() or "none")
    return 0


if __name__ == "__main__":
    sys.exit(main())
