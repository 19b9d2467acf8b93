"""Small trained reference models (sklearn ``load_digits``) for tests and benchmarks.

No model can be downloaded in this project's environments, so the compiler is exercised on two
tiny diffusers UNets trained from scratch on the 8x8 sklearn digits, upsampled to 32x32:

* ``digits-uncond`` -- :class:`diffusers.UNet2DModel` (DDPM-style, self-attention at 8x8).
* ``digits-cond``   -- :class:`diffusers.UNet2DConditionModel` (SD-style cross attention) conditioned
  on a learned per-class token table ``[11, S, D]`` (row 10 = null row for classifier-free guidance).

Images have **3 channels** (the gray digit replicated to RGB). Three channels keep the models
shaped like ordinary RGB pixel-space diffusers UNets (``DDPMPipeline`` output, ``conv_in``/``conv_out``
with C=3, non-trivial channel dims for per-channel quantization), and cost nothing measurable
against 1 channel: only ``conv_in``/``conv_out`` change.

This module only builds data/configs and provides the sampling loop; training lives in
``scripts/train_reference.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

MODEL_NAMES = ("digits-uncond", "digits-cond")
IMAGE_SIZE = 32
IN_CHANNELS = 3
NUM_CLASSES = 10
NULL_INDEX = 10
COND_TOKENS = 4  # S
CROSS_ATTENTION_DIM = 64  # D
GUIDANCE_SCALE = 5.0  # recommended CFG scale (conditional accuracy 0.77 at 3.0 vs 0.83 at 5.0)
NUM_TRAIN_TIMESTEPS = 1000
BETA_SCHEDULE = "squaredcos_cap_v2"

# Folder under the repository root that holds the shipped checkpoints.
MODELS_DIR = Path(__file__).resolve().parents[1] / "models"


# --------------------------------------------------------------------------------------------- data
def load_digits_arrays() -> tuple[torch.Tensor, torch.Tensor]:
    """Raw sklearn digits as float tensors: images ``[N, 8, 8]`` in [0, 16], labels ``[N]`` int64."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.images, dtype=torch.float32), torch.tensor(d.target, dtype=torch.int64)


def to_model_space(images8: torch.Tensor, size: int = IMAGE_SIZE, channels: int = IN_CHANNELS) -> torch.Tensor:
    """``[N, 8, 8]`` digits in [0, 16] -> ``[N, C, size, size]`` in [-1, 1] (bilinear upsampling)."""
    x = images8.unsqueeze(1) / 16.0 * 2.0 - 1.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.clamp(-1.0, 1.0).repeat(1, channels, 1, 1).contiguous()


def to_8x8(images: torch.Tensor) -> torch.Tensor:
    """Model-space images ``[N, C, H, W]`` in [-1, 1] -> gray ``[N, 64]`` (channel mean, area downsample)."""
    g = images.float().mean(dim=1, keepdim=True)
    return F.adaptive_avg_pool2d(g, (8, 8)).flatten(1)


def build_digits_dataset(size: int = IMAGE_SIZE, channels: int = IN_CHANNELS) -> tuple[torch.Tensor, torch.Tensor]:
    """The full training set: ``(images [1797, C, size, size] in [-1, 1], labels [1797])``."""
    images8, labels = load_digits_arrays()
    return to_model_space(images8, size, channels), labels


# ------------------------------------------------------------------------------------------ configs
def unet_config(name: str) -> dict[str, Any]:
    """Constructor kwargs for the UNet of ``name`` (diffusers built-in classes only)."""
    common: dict[str, Any] = {
        "sample_size": IMAGE_SIZE,
        "in_channels": IN_CHANNELS,
        "out_channels": IN_CHANNELS,
        "block_out_channels": (32, 64, 64),
        "layers_per_block": 1,
        "norm_num_groups": 8,
    }
    if name == "digits-uncond":
        return {
            **common,
            "down_block_types": ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
            "up_block_types": ("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
            "attention_head_dim": 32,
        }
    if name == "digits-cond":
        return {
            **common,
            # cross attention at 8x8 (down, mid, up): SD-style structure at half the CPU cost of 16x16
            "down_block_types": ("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
            "mid_block_type": "UNetMidBlock2DCrossAttn",
            "cross_attention_dim": CROSS_ATTENTION_DIM,
            "attention_head_dim": 4,  # diffusers legacy naming: number of heads (head dim 16)
            "transformer_layers_per_block": 1,
            "addition_embed_type": None,
        }
    raise ValueError(f"unknown reference model {name!r}; expected one of {MODEL_NAMES}")


def make_unet(name: str) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel, UNet2DModel

    cls = UNet2DConditionModel if name == "digits-cond" else UNet2DModel
    return cls(**unet_config(name))


def make_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS,
        beta_schedule=BETA_SCHEDULE,
        prediction_type="epsilon",
        clip_sample=True,
    )


def make_ddim(scheduler_config: dict[str, Any]):
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(scheduler_config)


# ------------------------------------------------------------------------------------- conditioning
def build_conditioning_table(generator: torch.Generator | None = None) -> torch.nn.Parameter:
    """Learnable "text-like" token table ``[NUM_CLASSES + 1, S, D]``; row ``NULL_INDEX`` is the null row."""
    t = torch.randn(NUM_CLASSES + 1, COND_TOKENS, CROSS_ATTENTION_DIM, generator=generator) * 0.5
    return torch.nn.Parameter(t)


def conditioning_config() -> dict[str, Any]:
    return {
        "num_classes": NUM_CLASSES,
        "null_index": NULL_INDEX,
        "guidance_scale": GUIDANCE_SCALE,
        "class_names": [str(i) for i in range(NUM_CLASSES)],
    }


def save_conditioning(folder: Path, table: torch.Tensor) -> None:
    from safetensors.torch import save_file

    folder = Path(folder) / "conditioning"
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"encoder_hidden_states": table.detach().float().contiguous().cpu()},
              str(folder / "embeddings.safetensors"))
    (folder / "config.json").write_text(json.dumps(conditioning_config(), indent=2) + "\n")


def load_conditioning(folder: Path) -> tuple[torch.Tensor, dict[str, Any]]:
    from safetensors.torch import load_file

    folder = Path(folder) / "conditioning"
    table = load_file(str(folder / "embeddings.safetensors"))["encoder_hidden_states"]
    return table, json.loads((folder / "config.json").read_text())


# ----------------------------------------------------------------------------------------- folders
def model_index(name: str) -> dict[str, Any]:
    import diffusers

    unet_cls = "UNet2DConditionModel" if name == "digits-cond" else "UNet2DModel"
    return {
        "_class_name": "DDPMPipeline",
        "_diffusers_version": diffusers.__version__,
        "unet": ["diffusers", unet_cls],
        "scheduler": ["diffusers", "DDPMScheduler"],
    }


def save_model_folder(folder: Path, name: str, unet, scheduler, table: torch.Tensor | None = None) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(str(folder / "unet"), safe_serialization=True)
    scheduler.save_pretrained(str(folder / "scheduler"))
    (folder / "model_index.json").write_text(json.dumps(model_index(name), indent=2) + "\n")
    if name == "digits-cond":
        assert table is not None, "digits-cond needs its conditioning table"
        save_conditioning(folder, table)


def load_model_folder(folder: Path):
    """``(unet, scheduler, table_or_None, cond_config_or_None)`` loaded with diffusers, safetensors only."""
    from diffusers import DDPMScheduler, UNet2DConditionModel, UNet2DModel

    folder = Path(folder)
    index = json.loads((folder / "model_index.json").read_text())
    cls = {"UNet2DModel": UNet2DModel, "UNet2DConditionModel": UNet2DConditionModel}[index["unet"][1]]
    unet = cls.from_pretrained(str(folder), subfolder="unet", use_safetensors=True).eval()
    scheduler = DDPMScheduler.from_pretrained(str(folder), subfolder="scheduler")
    if (folder / "conditioning").is_dir():
        table, cfg = load_conditioning(folder)
        return unet, scheduler, table, cfg
    return unet, scheduler, None, None


# ---------------------------------------------------------------------------------------- sampling
@torch.no_grad()
def sample(
    unet,
    scheduler_config: dict[str, Any],
    n: int,
    steps: int = 50,
    seed: int = 0,
    labels: torch.Tensor | None = None,
    table: torch.Tensor | None = None,
    guidance_scale: float = GUIDANCE_SCALE,
) -> torch.Tensor:
    """DDIM sampling (eta=0). Conditional when ``labels``/``table`` given (CFG with the null row).

    Returns images ``[n, C, H, W]`` clamped to [-1, 1].
    """
    ddim = make_ddim(scheduler_config)
    ddim.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    cfg = unet.config
    x = torch.randn(n, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    ehs = None
    if labels is not None:
        assert table is not None, "conditional sampling needs the conditioning table"
        ehs = torch.cat([table[labels], table[torch.full_like(labels, NULL_INDEX)]])
    for t in ddim.timesteps:
        if ehs is not None:
            eps_c, eps_u = unet(torch.cat([x, x]), t, encoder_hidden_states=ehs).sample.chunk(2)
            eps = eps_u + guidance_scale * (eps_c - eps_u)
        else:
            eps = unet(x, t).sample
        x = ddim.step(eps, t, x).prev_sample
    return x.clamp(-1.0, 1.0)


def save_grid(images: torch.Tensor, path: Path, nrow: int, scale: int = 2) -> None:
    """Save ``[N, C, H, W]`` images in [-1, 1] as a PNG grid with ``nrow`` images per row."""
    from PIL import Image

    imgs = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    n, c, h, w = imgs.shape
    rows = (n + nrow - 1) // nrow
    pad = 2
    canvas = torch.full((c, rows * (h + pad) + pad, nrow * (w + pad) + pad), 64, dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        y, xx = pad + r * (h + pad), pad + col * (w + pad)
        canvas[:, y:y + h, xx:xx + w] = imgs[i]
    arr = canvas.permute(1, 2, 0).numpy()
    mode = "L" if c == 1 else "RGB"
    im = Image.fromarray(arr[..., 0] if c == 1 else arr, mode=mode)
    im = im.resize((im.width * scale, im.height * scale), Image.Resampling.NEAREST)
    im.save(str(path))
