"""Build configuration: frozen, keyword-only, validated on construction, written next to every artifact
(manifest.json) and read back with :func:`BuildConfig.from_dict`."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from qdc_export.errors import UserError
from qdc_export.precision import PrecisionPlan

SCHEDULERS = ("ddim", "ddpm", "euler", "dpmsolver++")
OBSERVERS = ("minmax", "percentile", "mse")
COMPENSATIONS = ("none", "tcec", "ptqd", "tac")
TCEC_VARIANTS = ("m0", "m1-analytic", "m1-fitted")
TARGETS = ("onnxruntime", "tensorrt", "onnxruntime-cpu", "openvino")
# Seed sets (tests/test_seeds.py checks they are disjoint at these maxima): calibration, compensation-fit and
# held-out seeds are blocks of 1000 per --seed from 100 000 on (calibrate.calibration_seeds; the fit and held-out
# blocks are --seed + 7 and + 13), parity seeds 50 000 + i, evaluation seeds 0..N-1.
MAX_CALIB_SAMPLES = 1000
MAX_PARITY_SAMPLES = 1000
TRT_FLOAT_TYPES = ("fp16", "bf16")
# Build options that exist only for --target tensorrt: left out of an onnxruntime build's manifest, so the
# onnxruntime forms and their manifests stay exactly what they were before these options existed.
TRT_CONV_MODES = ("int8", "float")  # convolutions of a TensorRT W4A16 build (INT4 runs only in GEMMs there)
TRT_ONLY_KEYS = ("trt_float", "trt_version", "trt_conv")
# Fields that older manifests carry and no code ever read (guidance comes from the model's own conditioning):
# from_dict drops them so those manifests still load.
RETIRED_KEYS = ("guidance_scale", "extra")
def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UserError(f"unknown {name} {value!r}; choose one of: {', '.join(choices)}")


@dataclass(frozen=True, kw_only=True)
class BuildConfig:
    precision: str = "w8a8"
    scheduler: str = "ddim"
    steps: int = 20
    calib_samples: int = 8
    seed: int = 0
    observer: str = "percentile"
    percentile: float = 99.99
    quantize_attention: bool = False
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    # None: tcec for quantized precisions (with the held-out check below), none for fp32
    compensation: str | None = None
    tcec_variant: str = "m0"
    # Bias on by default: at 4-bit weights most of the accumulated error is a per-channel offset, not a
    # scaling (benchmarks/results/fidelity.md); at W8A8 it costs nothing measurable.
    comp_fit_bias: bool = True
    comp_target: str = "same-input"
    comp_ridge: float = 1e-3
    # Held-out check: tables that lower the mean PSNR on unseen seeds are not folded (compensation/stage.py says why).
    comp_validate: bool = True
    target: str = "onnxruntime"
    trt_batch_range: tuple[int, int, int] = (1, 2, 8)
    trt_float: str = "fp16"  # the network's float type for --target tensorrt (INT8/INT4 stay in Q/DQ)
    trt_version: str = ""  # TensorRT version the rules are checked against; "" = trt_rules.OLDEST_SUPPORTED
    trt_conv: str = "int8"  # W4A16 --target tensorrt: convolutions W8A8 (INT8 Q/DQ) or left in the float type
    parity_samples: int = 4
    ptq: str | None = None  # a PTQ recipe (PTQ_RECIPES); None: DEFAULT_PTQ of the precision
    svdquant_rank: int = 32
    weight_block_size: int = 64
    # Explicit changes to the model's own scheduler config (e.g. {"clip_sample": false}); empty = sample exactly
    # as the model's pipeline does. Recorded in the manifest; the engine's schedule guard compares against them.
    scheduler_overrides: dict[str, Any] = field(default_factory=dict)
    # --precision / --ptq decoded once (qdc_export.precision); derived, so not part of to_dict()
    plan: PrecisionPlan = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        plan = PrecisionPlan.parse(self.precision, self.ptq, weight_block_size=self.weight_block_size,
                                   svdquant_rank=self.svdquant_rank)
        object.__setattr__(self, "plan", plan)
        object.__setattr__(self, "ptq", plan.ptq)
        if self.compensation is None:
            object.__setattr__(self, "compensation", "tcec" if plan.quantized else "none")
        _check_choice("scheduler", self.scheduler, SCHEDULERS)
        _check_choice("observer", self.observer, OBSERVERS)
        _check_choice("compensation", self.compensation, COMPENSATIONS)
        _check_choice("tcec variant", self.tcec_variant, TCEC_VARIANTS)
        _check_choice("target", self.target, TARGETS)
        _check_choice("compensation target", self.comp_target, ("same-input", "cumulative"))
        if self.steps < 1 or self.steps > 1000:
            raise UserError(f"--steps must be in 1..1000, got {self.steps}")
        if not 1 <= self.calib_samples <= MAX_CALIB_SAMPLES:
            raise UserError(f"--calib-samples must be in 1..{MAX_CALIB_SAMPLES}, got {self.calib_samples}")
        if not 1 <= self.parity_samples <= MAX_PARITY_SAMPLES:
            raise UserError(f"--parity-samples must be in 1..{MAX_PARITY_SAMPLES}, got {self.parity_samples}")
        if self.seed < 0:  # a negative seed would move the calibration seeds onto the parity / evaluation seeds
            raise UserError(f"--seed must be >= 0, got {self.seed}")
        if not 50.0 < self.percentile <= 100.0:
            raise UserError(f"--percentile must be in (50, 100], got {self.percentile}")
        refusal = plan.runs_on_tensorrt()
        if refusal and self.target == "tensorrt":
            raise UserError(refusal)
        # CPU deployment forms (docs/cpu.md): W8A8 with quantized Conv outputs for ONNX Runtime's integer kernels,
        # and the onnxruntime form's ONNX run by OpenVINO (FP32 or W8A8)
        if self.target == "onnxruntime-cpu" and not (plan.weight_bits == 8 and plan.static_activation_bits == 8):
            raise UserError(f"--target onnxruntime-cpu takes w8a8, not {self.precision} (docs/cpu.md)")
        if self.target == "openvino" and plan.weight_bits not in (None, 8):
            raise UserError(f"--target openvino takes fp32 or w8a8, not {self.precision} (docs/cpu.md)")
        _check_choice("--trt-float", self.trt_float, TRT_FLOAT_TYPES)
        _check_choice("--trt-conv", self.trt_conv, TRT_CONV_MODES)
        if self.trt_float == "bf16":  # measured: onnx.checker rejects Conv(tensor(bfloat16)) at opset 21
            raise UserError("--trt-float bf16 is not available yet: ONNX Conv accepts bfloat16 only from opset 22 and "
                            "this exporter writes opset 21; use fp16")
        if self.trt_version:
            from qdc_export.engines.trt_rules import parse_version

            parse_version(self.trt_version)  # a UserError for a malformed or unsupported version
        if not plan.quantized and self.compensation != "none":
            raise UserError("compensation needs a quantized precision; fp32 has no quantization error")
        object.__setattr__(self, "trt_batch_range", tuple(int(b) for b in self.trt_batch_range))
        lo, opt, hi = self.trt_batch_range
        if not 0 < lo <= opt <= hi:
            raise UserError(f"--trt-batch-range must satisfy 0 < min <= opt <= max, got {lo}:{opt}:{hi}")
        object.__setattr__(self, "scheduler_overrides", dict(self.scheduler_overrides))
        object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self) if f.init}
        d["include"], d["exclude"] = list(self.include), list(self.exclude)
        if self.target != "tensorrt":
            for key in TRT_ONLY_KEYS:
                del d[key]
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BuildConfig:
        data = {k: v for k, v in data.items() if k not in RETIRED_KEYS}
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"unknown build config keys: {', '.join(unknown)}")
        data = dict(data)
        data["include"] = tuple(data.get("include", ()))
        data["exclude"] = tuple(data.get("exclude", ()))
        return cls(**data)
