"""manifest.json: what was built, from what, with what, and the sha256 of every artifact. The hashed
content holds no timestamps, so identical builds give identical manifests (creation time and stage
timings are kept out of ``content_sha256``)."""

from __future__ import annotations

import hashlib
import json
from importlib import metadata
from pathlib import Path
from typing import Any

from qdc_export.errors import UserError

# The build folder: manifest.json and the artifacts it hashes.
MANIFEST = "manifest.json"
MODEL_FILE = "model.onnx"
REFERENCE_FILE = "reference.pt2"
CONDITIONING_FILE = "conditioning.safetensors"
PARITY_FILE = "parity.json"
COMPENSATION_DIR = "compensation"
FORMAT_VERSION = 1
_PACKAGES = ("qdc-export", "torch", "torchao", "diffusers", "onnx", "onnxruntime", "onnxscript", "polygraphy")


def package_versions() -> dict[str, str]:
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def artifact_hashes(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): sha256_file(p)
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}


def canonical_json(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=True, allow_nan=True, default=str) + "\n"


UNHASHED_KEYS = ("created", "timings_s", "made_on")  # made_on: commit, dirty flag, machine load


def write_manifest(folder: Path, content: dict[str, Any], unhashed: dict[str, Any] | None = None) -> dict[str, Any]:
    """``unhashed`` (creation time, stage timings) is kept out of ``content_sha256``."""
    content = {k: v for k, v in content.items() if k not in UNHASHED_KEYS}
    content.update(format_version=FORMAT_VERSION, artifacts=artifact_hashes(folder))
    content["content_sha256"] = hashlib.sha256(canonical_json(content).encode()).hexdigest()
    content.update(unhashed or {})
    (folder / MANIFEST).write_text(canonical_json(content))
    return content


def read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    if not path.is_file():
        raise UserError(f"{folder} is not a qdc-export build folder (no {MANIFEST})")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON: {exc}") from None
    if data.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path} has format_version {data.get('format_version')!r}, expected {FORMAT_VERSION}")
    return data


def verify_artifacts(folder: Path, manifest: dict[str, Any]) -> None:
    for rel, expected in manifest.get("artifacts", {}).items():
        path = folder / rel
        if not path.is_file():
            raise UserError(f"artifact {rel} listed in the manifest is missing from {folder}")
        if sha256_file(path) != expected:
            raise UserError(f"artifact {rel} does not match its sha256 in the manifest (modified or corrupted)")
