"""The precision plan: what ``--precision`` and ``--ptq`` mean, decoded once. Every stage after the CLI reads a
:class:`PrecisionPlan` (``BuildConfig.plan``); no other module compares precision strings or looks for INT4 by
op names.

| precision | weights                                   | activations                                   |
|-----------|-------------------------------------------|-----------------------------------------------|
| fp32      | float                                     | float                                         |
| w8a8      | INT8 per output channel (PT2E)            | INT8 per tensor, static (PT2E observers)      |
| w4a16     | INT4 per block of K (quantize.int4)       | float                                         |
| w4a8      | INT4 per block of K                       | INT8 per tensor, static (PT2E observers)      |
| w4a4      | INT4 per block of K                       | INT4 per group of channels, dynamic           |

A PTQ recipe (INT4 weights only) is at most one transform of the layer (AWQ scaling or SVDQuant smoothing + low
rank), then the rounding of the INT4 weights (round-to-nearest with clip search, or GPTQ on the same grid)."""

from __future__ import annotations

from dataclasses import dataclass

from qdc_export.errors import UserError

PRECISIONS = ("fp32", "w8a8", "w4a16", "w4a8", "w4a4")
WEIGHT_BLOCK_SIZES = (64, 128)
ACTIVATION_GROUP = 64  # W4A4: channels per dynamic INT4 activation scale (the SVDQuant recipe's)
# INT4 PTQ recipes: at most one transform of the layer (AWQ scaling or SVDQuant smoothing + low rank), then the
# rounding of the INT4 weights (round-to-nearest with clip search, or GPTQ on the same grid and scales).
PTQ_TRANSFORMS = {"awq": ("w4a16", "w4a8"), "svdquant": ("w4a16", "w4a8", "w4a4")}
PTQ_ROUNDINGS = ("rtn", "gptq")
PTQ_RECIPES = ("rtn", "gptq", "awq", "awq+gptq", "svdquant", "svdquant+gptq")
# What a build uses when --ptq is not given: the best recipe measured per precision (benchmarks/results/
# fidelity.md, digits-uncond and digits-cond, DDIM 20). Precisions without INT4 weights have no recipe: "rtn".
DEFAULT_PTQ = {"w4a16": "gptq", "w4a8": "svdquant+gptq", "w4a4": "svdquant+gptq"}


def parse_ptq(text: str, precision: str) -> str:
    """A recipe such as "awq+gptq" -> its canonical form (transform first, "+rtn" dropped); one-line errors."""
    parts = [p.strip().lower() for p in str(text).split("+")]
    if any(not p for p in parts):
        raise UserError(f"--ptq {text!r}: empty part; write e.g. gptq or awq+gptq")
    unknown = [p for p in parts if p not in PTQ_TRANSFORMS and p not in PTQ_ROUNDINGS]
    if unknown:
        raise UserError(f"--ptq {text!r}: unknown part {unknown[0]!r}; recipes: {', '.join(PTQ_RECIPES)}")
    transforms = [p for p in parts if p in PTQ_TRANSFORMS]
    roundings = [p for p in parts if p in PTQ_ROUNDINGS]
    if len(transforms) > 1 or len(roundings) > 1:
        raise UserError(f"--ptq {text!r}: at most one of {', '.join(PTQ_TRANSFORMS)} and one of "
                        f"{', '.join(PTQ_ROUNDINGS)}; recipes: {', '.join(PTQ_RECIPES)}")
    rounding = roundings[0] if roundings else "rtn"
    recipe = "+".join(transforms + ([rounding] if rounding != "rtn" or not transforms else []))
    if precision not in _INT4_PRECISIONS:
        if recipe != "rtn":
            raise UserError(f"--ptq {recipe} applies to INT4 weights (w4a16, w4a8, w4a4), not {precision}")
        return recipe
    for transform in transforms:
        if precision not in PTQ_TRANSFORMS[transform]:
            raise UserError(f"--ptq {recipe}: {transform} applies to {' and '.join(PTQ_TRANSFORMS[transform])}, "
                            f"not {precision}")
    return recipe


_INT4_PRECISIONS = ("w4a16", "w4a8", "w4a4")
_ACTIVATIONS = {"fp32": "float", "w8a8": "int8-tensor", "w4a16": "float", "w4a8": "int8-tensor", "w4a4": "int4-group"}


@dataclass(frozen=True, kw_only=True)
class PrecisionPlan:
    """``weight_bits``: 8, 4 or None (float). ``activation``: "float", "int8-tensor" (static, PT2E observers) or
    "int4-group" (dynamic, ``activation_group`` channels per scale). ``ptq``: the canonical recipe."""

    name: str
    weight_bits: int | None
    weight_block_size: int
    activation: str
    ptq: str
    svdquant_rank: int

    @classmethod
    def parse(cls, precision: str, ptq: str | None = None, *, weight_block_size: int = 64,
              svdquant_rank: int = 32) -> PrecisionPlan:
        if precision not in PRECISIONS:
            raise UserError(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
        if weight_block_size not in WEIGHT_BLOCK_SIZES:
            raise UserError(f"weight block size must be one of {WEIGHT_BLOCK_SIZES}, got {weight_block_size}")
        if svdquant_rank < 1:
            raise UserError(f"--svdquant-rank must be >= 1, got {svdquant_rank}")
        recipe = parse_ptq(ptq if ptq is not None else DEFAULT_PTQ.get(precision, "rtn"), precision)
        bits = 4 if precision in _INT4_PRECISIONS else 8 if precision == "w8a8" else None
        return cls(name=precision, weight_bits=bits, weight_block_size=weight_block_size,
                   activation=_ACTIVATIONS[precision], ptq=recipe, svdquant_rank=svdquant_rank)

    @property
    def quantized(self) -> bool:
        return self.weight_bits is not None

    @property
    def int4_weights(self) -> bool:
        return self.weight_bits == 4

    @property
    def static_activation_bits(self) -> int | None:
        """8 where PT2E observers calibrate per-tensor INT8 activations (w8a8, w4a8); None otherwise."""
        return 8 if self.activation == "int8-tensor" else None

    @property
    def activation_group(self) -> int | None:
        return ACTIVATION_GROUP if self.activation == "int4-group" else None

    @property
    def ptq_transform(self) -> str | None:
        """"awq", "svdquant" or None."""
        first = self.ptq.split("+")[0]
        return first if first in PTQ_TRANSFORMS else None

    @property
    def ptq_rounding(self) -> str:
        """"rtn" or "gptq"."""
        last = self.ptq.split("+")[-1]
        return last if last in PTQ_ROUNDINGS else "rtn"

    def runs_on_tensorrt(self) -> str | None:
        """Why this precision cannot target TensorRT (None when it can)."""
        if self.activation == "int4-group":
            return ("w4a4 cannot target TensorRT: TensorRT has no 4-bit activation quantization (INT4 is "
                    "weight-only there; W4A4 needs a custom plugin). Use --target onnxruntime, or w4a16 for TensorRT")
        if self.int4_weights and self.activation == "int8-tensor":
            return ("w4a8 cannot target TensorRT: TensorRT runs INT4 only as weight-only GEMMs in the activation's "
                    "float type and has no INT4-weight x INT8-activation kernel; use --target onnxruntime, or "
                    "w4a16 / w8a8 for TensorRT")
        return None
