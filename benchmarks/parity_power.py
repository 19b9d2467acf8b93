"""The power of `check` on the trained models at the default settings of every precision.

For each model and precision: the default build (its default PTQ recipe and compensation, as `qdc-export build
MODEL --precision P` makes it), then each broken engine of tests/engine_breakers.py made from a copy of it and
checked from the folder, as `qdc-export check` does. An honest build must pass and every broken one must fail.
Writes benchmarks/results/parity_power.{json,md} with the command, commit, dirty flag, threads and machine load.

    python benchmarks/parity_power.py --models digits-uncond digits-cond --precisions w8a8 w4a16 w4a8 w4a4
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "tests"))


def _rules(report: dict) -> dict:
    """Which of the check's rules held (False = that rule failed the engine)."""
    steps_ok = report.get("polygraphy_passed")
    traj = report.get("trajectory", {})
    return {
        "every_step": steps_ok,
        "typical_step": report.get("typical_step", {}).get("passed"),
        "step_gain": report.get("step_gain", {}).get("passed"),
        "images_vs_reference": report.get("images_vs_reference", {}).get("passed"),
        "psnr_gap_vs_fp": (traj.get("gap_db", 0.0) <= traj.get("allowed_gap_db", 0.0)) if traj else None,
        "compensation_head": report.get("compensation_head", {}).get("passed"),
    }


def _row(report: dict) -> dict:
    typical, images = report.get("typical_step", {}), report.get("images_vs_reference", {})
    return {"passed": report["passed"], "rules": _rules(report),
            "min_step_snr_db": report["worst"]["min_snr_db"], "median_step_snr_db": typical.get("median_snr_db"),
            "step_gain_deviation": report.get("step_gain", {}).get("max_deviation"),
            "step_gain_allowed": report.get("step_gain", {}).get("allowed_deviation"),
            "median_required_db": typical.get("required_db"), "images_vs_reference_db": images.get("mean_psnr_db"),
            "images_required_db": images.get("required_db")}


def run(models: list[str], precisions: list[str], record_path: str) -> dict:
    from engine_breakers import BREAKERS, NEEDS_TABLES

    from qdc_export.build import build
    from qdc_export.check.folder import check_build
    from qdc_export.check.parity import summarize
    from qdc_export.cli import _quiet_third_party
    from qdc_export.config import BuildConfig
    from qdc_export.errors import RejectedBuild
    from qdc_export.infra.provenance import run_provenance
    from qdc_export.infra.staging import failed_folder

    _quiet_third_party()
    record = {"run": run_provenance("python benchmarks/parity_power.py", sys.argv[1:]), "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        for model in models:
            source = str(ROOT / "models" / model)
            for precision in precisions:
                out = Path(tmp) / f"{model}-{precision}"
                start = time.perf_counter()
                try:
                    honest = build(source, BuildConfig(precision=precision), out, write_report=False).parity
                except RejectedBuild:  # an honest build that fails its own check is a row too
                    out = failed_folder(out)
                    honest = json.loads((out / "parity.json").read_text())
                manifest = json.loads((out / "manifest.json").read_text())
                row = {"model": model, "precision": precision, "ptq": manifest["build"]["ptq"],
                       "compensation_folded": bool(manifest["compensation"].get("folded")),
                       "build_s": round(time.perf_counter() - start, 1), "honest": _row(honest),
                       "honest_summary": summarize(honest), "broken": {}}
                print(f"{model} {precision}: {row['honest_summary']}", flush=True)
                for name, breaker in BREAKERS.items():
                    if name in NEEDS_TABLES and not row["compensation_folded"]:
                        continue
                    folder = Path(tmp) / "broken"
                    shutil.rmtree(folder, ignore_errors=True)
                    shutil.copytree(out, folder)
                    what = breaker(folder)
                    report = check_build(folder)
                    row["broken"][name] = {"what": what, **_row(report), "summary": summarize(report)}
                    print(f"  {name}: {'PASS' if report['passed'] else 'FAIL'} ({what})", flush=True)
                record["rows"].append(row)
                write(record, record_path)  # after every row: an interrupted run keeps what it measured
    return record


def write(record: dict, record_path: str) -> None:
    Path(record_path + ".json").write_text(json.dumps(record, indent=2) + "\n")
    Path(record_path + ".md").write_text(markdown(record))


def _mark(ok: bool | None) -> str:
    return "-" if ok is None else ("ok" if ok else "**fails**")


def markdown(record: dict) -> str:
    run = record["run"]
    lines = ["# Parity check power on the trained models (generated by benchmarks/parity_power.py)", "",
             f"`{run['command']}` at {run['git_commit'][:10]}{' (dirty tree)' if run['git_dirty'] else ''}, "
             f"{run['torch_threads']} threads, load {run['load_average_1_5_15']} on {run['cpu_count']} cores "
             f"({run['cpu_model']}).", "",
             "Each row: the default build of that precision (honest) and broken copies of it, each checked from its "
             "folder. Verdict: PASS / FAIL of `check`; the rule columns say which rules failed the engine "
             "(every step's SNR/cosine against the floor's worst step, the median step SNR, the largest step gain "
             "deviation, the final images vs the reference's own, the PSNR gap vs FP, the compensation head; "
             "docs/parity.md). An honest build must PASS, every broken one must FAIL.", "",
             "| model | precision (ptq) | engine | verdict | every step | median step (dB, required) | "
             "step gain off 1 (allowed) | images vs reference (dB, required) | gap vs FP | head |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in record["rows"]:
        engines = [("honest", row["honest"])] + [(name, v) for name, v in row["broken"].items()]
        for name, r in engines:
            rules = r["rules"]
            verdict = "PASS" if r["passed"] else "FAIL"
            wrong = (name == "honest") != r["passed"]
            median = (f"{r['median_step_snr_db']:.1f} (>= {r['median_required_db']:.1f}) "
                      f"{_mark(rules['typical_step'])}" if r["median_step_snr_db"] is not None else "-")
            images = (f"{r['images_vs_reference_db']:.2f} (>= {r['images_required_db']:.2f}) "
                      f"{_mark(rules['images_vs_reference'])}" if r["images_vs_reference_db"] is not None else "-")
            gain = (f"{r['step_gain_deviation']:.2g} ({r['step_gain_allowed']:.2g}) {_mark(rules['step_gain'])}"
                    if r.get("step_gain_deviation") is not None else "-")
            lines.append(f"| {row['model']} | {row['precision']} ({row['ptq']}) | {name} | "
                         f"{'**' + verdict + ' (wrong)**' if wrong else verdict} | {_mark(rules['every_step'])} | "
                         f"{median} | {gain} | {images} | {_mark(rules['psnr_gap_vs_fp'])} | "
                         f"{_mark(rules['compensation_head'])} |")
    missed = [(row["model"], row["precision"], n) for row in record["rows"] for n, v in row["broken"].items()
              if v["passed"]]
    false_alarms = [(row["model"], row["precision"]) for row in record["rows"] if not row["honest"]["passed"]]
    lines += ["", f"Broken engines that passed: {missed or 'none'}. Honest builds that failed: {false_alarms or 'none'}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["digits-uncond", "digits-cond"])
    parser.add_argument("--precisions", nargs="+", default=["w8a8", "w4a16", "w4a8", "w4a4"])
    parser.add_argument("--out", default=str(RESULTS / "parity_power"), help="record path without suffix")
    parser.add_argument("--render", action="store_true", help="only rewrite OUT.md from OUT.json")
    args = parser.parse_args()
    if args.render:
        Path(args.out + ".md").write_text(markdown(json.loads(Path(args.out + ".json").read_text())))
        return
    print(markdown(run(args.models, args.precisions, args.out)))


if __name__ == "__main__":
    main()
