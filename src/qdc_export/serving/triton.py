"""A Triton Inference Server model repository from a build folder (``qdc-export triton BUILD --out REPO``):

    REPO/<name>/config.pbtxt          backend "onnxruntime", inputs/outputs with dims, dynamic batching
    REPO/<name>/1/model.onnx          the build's engine (and its external data file, if any)
    REPO/<name>/manifest.json         the build's manifest (schedule, compensation, tolerances)
    REPO/<name>_trt/...               the same for the TensorRT plan, where ``--target tensorrt`` built one

Compensation state: client-fed I/O (``comp_state`` in, ``comp_state_out`` out), not Triton's sequence batcher
with implicit state. Why: a sequence-batched request must have batch size 1, which rules out the batch of two
that classifier-free guidance sends per step (and several images per request); the engine looks up its
compensation row per batch row from that row's timestep, so with client-fed state any requests (other
generations, other steps) can share one dynamically formed batch; and the state is data, so the client resets
it by sending zeros at the first step. The cost is one latent-sized tensor each way per step.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

from qdc_export.errors import OutputExistsError, UserError
from qdc_export.manifest import MANIFEST, read_manifest, verify_artifacts

MODEL_FILE = "model.onnx"
TRT_ENGINE_FILE = "model.engine"
_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64", "int32": "TYPE_INT32"}


def model_name(manifest: dict[str, Any]) -> str:
    source = manifest["model"]["source"]
    base = f"{source.get('name', 'model')}-{manifest['build']['precision']}"
    return re.sub(r"[^A-Za-z0-9_.-]", "_", base)


def _tensor(entry: dict[str, Any]) -> str:
    name, shape = entry["name"], list(entry["shape"])
    if shape[:1] != ["batch"]:
        raise UserError(f"engine tensor {name} has no leading batch axis ({shape}); Triton batching needs one")
    dtype = _TYPES.get(entry["dtype"])
    if dtype is None:
        raise UserError(f"engine tensor {name} has dtype {entry['dtype']}, which has no Triton type here")
    dims = [int(d) for d in shape[1:]]
    if not dims:  # a [batch] tensor (timestep): Triton sends [batch, 1] and reshapes it to [batch]
        return f'  {{ name: "{name}" data_type: {dtype} dims: [ 1 ] reshape: {{ shape: [ ] }} }}'
    return f'  {{ name: "{name}" data_type: {dtype} dims: [ {", ".join(map(str, dims))} ] }}'


def model_config(manifest: dict[str, Any], name: str, *, max_batch_size: int, platform: str = "onnxruntime",
                 instances: int = 1, kind: str = "KIND_AUTO") -> str:
    """config.pbtxt text (Triton's ModelConfig in protobuf text format)."""
    io = manifest["io"]
    backend = 'backend: "onnxruntime"' if platform == "onnxruntime" else 'platform: "tensorrt_plan"'
    inputs = ",\n".join(_tensor(i) for i in io["inputs"])
    outputs = ",\n".join(_tensor(o) for o in io["outputs"])
    schedule = manifest["scheduler"]
    return (
        f"# qdc-export build of {manifest['model']['source'].get('name', '?')}: {manifest['build']['precision']}, "
        f"{schedule['name']} x {schedule['steps']} steps (see manifest.json)\n"
        f'name: "{name}"\n{backend}\nmax_batch_size: {max_batch_size}\n'
        f"input [\n{inputs}\n]\noutput [\n{outputs}\n]\n"
        f"dynamic_batching {{ }}\n"
        f"instance_group [ {{ count: {instances} kind: {kind} }} ]\n"
    )


def _copy_onnx(build_dir: Path, version_dir: Path) -> None:
    version_dir.mkdir(parents=True)
    shutil.copy2(build_dir / MODEL_FILE, version_dir / MODEL_FILE)
    data = build_dir / (MODEL_FILE + ".data")  # external weights, referenced by this name from model.onnx
    if data.is_file():
        shutil.copy2(data, version_dir / data.name)


def write_repository(build_dir: Path | str, out: Path | str, *, name: str | None = None,
                     max_batch_size: int | None = None, force: bool = False) -> list[Path]:
    """Write the model repository; returns the config.pbtxt paths written."""
    build_dir, out = Path(build_dir), Path(out)
    manifest = read_manifest(build_dir)
    verify_artifacts(build_dir, manifest)
    name = name or model_name(manifest)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise UserError(f"model name {name!r}: use letters, digits, '_', '.', '-'")
    target = manifest.get("target", {})
    if max_batch_size is None:
        max_batch_size = int(target["batch_range"][2]) if target.get("batch_range") else 8
    if max_batch_size < 1:
        raise UserError(f"--max-batch-size must be >= 1, got {max_batch_size}")
    models = [(name, "onnxruntime")]
    if target.get("engine"):
        models.append((f"{name}_trt", "tensorrt"))
    for model, _ in models:
        if (out / model).exists() and not force:
            raise OutputExistsError(f"{out / model} exists; pass --force to replace it")
    written = []
    for model, platform in models:
        folder = out / model
        shutil.rmtree(folder, ignore_errors=True)
        if platform == "onnxruntime":
            _copy_onnx(build_dir, folder / "1")
        else:
            (folder / "1").mkdir(parents=True)
            shutil.copy2(build_dir / target["engine"], folder / "1" / "model.plan")
        shutil.copy2(build_dir / MANIFEST, folder / MANIFEST)
        config = model_config(manifest, model, max_batch_size=max_batch_size, platform=platform,
                              kind="KIND_GPU" if platform == "tensorrt" else "KIND_AUTO")
        (folder / "config.pbtxt").write_text(config)
        written.append(folder / "config.pbtxt")
    return written
