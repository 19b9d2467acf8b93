"""TensorRT engines: build from a Q/DQ ONNX file, run with torch CUDA buffers.

Thin on purpose. TensorRT, Polygraphy's TensorRT backend and torch are imported inside the
functions that need them, so this module imports (and its pure parts run and are tested) on
machines without TensorRT or a GPU.

Build (``build_engine``): our own parse step (so every parser error lands in one
``TensorRTCompatibilityError``), then Polygraphy's ``CreateConfig`` (profile, timing cache,
optimization level, workspace) and ``EngineBytesFromNetwork`` (``build_serialized_network`` and a
file-locked timing-cache save), then an atomic write of the plan and its build record.

Version notes. Typed against ``tensorrt-stubs`` 10.13. TensorRT 10.x needs
``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` for explicit quantization; 11.x removed the weak
typing APIs and every network is strongly typed, so when the enum member is absent no flag is set.
Precision builder flags (FP16/INT8/...) are never set: precision comes from the Q/DQ nodes only.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qdc_export.errors import TensorRTCompatibilityError, UserError

if TYPE_CHECKING:
    import tensorrt as trt

__all__ = [
    "ShapeRange",
    "TensorRTBuildConfig",
    "build_engine",
    "profiles_from_build_options",
    "tensorrt_available",
]

Shape = tuple[int, ...]
ShapeRange = tuple[Shape, Shape, Shape]  # (min, opt, max) of one input
_MAX_BUILDER_OPTIMIZATION_LEVEL = 5
_MAX_ERRORS_IN_MESSAGE = 3


# --------------------------------------------------------------------------------------------------
# Configuration (pure)
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class TensorRTBuildConfig:
    """How to build one engine. Validated on construction; round-trips through JSON.

    ``shapes``: input name -> (min, opt, max) shapes of one optimization profile.
    ``builder_optimization_level``: 0..5 (TensorRT's default is 3).
    ``workspace_bytes``: workspace memory-pool limit; None leaves TensorRT's default.
    ``timing_cache_path``: read before the build if present, merged and written after it.
    """

    shapes: Mapping[str, ShapeRange]
    builder_optimization_level: int = 3
    workspace_bytes: int | None = None
    timing_cache_path: str | None = None

    def __post_init__(self) -> None:
        if not self.shapes:
            raise UserError("TensorRTBuildConfig needs min/opt/max shapes for at least one input")
        frozen: dict[str, ShapeRange] = {}
        for name, triple in self.shapes.items():
            if len(triple) != 3:
                raise UserError(f"input {name!r}: expected (min, opt, max) shapes, got {triple!r}")
            lo, opt, hi = (tuple(int(d) for d in shape) for shape in triple)
            if not len(lo) == len(opt) == len(hi):
                raise UserError(f"input {name!r}: min/opt/max shapes differ in rank: {lo}, {opt}, {hi}")
            if any(d <= 0 for d in lo) or any(not a <= b <= c for a, b, c in zip(lo, opt, hi)):
                raise UserError(f"input {name!r}: need 0 < min <= opt <= max per dim, got {lo}, {opt}, {hi}")
            frozen[name] = (lo, opt, hi)
        object.__setattr__(self, "shapes", frozen)
        if not 0 <= self.builder_optimization_level <= _MAX_BUILDER_OPTIMIZATION_LEVEL:
            raise UserError(
                f"builder_optimization_level must be 0..{_MAX_BUILDER_OPTIMIZATION_LEVEL}, "
                f"got {self.builder_optimization_level}"
            )
        if self.workspace_bytes is not None and self.workspace_bytes <= 0:
            raise UserError(f"workspace_bytes must be positive, got {self.workspace_bytes}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "shapes": {k: [list(s) for s in v] for k, v in self.shapes.items()},
            "builder_optimization_level": self.builder_optimization_level,
            "workspace_bytes": self.workspace_bytes,
            "timing_cache_path": self.timing_cache_path,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TensorRTBuildConfig:
        shapes = {k: tuple(tuple(s) for s in v) for k, v in data["shapes"].items()}
        return cls(
            shapes=shapes,  # type: ignore[arg-type]  # validated in __post_init__
            builder_optimization_level=int(data.get("builder_optimization_level", 3)),
            workspace_bytes=data.get("workspace_bytes"),
            timing_cache_path=data.get("timing_cache_path"),
        )


def profiles_from_build_options(
    input_specs: Mapping[str, Sequence[int | str]],
    batch_range: tuple[int, int, int],
    hw_range: tuple[int, int, int],
    *,
    extra_dims: Mapping[str, tuple[int, int, int]] | None = None,
) -> dict[str, ShapeRange]:
    """Min/opt/max shapes per input from symbolic input shapes.

    ``input_specs`` maps an input name to its shape, each dim an int (fixed) or a symbol:
    ``"batch"`` takes ``batch_range``, ``"height"`` and ``"width"`` take ``hw_range`` (square
    latents), any other symbol must be in ``extra_dims``. Ranges are (min, opt, max).

    >>> profiles_from_build_options({"sample": ("batch", 4, "height", "width")}, (1, 2, 4), (32, 64, 96))
    {'sample': ((1, 4, 32, 32), (2, 4, 64, 64), (4, 4, 96, 96))}
    """
    ranges: dict[str, tuple[int, int, int]] = {"batch": batch_range, "height": hw_range, "width": hw_range}
    ranges.update(extra_dims or {})
    for symbol, (lo, opt, hi) in ranges.items():
        if not 0 < lo <= opt <= hi:
            raise UserError(f"range for {symbol!r} must satisfy 0 < min <= opt <= max, got {(lo, opt, hi)}")
    profiles: dict[str, ShapeRange] = {}
    for name, dims in input_specs.items():
        per_level: list[list[int]] = [[], [], []]
        for dim in dims:
            if isinstance(dim, str):
                if dim not in ranges:
                    raise UserError(f"input {name!r}: unknown dimension symbol {dim!r}; known: {sorted(ranges)}")
                values = ranges[dim]
            else:
                values = (int(dim),) * 3
            for level, value in zip(per_level, values):
                level.append(value)
        profiles[name] = (tuple(per_level[0]), tuple(per_level[1]), tuple(per_level[2]))
    return profiles


# --------------------------------------------------------------------------------------------------
# Availability and lazy imports
# --------------------------------------------------------------------------------------------------


def _tensorrt_problem() -> str | None:
    """Why TensorRT cannot be used, or None. ``import tensorrt`` alone proves nothing: with only
    tensorrt-stubs installed, the stub folder ``tensorrt/`` imports as an empty namespace package."""
    try:
        import tensorrt
    except ImportError as exc:
        return f"tensorrt is not importable ({exc})"
    if not hasattr(tensorrt, "Builder"):
        return "tensorrt is not installed (only type stubs or an empty 'tensorrt' package were found)"
    return None


def _require_tensorrt() -> None:
    """Raise a UserError when TensorRT is missing. Callers then ``import tensorrt as trt``
    themselves, so mypy checks their TensorRT calls against tensorrt-stubs."""
    problem = _tensorrt_problem()
    if problem is not None:
        raise UserError(f"{problem}; TensorRT (pip install tensorrt) is needed to build or run engines")


def tensorrt_available() -> tuple[bool, str]:
    """(True, version and device) when TensorRT is usable and a CUDA device is visible, else
    (False, reason)."""
    problem = _tensorrt_problem()
    if problem is not None:
        return False, problem
    import tensorrt as trt

    try:
        import torch
    except ImportError:
        return False, "torch is not importable (engines use torch CUDA tensors as buffers)"
    if not torch.cuda.is_available():
        return False, f"tensorrt {trt.__version__} is installed but no CUDA device is visible"
    return True, f"tensorrt {trt.__version__} on {torch.cuda.get_device_name(0)}"


def _network_flags() -> int:
    """Network creation flags: STRONGLY_TYPED on 10.x; 0 on 11.x where every network is."""
    import tensorrt as trt

    # getattr, not the attribute: the 10.x stubs have it, an 11.x runtime may not.
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if strongly_typed is None else 1 << int(strongly_typed)


def _parser_error_text(error: Any) -> str:
    """One parser error as 'node (op): description'; tolerant of older ParserError objects."""
    desc = str(error.desc()) if hasattr(error, "desc") else str(error)
    node = error.node_name() if hasattr(error, "node_name") else ""
    op = error.node_operator() if hasattr(error, "node_operator") else ""
    where = f"{node} ({op}): " if node else ""
    return " ".join(f"{where}{desc}".split())


def _parse_onnx(onnx_path: Path) -> tuple[trt.Builder, trt.INetworkDefinition, trt.OnnxParser]:
    _require_tensorrt()
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags())
    parser = trt.OnnxParser(network, logger)
    # parse_from_file keeps the file's folder, so external weight files resolve.
    ok = parser.parse_from_file(str(onnx_path))
    errors = [_parser_error_text(parser.get_error(i)) for i in range(parser.num_errors)]
    if not ok or errors:
        shown = "; ".join(errors[:_MAX_ERRORS_IN_MESSAGE]) or "no parser error recorded"
        more = f" (+{len(errors) - _MAX_ERRORS_IN_MESSAGE} more)" if len(errors) > _MAX_ERRORS_IN_MESSAGE else ""
        raise TensorRTCompatibilityError(
            f"TensorRT's ONNX parser rejected {onnx_path.name}: {len(errors)} error(s): {shown}{more}"
        )
    return builder, network, parser


def _write_atomically(path: Path, data: bytes | memoryview) -> None:
    """Write to a temp file in the same folder, fsync, then os.replace: no half-written plans."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------------------------------
# Build
# --------------------------------------------------------------------------------------------------


def build_engine(
    onnx_path: str | os.PathLike[str],
    config: TensorRTBuildConfig,
    engine_path: str | os.PathLike[str],
    *,
    check_rules: bool = True,
) -> Path:
    """Build a strongly typed TensorRT engine from a Q/DQ ONNX file and write it to ``engine_path``.

    With ``check_rules`` the model is first checked on the CPU against
    :mod:`qdc_export.engines.trt_rules` so rule breaks are reported before any TensorRT work.
    Also writes ``<engine_path>.json``: the build config, TensorRT version and source ONNX path.
    Returns the engine path.
    """
    onnx_file, engine_file = Path(onnx_path), Path(engine_path)
    if not onnx_file.is_file():
        raise UserError(f"ONNX model not found: {onnx_file}")
    if check_rules:
        import onnx

        from qdc_export.engines.trt_rules import assert_tensorrt_compatible

        assert_tensorrt_compatible(onnx.load(str(onnx_file), load_external_data=False))

    _require_tensorrt()
    import tensorrt as trt
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, Profile
    from polygraphy.exception import PolygraphyException

    builder, network, parser = _parse_onnx(onnx_file)
    network_inputs = {network.get_input(i).name for i in range(network.num_inputs)}
    missing = sorted(network_inputs - set(config.shapes))
    unknown = sorted(set(config.shapes) - network_inputs)
    if missing or unknown:
        raise UserError(
            f"profile shapes do not match the network inputs: missing {missing}, unknown {unknown}"
        )

    profile = Profile()
    for name, (lo, opt, hi) in config.shapes.items():
        profile.add(name, min=lo, opt=opt, max=hi)
    pools = (
        {trt.MemoryPoolType.WORKSPACE: config.workspace_bytes}
        if config.workspace_bytes is not None
        else None
    )
    cache = config.timing_cache_path
    create_config = CreateConfig(
        profiles=[profile],
        # layers left in FP32 (the timestep embedding, an FP32-form build) may use TF32 tensor cores;
        # Polygraphy's default is off. Allowed in strongly typed networks (only precision flags are not).
        tf32=True,
        # per-layer precisions in the engine inspector (scripts/gpu_smoke.sh counts INT8/INT4 layers)
        profiling_verbosity=trt.ProfilingVerbosity.DETAILED,
        builder_optimization_level=config.builder_optimization_level,
        memory_pool_limits=pools,
        load_timing_cache=cache if cache and os.path.exists(cache) else None,
    )
    try:
        serialized = EngineBytesFromNetwork(
            (builder, network, parser), config=create_config, save_timing_cache=cache
        )()
    except PolygraphyException as exc:
        message = " ".join(str(exc).split())
        raise TensorRTCompatibilityError(f"TensorRT engine build failed for {onnx_file.name}: {message}") from exc

    _write_atomically(engine_file, memoryview(serialized))
    record = {
        "onnx": str(onnx_file.resolve()),
        "tensorrt_version": str(trt.__version__),
        "strongly_typed_flag": _network_flags() != 0,
        "tf32": True,
        "config": config.to_dict(),
    }
    _write_atomically(engine_file.with_name(engine_file.name + ".json"), json.dumps(record, indent=2).encode())
    return engine_file
