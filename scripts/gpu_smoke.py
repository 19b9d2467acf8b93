"""GPU smoke run: one JSON verdict per step in OUT (``<step>.json``: status ok / failed / skipped, reason,
numbers). A step that cannot run here (no TensorRT, no CUDA, provider missing) writes ``skipped`` with the
reason; a step that fails writes ``failed`` with the error; the script itself never stops early.
Run through scripts/gpu_smoke.sh. Written against the documented TensorRT 10.x / ORT APIs; until a run's
verdicts are committed, nothing here has run on a GPU.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODEL = str(ROOT / "models" / "digits-uncond")
SNR_DB_MIN = 30.0  # TensorRT FP16 vs ONNX Runtime CPU on the same Q/DQ network: rounding flips only


def _snr(ref: np.ndarray, out: np.ndarray) -> float:
    noise = float(np.sum((ref.astype(np.float64) - out) ** 2))
    return float(10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / max(noise, 1e-30)))


def _trt_reason() -> str | None:
    from qdc_export.engines.tensorrt import tensorrt_available

    available, reason = tensorrt_available()
    return None if available else reason


def step_versions(work: Path) -> dict[str, Any]:
    import onnxruntime as ort
    import torch

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "onnxruntime": ort.__version__, "ort_providers": ort.get_available_providers(),
                            "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
    try:
        import tensorrt as trt

        info["tensorrt"] = getattr(trt, "__version__", "stubs only")
    except ImportError as exc:
        info["tensorrt"] = f"not importable: {exc}"
    return {"status": "ok", **info}


def step_pytest_gpu(work: Path) -> dict[str, Any]:
    if (reason := _trt_reason()) is not None:
        return {"status": "skipped", "reason": reason}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "tests" / "gpu")],
                         capture_output=True, text=True, timeout=240)
    return {"status": "ok" if out.returncode == 0 else "failed", "returncode": out.returncode,
            "tail": out.stdout.strip().splitlines()[-5:]}


def _build_w8a8(work: Path) -> Path:
    from qdc_export.build import build
    from qdc_export.config import BuildConfig

    out = work / "digits-w8a8-trt"
    if not (out / "model.engine").is_file():
        config = BuildConfig(precision="w8a8", steps=4, calib_samples=2, parity_samples=1, target="tensorrt",
                             trt_batch_range=(1, 2, 4))
        build(MODEL, config, out, force=True, write_report=False)
    return out


def _int8_layers(engine_path: Path) -> dict[str, Any]:
    """Layer precisions from the engine inspector (needs ProfilingVerbosity.DETAILED at build)."""
    import tensorrt as trt

    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
    inspector = engine.create_engine_inspector()
    layers = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON)).get("Layers", [])
    text = [json.dumps(layer) for layer in layers]
    return {"layers": len(layers), "int8_layers": sum("Int8" in t or "INT8" in t for t in text),
            "int4_layers": sum("Int4" in t or "INT4" in t for t in text),
            "half_layers": sum("Half" in t or "FP16" in t for t in text)}


def step_w8a8_engine(work: Path) -> dict[str, Any]:
    if (reason := _trt_reason()) is not None:
        return {"status": "skipped", "reason": reason}
    from qdc_export.engines.providers import create_session
    from qdc_export.engines.tensorrt_runtime import TensorRTEngine

    folder = _build_w8a8(work)
    cpu = create_session(folder / "model.onnx", provider="cpu")
    rng = np.random.default_rng(0)
    per_batch = {}
    with TensorRTEngine(folder / "model.engine") as engine:
        for batch in (1, 4):
            feeds = {i.name: (rng.standard_normal([batch, *i.shape[1:]]).astype(np.float32) if i.name != "timestep"
                              else np.full([batch], 500.0, np.float32)) for i in cpu.get_inputs()}
            ref = cpu.run(None, feeds)[0]
            out = engine.infer(feeds)["noise_pred"]
            per_batch[str(batch)] = {"snr_db_vs_ort_cpu": _snr(ref, out), "max_abs": float(np.abs(ref - out).max())}
    passed = all(v["snr_db_vs_ort_cpu"] >= SNR_DB_MIN for v in per_batch.values())
    return {"status": "ok" if passed else "failed", "snr_db_min": SNR_DB_MIN, "per_batch": per_batch,
            **_int8_layers(folder / "model.engine")}


def _probe_model(kind: str) -> Any:
    """INT4 probes: DQ -> MatMul at block 64 / 128 with FP16 scales, a ragged block, a rank-3 block, DQ -> Conv."""
    import onnx
    from onnx import TensorProto as TP
    from onnx import helper as h

    rng = np.random.default_rng(0)
    k, n, block, rank3, conv = {"matmul-b64": (256, 64, 64, False, False), "matmul-b128": (256, 64, 128, False, False),
                                "ragged-b64": (96, 64, 64, False, False), "rank3-b64": (128, 64, 64, True, False),
                                "conv-b64": (64 * 9, 16, 64, False, True)}[kind]
    shape = (2, k, n) if rank3 else (k, n) if not conv else (n, k)
    axis = 1 if rank3 or conv else 0
    blocks = -(-k // block)
    scale_shape = (2, blocks, n) if rank3 else (blocks, n) if not conv else (n, blocks)
    inits = [h.make_tensor("w_q", TP.INT4, shape, rng.integers(-8, 8, int(np.prod(shape))).tolist()),
             h.make_tensor("w_s", TP.FLOAT16, scale_shape, [0.01] * int(np.prod(scale_shape)))]
    nodes = [h.make_node("DequantizeLinear", ["w_q", "w_s"], ["w"], axis=axis, block_size=block)]
    if conv:
        inits.append(onnx.numpy_helper.from_array(np.array([n, 64, 3, 3], np.int64), "shape"))
        nodes += [h.make_node("Reshape", ["w", "shape"], ["w4"]), h.make_node("Conv", ["x", "w4"], ["y"], pads=[1] * 4)]
        x, y = ["N", 64, 8, 8], ["N", n, 8, 8]
    else:
        nodes.append(h.make_node("MatMul", ["x", "w"], ["y"]))
        x, y = (["N", 2, 8, k], ["N", 2, 8, n]) if rank3 else (["N", k], ["N", n])
    graph = h.make_graph(nodes, kind, [h.make_tensor_value_info("x", TP.FLOAT16, x)],
                         [h.make_tensor_value_info("y", TP.FLOAT16, y)], inits)
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 21)])


def step_int4_probes(work: Path) -> dict[str, Any]:
    from qdc_export.engines.trt_rules import check_tensorrt_compatibility

    kinds = ("matmul-b64", "matmul-b128", "ragged-b64", "rank3-b64", "conv-b64")
    rules = {k: sorted({v.rule for v in check_tensorrt_compatibility(_probe_model(k))}) for k in kinds}
    if (reason := _trt_reason()) is not None:
        return {"status": "skipped", "reason": reason, "rules_verdicts": rules}
    import onnx

    from qdc_export.engines.tensorrt import TensorRTBuildConfig, build_engine

    probes: dict[str, Any] = {}
    for kind in kinds:
        model = _probe_model(kind)
        path = work / f"probe-{kind}.onnx"
        onnx.save(model, path)
        dims = [d.dim_value or d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim]
        fixed = tuple(int(d) for d in dims[1:])
        config = TensorRTBuildConfig(shapes={"x": ((1, *fixed), (2, *fixed), (4, *fixed))})
        try:
            build_engine(path, config, work / f"probe-{kind}.plan", check_rules=False)
            probes[kind] = {"built": True, **_int8_layers(work / f"probe-{kind}.plan")}
        except Exception as exc:  # noqa: BLE001 - a probe records TensorRT's verdict, whatever it is
            probes[kind] = {"built": False, "error": " ".join(str(exc).split())[:400]}
        probes[kind]["rules_verdict"] = rules[kind]
    # the rules say which ones TensorRT must reject; a disagreement is the finding this probe exists for
    agree = all(p["built"] == (not p["rules_verdict"]) for p in probes.values())
    return {"status": "ok" if agree else "failed", "rules_agree_with_tensorrt": agree, "probes": probes}


def step_ort_providers(work: Path) -> dict[str, Any]:
    import onnxruntime as ort

    from qdc_export.engines.providers import create_session

    wanted = ["CUDAExecutionProvider", "TensorrtExecutionProvider"]
    missing = [p for p in wanted if p not in ort.get_available_providers()]
    if missing or _trt_reason() is not None:
        return {"status": "skipped", "reason": f"providers missing: {missing}" if missing else _trt_reason()}
    folder = _build_w8a8(work)
    rng = np.random.default_rng(1)
    cpu = create_session(folder / "model.onnx", provider="cpu")
    feeds = {i.name: (rng.standard_normal([2, *i.shape[1:]]).astype(np.float32) if i.name != "timestep"
                      else np.full([2], 500.0, np.float32)) for i in cpu.get_inputs()}
    ref = cpu.run(None, feeds)[0]
    result: dict[str, Any] = {}
    for provider in ("cuda", "tensorrt"):
        start = time.perf_counter()
        session = create_session(folder / "model.onnx", provider=provider)
        out = session.run(None, feeds)[0]
        result[provider] = {"session_and_first_run_s": round(time.perf_counter() - start, 2),
                            "providers": session.get_providers(), "snr_db_vs_cpu": _snr(ref, out)}
    passed = all(v["snr_db_vs_cpu"] >= SNR_DB_MIN for v in result.values())
    return {"status": "ok" if passed else "failed", **result}


STEPS: dict[str, Callable[[Path], dict[str, Any]]] = {
    "01_versions": step_versions, "02_pytest_gpu": step_pytest_gpu, "03_w8a8_engine": step_w8a8_engine,
    "04_int4_probes": step_int4_probes, "05_ort_providers": step_ort_providers,
}


def main() -> int:
    out = Path(sys.argv[1])
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    for name, step in STEPS.items():
        start = time.perf_counter()
        try:
            verdict = step(work)
        except Exception as exc:  # noqa: BLE001 - one failing step must not hide the others' verdicts
            verdict = {"status": "failed", "error": f"{type(exc).__name__}: {exc}",
                       "traceback": traceback.format_exc().splitlines()[-6:]}
        verdict = {"step": name, **verdict, "seconds": round(time.perf_counter() - start, 2)}
        (out / f"{name}.json").write_text(json.dumps(verdict, indent=2, default=str))
        print(f"{name}: {verdict['status']}" + (f" ({verdict.get('reason') or verdict.get('error')})"
                                                 if verdict["status"] != "ok" else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
