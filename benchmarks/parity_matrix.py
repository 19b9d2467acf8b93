"""W4A4 builds with the recipes named on the command line (`--ptq rtn`, `--ptq svdquant`, no compensation; not the
defaults, which benchmarks/parity_power.py runs) pass `check`: the installed CLI, as a user runs it, on the bundled
trained models and on random-init presets (a UNet2DModel and an SD-style UNet2DConditionModel).
Each build's parity verdict, its per-step SNR against the measured noise floor, and its final-image gap are
written to benchmarks/results/parity_matrix.{json,md} with the command, commit, threads and package versions.

    python benchmarks/parity_matrix.py --models digits-uncond digits-cond tiny-unet2d tiny-sd --ptq rtn svdquant
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()


def provenance() -> dict:
    import torch

    from qdc_export.manifest import package_versions

    return {"command": " ".join([Path(sys.executable).name, *sys.argv]),
            "commit": _git("rev-parse", "--short", "HEAD") + ("-dirty" if _git("status", "--porcelain",
                                                                              "--untracked-files=no") else ""),
            "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "package_versions": package_versions()}


def build_and_check(model: str, precision: str, ptq: str, compensation: str, out: Path) -> dict:
    cmd = ["qdc-export", "build", model, "--precision", precision, "--ptq", ptq, "--compensation", compensation,
           "--out", str(out)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    row = {"model": model, "precision": precision, "ptq": ptq, "compensation": compensation,
           "cli": " ".join(cmd[:-2]), "exit_code": proc.returncode, "wall_s": round(time.perf_counter() - start, 1)}
    parity_path = out / "parity.json"
    if not parity_path.is_file():  # a failed check leaves no folder: the CLI's last line says why
        row["error"] = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or ["(no output)"]
        return row
    report = json.loads(parity_path.read_text())
    floor, traj = report["noise_floor"], report["trajectory"]
    row.update(passed=report["passed"], min_step_snr_db=report["worst"]["min_snr_db"],
               required_snr_db=min(floor["required_snr_db"]), floor_snr_db=min(floor["per_step_snr_db"]),
               min_cosine=report["worst"]["min_cosine"], required_cosine=min(floor["required_cosine"]),
               psnr_pytorch_db=traj["mean_psnr_pytorch_db"], psnr_onnxruntime_db=traj["mean_psnr_onnxruntime_db"],
               gap_db=traj["gap_db"], allowed_gap_db=traj["allowed_gap_db"],
               steps=report["steps"], parity_seeds=len(report["seeds"]))
    return row


def markdown(data: dict) -> str:
    p = data["provenance"]
    lines = ["# W4A4 parity with the recipes named on the command line (not the defaults: benchmarks/parity_power.py)\n",
             f"`{p['command']}` at commit {p['commit']}, {p['torch_threads']} torch threads on {p['cpu_count']} "
             f"cores; {', '.join(f'{k} {v}' for k, v in p['package_versions'].items())}.\n",
             "Per-step SNR of ONNX Runtime vs the PyTorch Q/DQ graph against the required threshold "
             "(min(25 dB, the graph's own noise floor - 3 dB) with the tolerances of the recorded commit, "
             "docs/parity.md); final-image PSNR vs FP.\n",
             "| model | ptq | compensation | check | step SNR min | required | own floor | PSNR PyTorch | "
             "PSNR ONNX Runtime | gap | allowed | wall |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in data["rows"]:
        if "passed" not in r:
            lines.append(f"| {r['model']} | {r['ptq']} | {r['compensation']} | exit {r['exit_code']}: "
                         f"{r['error'][0]} | | | | | | | | {r['wall_s']} s |")
            continue
        lines.append(f"| {r['model']} | {r['ptq']} | {r['compensation']} | {'PASS' if r['passed'] else 'FAIL'} | "
                     f"{r['min_step_snr_db']:.1f} | {r['required_snr_db']:.1f} | {r['floor_snr_db']:.1f} | "
                     f"{r['psnr_pytorch_db']:.2f} | {r['psnr_onnxruntime_db']:.2f} | {r['gap_db']:.2f} | "
                     f"{r['allowed_gap_db']:.2f} | {r['wall_s']} s |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["digits-uncond", "digits-cond", "tiny-unet2d", "tiny-sd"])
    parser.add_argument("--precision", default="w4a4")
    parser.add_argument("--ptq", nargs="+", default=["rtn", "svdquant"])
    parser.add_argument("--compensation", default="none")
    parser.add_argument("--name", default="parity_matrix", help="results file stem")
    parser.add_argument("--render", action="store_true", help="only rewrite the .md from the committed .json")
    args = parser.parse_args()
    if args.render:
        (RESULTS / f"{args.name}.md").write_text(markdown(json.loads((RESULTS / f"{args.name}.json").read_text())))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            for ptq in args.ptq:
                rows.append(build_and_check(model, args.precision, ptq, args.compensation,
                                            Path(tmp) / f"{model}-{ptq}"))
                print(json.dumps(rows[-1]), flush=True)
    data = {"provenance": provenance(), "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(data, indent=2) + "\n")
    (RESULTS / f"{args.name}.md").write_text(markdown(data))
    print(markdown(data))


if __name__ == "__main__":
    main()
