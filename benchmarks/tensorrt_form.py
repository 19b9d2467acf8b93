"""The TensorRT form (`--target tensorrt`, FP16 network with INT8 / INT4 Q/DQ) of the bundled models on CPU:
rule check at the default TensorRT version, and the parity check of the FP16 ONNX (ONNX Runtime CPU) against
its FP16 PyTorch graph, next to the onnxruntime form of the same build. Writes
benchmarks/results/tensorrt_form.json and tensorrt_form.md. No TensorRT runs here.

    python benchmarks/tensorrt_form.py --models digits-uncond digits-cond --precisions w8a8 w4a16 --steps 10
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]


def run(models: list[str], precisions: list[str], steps: int, calib: int, parity: int) -> dict:
    import onnx

    from qdc_export.build import build
    from qdc_export.cli import _quiet_third_party
    from qdc_export.config import BuildConfig
    from qdc_export.engines.trt_rules import OLDEST_SUPPORTED, check_tensorrt_compatibility
    from qdc_export.errors import RejectedBuild
    from qdc_export.infra.staging import failed_folder

    _quiet_third_party()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in models:
            source = str(ROOT / "models" / model) if (ROOT / "models" / model).is_dir() else model
            for precision in precisions:
                for target in ("onnxruntime", "tensorrt"):
                    out = Path(tmp) / f"{model}-{precision}-{target}"
                    config = BuildConfig(precision=precision, target=target, steps=steps, calib_samples=calib,
                                         parity_samples=parity)
                    start = time.perf_counter()
                    try:
                        result = build(source, config, out, write_report=False)
                        checked, manifest = result.parity, result.manifest
                    except RejectedBuild:  # a failed check keeps the folder beside --out: its numbers are the row
                        out = failed_folder(out)
                        checked, manifest = (json.loads((out / name).read_text()) for name in ("parity.json",
                                                                                                "manifest.json"))
                    proto = onnx.load(str(out / "model.onnx"))
                    rules = sorted({v.rule for v in check_tensorrt_compatibility(proto)})
                    halves = sum(i.data_type == onnx.TensorProto.FLOAT16 for i in proto.graph.initializer)
                    traj = checked.get("trajectory", {})
                    rows.append({
                        "model": model, "precision": precision, "target": target,
                        "network_float": manifest["target"].get("network_float", "fp32"),
                        "fp16_initializers": halves,
                        f"rules_broken_at_{OLDEST_SUPPORTED}": rules,
                        "min_step_snr_db": checked["worst"].get("min_snr_db"),
                        "psnr_vs_fp_pytorch_db": traj.get("mean_psnr_pytorch_db"),
                        "psnr_vs_fp_ort_db": traj.get("mean_psnr_onnxruntime_db"),
                        "parity_passed": checked.get("passed"),
                        "build_s": round(time.perf_counter() - start, 1),
                    })
                    print(json.dumps(rows[-1]), flush=True)
    return {"steps": steps, "calib_samples": calib, "parity_samples": parity, "rows": rows}


def write(report: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "tensorrt_form.json").write_text(json.dumps(report, indent=2) + "\n")
    rule_key = next(k for k in report["rows"][0] if k.startswith("rules_broken_at_"))
    run = report.get("run")
    made = (f"`{run['command']}` at {(run['git_commit'] or '?')[:10]}{' (dirty tree)' if run['git_dirty'] else ''}, "
            f"load {run['load_average_1_5_15']}" if run else "command and commit not recorded (made before they were)")
    lines = [f"# TensorRT form on CPU (DDIM {report['steps']} steps, {report['calib_samples']} calibration and "
             f"{report['parity_samples']} parity trajectories; ONNX Runtime CPU, no TensorRT)", "", made, "",
             f"| model | precision | target | network | TensorRT rules broken ({rule_key[16:]}) | min step SNR ORT vs "
             "PyTorch (dB) | PSNR vs FP, PyTorch (dB) | PSNR vs FP, ORT (dB) | parity |", "|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        fmt = lambda v: "-" if v is None else f"{v:.1f}" if isinstance(v, float) else str(v)  # noqa: E731
        lines.append(f"| {r['model']} | {r['precision']} | {r['target']} | {r['network_float']} | "
                     f"{', '.join(r[rule_key]) or 'none'} | {fmt(r['min_step_snr_db'])} | "
                     f"{fmt(r['psnr_vs_fp_pytorch_db'])} | {fmt(r['psnr_vs_fp_ort_db'])} | "
                     f"{'pass' if r['parity_passed'] else 'FAIL'} |")
    (RESULTS / "tensorrt_form.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["digits-uncond", "digits-cond"])
    parser.add_argument("--precisions", nargs="+", default=["w8a8", "w4a16"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--calib-samples", type=int, default=4)
    parser.add_argument("--parity-samples", type=int, default=2)
    args = parser.parse_args()
    from qdc_export.infra.provenance import run_provenance

    provenance = run_provenance("python benchmarks/tensorrt_form.py", sys.argv[1:])  # before the run: its load
    write({"run": provenance, **run(args.models, args.precisions, args.steps, args.calib_samples,
                                    args.parity_samples)})


if __name__ == "__main__":
    main()
