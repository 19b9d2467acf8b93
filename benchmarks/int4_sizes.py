"""INT4 sizes and fidelity: ONNX file size FP32 vs INT4 forms, and final-image PSNR vs the FP model (from the
parity report's trajectory section, PyTorch Q/DQ graph and ONNX Runtime) for w4a16 / w4a8 / w4a4 with
rtn and svdquant. Writes benchmarks/results/int4.json and int4.md.

    python benchmarks/int4_sizes.py --models tiny-sd digits-cond digits-uncond --steps 20 --calib-samples 8
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

VARIANTS = [("fp32", "rtn"), ("w4a16", "rtn"), ("w4a8", "rtn"), ("w4a8", "svdquant"), ("w4a4", "rtn"),
            ("w4a4", "svdquant")]
RESULTS = Path(__file__).resolve().parent / "results"


def run(models: list[str], steps: int, calib: int, parity: int, variants: list[tuple[str, str]]) -> dict:
    from qdc_export.build import build
    from qdc_export.cli import _quiet_third_party
    from qdc_export.config import BuildConfig
    from qdc_export.report.inspection import inspect_model

    _quiet_third_party()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in models:
            for precision, ptq in variants:
                out = Path(tmp) / f"{model}-{precision}-{ptq}"
                config = BuildConfig(precision=precision, ptq=ptq, steps=steps, calib_samples=calib,
                                     parity_samples=parity, compensation="none")  # sizes of the INT4 forms as such
                start = time.perf_counter()
                result = build(model, config, out)
                info = inspect_model(out)
                float_layers = [l["node"] for l in info["layers"] if l["weight"] == "float"]
                traj = result.parity.get("trajectory", {})
                rows.append({
                    "model": model, "precision": precision, "ptq": ptq,
                    "onnx_bytes": (out / "model.onnx").stat().st_size,
                    "weight_bytes_by_dtype": info["weight_bytes_by_dtype"],
                    "float_weight_layers": len(float_layers),
                    "psnr_vs_fp_pytorch_db": traj.get("mean_psnr_pytorch_db"),
                    "psnr_vs_fp_onnxruntime_db": traj.get("mean_psnr_onnxruntime_db"),
                    "min_step_snr_db": result.parity["worst"]["min_snr_db"],
                    "parity_passed": result.parity["passed"],
                    "build_s": round(time.perf_counter() - start, 1),
                })
                print(json.dumps(rows[-1]), flush=True)
    for row in rows:
        fp = next((r for r in rows if r["model"] == row["model"] and r["precision"] == "fp32"), None)
        row["size_ratio_vs_fp32"] = round(fp["onnx_bytes"] / row["onnx_bytes"], 2) if fp else None
    return {"settings": {"steps": steps, "calib_samples": calib, "parity_samples": parity, "scheduler": "ddim"},
            "rows": rows}


def markdown(data: dict) -> str:
    s = data["settings"]
    lines = [f"# INT4 sizes and fidelity (DDIM {s['steps']} steps, {s['calib_samples']} calibration and "
             f"{s['parity_samples']} parity trajectories)", "",
             "| model | precision | ptq | ONNX MB | x smaller than fp32 | PSNR vs FP, PyTorch (dB) | "
             "PSNR vs FP, ORT (dB) | min step SNR ORT vs PyTorch (dB) | parity |", "|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        def f(v):
            return "-" if v is None else f"{v:.2f}"
        lines.append(f"| {r['model']} | {r['precision']} | {r['ptq']} | {r['onnx_bytes'] / 1e6:.2f} | "
                     f"{r['size_ratio_vs_fp32']} | {f(r['psnr_vs_fp_pytorch_db'])} | {f(r['psnr_vs_fp_onnxruntime_db'])} | "
                     f"{r['min_step_snr_db']:.1f} | {'pass' if r['parity_passed'] else 'FAIL'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny-sd", "digits-cond", "digits-uncond"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--calib-samples", type=int, default=8)
    parser.add_argument("--parity-samples", type=int, default=4)
    parser.add_argument("--variants", nargs="*", default=None, help="precision:ptq pairs, e.g. w4a16:rtn")
    args = parser.parse_args()
    variants = [tuple(v.split(":")) for v in args.variants] if args.variants else VARIANTS
    data = run(args.models, args.steps, args.calib_samples, args.parity_samples, variants)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "int4.json").write_text(json.dumps(data, indent=2) + "\n")
    (RESULTS / "int4.md").write_text(markdown(data))
    print(markdown(data))


if __name__ == "__main__":
    main()
