"""The report's pictures: the image grid (FP | quantized | compensated, PSNR under each tile), the per-step latent
error curves ||x~_n - x_n|| / ||x_n||, and the per-layer sensitivity bar chart."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont

from qdc_export.report.samples import to_pil

UPSCALE = 4
WORST_LAYERS = 30


def _font(size: int) -> Any:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def image_grid(
    columns: list[tuple[str, torch.Tensor, list[float] | None]], path: Path, *, per_row: int = 4
) -> None:
    """Images in groups of ``per_row`` seeds; within a group one row per column kind (FP, quantized, ...), each
    tile upscaled x4 with its PSNR (dB) underneath."""
    n = columns[0][1].shape[0]
    size = columns[0][1].shape[-1] * UPSCALE
    label_w, cap_h, pad = 150, 20, 6
    groups = math.ceil(n / per_row)
    width = label_w + per_row * (size + pad) + pad
    height = groups * (len(columns) * (size + cap_h + pad) + 14) + 24
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    font, small = _font(14), _font(13)
    for g in range(groups):
        y0 = 24 + g * (len(columns) * (size + cap_h + pad) + 14)
        for k in range(per_row):
            i = g * per_row + k
            if i < n:
                draw.text((label_w + pad + k * (size + pad), y0 - 18), f"seed {i}", fill="black", font=small)
        for c, (title, images, values) in enumerate(columns):
            y = y0 + c * (size + cap_h + pad)
            for line_no, part in enumerate(title.split("\n")):
                draw.text((6, y + size // 2 - 16 + 16 * line_no), part, fill="black", font=small)
            for k in range(per_row):
                i = g * per_row + k
                if i >= n:
                    continue
                x = label_w + pad + k * (size + pad)
                tile = to_pil(images[i]).convert("RGB").resize((size, size), Image.Resampling.NEAREST)
                canvas.paste(tile, (x, y))
                caption = (
                    "reference"
                    if values is None
                    else ("identical" if math.isinf(values[i]) else f"{values[i]:.2f} dB")
                )
                draw.text((x + 4, y + size + 2), caption, fill="black", font=font)
    canvas.save(path)


def plot_error_curves(curves: dict[str, list[float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=110)
    for label, curve in curves.items():  # step 0 (the shared starting noise) has error 0: not on a log axis
        ax.plot(range(1, len(curve)), curve[1:], marker="o", markersize=3, label=label)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_yscale("log")
    ax.set_xlabel("sampler steps taken (error is 0 at step 0, the shared starting noise)")
    ax.set_ylabel("||x~_n - x_n|| / ||x_n||")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_sensitivity(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    worst = rows[:WORST_LAYERS][::-1]
    fig, ax = plt.subplots(figsize=(8, 0.28 * max(len(worst), 4) + 1.2), dpi=110)
    values = [min(r["sqnr_db"], 200.0) for r in worst]
    ax.barh(range(len(worst)), values, color="tab:red")
    ax.set_yticks(range(len(worst)), [r["layer"] for r in worst], fontsize=7)
    ax.set_xlabel("output SQNR with only this layer quantized (dB; lower = more sensitive)")
    ax.set_title(title, fontsize=10)
    for k, v in enumerate(values):
        ax.text(v, k, f" {v:.1f}", va="center", fontsize=7)
    ax.set_xlim(0, max(values + [1.0]) * 1.12)
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
