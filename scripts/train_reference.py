#!/usr/bin/env python
"""Train a reference digits diffusion model and save it as a diffusers pipeline folder.

    python scripts/train_reference.py --model digits-uncond --out models/digits-uncond --minutes 15
    python scripts/train_reference.py --model digits-cond   --out models/digits-cond   --minutes 15

Standard DDPM epsilon-prediction MSE on sklearn digits (8x8 -> 32x32 bilinear, 3 channels, [-1, 1]),
AdamW with linear warmup + cosine decay, EMA of the weights (the EMA weights are what is saved).
The conditional model learns its class-token table jointly, with label dropout to the null row.

Reproducibility: everything is seeded. With ``--minutes`` only, the number of steps is estimated
from the measured speed (so it depends on the machine); the step count actually run is written to
``<out>/training.json`` and passing it back as ``--max-steps`` reruns the same schedule exactly
(bitwise identity additionally needs the same thread count / CPU kernels).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import reference_models as ref
import torch
import torch.nn.functional as F


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, choices=ref.MODEL_NAMES)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--minutes", type=float, default=15.0, help="wall-clock training budget")
    p.add_argument("--max-steps", type=int, default=None, help="fixed step count (overrides the estimate)")
    p.add_argument("--schedule-steps", type=int, default=None,
                   help="length of the lr schedule if it differs from --max-steps (to replay a run cut short "
                        "by its time budget: --max-steps <steps done> --schedule-steps <steps planned>)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--ema-decay", type=float, default=0.995)
    p.add_argument("--cond-drop", type=float, default=0.12, help="label dropout to the null row")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sample-steps", type=int, default=50)
    p.add_argument("--init-from", type=Path, default=None,
                   help="continue from a saved model folder (its EMA weights / table) instead of random init")
    return p.parse_args(argv)


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    g = seed_everything(args.seed)
    cond = args.model == "digits-cond"

    images, labels = ref.build_digits_dataset()
    unet = ref.make_unet(args.model).train()
    scheduler = ref.make_scheduler()
    table = ref.build_conditioning_table(g) if cond else None
    if args.init_from is not None:
        init_unet, _, init_table, _ = ref.load_model_folder(args.init_from)
        unet.load_state_dict(init_unet.state_dict())
        if cond:
            table.data.copy_(init_table)
        print(f"initialised from {args.init_from}", flush=True)
    params = list(unet.parameters()) + ([table] if cond else [])
    n_params = sum(p.numel() for p in unet.parameters())
    print(f"{args.model}: unet params {n_params:,}" + (f", table {table.numel():,}" if cond else ""), flush=True)

    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2, betas=(0.9, 0.99))
    ema_unet = copy.deepcopy(unet).eval().requires_grad_(False)
    ema_table = table.detach().clone() if cond else None
    alphas_cumprod = scheduler.alphas_cumprod.float()

    budget_s = args.minutes * 60.0
    max_steps = args.max_steps
    est_steps = args.schedule_steps or max_steps or 10**9
    stop_steps = max_steps or 10**9
    t_start = time.time()
    losses: list[float] = []
    step = 0
    while step < min(est_steps, stop_steps):
        if time.time() - t_start > budget_s and args.max_steps is None:
            break
        # lr: linear warmup then cosine to 2% over the (estimated) total
        if step < args.warmup:
            lr = args.lr * (step + 1) / args.warmup
        else:
            prog = min(1.0, (step - args.warmup) / max(1, est_steps - args.warmup))
            lr = args.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * prog)))
        for group in opt.param_groups:
            group["lr"] = lr

        idx = torch.randint(0, images.shape[0], (args.batch_size,), generator=g)
        x0 = images[idx]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (args.batch_size,), generator=g)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        if cond:
            y = labels[idx].clone()
            drop = torch.rand(args.batch_size, generator=g) < args.cond_drop
            y[drop] = ref.NULL_INDEX
            pred = unet(xt, t, encoder_hidden_states=table[y]).sample
        else:
            pred = unet(xt, t).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        losses.append(loss.item())

        with torch.no_grad():
            d = min(args.ema_decay, (1 + step) / (10 + step))
            for pe, pm in zip(ema_unet.parameters(), unet.parameters()):
                pe.lerp_(pm, 1 - d)
            if cond:
                ema_table.lerp_(table.detach(), 1 - d)

        if step == 10:
            t10 = time.time()
        if step == 40 and max_steps is None and args.schedule_steps is None:
            # estimate the total step count from the measured speed (excluding the first steps)
            sps = (time.time() - t10) / 30
            est_steps = max(args.warmup + 1, int((budget_s - (time.time() - t_start)) / sps * 0.97) + step)
            print(f"{sps:.3f} s/step -> planning {est_steps} steps", flush=True)
        if step % 50 == 0:
            el = time.time() - t_start
            print(f"step {step}/{est_steps} loss(avg50) {np.mean(losses[-50:]):.4f} lr {lr:.2e} "
                  f"elapsed {el / 60:.1f} min", flush=True)

    train_s = time.time() - t_start
    final_loss = float(np.mean(losses[-200:]))
    print(f"done: {step} steps in {train_s / 60:.1f} min, final loss (mean last 200) {final_loss:.4f}", flush=True)

    out = args.out
    ref.save_model_folder(out, args.model, ema_unet, scheduler, ema_table)
    info = {
        "model": args.model,
        "steps": step,
        "planned_schedule_steps": est_steps,
        "train_seconds": round(train_s, 1),
        "final_loss_mean_last_200": round(final_loss, 5),
        "unet_params": n_params,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "torch": torch.__version__,
        "command": " ".join([Path(sys.argv[0]).as_posix()] + (argv or sys.argv[1:])),
        "loss_curve_avg100": [round(float(np.mean(losses[i:i + 100])), 5) for i in range(0, len(losses), 100)],
    }
    (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")

    # sample grid from the saved EMA weights
    t0 = time.time()
    if cond:
        per_row = 8
        ys = torch.arange(10).repeat_interleave(per_row)
        imgs = ref.sample(ema_unet, dict(scheduler.config), len(ys), steps=args.sample_steps, seed=args.seed,
                          labels=ys, table=ema_table, guidance_scale=ref.GUIDANCE_SCALE)
        ref.save_grid(imgs, out / "samples.png", nrow=per_row)
    else:
        imgs = ref.sample(ema_unet, dict(scheduler.config), 64, steps=args.sample_steps, seed=args.seed)
        ref.save_grid(imgs, out / "samples.png", nrow=8)
    print(f"samples.png written ({time.time() - t0:.1f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
