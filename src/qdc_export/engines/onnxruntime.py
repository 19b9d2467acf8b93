"""ONNX Runtime engine: a Denoiser over an InferenceSession, feeding the fixed engine interface
(sample, timestep, conditioning..., [comp_state]) and carrying the compensation state between steps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from qdc_export.engines.providers import create_session
from qdc_export.load.plugins.base import COMP_STATE, COMP_STATE_OUT, NOISE_PRED, SAMPLE, TIMESTEP


class OrtDenoiser:
    def __init__(self, session: ort.InferenceSession | Any) -> None:  # or a session-like engine (engines/openvino.py)
        self.session = session
        self.input_names = [i.name for i in session.get_inputs()]
        self.stateful = COMP_STATE in self.input_names
        self.cond_names = [n for n in self.input_names if n not in (SAMPLE, TIMESTEP, COMP_STATE)]
        self.output_names = [NOISE_PRED] + ([COMP_STATE_OUT] if self.stateful else [])
        self.state: np.ndarray | None = None

    @classmethod
    def from_path(cls, model_path: Path | str, provider: str = "cpu") -> OrtDenoiser:
        return cls(create_session(model_path, provider=provider))

    def reset(self, batch: int) -> None:
        self.state = None

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(self.output_names, feeds)

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        feeds = {SAMPLE: sample.float().numpy(), TIMESTEP: timestep.float().numpy()}
        for name in self.cond_names:
            feeds[name] = cond[name].float().numpy()
        if self.stateful:
            if self.state is None or self.state.shape != feeds[SAMPLE].shape:
                self.state = np.zeros_like(feeds[SAMPLE])
            feeds[COMP_STATE] = self.state
        outputs = self.run(feeds)
        if self.stateful:
            self.state = outputs[1]
        return torch.from_numpy(outputs[0])
