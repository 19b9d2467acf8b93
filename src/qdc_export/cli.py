"""The ``qdc-export`` command line. It only parses options and calls library functions; user errors
(:class:`qdc_export.errors.UserError`) end with one line on stderr and exit code 1, no traceback."""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import warnings
from pathlib import Path

import click

from qdc_export.config import TARGETS
from qdc_export.errors import UserError
from qdc_export.precision import PRECISIONS

EXIT_USER_ERROR = 1


def _quiet_third_party() -> None:
    """torchao and diffusers log import-time warnings about optional kernels that don't apply here."""
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    warnings.filterwarnings("ignore")
    import torch  # noqa: F401  (torch configures its loggers on import; adjust them afterwards)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    for name in ("torchao", "torch.utils._pytree", "torch.onnx", "torch._export", "torch.export"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _parse_range(text: str) -> tuple[int, int, int]:
    try:
        lo, opt, hi = (int(v) for v in text.split(":"))
    except ValueError:
        raise UserError(f"expected MIN:OPT:MAX integers, got {text!r}") from None
    return lo, opt, hi


def _parse_overrides(items: tuple[str, ...]) -> dict:
    overrides = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise UserError(f"--scheduler-override expects KEY=VALUE, got {item!r}")
        try:
            overrides[key] = json.loads(text)
        except json.JSONDecodeError:
            overrides[key] = text  # a bare string such as trailing
    return overrides


def _user_errors(func):
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except UserError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(EXIT_USER_ERROR)
        except KeyboardInterrupt:
            click.echo("interrupted; nothing was written", err=True)
            sys.exit(130)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="qdc-export")
def main() -> None:
    """Compile diffusers UNets into quantized ONNX engines with in-graph error compensation."""
    _quiet_third_party()


@main.command()
@click.argument("model", required=False)
@click.option("--precision", type=click.Choice(PRECISIONS), default="w8a8", show_default=True)
@click.option("--scheduler", type=click.Choice(["ddim", "ddpm", "euler", "dpmsolver++"]), default="ddim", show_default=True)
@click.option("--scheduler-config", "scheduler_config", type=click.Path(path_type=Path), default=None,
              help="the model's scheduler_config.json (or a folder holding it), where MODEL has none")
@click.option("--scheduler-override", "scheduler_override", multiple=True, metavar="KEY=VALUE",
              help="change one field of the model's scheduler config (JSON value), recorded in the manifest")
@click.option("--steps", type=int, default=20, show_default=True, help="denoising steps the engine is built and calibrated for")
@click.option("--calib-samples", type=int, default=8, show_default=True, help="calibration trajectories (1..1000)")
@click.option("--observer", type=click.Choice(["minmax", "percentile", "mse"]), default="percentile", show_default=True)
@click.option("--percentile", type=float, default=99.99, show_default=True)
@click.option("--quantize-attention/--no-quantize-attention", default=False, show_default=True)
@click.option("--include", multiple=True, help="glob of layers to quantize even if float by default")
@click.option("--exclude", multiple=True, help="glob of layers to keep in float")
@click.option("--compensation", type=click.Choice(["none", "tcec", "ptqd", "tac"]), default=None,
              help="error compensation folded into the engine  [default: tcec, none for fp32; the held-out check "
                   "(--comp-validate) keeps it out when it does not help]")
@click.option("--tcec-variant", type=click.Choice(["m0", "m1-analytic", "m1-fitted"]), default="m0", show_default=True)
@click.option("--comp-fit-bias/--no-comp-fit-bias", default=True, show_default=True,
              help="also fit a per-step, per-channel bias")
@click.option("--comp-target", type=click.Choice(["same-input", "cumulative"]), default="same-input",
              show_default=True, help="fit target of the m1-fitted variant")
@click.option("--comp-ridge", type=float, default=1e-3, show_default=True, help="ridge strength (relative)")
@click.option("--comp-validate/--no-comp-validate", default=True, show_default=True,
              help="fold the tables only if their PSNR gain vs FP on >= 64 held-out seeds (every class) exceeds twice "
                   "its standard error")
@click.option("--target", type=click.Choice(TARGETS), default="onnxruntime",
              show_default=True, help="onnxruntime-cpu: W8A8 with integer CPU kernels; openvino: OpenVINO runs it (docs/cpu.md)")
@click.option("--trt-batch-range", default="1:2:8", show_default=True,
              help="TensorRT optimization profile batch MIN:OPT:MAX (--target tensorrt)")
@click.option("--trt-float", type=click.Choice(["fp16", "bf16"]), default="fp16", show_default=True,
              help="float type of the TensorRT network (--target tensorrt); INT8/INT4 stay in Q/DQ")
@click.option("--trt-conv", type=click.Choice(["int8", "float"]), default="int8", show_default=True,
              help="convolutions of a W4A16 TensorRT build (INT4 runs only in GEMMs in TensorRT)")
@click.option("--trt-version", default="", help="TensorRT version to check the rules against "
              "(--target tensorrt; default: the oldest release the GPU path is written for, docs/tensorrt.md)")
@click.option("--parity-samples", type=int, default=4, show_default=True)
@click.option("--ptq", default=None, metavar="RECIPE",
              help="INT4 PTQ recipe: rtn, gptq, awq, awq+gptq (awq: w4a16/w4a8), svdquant, svdquant+gptq "
                   "(svdquant: any 4-bit)  [default: the best measured per precision: "
                   "w4a16 gptq, w4a8 and w4a4 svdquant+gptq]")
@click.option("--svdquant-rank", type=int, default=32, show_default=True, help="rank of SVDQuant's low-rank branch")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", "out", type=click.Path(path_type=Path), required=True, help="build folder to create")
@click.option("--force", is_flag=True, help="replace an existing --out folder")
@click.option("--no-check", is_flag=True, help="skip the parity check (not recommended)")
@click.option("--distributed", is_flag=True,
              help="split calibration over torchrun's processes (gloo/nccl); rank 0 writes --out")
@_user_errors
def build(model, precision, scheduler, scheduler_config, scheduler_override, steps, calib_samples, observer, percentile, quantize_attention, include,
          exclude, compensation, tcec_variant, comp_fit_bias, comp_target, comp_ridge, comp_validate, target, trt_batch_range,
          trt_float, trt_conv, trt_version, parity_samples, ptq, svdquant_rank, seed, out, force, no_check, distributed) -> None:
    """Build a quantized ONNX model from MODEL (a diffusers folder or preset; default: the bundled model)."""
    from qdc_export.build import build as run_build
    from qdc_export.check.parity import summarize
    from qdc_export.config import BuildConfig

    config = BuildConfig(precision=precision, scheduler=scheduler, steps=steps, calib_samples=calib_samples,
                         observer=observer, percentile=percentile, quantize_attention=quantize_attention,
                         include=include, exclude=exclude, compensation=compensation, tcec_variant=tcec_variant,
                         comp_fit_bias=comp_fit_bias, comp_target=comp_target, comp_ridge=comp_ridge,
                         comp_validate=comp_validate, target=target,
                         trt_batch_range=_parse_range(trt_batch_range), trt_float=trt_float,
                         trt_conv=trt_conv, trt_version=trt_version, parity_samples=parity_samples, seed=seed,
                         ptq=ptq, svdquant_rank=svdquant_rank,
                         scheduler_overrides=_parse_overrides(scheduler_override))
    if distributed:  # under torchrun: see qdc_export.quantize.distributed
        from qdc_export.build import build_distributed

        result = build_distributed(model, config, out, force=force, progress=True, run_check=not no_check,
                                   scheduler_config=scheduler_config)
        if result is None:  # ranks > 0 only calibrate
            return
    else:
        result = run_build(model, config, out, force=force, progress=True, run_check=not no_check,
                           scheduler_config=scheduler_config)
    click.echo(f"built {out} ({precision}, {scheduler} x {steps} steps) in {sum(result.timings.values()):.1f} s")
    compensation = result.manifest.get("compensation", {})
    validation = compensation.get("validation")
    if validation:
        verdict = "NOT folded" if compensation.get("rejected") else "folded"
        click.echo(f"compensation {compensation['method']} {verdict}: final-image PSNR vs FP on "
                   f"{len(validation['seeds'])} held-out seeds {validation['psnr_without_db']:.2f} dB without, "
                   f"{validation['psnr_with_db']:.2f} dB with (gain {validation['gain_db']:+.2f} +- "
                   f"{validation.get('gain_se_db', 0.0):.2f} dB)"
                   + (" (--no-comp-validate folds it anyway)" if compensation.get("rejected") else ""))
    if result.parity:  # a failed check raised RejectedBuild in the build (kept as OUT.failed-check)
        click.echo(summarize(result.parity))


@main.command()
@click.argument("build_dir", type=click.Path(path_type=Path))
@click.option("--backend", type=click.Choice(["onnxruntime", "tensorrt"]), default="onnxruntime", show_default=True,
              help="tensorrt runs the build's model.engine and needs --against")
@click.option("--provider", type=click.Choice(["cpu", "cuda", "tensorrt"]), default="cpu", show_default=True,
              help="ONNX Runtime execution provider")
@click.option("--seeds", type=int, default=None, help="number of parity trajectories (default: the build's)")
@click.option("--against", "against", type=click.Path(path_type=Path), default=None,
              help="compare with goldens saved by --save-goldens (possibly on another machine)")
@click.option("--save-goldens", "save_goldens", type=click.Path(path_type=Path), default=None,
              help="save the step inputs and ONNX Runtime outputs as goldens JSON")
@click.option("--json", "as_json", is_flag=True, help="print the full report as JSON")
@_user_errors
def check(build_dir, backend, provider, seeds, against, save_goldens, as_json) -> None:
    """Check a build folder's ONNX model against its PyTorch reference graph and the FP model."""
    from qdc_export.check.folder import PARITY_SEED_OFFSET, check_against, check_build
    from qdc_export.check.parity import summarize
    from qdc_export.config import MAX_PARITY_SAMPLES

    if not build_dir.is_dir():
        raise UserError(f"{build_dir} is not a folder")
    if against is not None:
        report = check_against(build_dir, against, backend=backend, provider=provider)
        w = report["worst"]
        click.echo(json.dumps(report, indent=2) if as_json else
                   f"{'PASS' if report['passed'] else 'FAIL'} {report['runner']} vs goldens by {report['golden_made_by']} "
                   f"({report['mode']}): max abs {w['max_abs']:.3g}, p99 {w['p99_abs']:.3g}, "
                   f"min SNR {w['min_snr_db']:.1f} dB, min cosine {w['min_cosine']:.5f}")
        if not report["passed"]:
            raise UserError("check against goldens failed")
        return
    if backend == "tensorrt":
        raise UserError("--backend tensorrt compares the engine with goldens: pass --against goldens.json")
    if save_goldens is not None and save_goldens.exists():
        raise UserError(f"{save_goldens} exists; remove it first")
    if seeds is not None and not 1 <= seeds <= MAX_PARITY_SAMPLES:
        raise UserError(f"--seeds must be in 1..{MAX_PARITY_SAMPLES}, got {seeds}")
    seed_list = [PARITY_SEED_OFFSET + i for i in range(seeds)] if seeds else None
    report = check_build(build_dir, seeds=seed_list, provider=provider, save_goldens_to=save_goldens)
    click.echo(json.dumps(report, indent=2) if as_json else summarize(report))
    if not report["passed"]:
        raise UserError("parity check failed")


@main.command()
@click.argument("build_dir", type=click.Path(path_type=Path))
@click.option("--seed", type=int, default=0, show_default=True, help="first seed; image i uses seed + i")
@click.option("--num", type=int, default=8, show_default=True)
@click.option("--out", "out", type=click.Path(path_type=Path), required=True, help="folder for PNG images")
@click.option("--provider", type=click.Choice(["cpu", "cuda", "tensorrt"]), default="cpu", show_default=True)
@click.option("--force", is_flag=True, help="overwrite existing images")
@_user_errors
def sample(build_dir, seed, num, out, provider, force) -> None:
    """Generate images with the built engine (ONNX Runtime) and write them as PNG."""
    from qdc_export.report.samples import sample_build

    paths = sample_build(build_dir, seeds=list(range(seed, seed + num)), out=out, provider=provider,
                         force=force, progress=True)
    click.echo(f"wrote {len(paths)} images to {out}")


@main.command()
@click.argument("build_dir", type=click.Path(path_type=Path))
@click.option("--num", type=int, default=8, show_default=True, help="images in the grid (evaluation seeds 0..NUM-1)")
@click.option("--force", is_flag=True, help="replace an existing report")
@_user_errors
def report(build_dir, num, force) -> None:
    """Write BUILD_DIR/report.html: image grid, latent error curves, per-layer sensitivity, parity."""
    from qdc_export.report.writer import write_report

    if not build_dir.is_dir():
        raise UserError(f"{build_dir} is not a folder")
    path = write_report(build_dir, num=num, force=force)
    click.echo(f"wrote {path}")


@main.command()
@click.argument("build_dir", type=click.Path(path_type=Path))
@click.option("--out", "out", type=click.Path(path_type=Path), required=True, help="model repository folder")
@click.option("--name", default=None, help="model name in the repository (default: <model>-<precision>)")
@click.option("--max-batch-size", type=int, default=None,
              help="Triton max_batch_size (default: the TensorRT profile's max, else 8)")
@click.option("--force", is_flag=True, help="replace existing model folders in --out")
@_user_errors
def triton(build_dir, out, name, max_batch_size, force) -> None:
    """Write a Triton Inference Server model repository (config.pbtxt, 1/model.onnx, manifest) from a build."""
    from qdc_export.serving.triton import write_repository

    if not build_dir.is_dir():
        raise UserError(f"{build_dir} is not a folder")
    for path in write_repository(build_dir, out, name=name, max_batch_size=max_batch_size, force=force):
        click.echo(f"wrote {path}")


@main.command()
@click.argument("target", type=click.Path(path_type=Path))
@click.option("--verbose", "-v", is_flag=True, help="list every layer")
@click.option("--json", "as_json", is_flag=True)
@_user_errors
def inspect(target, verbose, as_json) -> None:
    """Show per-layer precision, Q/DQ counts, inputs/outputs of a build folder or an .onnx file."""
    from qdc_export.report.inspection import format_inspection, inspect_model

    if not target.exists():
        raise UserError(f"{target} does not exist")
    info = inspect_model(target)
    click.echo(json.dumps(info, indent=2) if as_json else format_inspection(info, verbose))


if __name__ == "__main__":
    main()
