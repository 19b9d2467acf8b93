"""Shared fixtures: small diffusers UNets built from config go through the real pipeline once per
session (capture, PT2E, calibration over sampler trajectories, ONNX export, ONNX Runtime, Polygraphy)."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pytest
import torch

from qdc_export.cli import _quiet_third_party

_quiet_third_party()
warnings.filterwarnings("ignore")
logging.getLogger("torchao").setLevel(logging.ERROR)
torch.set_num_threads(2)

# compensation="none": the build's default is tcec with its held-out check; tests of the compensation ask for it
FAST = dict(steps=4, calib_samples=2, parity_samples=1, compensation="none")


@pytest.fixture(scope="session")
def build_factory(tmp_path_factory):
    from qdc_export.build import build
    from qdc_export.config import BuildConfig

    cache: dict[tuple, object] = {}

    def make(model: str, precision: str, *, write_report: bool = False, **overrides):
        # report.html is off by default here (tests/test_report.py asks for it): it samples images per build
        key = (model, precision, write_report, tuple(sorted(overrides.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp("builds") / f"{model}-{precision}"
            config = BuildConfig(precision=precision, **{**FAST, **overrides})
            cache[key] = build(model, config, out, force=False, write_report=write_report)
        return cache[key]

    return make


def pytest_report_header(config):
    return f"torch {torch.__version__}, threads {torch.get_num_threads()}"


ROOT = Path(__file__).resolve().parents[1]
