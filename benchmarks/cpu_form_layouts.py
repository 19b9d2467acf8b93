"""Which Q/DQ layout the CPU form (``--target onnxruntime-cpu``) should have: final-image PSNR vs the FP model
(DDIM 20, with the build's default compensation) of the PyTorch Q/DQ graph of each candidate layout, and how
many Convs each leaves for ONNX Runtime's QLinearConv (a quantized Conv with its output quantized).

    python benchmarks/cpu_form_layouts.py                # digits-uncond, digits-cond, 64 images
    python benchmarks/cpu_form_layouts.py --images 8 --models digits-uncond --out /tmp/layouts   # smoke run

The graph is the one the build exports: ``qdc-export check`` holds every engine to its own graph (per-step SNR
and final-image PSNR, docs/parity.md), so the layout's fidelity is decided here, before ONNX. Speed of the
shipped layout: benchmarks/results/engine_speed.md.

Layouts (quantize/annotate_cpu.py): ``reference`` the onnxruntime form (INT8 Conv/Linear inputs only; ONNX Runtime
runs its Convs as DQ + float Conv); ``all-conv-outputs`` every quantized Conv's output UINT8 too (the CPU form
before residual-joining Convs stayed float); ``residual-convs-float`` the shipped CPU form; ``no-conv-outputs``
no Conv output quantized (no QLinearConv at all: the fidelity ceiling of U8S8 inputs).
Writes benchmarks/results/cpu_form_layouts.{json,md}."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = ("reference", "all-conv-outputs", "residual-convs-float", "no-conv-outputs")


def quantizer_factory(layout: str) -> Any:
    """The CpuFormQuantizer of ``layout`` (None: the shipped one, or the reference form's)."""
    from qdc_export.quantize import annotate_cpu as ac

    if layout == "all-conv-outputs":
        return lambda plan: ac.CpuFormQuantizer(plan, ac.CPU_FORM_ACTIVATION_DTYPE, asymmetric=True)
    if layout == "no-conv-outputs":
        return lambda plan: ac.CpuFormQuantizer(plan, ac.CPU_FORM_ACTIVATION_DTYPE, asymmetric=True, output_ops=())
    return ac.cpu_form_quantizer


def measure(model_name: str, layout: str, images: int, cache: Path) -> dict[str, Any]:
    from qdc_export.build import load_for_build
    from qdc_export.compensation.stage import add_compensation
    from qdc_export.config import BuildConfig
    from qdc_export.load.models import io_description
    from qdc_export.quantize import qdq
    from qdc_export.quantize.graph import build_graph
    from qdc_export.report.fidelity import compare, evaluation_seeds, fp_latents, sample_latents
    from qdc_export.sampling import TorchDenoiser

    config = BuildConfig(precision="w8a8", target="onnxruntime" if layout == "reference" else "onnxruntime-cpu",
                         steps=20)
    model, _ = load_for_build(model_name, config)
    start = time.perf_counter()
    with mock.patch.object(qdq, "cpu_form_quantizer", quantizer_factory(layout)):
        gm, example, info = build_graph(model, config)
    # QLinearConv candidates: Convs whose output the graph quantizes (a quantize op right after the conv)
    output_quantized = sum(1 for n in gm.graph.nodes if n.op == "call_function" and "conv2d" in str(n.target)
                           and any("quantize_per_tensor" in str(u.target) for u in n.users))
    names = [s.name for s in model.conditioning.specs]
    seeds = evaluation_seeds(images)
    reference = fp_latents(model, "ddim", 20, seeds, cache_dir=cache)
    with tempfile.TemporaryDirectory() as staging:
        gm, _, compensation = add_compensation(gm, example, model, config, Path(staging), io_description(model))
    denoiser = TorchDenoiser(gm, names, stateful=bool(compensation.get("stateful")))
    scores = compare(reference, sample_latents(denoiser, model, "ddim", 20, seeds))
    return {"model": model_name, "layout": layout, "psnr_db_mean": scores["psnr_db"]["mean"],
            "psnr_db_min": scores["psnr_db"]["min"], "images": images, "conv_outputs_quantized": output_quantized,
            "compensation": {k: compensation.get(k) for k in ("method", "folded")},
            "quantized_layers": len(info.get("quantized_layers", [])),
            "float_layers": len(info.get("float_layers", [])), "wall_s": round(time.perf_counter() - start, 1)}


def write_markdown(payload: dict[str, Any], path: Path) -> None:
    run = payload["run"]
    lines = ["# CPU form: Q/DQ layouts", "",
             f"`{run['command']}` (commit {str(run['git_commit'])[:7]}, dirty {run['git_dirty']}); torch threads "
             f"{payload['threads']}. PSNR: final image of the PyTorch Q/DQ graph vs the FP model, DDIM 20, "
             f"{payload['images']} images, the build's default compensation. QLinearConv: Convs with their output "
             "quantized (ONNX Runtime fuses exactly those).", "",
             "| model | layout | PSNR dB (mean) | PSNR dB (min) | vs reference dB | QLinearConv | compensation folded |",
             "|---|---|---:|---:|---:|---:|---|"]
    for row in payload["rows"]:
        base = next(r for r in payload["rows"] if r["model"] == row["model"] and r["layout"] == "reference")
        lines.append(f"| {row['model']} | {row['layout']} | {row['psnr_db_mean']:.2f} | {row['psnr_db_min']:.2f} | "
                     f"{row['psnr_db_mean'] - base['psnr_db_mean']:+.2f} | {row['conv_outputs_quantized']} | "
                     f"{row['compensation']['folded']} |")
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    import torch

    from qdc_export.cli import _quiet_third_party
    from qdc_export.infra.provenance import run_provenance

    _quiet_third_party()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="digits-uncond,digits-cond")
    p.add_argument("--layouts", default=",".join(LAYOUTS))
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    run = run_provenance("python benchmarks/cpu_form_layouts.py", sys.argv[1:] if argv is None else list(argv))
    cache = ROOT / "benchmarks" / ".cache" / "cpu_form_layouts"
    rows = []
    for model_name in args.models.split(","):
        for layout in ["reference", *[x for x in args.layouts.split(",") if x != "reference"]]:
            rows.append(measure(model_name, layout, args.images, cache))
            print(json.dumps(rows[-1]), flush=True)
    payload = {"run": run, "threads": args.threads, "images": args.images, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cpu_form_layouts.json").write_text(json.dumps(payload, indent=1) + "\n")
    write_markdown(payload, args.out / "cpu_form_layouts.md")
    print(f"wrote {args.out / 'cpu_form_layouts.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
