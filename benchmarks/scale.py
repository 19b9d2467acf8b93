"""Scale benchmark: full-size UNet architectures (SD 1.5, SDXL; published configs, random weights)
through the real build, with wall time and peak resident memory per build stage.

Each model runs in a fresh subprocess (``run`` mode) under ``nice`` and a memory watchdog; the
parent (``all`` mode) collects the per-stage numbers into results/scale.json and results/scale.md.
Per-stage peak RSS: the kernel's high-water mark (VmHWM) is reset at the start of every stage
(``/proc/self/clear_refs`` = 5) and read at its end, so each number is that stage's own peak,
including what earlier stages left resident.

    python benchmarks/scale.py all --models sd15 sdxl --precisions w8a8
    python benchmarks/scale.py run --model sd15 --precision w8a8 --json /tmp/sd15.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from qdc_export.infra.memory import reset_peak, resident_gb

RESULTS = Path(__file__).resolve().parent / "results"
GIB = 1024**3


class StageMeter:
    """Wraps the build's stage timer: wall time and VmHWM (reset per stage) for every stage."""

    def __init__(self, partial_path: Path | None = None) -> None:
        self.partial_path = partial_path  # stages so far, rewritten after each one (kept if the run is killed)
        self.stages: dict[str, dict[str, float]] = {}
        reset_peak()
        self.sub_peaks: list[float] = []  # peaks of the phases the library logs inside a stage (it resets VmHWM)

    def enter(self, name: str) -> None:
        gc.collect()
        reset_peak()
        self.sub_peaks = []
        self.stages[name] = {"rss_start_gb": resident_gb(), "start": time.perf_counter()}

    def exit(self, name: str) -> None:
        entry = self.stages[name]
        entry["wall_s"] = round(time.perf_counter() - entry.pop("start"), 2)
        entry["peak_rss_gb"] = round(max([resident_gb("VmHWM"), *self.sub_peaks]), 2)
        entry["rss_end_gb"] = round(resident_gb(), 2)
        entry["rss_start_gb"] = round(entry["rss_start_gb"], 2)
        print(f"[scale] {name:16s} {entry['wall_s']:9.1f} s  peak {entry['peak_rss_gb']:6.2f} GB  "
              f"end {entry['rss_end_gb']:6.2f} GB", flush=True)
        if self.partial_path is not None:
            self.partial_path.write_text(json.dumps(self.stages, indent=2))


def run_one(args: argparse.Namespace) -> dict:
    import torch

    from qdc_export import build as build_module
    from qdc_export.cli import _quiet_third_party
    from qdc_export.config import BuildConfig
    from qdc_export.load import models as loading

    _quiet_third_party()
    import logging

    logging.basicConfig(format="[scale] %(message)s")
    memory_log = logging.getLogger("qdc_export.infra.memory")
    memory_log.setLevel(logging.INFO)  # RSS at each phase of the check, with the phase's peak

    class _PeakCatcher(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            meter.sub_peaks.append(float(record.args[2]))  # ("%s: RSS %.2f GB (peak since last %.2f GB)")

    memory_log.addHandler(_PeakCatcher())
    torch.set_num_threads(args.threads)
    meter = StageMeter(Path(args.json + ".stages"))
    original_stage = build_module._Timer.stage

    def stage(self, name):
        inner = original_stage(self, name)

        class _Measured:
            def __enter__(self_inner):
                meter.enter(name)
                return inner.__enter__()

            def __exit__(self_inner, *exc):
                result = inner.__exit__(*exc)
                meter.exit(name)
                return result

        return _Measured()

    build_module._Timer.stage = stage
    original_load = build_module.load_model
    counted: dict[str, int] = {}

    def load_measured(model_arg):
        loaded = original_load(model_arg)
        counted["params"] = sum(p.numel() for p in loaded.unet.parameters())
        if args.sample_size:  # same architecture, smaller latent: only the config's sample_size changes
            loaded.unet.register_to_config(sample_size=args.sample_size)
            loaded.conditioning.image_size = args.sample_size * 8
        return loaded

    build_module.load_model = load_measured
    config = BuildConfig(precision=args.precision, steps=args.steps, calib_samples=args.calib_samples,
                         parity_samples=args.parity_samples, observer=args.observer, ptq=args.ptq,
                         compensation=args.compensation)
    out = Path(args.out or tempfile.mkdtemp(prefix=f"scale-{args.model}-")) / "build"
    start = time.perf_counter()
    import inspect

    extra = {"write_report": False} if "write_report" in inspect.signature(build_module.build).parameters else {}
    result = build_module.build(args.model, config, out, force=True, run_check=not args.no_check, **extra)
    total = time.perf_counter() - start
    files = {p.name: p.stat().st_size for p in out.iterdir() if p.is_file()}
    report = {
        "model": args.model, "precision": args.precision, "ptq": config.ptq, "compensation": config.compensation,
        "sample_size": args.sample_size or loading.CONFIG_PRESETS[args.model][1]["sample_size"],
        "sample_size_reduced": bool(args.sample_size),
        "steps": args.steps, "calib_samples": args.calib_samples, "parity_samples": args.parity_samples,
        "threads": args.threads, "params": counted.get("params"), "total_wall_s": round(total, 1),
        "peak_rss_gb": max(s["peak_rss_gb"] for s in meter.stages.values()),
        "stages": meter.stages, "files_bytes": files,
        "parity_passed": result.parity.get("passed") if result.parity else None,
        "parity_summary": result.manifest.get("parity_summary"),
        "build_dir": str(out),
        "commit": _commit(),
    }
    return report


def _commit() -> str:
    result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                            text=True, check=False)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=Path(__file__).parent,
                           capture_output=True, text=True, check=False).stdout.strip()
    return result.stdout.strip() + ("+changes" if dirty else "") if result.returncode == 0 else "unknown"


def _watch(proc: subprocess.Popen, cap_gb: float, state: dict) -> None:
    """Kill the child (only it) if its RSS passes the cap: the machine is shared."""
    status = Path(f"/proc/{proc.pid}/status")
    while proc.poll() is None:
        try:
            for line in status.read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) / 1024**2
                    state["max_rss_gb"] = max(state.get("max_rss_gb", 0.0), rss)
                    if rss > cap_gb:
                        state["killed"] = f"RSS {rss:.1f} GB passed the {cap_gb} GB cap"
                        proc.kill()
        except OSError:
            pass
        time.sleep(0.2)


def run_all(args: argparse.Namespace) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    json_path = RESULTS / "scale.json"
    existing = json.loads(json_path.read_text()) if json_path.is_file() else {"runs": []}
    runs = [r for r in existing.get("runs", [])]
    for model in args.models:
        for precision in args.precisions:
            with tempfile.TemporaryDirectory(prefix=f"scale-{model}-") as tmp:
                out_json = Path(tmp) / "report.json"
                cmd = ["nice", "-n", "10", sys.executable, __file__, "run", "--model", model, "--precision", precision,
                       "--json", str(out_json), "--steps", str(args.steps), "--calib-samples", str(args.calib_samples),
                       "--parity-samples", str(args.parity_samples), "--threads", str(args.threads), "--out", tmp,
                       "--compensation", args.compensation] + (["--ptq", args.ptq] if args.ptq else [])
                if model == "sdxl" and args.sdxl_sample_size:
                    cmd += ["--sample-size", str(args.sdxl_sample_size)]
                if args.as_gb:
                    cmd = ["prlimit", f"--as={int(args.as_gb * GIB)}", "--"] + cmd
                print("[scale]", " ".join(cmd), flush=True)
                proc = subprocess.Popen(cmd)
                state: dict = {}
                watcher = threading.Thread(target=_watch, args=(proc, args.cap_gb, state), daemon=True)
                watcher.start()
                rc = proc.wait()
                watcher.join()
                if rc == 0 and out_json.is_file():
                    report = json.loads(out_json.read_text())
                else:
                    report = {"model": model, "precision": precision, "failed": state.get("killed") or f"exit {rc}"}
                    partial = Path(str(out_json) + ".stages")
                    if partial.is_file():  # the stages that finished before it failed
                        report["stages"] = json.loads(partial.read_text())
                report["watchdog_max_rss_gb"] = round(state.get("max_rss_gb", 0.0), 2)
                runs = [r for r in runs if (r["model"], r["precision"], r.get("label", "")) != (model, precision, "")]
                runs.append(report)
                _write(runs)


def _write(runs: list[dict]) -> None:
    meta = {"machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, "
                       f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / GIB:.0f} GiB RAM (shared)",
            "method": "per-stage VmHWM, reset at every stage start via /proc/self/clear_refs; one fresh "
                      "process per model; peak includes what earlier stages left resident"}
    (RESULTS / "scale.json").write_text(json.dumps({"meta": meta, "runs": runs}, indent=2) + "\n")
    lines = ["# Full-size builds: wall time and peak RSS per stage", "", meta["machine"] + ".", meta["method"] + ".", "",
             *_summary(runs), "", "## Every run (oldest first)", ""]
    for run in runs:
        title = f"### {run['model']} {run['precision']}" + (f" ({run['label']})" if run.get("label") else "")
        if "failed" in run:
            lines += [title, "", f"FAILED: {run['failed']} (watchdog max RSS {run.get('watchdog_max_rss_gb')} GB)", ""]
            if run.get("stages"):
                lines += ["Stages that finished:", "", *_stage_table(run["stages"]), ""]
            continue
        summary = (f"params {run.get('params')}, sample size {run['sample_size']}"
                   f"{' (reduced)' if run['sample_size_reduced'] else ''}, {run['steps']} steps, "
                   f"{run['calib_samples']} calibration / {run['parity_samples']} parity samples; "
                   f"total {run['total_wall_s']} s, peak {run['peak_rss_gb']} GB; parity passed: {run['parity_passed']}")
        lines += [title, "", summary, "", *([run["note"], ""] if run.get("note") else []),
                  *_stage_table(run["stages"]), ""]
    (RESULTS / "scale.md").write_text("\n".join(lines) + "\n")


def _summary(runs: list[dict]) -> list[str]:
    """The newest finished run of each model, precision and latent size (later entries are newer)."""
    latest: dict[tuple, dict] = {}
    for run in runs:
        if "failed" not in run:
            latest[(run["model"], run["precision"], run["sample_size"])] = run
    rows = ["## Newest run of each model and precision", "",
            "| model | precision | latent | params | total wall s | peak RSS GB | peak stage | parity | from |",
            "|---|---|---:|---:|---:|---:|---|---|---|"]
    for (model, precision, size), run in sorted(latest.items()):
        stage = max(run["stages"], key=lambda name: run["stages"][name]["peak_rss_gb"])
        rows.append(f"| {model} | {precision} | {size}{' (reduced)' if run['sample_size_reduced'] else ''} | "
                    f"{run['params'] / 1e9:.2f} B | {run['total_wall_s']} | {run['peak_rss_gb']} | {stage} | "
                    f"{'PASS' if run['parity_passed'] else 'FAIL'} | {run.get('label', '')} |")
    return rows + ["", "latent: the UNet's sample_size. SDXL's published config has 128 (1024 px images); runs marked "
                       "reduced use 64 (512 px): the same architecture and weights, 4x fewer activation pixels."]


def _stage_table(stages: dict[str, dict[str, float]]) -> list[str]:
    rows = ["| stage | wall s | peak RSS GB | RSS after GB |", "|---|---:|---:|---:|"]
    return rows + [f"| {name} | {st['wall_s']} | {st['peak_rss_gb']} | {st['rss_end_gb']} |" for name, st in stages.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    for name in ("run", "all"):
        p = sub.add_parser(name)
        p.add_argument("--precision" if name == "run" else "--precisions", nargs=None if name == "run" else "+",
                       default="w8a8" if name == "run" else ["w8a8"])
        p.add_argument("--steps", type=int, default=2)
        p.add_argument("--calib-samples", type=int, default=1)
        p.add_argument("--parity-samples", type=int, default=1)
        p.add_argument("--threads", type=int, default=2)
        p.add_argument("--ptq", default=None, help="INT4 PTQ recipe (default: the build's default per precision)")
        p.add_argument("--compensation", default="none",
                       help="the recorded runs measure the build without compensation (the build's default is tcec)")
    run_p = sub.choices["run"]
    run_p.add_argument("--model", required=True)
    run_p.add_argument("--json", required=True)
    run_p.add_argument("--out", default=None)
    run_p.add_argument("--sample-size", type=int, default=0)
    run_p.add_argument("--observer", default="percentile")
    run_p.add_argument("--no-check", action="store_true")
    all_p = sub.choices["all"]
    all_p.add_argument("--models", nargs="+", default=["sd15", "sdxl"])
    all_p.add_argument("--sdxl-sample-size", type=int, default=0, help="lower SDXL's latent size (documented)")
    all_p.add_argument("--cap-gb", type=float, default=21.0, help="watchdog: kill the run above this RSS")
    all_p.add_argument("--as-gb", type=float, default=0.0, help="prlimit --as cap (0: none)")
    args = parser.parse_args()
    if args.mode == "run":
        report = run_one(args)
        Path(args.json).write_text(json.dumps(report, indent=2))
    else:
        run_all(args)


if __name__ == "__main__":
    main()
