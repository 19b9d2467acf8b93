"""``qdc-export sample``: images from a build folder's engine, written as PNG (no source model needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from qdc_export.engines.select import denoiser_from_build
from qdc_export.errors import OutputExistsError
from qdc_export.load.models import conditioning_from_build
from qdc_export.manifest import read_manifest, verify_artifacts
from qdc_export.sampling import Episode, latents_to_images, make_scheduler, run_episode


def to_pil(image: torch.Tensor) -> Image.Image:
    """[C, H, W] in [0, 1] -> PIL (1 or 3 channels; other channel counts show the first 3)."""
    array = (image.clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    if array.shape[0] == 1:
        return Image.fromarray(array[0], mode="L")
    return Image.fromarray(np.ascontiguousarray(array[:3].transpose(1, 2, 0)), mode="RGB")


def sample_build(build_dir: Path, *, seeds: list[int], out: Path, provider: str = "cpu", force: bool = False,
                 batch: int = 8, progress: bool = False) -> list[Path]:
    manifest = read_manifest(build_dir)
    verify_artifacts(build_dir, manifest)
    names = [out / f"seed{seed:06d}.png" for seed in seeds]
    clashes = [p for p in names if p.exists()]
    if clashes and not force:
        raise OutputExistsError(f"{clashes[0]} exists ({len(clashes)} images would be overwritten); pass --force")
    conditioning = conditioning_from_build(build_dir, manifest)
    denoiser = denoiser_from_build(build_dir, provider)
    scheduler = make_scheduler(manifest["scheduler"]["name"], manifest["scheduler"]["config"])
    shape = tuple(manifest["io"]["inputs"][0]["shape"][1:])
    out.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(seeds), batch):
        chunk = seeds[start:start + batch]
        episode = Episode.from_seeds(scheduler, manifest["scheduler"]["steps"], conditioning, shape, chunk)
        traj = run_episode(denoiser, episode, record=False, progress=progress)
        for image, path in zip(latents_to_images(traj.final), names[start:start + batch]):
            tmp = path.with_suffix(".png.tmp")
            to_pil(image).save(tmp, format="PNG")
            tmp.replace(path)
    return names
