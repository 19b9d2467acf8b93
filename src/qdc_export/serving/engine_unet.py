"""A build's ONNX engine as a drop-in ``pipe.unet`` for diffusers pipelines.

    pipe = StableDiffusionPipeline.from_pretrained(MODEL_DIR)
    pipe.unet = EngineUNet.from_build(BUILD_DIR, provider="cpu")
    images = pipe(prompt, num_inference_steps=20, generator=torch.Generator().manual_seed(0)).images

The drop-in takes the call signature of the diffusers UNet it replaces (``UNet2DModel`` or
``UNet2DConditionModel``: ``sample, timestep, encoder_hidden_states, added_cond_kwargs, return_dict``),
exposes what pipelines read (``config``, ``dtype``, ``device``, ``add_embedding.linear_1.in_features``, ...),
takes and returns torch tensors, and owns the compensation state:

* a generation starts when the engine is called at the first timestep of the build's schedule: the state is
  reset (zeros) and the schedule guard runs (:mod:`.schedule_guard`) against the calling pipeline's scheduler
  (found on the call stack, or given with ``scheduler=``);
* every later call must be at the schedule's next timestep with the same batch; anything else is a schedule
  mismatch (one-line :class:`ScheduleMismatchError`);
* the state is kept per batch row: row i of ``comp_state`` is row i's previous raw output. Classifier-free
  guidance batches [uncond; cond] in the same order at every step, so each branch carries its own state,
  which is what the build's fit and parity check run (compensation/stage.py).

``allow_schedule_mismatch=True`` runs a mismatched schedule without compensation instead of refusing: the raw
model output is ``comp_state_out`` for stateful builds, and for stateless ones the folded affine head is
inverted with the build's own tables (``eps = (noise_pred + bias[r]) / scale[r]``, same row lookup).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from diffusers.configuration_utils import FrozenDict

from qdc_export.compensation import CompensationTables
from qdc_export.engines.onnxruntime import OrtDenoiser
from qdc_export.engines.select import denoiser_from_build
from qdc_export.errors import UserError
from qdc_export.load.plugins.base import TEXT_EMBEDS, TIME_IDS
from qdc_export.manifest import read_manifest, verify_artifacts
from qdc_export.serving.schedule_guard import (
    TIMESTEP_ATOL,
    ScheduleMismatchError,
    calling_pipeline_scheduler,
    schedule_mismatch,
)

MODEL_FILE = "model.onnx"
COMPENSATION_DIR = "compensation"


def _host(tensor: torch.Tensor) -> torch.Tensor:
    """float32 on the host, as the session takes it (no copy when it already is)."""
    tensor = tensor.detach()
    if tensor.device.type == "cpu" and tensor.dtype == torch.float32:
        return tensor
    return tensor.to("cpu", torch.float32)


class EngineUNet(torch.nn.Module):
    """Base of the two drop-ins; use :meth:`from_build`, which picks the one matching the build's UNet class."""

    def __init__(self, build_dir: Path, manifest: dict[str, Any], engine: OrtDenoiser, *,
                 scheduler: Any = None, allow_schedule_mismatch: bool = False) -> None:
        super().__init__()
        self.build_dir, self.manifest, self.engine = Path(build_dir), manifest, engine
        self.config = FrozenDict(manifest["model"]["unet_config"])
        self.scheduler = scheduler
        self.allow_schedule_mismatch = allow_schedule_mismatch
        self.schedule = manifest["scheduler"]
        self.timesteps = [float(t) for t in self.schedule["timesteps"]]
        self.cond_names: list[str] = list(manifest["conditioning"]["names"])
        compensation = manifest.get("compensation", {})
        self.compensated = bool(compensation.get("folded")) and not compensation.get("rejected")
        self.stateful = engine.stateful
        self._tables = (CompensationTables.load(self.build_dir / COMPENSATION_DIR)
                        if self.compensated and not self.stateful else None)
        self.step: int | None = None  # index into the build's timesteps of the current call; None = no generation
        self.compensating = True  # False for a generation that runs without compensation
        self.schedule_note: str | None = None  # why the current generation runs without compensation
        if self.config.get("addition_embed_type") == "text_time":  # SDXL pipelines check this width
            width = int(self.config["projection_class_embeddings_input_dim"])
            self.add_embedding = SimpleNamespace(linear_1=SimpleNamespace(in_features=width))
        self.encoder_hid_proj = None

    # ---- construction ------------------------------------------------------------------------------------
    @classmethod
    def from_build(cls, build_dir: Path | str, provider: str = "cpu", *, scheduler: Any = None,
                   allow_schedule_mismatch: bool = False, verify: bool = True) -> EngineUNet:
        """``scheduler``: the client's scheduler, when the engine is not called from a pipeline that owns it.
        ``verify``: check the artifacts' sha256 against the manifest first."""
        build_dir = Path(build_dir)
        manifest = read_manifest(build_dir)
        if verify:
            verify_artifacts(build_dir, manifest)
        unet_class = manifest["model"]["unet_class"]
        kinds = {"UNet2DModel": EngineUNet2DModel, "UNet2DConditionModel": EngineUNet2DConditionModel}
        if unet_class not in kinds:
            raise UserError(f"{build_dir}: no drop-in for a {unet_class} build")
        engine = denoiser_from_build(build_dir, provider)  # the runtime the manifest's target names
        return kinds[unet_class](build_dir, manifest, engine, scheduler=scheduler,
                                 allow_schedule_mismatch=allow_schedule_mismatch)

    # ---- what pipelines read -----------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")  # tensors in and out live on the host; the provider decides where it runs

    @property
    def in_channels(self) -> int:
        return int(self.config["in_channels"])

    @property
    def sample_size(self) -> Any:
        return self.config["sample_size"]

    def reset(self) -> None:
        """Forget the current generation (the next call must be at the schedule's first timestep)."""
        self.step, self.engine.state, self.compensating, self.schedule_note = None, None, True, None

    # ---- one engine call ---------------------------------------------------------------------------------
    @staticmethod
    def _timestep_value(timestep: Any, batch: int) -> float:
        """The one timestep value of this call (pipelines pass a 0-d tensor, a [1] or a [B] tensor, or a number)."""
        if isinstance(timestep, (int, float)):
            return float(timestep)
        t = torch.as_tensor(timestep).detach()
        if t.numel() == 1:
            return float(t)
        if t.numel() != batch:
            raise UserError(f"timestep has {t.numel()} values for a batch of {batch}")
        flat = t.reshape(-1).to("cpu", torch.float32)
        if not bool((flat == flat[0]).all()):
            raise UserError("the engine's rows must share one timestep per call (one schedule position)")
        return float(flat[0])

    def _mismatch(self, why: str) -> None:
        if not self.allow_schedule_mismatch or not self.compensated:
            if self.compensated:
                raise ScheduleMismatchError(
                    f"schedule mismatch: {why}; this engine's compensation is fitted to its build's schedule "
                    f"(pass allow_schedule_mismatch=True to run it without compensation)")
            return  # nothing schedule-specific in an uncompensated engine
        if self.compensating:
            warnings.warn(f"schedule mismatch ({why}): running this generation without compensation", stacklevel=4)
        self.compensating, self.schedule_note = False, why

    def _advance(self, t: float, batch: int) -> None:
        """Track the position in the build's schedule; reset the state at the first step of a generation."""
        if abs(t - self.timesteps[0]) <= TIMESTEP_ATOL:
            self.step, self.compensating, self.schedule_note = 0, True, None
            self.engine.reset(batch)
            scheduler = self.scheduler or calling_pipeline_scheduler(self)
            why = schedule_mismatch(self.schedule, scheduler) if scheduler is not None else None
            if why:
                self._mismatch(why)
            return
        nxt = None if self.step is None else self.step + 1
        state = self.engine.state
        if nxt is not None and nxt < len(self.timesteps) and abs(t - self.timesteps[nxt]) <= TIMESTEP_ATOL \
                and (state is None or state.shape[0] == batch):
            self.step = nxt
            return
        scheduler = self.scheduler or calling_pipeline_scheduler(self)
        why = schedule_mismatch(self.schedule, scheduler) if scheduler is not None else None
        if why:
            pass
        elif nxt is not None and nxt < len(self.timesteps) and state is not None and state.shape[0] != batch:
            why = f"batch {batch} at step {nxt}, the generation started with batch {state.shape[0]}"
        elif nxt is None or nxt >= len(self.timesteps):
            why = f"first call at timestep {t:g}, the build's schedule starts at {self.timesteps[0]:g}"
        else:
            why = f"timestep {t:g} after step {self.step}, the build's schedule has {self.timesteps[nxt]:g} there"
        self.step = None
        self.engine.reset(batch)
        self._mismatch(why)

    def _run(self, sample: torch.Tensor, timestep: Any, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        batch = sample.shape[0]
        t = self._timestep_value(timestep, batch)
        self._advance(t, batch)
        out = self.engine(_host(sample), torch.full((batch,), t, dtype=torch.float32),
                          {k: _host(v) for k, v in cond.items()})
        if not self.compensating:
            out = self._uncompensated(out, t)
        return out if (out.device, out.dtype) == (sample.device, sample.dtype) else out.to(sample.device, sample.dtype)

    def _uncompensated(self, noise_pred: torch.Tensor, t: float) -> torch.Tensor:
        if self.stateful:  # comp_state_out is the raw model output
            return torch.from_numpy(np.array(self.engine.state))
        if self._tables is None:
            return noise_pred
        row = self._tables.row_for(t)
        view = (1, -1) + (1,) * (noise_pred.dim() - 2)
        scale = torch.from_numpy(self._tables.scale[row]).reshape(view)
        bias = torch.from_numpy(self._tables.bias[row]).reshape(view)
        return (noise_pred + bias) / scale


class EngineUNet2DModel(EngineUNet):
    """Drop-in for ``UNet2DModel`` (DDPMPipeline, DDIMPipeline)."""

    def forward(self, sample: torch.Tensor, timestep: Any, class_labels: torch.Tensor | None = None,
                return_dict: bool = True) -> Any:
        if class_labels is not None:
            raise UserError("this engine takes no class_labels")
        from diffusers.models.unets.unet_2d import UNet2DOutput

        out = self._run(sample, timestep, {})
        return UNet2DOutput(sample=out) if return_dict else (out,)


class EngineUNet2DConditionModel(EngineUNet):
    """Drop-in for ``UNet2DConditionModel`` (StableDiffusionPipeline, StableDiffusionXLPipeline)."""

    def forward(self, sample: torch.Tensor, timestep: Any, encoder_hidden_states: torch.Tensor,
                class_labels: torch.Tensor | None = None, timestep_cond: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, cross_attention_kwargs: dict[str, Any] | None = None,
                added_cond_kwargs: dict[str, torch.Tensor] | None = None, down_block_additional_residuals: Any = None,
                mid_block_additional_residual: Any = None, down_intrablock_additional_residuals: Any = None,
                encoder_attention_mask: torch.Tensor | None = None, return_dict: bool = True) -> Any:
        unsupported = {"class_labels": class_labels, "timestep_cond": timestep_cond, "attention_mask": attention_mask,
                       "cross_attention_kwargs": cross_attention_kwargs,
                       "down_block_additional_residuals": down_block_additional_residuals,
                       "mid_block_additional_residual": mid_block_additional_residual,
                       "down_intrablock_additional_residuals": down_intrablock_additional_residuals,
                       "encoder_attention_mask": encoder_attention_mask}
        given = [name for name, value in unsupported.items() if value is not None]
        if given:
            raise UserError(f"the engine does not take {', '.join(given)} (not part of the exported graph)")
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        cond = {"encoder_hidden_states": encoder_hidden_states}
        for name in (TEXT_EMBEDS, TIME_IDS):
            if name in self.cond_names:
                if not added_cond_kwargs or name not in added_cond_kwargs:
                    raise UserError(f"this engine needs added_cond_kwargs[{name!r}] (an SDXL-type build)")
                cond[name] = added_cond_kwargs[name]
        cond = {k: v for k, v in cond.items() if k in self.cond_names}
        out = self._run(sample, timestep, cond)
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)
