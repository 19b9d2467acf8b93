"""What an output-side compensation table can reach: how much of the quantization error is systematic.

For each model and precision (default recipe, as `qdc-export build` quantizes it), the FP model and the quantized
PyTorch Q/DQ graph sample paired DDIM trajectories from the same noise (and conditioning) on N seeds. Split the
seeds in two halves; on the second half, report the share of error energy that the first half's mean removes:

- per step, the output error e_n = eps~(x~_n) - eps(x~_n) at the same input (what a table row corrects), with the
  mean taken per channel (a per-channel bias, what TCEC's bias row is) and per pixel (a bias map at latent size);
- at the final latent, d = x~_0 - x_0 (the accumulated error that reaches the image), likewise.

A per-step share near zero with a larger final share is error that accumulates coherently over the steps; shares
near zero at both mean the error is input-dependent and no lookup on the output can remove it. Writes
benchmarks/results/error_structure.{json,md} with the command, commit, dirty flag, threads and machine load.

    python benchmarks/error_structure.py --models digits-uncond digits-cond --precisions w8a8 w4a16 w4a8 w4a4 \
        --seeds 64 --threads 1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CHUNK = 16  # seeds per sampler batch (classifier-free guidance doubles it; the captured graph takes <= 63)


def removed_share(err: torch.Tensor, dims: tuple[int, ...]) -> float:
    """Share of the second half's error energy removed by subtracting the first half's mean over ``dims``."""
    half = err.shape[0] // 2
    fit, held = err[:half].double(), err[half:].double()
    mean = fit.mean(dim=dims, keepdim=True)
    return 1.0 - float((held - mean).pow(2).sum() / held.pow(2).sum())


def affine_share(err: torch.Tensor, regressor: torch.Tensor) -> float:
    """Share of the second half's error energy removed by a per-channel affine map of ``regressor`` (err ~ k_c *
    regressor + b_c, least squares on the first half): the form of a TCEC table row (scale and bias per channel)."""
    half = err.shape[0] // 2
    removed, total = 0.0, 0.0
    for c in range(err.shape[1]):
        e, r = err[:, c].double().flatten(1), regressor[:, c].double().flatten(1)
        design = torch.stack([r[:half].flatten(), torch.ones_like(r[:half].flatten())], dim=1)
        coef = torch.linalg.lstsq(design, e[:half].flatten().unsqueeze(1)).solution.squeeze(1)
        held = e[half:].flatten()
        fitted = coef[0] * r[half:].flatten() + coef[1]
        removed += float((held.pow(2).sum() - (held - fitted).pow(2).sum()))
        total += float(held.pow(2).sum())
    return removed / total


def paired_errors(model_name: str, precision: str, seeds: list[int]) -> dict:
    from qdc_export.build import load_for_build
    from qdc_export.config import BuildConfig
    from qdc_export.quantize.graph import build_graph
    from qdc_export.sampling import Episode, TorchDenoiser, make_scheduler

    config = BuildConfig(precision=precision)
    model, _ = load_for_build(str(ROOT / "models" / model_name), config)
    quantized, _, _ = build_graph(model, config)
    names = [s.name for s in model.conditioning.specs]
    fp, q = TorchDenoiser(model.adapter.wrap(model.unet).eval(), names), TorchDenoiser(quantized, names)
    shape = model.adapter.input_specs(model.unet)[0].concrete(1)[1:]
    scheduler = make_scheduler(config.scheduler, model.scheduler_config)
    step_errors: list[list[torch.Tensor]] = []
    step_outputs: list[list[torch.Tensor]] = []
    finals, fp_finals = [], []
    for start in range(0, len(seeds), CHUNK):
        episode = Episode.from_seeds(scheduler, config.steps, model.conditioning, shape, seeds[start:start + CHUNK])
        x_q, x_fp = episode.start.clone(), episode.start.clone()
        per_step, outputs = [], []
        with torch.no_grad():
            for t in episode.timesteps:
                eps_q = episode.output(q, episode.model_input(x_q, t), t)
                per_step.append(eps_q - episode.output(fp, episode.model_input(x_q, t), t))
                outputs.append(eps_q)
                x_fp = episode.step(episode.output(fp, episode.model_input(x_fp, t), t), t, x_fp)
                x_q = episode.step(eps_q, t, x_q)
        step_errors.append(per_step)
        step_outputs.append(outputs)
        finals.append(x_q - x_fp)
        fp_finals.append(x_fp)
    steps = [torch.cat([chunk[i] for chunk in step_errors]) for i in range(config.steps)]
    eps_q_steps = [torch.cat([chunk[i] for chunk in step_outputs]) for i in range(config.steps)]
    final, x_fp_final = torch.cat(finals), torch.cat(fp_finals)
    return {
        "model": model_name, "precision": precision, "ptq": config.ptq, "steps": config.steps,
        "seeds": len(seeds),
        "step_share_per_channel": [removed_share(e, (0, 2, 3)) for e in steps],
        "step_share_per_pixel": [removed_share(e, (0,)) for e in steps],
        "step_share_affine_per_channel": [affine_share(e, a) for e, a in zip(steps, eps_q_steps)],
        "final_share_per_channel": removed_share(final, (0, 2, 3)),
        "final_share_affine_per_channel": affine_share(final, x_fp_final),
        "final_share_per_pixel": removed_share(final, (0,)),
        "final_rel_error": float(final.norm() / x_fp_final.norm()),
    }


def markdown(record: dict) -> str:
    run = record["run"]
    lines = ["# How much of the quantization error is systematic (generated by benchmarks/error_structure.py)", "",
             f"`{run['command']}` at {(run['git_commit'] or '?')[:10]}{' (dirty tree)' if run['git_dirty'] else ''}, "
             f"{run['torch_threads']} threads, load {run['load_average_1_5_15']} ({run['cpu_model']}).", "",
             "Share of the held-out half's error energy removed by the other half's mean (1 = all of it is a "
             "fixed offset a table could remove; 0 = none; negative = the mean of the other half adds error). "
             "Per step: the same-input output error, median over the steps and the last step. Final: the "
             "accumulated latent error.", "",
             "| model | precision (ptq) | seeds | final rel. error | per step: channel mean (median / last) | "
             "per step: channel scale + bias on eps~ (median / last) | per step: pixel mean (median / last) | "
             "final: channel mean | final: channel scale + bias on x_0 | final: pixel mean |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in record["rows"]:
        def med(values: list[float]) -> float:
            return sorted(values)[len(values) // 2]
        lines.append(f"| {r['model']} | {r['precision']} ({r['ptq']}) | {r['seeds']} | {r['final_rel_error']:.2e} | "
                     f"{med(r['step_share_per_channel']):.3f} / {r['step_share_per_channel'][-1]:.3f} | "
                     f"{med(r['step_share_affine_per_channel']):.3f} / "
                     f"{r['step_share_affine_per_channel'][-1]:.3f} | "
                     f"{med(r['step_share_per_pixel']):.3f} / {r['step_share_per_pixel'][-1]:.3f} | "
                     f"{r['final_share_per_channel']:.3f} | {r['final_share_affine_per_channel']:.3f} | "
                     f"{r['final_share_per_pixel']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["digits-uncond", "digits-cond"])
    parser.add_argument("--precisions", nargs="+", default=["w8a8", "w4a16", "w4a8", "w4a4"])
    parser.add_argument("--seeds", type=int, default=64)
    parser.add_argument("--out", default=str(RESULTS / "error_structure"))
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from qdc_export.cli import _quiet_third_party
    from qdc_export.infra.provenance import run_provenance

    _quiet_third_party()
    record = {"run": run_provenance("python benchmarks/error_structure.py", sys.argv[1:]), "rows": []}
    seeds = list(range(300_000, 300_000 + args.seeds))  # apart from calibration, fit, held-out and parity seeds
    for model in args.models:
        for precision in args.precisions:
            start = time.perf_counter()
            row = paired_errors(model, precision, seeds)
            row["wall_s"] = round(time.perf_counter() - start, 1)
            record["rows"].append(row)
            print(json.dumps({k: v for k, v in row.items() if not k.startswith("step_")}), flush=True)
            Path(args.out + ".json").write_text(json.dumps(record, indent=2) + "\n")
            Path(args.out + ".md").write_text(markdown(record))
    print(markdown(record))


if __name__ == "__main__":
    main()
