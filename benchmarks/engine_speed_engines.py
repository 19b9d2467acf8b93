"""Engines of benchmarks/engine_speed.py: the builds (one subprocess per form, cached), the runtimes that run them
(ONNX Runtime sessions, OpenVINO compiled models), NNCF INT8 PTQ of the FP32 ONNX with optimum-intel's Stable
Diffusion recipe, which kernels each engine selected, and interleaved timing.

Forms (``FORMS``): ``fp32`` (the FP32 export), ``reference`` (W8A8, the onnxruntime form: TensorRT-style Q/DQ on
Conv/Linear inputs), ``cpu`` (W8A8, ``--target onnxruntime-cpu``: inputs and outputs quantized, U8S8),
``tensorrt`` (W8A8, ``--target tensorrt``: the same Q/DQ in an FP16 network). Each form runs on ONNX Runtime and
on OpenVINO (f32 inference precision; the FP32 export also at OpenVINO's default hint, bf16 on CPUs with BF16
units), plus ``nncf`` (OpenVINO only)."""

from __future__ import annotations

import collections
import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
FORMS: dict[str, dict[str, Any]] = {  # BuildConfig fields of each form
    "fp32": {"precision": "fp32"},
    "reference": {"precision": "w8a8"},
    "cpu": {"precision": "w8a8", "target": "onnxruntime-cpu"},
    "tensorrt": {"precision": "w8a8", "target": "tensorrt"},
}
# one build in a fresh process: the library call of `qdc-export build`, without report.html (at SD 1.5 size the
# report's FP and engine sampling would take longer than the build)
_BUILD_SCRIPT = """
import json, sys
from pathlib import Path
from qdc_export.cli import _quiet_third_party
_quiet_third_party()
from qdc_export.build import build
from qdc_export.config import BuildConfig
model, fields, out, check = sys.argv[1], json.loads(sys.argv[2]), Path(sys.argv[3]), sys.argv[4] == "1"
result = build(model, BuildConfig(**fields), out, force=True, run_check=check, write_report=False)
if result.parity and not result.parity["passed"]:
    sys.exit("parity check failed")
"""
BUILT_FROM = "built_from.json"  # beside the build: the source hash and commit that made it
NNCF_SUBSET = 200  # optimum-intel's num_samples default for diffusion models


def build_form(model: str, form: str, cache: Path, extra: dict[str, Any], check: bool,
               log: Callable[[str], None], reuse: bool = False) -> tuple[Path, dict[str, Any]]:
    """(The build folder of ``form``, the code it was built from). A fresh process when not cached: the memory of
    one build is returned to the system before the next. ``extra``: BuildConfig fields on top of the form's.
    A cached build is used when it was made by the current source (``source_hash``), or by any source with
    ``reuse`` (the record then names the commit it came from); otherwise it is rebuilt."""
    from qdc_export.infra.provenance import git_state, source_hash

    fields = {**FORMS[form], **extra}
    key = hashlib.sha256(json.dumps([model, fields, check], sort_keys=True).encode()).hexdigest()[:12]
    out = cache / "builds" / f"{model}-{form}-{key}"
    stamp = out / BUILT_FROM
    current = {"source_hash": source_hash(), **git_state()}
    if (out / "manifest.json").is_file() and stamp.is_file():
        built_from = json.loads(stamp.read_text())
        if reuse or built_from["source_hash"] == current["source_hash"]:
            return out, built_from
    command = [sys.executable, "-c", _BUILD_SCRIPT, model, json.dumps(fields), str(out), "1" if check else "0"]
    log(f"  building {model} {form}: {json.dumps(fields)}, parity check {'on' if check else 'off'}")
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"build {model} {form} failed: {done.stderr.strip().splitlines()[-3:]}")
    stamp.write_text(json.dumps(current))
    log(f"  built in {time.perf_counter() - start:.0f} s")
    return out, current


@dataclass
class Engine:
    """One runtime running one form: ``run(feeds)`` -> outputs; ``kernels`` says what the runtime selected."""

    form: str
    runtime: str  # "onnxruntime" | "openvino" | "openvino-bf16"
    run: Callable[[dict[str, np.ndarray]], Any]
    denoiser: Any
    kernels: dict[str, int]
    input_names: list[str]
    release: Callable[[], None] = lambda: None  # after a timed call, untimed: give intermediate memory back

    @property
    def label(self) -> str:
        return f"{self.runtime} / {self.form}"


def ort_engine(form: str, folder: Path, threads: int, scratch: Path, shrink_arena: bool = False) -> Engine:
    """``shrink_arena``: each timed call returns its memory arena to the system afterwards (run option
    ``memory.enable_memory_arena_shrinkage``), so engines open together do not each hold their peak at once
    (SD 1.5 at batch 2 and up); every form of the group pays the same release."""
    import onnxruntime as ort

    from qdc_export.engines.onnxruntime import OrtDenoiser
    from qdc_export.engines.ort_cpu import optimized_model_path
    from qdc_export.engines.providers import create_session

    session = create_session(folder / "model.onnx", threads=threads)
    cached = optimized_model_path(folder)
    if form == "cpu" and cached.is_file():
        optimized = cached
    else:  # the graph the runtime runs, written by a second session with the same settings
        scratch.mkdir(parents=True, exist_ok=True)
        optimized = scratch / f"{folder.name}.ort-optimized.onnx"
        if not optimized.is_file():
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.add_session_config_entry("optimization.disable_specified_optimizers", "QDQS8ToU8Transformer")
            options.optimized_model_filepath = str(optimized)
            if Path(str(folder / "model.onnx") + ".data").is_file():
                options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                                 optimized.name + ".data")
            ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
    ops = collections.Counter(n.op_type for n in onnx.load(str(optimized), load_external_data=False).graph.node)
    kernels = {k: ops[k] for k in ("QLinearConv", "QGemm", "QLinearMatMul", "MatMulIntegerToFloat", "MatMulNBits",
                                   "Conv", "FusedConv", "MatMul", "FusedMatMul", "Gemm") if ops.get(k)}
    denoiser = OrtDenoiser(session)
    run_options = ort.RunOptions()
    if shrink_arena:
        run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return Engine(form, "onnxruntime", lambda feeds: session.run(None, feeds, run_options), denoiser, kernels,
                  [i.name for i in session.get_inputs()])


def ov_kernels(compiled: Any) -> dict[str, int]:
    """Runtime precision of the compute layers in OpenVINO's compiled graph ("Convolution u8": INT8 kernels)."""
    counts: collections.Counter[str] = collections.Counter()
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        layer = info["layerType"].astype(str)
        if layer in ("Convolution", "FullyConnected", "MatMul"):
            counts[f"{layer} {info['runtimePrecision'].astype(str)}"] += 1
    return dict(counts)


def ov_engine(form: str, model_path: Path, threads: int, hint: str = "f32", cache_dir: Path | None = None,
              release_memory: bool = False) -> Engine:
    """``release_memory``: after each timed call the compiled model frees its intermediate buffers (outside the
    timing), so engines open together do not each hold their peak at once (SD 1.5 at batch 8)."""
    from qdc_export.engines.openvino import OvDenoiser, OvEngine, compile_model

    compiled = compile_model(model_path, cache_dir=cache_dir, precision_hint=hint, threads=threads)
    engine = OvEngine(compiled)
    runtime = "openvino" if hint == "f32" else f"openvino-{hint}"
    return Engine(form, runtime, lambda feeds: engine.run(None, feeds), OvDenoiser(engine), ov_kernels(compiled),
                  engine.input_names, compiled.release_memory if release_memory else (lambda: None))


def calibration_feeds(model: Any, steps: int, samples: int, log: Callable[[str], None]) -> list[dict[str, np.ndarray]]:
    """UNet feeds of FP trajectories on calibration seeds (not evaluation seeds), one dict per call, batch 1."""
    from qdc_export.quantize.calibrate import calibration_seeds
    from qdc_export.report.fidelity import fp_denoiser, sample_latents

    recorded: list[dict[str, np.ndarray]] = []
    inner = fp_denoiser(model)

    class Recorder:
        def reset(self, batch: int) -> None:
            inner.reset(batch)

        def __call__(self, sample, timestep, cond):
            for i in range(sample.shape[0]):
                feed = {"sample": sample[i:i + 1].numpy().copy(), "timestep": timestep[i:i + 1].numpy().copy()}
                feed.update({k: v[i:i + 1].numpy().copy() for k, v in cond.items()})
                recorded.append(feed)
            return inner(sample, timestep, cond)

    trajectories = max(1, -(-samples // (steps * 2)))
    sample_latents(Recorder(), model, "ddim", steps, calibration_seeds(0, trajectories))
    log(f"  NNCF calibration: {len(recorded)} feeds from {trajectories} FP trajectories")
    stride = max(1, len(recorded) // samples)
    return recorded[::stride][:samples]


def nncf_int8(fp32_onnx: Path, out: Path, make_feeds: Callable[[], list[dict[str, np.ndarray]]],
              log: Callable[[str], None]) -> Path:
    """optimum-intel's recipe for diffusion UNets (``quant_method="hybrid"``): INT8 weight compression of the
    MatMul (Linear) weights, then full INT8 quantization (weights and activations) of the rest, model_type
    TRANSFORMER, SmoothQuant off (alpha -1), with the MatMuls in the ignored scope of the second step."""
    import nncf
    import openvino as ov

    xml = out / "nncf_int8.xml"
    if xml.is_file():
        return xml
    feeds = make_feeds()
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model = ov.Core().read_model(str(fp32_onnx))
    matmuls = [op.get_friendly_name() for op in model.get_ops() if op.get_type_name() == "MatMul"
               and any(op.input_value(i).get_node().get_type_name() in ("Constant", "Convert") for i in range(2))]
    compressed = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM,
                                       ignored_scope=nncf.IgnoredScope(types=["Convolution"]))
    quantized = nncf.quantize(
        compressed, nncf.Dataset(feeds), subset_size=len(feeds), model_type=nncf.ModelType.TRANSFORMER,
        ignored_scope=nncf.IgnoredScope(names=matmuls, validate=False),
        advanced_parameters=nncf.AdvancedQuantizationParameters(smooth_quant_alpha=-1))
    ov.save_model(quantized, str(xml))
    log(f"  NNCF INT8 PTQ ({len(feeds)} calibration feeds) in {time.perf_counter() - start:.0f} s")
    return xml


def random_feeds(input_names: list[str], shapes: dict[str, list[int]], batch: int, timestep: float) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {}
    for name in input_names:
        shape = [batch, *shapes[name][1:]]
        if name == "timestep":
            feeds[name] = np.full(shape, timestep, dtype=np.float32)
        elif name == "comp_state":
            feeds[name] = np.zeros(shape, dtype=np.float32)
        else:
            feeds[name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def interleaved(calls: dict[str, Callable[[], Any]], repeats: int, warmup: int = 2,
                after: dict[str, Callable[[], None]] | None = None) -> dict[str, list[float]]:
    """Seconds per call of each entry, the entries taking turns (machine drift hits them alike); ``after[key]``
    runs untimed after each of that entry's calls."""
    after = after or {}
    for key, fn in calls.items():
        for _ in range(warmup):
            fn()
            after.get(key, lambda: None)()
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(repeats):
        for key, fn in calls.items():
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
            after.get(key, lambda: None)()
    return times


def spread(values: list[float]) -> dict[str, float]:
    a = np.asarray(values) * 1e3
    return {"median_ms": float(np.median(a)), "p10_ms": float(np.percentile(a, 10)),
            "p90_ms": float(np.percentile(a, 90)), "n": int(a.size)}


def head_share(folder: Path, threads: int, batch: int, repeats: int) -> dict[str, Any] | None:
    """The compensation head cut from the engine (head_parity.extract_head) timed alone against the whole engine
    call, interleaved, ONNX Runtime, at ``batch``."""
    from qdc_export.check.head import extract_head
    from qdc_export.engines.providers import create_session
    from qdc_export.manifest import read_manifest

    manifest = read_manifest(folder)
    if not manifest.get("compensation", {}).get("folded"):
        return None
    stateful = bool(manifest["compensation"].get("stateful"))
    head, _ = extract_head(folder / "model.onnx", stateful)
    head_session = create_session(head, threads=threads)
    engine = create_session(folder / "model.onnx", threads=threads)
    shapes = {i["name"]: i["shape"] for i in manifest["io"]["inputs"]}
    timestep = float(manifest["scheduler"]["timesteps"][0])
    engine_feeds = random_feeds([i.name for i in engine.get_inputs()], shapes, batch, timestep)
    head_feeds = {i.name: (engine_feeds[i.name] if i.name in engine_feeds else engine_feeds["sample"])
                  for i in head_session.get_inputs()}
    times = interleaved({"head": lambda: head_session.run(None, head_feeds),
                         "engine": lambda: engine.run(None, engine_feeds)}, repeats)
    head_ms, engine_ms = spread(times["head"]), spread(times["engine"])
    return {"form": manifest["target"]["name"], "batch": batch, "head": head_ms, "engine": engine_ms,
            "share_percent": 100.0 * head_ms["median_ms"] / engine_ms["median_ms"]}
