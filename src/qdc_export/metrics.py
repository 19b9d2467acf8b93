"""Error statistics and image-fidelity metrics shared by parity checks, benchmarks and reports."""

from __future__ import annotations

import math

import numpy as np
import torch


def error_stats(reference: np.ndarray, actual: np.ndarray) -> dict[str, float]:
    """max/mean/p99 absolute error, SNR (dB), cosine similarity and gain of ``actual`` against ``reference``. The gain
    <reference, actual> / <reference, reference> is the least-squares scale from one to the other: a scaled output
    moves it by the scale (cosine cannot see a scaling), an error orthogonal to the output barely moves it."""
    ref = np.asarray(reference, dtype=np.float64).ravel()
    act = np.asarray(actual, dtype=np.float64).ravel()
    diff = np.abs(ref - act)
    noise = float(np.mean(diff**2))
    signal = float(np.mean(ref**2))
    denom = float(np.linalg.norm(ref) * np.linalg.norm(act))
    return {
        "max_abs": float(diff.max()),
        "mean_abs": float(diff.mean()),
        "p99_abs": float(np.quantile(diff, 0.99)),
        "snr_db": math.inf if noise == 0 else 10 * math.log10(max(signal, 1e-30) / noise),
        "cosine": 1.0 if denom == 0 else float(np.dot(ref, act) / denom),
        "gain": 1.0 if not ref.any() else float(np.dot(ref, act) / np.dot(ref, ref)),
    }


def psnr(reference: torch.Tensor, images: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image PSNR (dB) of images in [0, data_range]; identical images give +inf."""
    mse = (reference.double() - images.double()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(data_range**2 / mse)


def ssim(reference: torch.Tensor, images: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004): 7x7 uniform window, channels averaged."""
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    x, y = reference.double(), images.double()
    channels = x.shape[1]
    kernel = torch.ones(channels, 1, 7, 7, dtype=torch.float64) / 49.0

    def blur(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(t, kernel, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(1)


def relative_latent_error(reference: list[torch.Tensor], actual: list[torch.Tensor]) -> list[float]:
    """||x~_n - x_n|| / ||x_n|| per step (mean over the batch): the error-accumulation curve."""
    out = []
    for ref, act in zip(reference, actual):
        num = (act - ref).flatten(1).norm(dim=1)
        den = ref.flatten(1).norm(dim=1).clamp_min(1e-12)
        out.append(float((num / den).mean()))
    return out
