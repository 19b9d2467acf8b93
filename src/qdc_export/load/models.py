"""Load MODEL: a local diffusers folder (bare UNet or pipeline with unet/ and scheduler/), or a named
preset (the bundled trained reference models, or architectures built from config with random weights).
Weights are read from safetensors only: no pickle, no remote code, no download."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel, UNet2DModel
from safetensors.torch import load_file

from qdc_export.errors import ModelLoadError
from qdc_export.load.plugins import UNetAdapter, adapter_for
from qdc_export.load.plugins.base import ENCODER_HIDDEN_STATES, TIME_IDS, TensorSpec

MODELS_DIR = Path(__file__).resolve().parents[3] / "models"  # the repository's models/ (src/qdc_export/load/models.py)
TRAINED_PRESETS = ("digits-uncond", "digits-cond")
DEFAULT_MODEL = "digits-uncond"

_UNET_CLASSES = {"UNet2DModel": UNet2DModel, "UNet2DConditionModel": UNet2DConditionModel}


def _tiny_sd(**extra: Any) -> dict[str, Any]:
    return dict(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8, **extra,
    )


# Architectures built from config (random weights, seeded): test models and the full-size configs.
CONFIG_PRESETS: dict[str, tuple[type, dict[str, Any]]] = {
    "tiny-unet2d": (UNet2DModel, dict(
        sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )),
    "tiny-sd": (UNet2DConditionModel, _tiny_sd()),
    "tiny-sdxl": (UNet2DConditionModel, _tiny_sd(
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=16 + 6 * 8,
    )),
    # Published configs of the full-size models (random weights): SD 1.5 and SDXL base.
    "sd15": (UNet2DConditionModel, dict(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )),
    "sdxl": (UNet2DConditionModel, dict(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280), cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
        transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )),
}
_PRESET_SEQUENCE_LENGTH = {"tiny-sd": 8, "tiny-sdxl": 8}


@dataclass
class Conditioning:
    """Conditioning per sample index: rows of a learned table (reference models: index -> class) or,
    for models built from config, seeded Gaussian tensors. ``uncond`` feeds classifier-free guidance."""

    specs: list[TensorSpec]
    table: dict[str, torch.Tensor] = field(default_factory=dict)
    num_classes: int = 0
    null_index: int = -1
    guidance_scale: float = 1.0
    image_size: int = 0

    def labels(self, indices: list[int]) -> list[int]:
        return [i % self.num_classes for i in indices] if self.num_classes else []

    def for_samples(self, indices: list[int]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        cond: dict[str, torch.Tensor] = {}
        uncond: dict[str, torch.Tensor] = {}
        for spec in self.specs:
            if spec.name in self.table:
                rows = self.table[spec.name]
                cond[spec.name] = rows[torch.tensor(self.labels(indices))]
                uncond[spec.name] = rows[self.null_index].expand_as(cond[spec.name]).clone()
            elif spec.name == TIME_IDS:  # SDXL micro-conditioning: original size, crop, target size
                size = float(self.image_size)
                ids = torch.tensor([size, size, 0.0, 0.0, size, size])
                cond[spec.name] = ids.expand(len(indices), 6).clone()
                uncond[spec.name] = cond[spec.name].clone()
            else:
                shape = spec.concrete(1)[1:]
                cond[spec.name] = torch.stack([
                    torch.randn(shape, generator=torch.Generator().manual_seed(10_000 + i)) for i in indices
                ])
                uncond[spec.name] = torch.zeros_like(cond[spec.name])
        return cond, uncond


@dataclass
class LoadedModel:
    unet: torch.nn.Module
    adapter: UNetAdapter
    scheduler_config: dict[str, Any]
    conditioning: Conditioning
    source: dict[str, Any]

    @property
    def conditional(self) -> bool:
        return bool(self.conditioning.specs)

    @property
    def released(self) -> bool:
        return any(p.numel() == 0 for p in self.unet.parameters())

    def release_weights(self) -> None:
        """Free the UNet's weights: a full-size FP UNet is the largest thing a build holds, and its check needs
        it only for the FP trajectories. The data of each Parameter object is replaced in place (``.data``),
        not the module's attributes (``.to("meta")``): the captured graphs hold the same Parameter objects,
        and a graph still reachable from elsewhere (measured: PT2E's observed module) would keep the old
        storage alive. The UNet is unusable afterwards (``released``)."""
        with torch.no_grad():
            for tensor in [*self.unet.parameters(), *self.unet.buffers()]:
                tensor.data = torch.empty(0, dtype=tensor.dtype)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from None


def _load_unet_folder(folder: Path) -> torch.nn.Module:
    config = _read_json(folder / "config.json")
    cls_name = config.get("_class_name")
    if cls_name not in _UNET_CLASSES:
        raise ModelLoadError(
            f"unsupported architecture {cls_name!r} in {folder}; supported: {', '.join(_UNET_CLASSES)}"
        )
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        raise ModelLoadError(f"{folder} has no .safetensors weights (pickle checkpoints are not loaded)")
    try:
        unet = _UNET_CLASSES[cls_name].from_pretrained(folder, use_safetensors=True, local_files_only=True)
    except Exception as exc:  # diffusers raises many types for broken folders
        raise ModelLoadError(f"cannot load UNet from {folder}: {str(exc).splitlines()[0]}") from None
    return unet.eval()


SCHEDULER_CONFIG = "scheduler_config.json"
# Scheduler configs of the config presets, recorded here as their model folders would ship them: the pixel-space
# preset takes diffusers' DDPMScheduler defaults (google/ddpm-* style, x0 clipping on); the latent presets take
# the published Stable Diffusion scheduler config (scaled_linear betas, no clipping, leading + offset 1).
_LATENT_PRESET_SCHEDULER: dict[str, Any] = {
    "_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1, "timestep_spacing": "leading",
    "num_train_timesteps": 1000, "prediction_type": "epsilon",
}


def _preset_scheduler_config(name: str) -> dict[str, Any]:
    if CONFIG_PRESETS[name][0] is UNet2DModel:
        return {**DDPMScheduler().config, "_class_name": "DDPMScheduler"}
    return dict(_LATENT_PRESET_SCHEDULER)


def _find_scheduler_config(unet_dir: Path, root: Path | None, explicit: Path | dict[str, Any] | None,
                           folder: Path) -> tuple[dict[str, Any], str]:
    """Where diffusers finds it: an explicit path (file or folder), a pipeline's ``scheduler/``, or
    ``scheduler_config.json`` beside a bare UNet (``SchedulerMixin.from_pretrained(folder)``)."""
    if isinstance(explicit, dict):
        return dict(explicit), "given"
    if explicit is not None:
        path = Path(explicit)
        path = path / SCHEDULER_CONFIG if path.is_dir() else path
        if not path.is_file():
            raise ModelLoadError(f"--scheduler-config {explicit}: no such file (expected a {SCHEDULER_CONFIG})")
        return _read_json(path), str(path.resolve())
    candidates = [root / "scheduler" / SCHEDULER_CONFIG] if root else [unet_dir / SCHEDULER_CONFIG]
    for path in candidates:
        if path.is_file():
            return _read_json(path), str(path.resolve())
    raise ModelLoadError(
        f"{folder} has no scheduler config ({candidates[0]} is missing); the build must sample as the model's "
        f"pipeline does: add it there or pass --scheduler-config PATH")


def _conditioning(unet: torch.nn.Module, adapter: UNetAdapter, folder: Path | None) -> Conditioning:
    specs = adapter.condition_specs(unet)
    size = unet.config.sample_size
    cond = Conditioning(specs=specs, image_size=int(size if isinstance(size, int) else size[0]) * 8)
    if not specs:
        return cond
    cond.guidance_scale = 2.0
    table_dir = folder / "conditioning" if folder else None
    if table_dir and (table_dir / "embeddings.safetensors").is_file():
        meta = _read_json(table_dir / "config.json")
        cond.table = load_file(str(table_dir / "embeddings.safetensors"))
        cond.num_classes = int(meta["num_classes"])
        cond.null_index = int(meta["null_index"])
        cond.guidance_scale = float(meta.get("guidance_scale", cond.guidance_scale))
        if ENCODER_HIDDEN_STATES in cond.table:
            # The table fixes the sequence length; record it where the adapter reads it, so capture,
            # the manifest and the engine all agree (the UNet config alone does not know it).
            unet.register_to_config(qdc_sequence_length=int(cond.table[ENCODER_HIDDEN_STATES].shape[1]))
        cond.specs = adapter.condition_specs(unet)
    return cond


def build_preset(name: str, seed: int = 0) -> torch.nn.Module:
    cls, kwargs = CONFIG_PRESETS[name]
    torch.manual_seed(seed)
    unet = cls(**kwargs).eval()
    if name in _PRESET_SEQUENCE_LENGTH:
        unet.register_to_config(qdc_sequence_length=_PRESET_SEQUENCE_LENGTH[name])
    return unet


def load_model(model: str | None, scheduler_config: Path | str | dict[str, Any] | None = None) -> LoadedModel:
    """MODEL: a folder path, a trained preset name, or a config preset name; None = the default model.
    ``scheduler_config``: a scheduler_config.json (or a folder holding one, or the dict itself) that replaces
    the one found with the model."""
    model = model or DEFAULT_MODEL
    path = Path(model)
    if model in TRAINED_PRESETS and not path.exists():
        path = MODELS_DIR / model
        if not path.is_dir():
            raise ModelLoadError(f"bundled model {model!r} is missing from {MODELS_DIR}")
    if model in CONFIG_PRESETS and not path.exists():
        unet = build_preset(model)
        adapter = adapter_for(unet)
        source = {"kind": "config-preset", "name": model, "seed": 0}
        if scheduler_config is None:
            sched, source["scheduler_config"] = _preset_scheduler_config(model), "preset"
        else:
            sched, source["scheduler_config"] = _find_scheduler_config(Path(), None, _explicit(scheduler_config), path)
        return LoadedModel(unet, adapter, sched, _conditioning(unet, adapter, None), source)
    if not path.exists():
        raise ModelLoadError(
            f"MODEL {model!r} is neither a folder nor a preset "
            f"({', '.join(TRAINED_PRESETS + tuple(CONFIG_PRESETS))})"
        )
    if not path.is_dir():
        raise ModelLoadError(f"MODEL {model!r} is not a folder; expected a diffusers model folder")
    if (path / "unet" / "config.json").is_file():
        unet_dir, root = path / "unet", path
    elif (path / "config.json").is_file():
        unet_dir, root = path, None
    else:
        raise ModelLoadError(f"{path} is not a diffusers folder (no config.json or unet/config.json)")
    unet = _load_unet_folder(unet_dir)
    adapter = adapter_for(unet)
    sched, sched_source = _find_scheduler_config(unet_dir, root, _explicit(scheduler_config), path)
    source = {"kind": "folder", "path": str(path.resolve()), "name": path.name, "scheduler_config": sched_source}
    return LoadedModel(unet, adapter, sched, _conditioning(unet, adapter, root), source)


def _explicit(scheduler_config: Path | str | dict[str, Any] | None) -> Path | dict[str, Any] | None:
    return Path(scheduler_config) if isinstance(scheduler_config, str) else scheduler_config


def conditioning_from_build(folder: Path, manifest: dict[str, Any]) -> Conditioning:
    """The conditioning a build was made with, from the build folder alone (no source model needed)."""
    meta = manifest["conditioning"]
    specs = [TensorSpec(i["name"], tuple(i["shape"]), i["dtype"]) for i in manifest["io"]["inputs"][2:]
             if i["name"] in meta["names"]]  # not comp_state, the last input of stateful builds
    cond = Conditioning(specs=specs, num_classes=int(meta["num_classes"]), null_index=int(meta["null_index"]),
                        guidance_scale=float(meta["guidance_scale"]), image_size=int(meta["image_size"]))
    if meta.get("table"):
        cond.table = load_file(str(folder / meta["table"]))
    return cond


def io_description(model: LoadedModel) -> dict[str, Any]:
    inputs = [{"name": s.name, "shape": list(s.shape), "dtype": s.dtype} for s in model.adapter.input_specs(model.unet)]
    out = model.adapter.output_spec(model.unet)
    outputs = [{"name": out.name, "shape": list(out.shape), "dtype": out.dtype}]
    return {"inputs": inputs, "outputs": outputs, "dynamic_axes": {"batch": "axis 0 of every input and output"}}
