"""Adapters for diffusers' UNet2DModel (unconditional), UNet2DConditionModel in SD 1.x/2.x form (cross
attention) and in SDXL form (addition_embed_type 'text_time': text_embeds + time_ids)."""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel, UNet2DModel

from qdc_export.load.plugins.base import ENCODER_HIDDEN_STATES, TEXT_EMBEDS, TIME_IDS, TensorSpec, UNetAdapter


class _Unconditional(torch.nn.Module):
    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep, return_dict=False)[0]


class _CrossAttention(torch.nn.Module):
    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class _TextTime(torch.nn.Module):
    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids):
        added = {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.unet(
            sample, timestep, encoder_hidden_states, added_cond_kwargs=added, return_dict=False
        )[0]


class UNet2DAdapter(UNetAdapter):
    name = "unet2d"

    def matches(self, unet: torch.nn.Module) -> bool:
        return isinstance(unet, UNet2DModel) and unet.config.class_embed_type is None

    def condition_specs(self, unet: torch.nn.Module) -> list[TensorSpec]:
        return []

    def wrap(self, unet: torch.nn.Module) -> torch.nn.Module:
        return _Unconditional(unet)


def _sequence_length(unet: torch.nn.Module) -> int:
    # Not in the UNet config: the text encoder decides it. Models we build record it in their config.
    return int(getattr(unet.config, "qdc_sequence_length", None) or 77)


class SDUNetAdapter(UNetAdapter):
    name = "sd"

    def matches(self, unet: torch.nn.Module) -> bool:
        cfg = unet.config
        return (
            isinstance(unet, UNet2DConditionModel)
            and cfg.addition_embed_type is None
            and cfg.class_embed_type is None
            and cfg.encoder_hid_dim is None
        )

    def condition_specs(self, unet: torch.nn.Module) -> list[TensorSpec]:
        dim = unet.config.cross_attention_dim
        return [TensorSpec(ENCODER_HIDDEN_STATES, ("batch", _sequence_length(unet), dim))]

    def wrap(self, unet: torch.nn.Module) -> torch.nn.Module:
        return _CrossAttention(unet)


class SDXLUNetAdapter(SDUNetAdapter):
    name = "sdxl"

    def matches(self, unet: torch.nn.Module) -> bool:
        cfg = unet.config
        return (
            isinstance(unet, UNet2DConditionModel)
            and cfg.addition_embed_type == "text_time"
            and cfg.class_embed_type is None
            and cfg.encoder_hid_dim is None
        )

    def condition_specs(self, unet: torch.nn.Module) -> list[TensorSpec]:
        cfg = unet.config
        text_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        return [
            *super().condition_specs(unet),
            TensorSpec(TEXT_EMBEDS, ("batch", text_dim)),
            TensorSpec(TIME_IDS, ("batch", 6)),
        ]

    def wrap(self, unet: torch.nn.Module) -> torch.nn.Module:
        return _TextTime(unet)
