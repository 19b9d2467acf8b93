"""How big the rounding noise of the parity check's noise floor should be, and what the check then catches.

For tiny W8A8 and W4A4 builds (4 DDIM steps, one parity sample): ONNX Runtime's per-step SNR and trajectory
gap against the PyTorch Q/DQ graph, next to the reference's own floor under RoundingNoise of 1, 4 and 16 ulp;
then the check's verdict on the broken engines of tests/engine_breakers.py at the default noise. Writes
benchmarks/results/noise_floor.{json,md} (docs/parity.md reads them).

    python benchmarks/noise_floor.py
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "benchmarks")]

from parity_matrix import RESULTS, provenance  # noqa: E402

BUILDS = [  # (preset, precision, build options)
    ("tiny-unet2d", "w8a8", {"compensation": "tcec", "comp_validate": False}),
    ("tiny-sdxl", "w8a8", {"compensation": "none"}),
    ("tiny-unet2d", "w4a4", {"compensation": "tcec", "comp_validate": False}),
    ("tiny-unet2d", "w4a4", {"ptq": "svdquant", "compensation": "none"}),
]
ULPS = (1.0, 4.0, 16.0)


def _floor_row(report: dict) -> dict:
    t = report["trajectory"]
    return {"onnxruntime_step_snr_db": [s["snr_db"] for s in report["per_step"]],
            "floor_step_snr_db": report["noise_floor"]["per_step_snr_db"],
            "onnxruntime_gap_db": t["gap_db"], "noisy_reference_gap_db": t["noisy_reference_gap_db"],
            "passed": report["passed"]}


def run() -> dict:
    import torch
    from engine_breakers import BREAKERS

    from qdc_export.build import build
    from qdc_export.check.folder import check_build
    from qdc_export.check.parity import ParityTolerances, summarize
    from qdc_export.cli import _quiet_third_party
    from qdc_export.config import BuildConfig

    _quiet_third_party()
    warnings.filterwarnings("ignore")
    logging.getLogger("torchao").setLevel(logging.ERROR)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset, precision, options in BUILDS:
            label = f"{preset} {precision}" + (f" + {options['ptq']}" if "ptq" in options else "")
            out = Path(tmp) / label.replace(" ", "_")
            build(preset, BuildConfig(precision=precision, steps=4, calib_samples=2, parity_samples=1, **options), out)
            row: dict = {"build": label, "options": options, "by_ulps": {}, "broken": {}}
            for ulps in ULPS:
                row["by_ulps"][str(ulps)] = _floor_row(check_build(out, tolerances=ParityTolerances(noise_ulps=ulps)))
            for name, breaker in BREAKERS.items():
                if name == "shifted-table" and options.get("compensation") == "none":
                    continue
                broken = Path(tmp) / f"{out.name}-{name}"
                shutil.copytree(out, broken)
                what = breaker(broken)
                report = check_build(broken)
                row["broken"][name] = {"what": what, "passed": report["passed"], "summary": summarize(report)}
            rows.append(row)
            print(json.dumps(row)[:400], flush=True)
    return {"provenance": provenance(), "torch_threads": torch.get_num_threads(), "rows": rows,
            "default_noise_ulps": ParityTolerances().noise_ulps}


def _db(values: list[float]) -> str:
    return ", ".join("inf" if v == float("inf") else f"{v:.1f}" for v in values)


def markdown(data: dict) -> str:
    p = data["provenance"]
    lines = ["# Parity noise floor: size of the rounding noise, and power\n",
             f"`{p['command']}` at commit {p['commit']}, {p['torch_threads']} torch threads; "
             f"{', '.join(f'{k} {v}' for k, v in p['package_versions'].items())}. Tiny presets (random weights), "
             f"4 DDIM steps, 2 calibration samples, 1 parity sample. Default noise: {data['default_noise_ulps']:g} ulp.\n",
             "| build | ONNX Runtime step SNR (dB) | " + " | ".join(f"floor at {u:g} ulp" for u in ULPS)
             + " | trajectory gap: ORT / " + " / ".join(f"{u:g} ulp" for u in ULPS) + " |",
             "|---|---|" + "---|" * len(ULPS) + "---|"]
    for r in data["rows"]:
        first = next(iter(r["by_ulps"].values()))
        lines.append(f"| {r['build']} | {_db(first['onnxruntime_step_snr_db'])} | "
                     + " | ".join(_db(v["floor_step_snr_db"]) for v in r["by_ulps"].values())
                     + f" | {first['onnxruntime_gap_db']:.3f} / "
                     + " / ".join(f"{v['noisy_reference_gap_db']:.3f}" for v in r["by_ulps"].values()) + " |")
    lines += ["", "Broken engines (tests/engine_breakers.py) under the default check:", "",
              "| build | broken how | check |", "|---|---|---|"]
    for r in data["rows"]:
        for name, b in r["broken"].items():
            lines.append(f"| {r['build']} | {b['what']} | {b['summary']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    data = run()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "noise_floor.json").write_text(json.dumps(data, indent=2) + "\n")
    (RESULTS / "noise_floor.md").write_text(markdown(data))
    print(markdown(data))


if __name__ == "__main__":
    main()
