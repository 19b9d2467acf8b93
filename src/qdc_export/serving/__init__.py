"""Serving a build: a drop-in ``pipe.unet`` for diffusers pipelines (:class:`EngineUNet`), the schedule guard
(:func:`schedule_mismatch`), and a Triton Inference Server model repository (:mod:`.triton`)."""

from qdc_export.serving.engine_unet import EngineUNet, EngineUNet2DConditionModel, EngineUNet2DModel
from qdc_export.serving.schedule_guard import ScheduleMismatchError, schedule_mismatch

__all__ = ["EngineUNet", "EngineUNet2DConditionModel", "EngineUNet2DModel", "ScheduleMismatchError",
           "schedule_mismatch"]
