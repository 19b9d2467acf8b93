"""Check, without a GPU, what a GPU user can install from the Python package index alone: every requirement of
pyproject's GPU extra must resolve to *wheels* for this interpreter and platform (``pip install --dry-run
--only-binary=:all:``, metadata only, nothing installed), and the separate TensorRT step
(``engines.trt_rules.TENSORRT_REQUIREMENT``) is reported with whether the index has a wheel for it. ``pip index
versions`` is not enough: it lists source packages too, and every tensorrt-cu12 10.x there is a source package
that downloads from NVIDIA's index at install time. Also checks that the extras keep CPU and GPU ONNX Runtime
apart. Prints one JSON object; exit 1 when the extra does not install from wheels.

    python scripts/check_gpu_extra.py [--extra gpu] [--requirement REQ ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import tomllib
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def resolve_wheels(requirements: list[str]) -> dict:
    """What pip would install for ``requirements`` (with their dependencies) from wheels only, or why it cannot."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed",
                               "--only-binary=:all:", "--quiet", "--report", str(report), *requirements],
                              capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            errors = [line for line in proc.stderr.splitlines() if line.startswith("ERROR")]
            return {"wheels": False, "error": errors[-1] if errors else proc.stderr.strip()[-300:]}
        installs = json.loads(report.read_text())["install"]
    return {"wheels": True, "resolves_to": {i["metadata"]["name"]: i["metadata"]["version"] for i in installs}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--extra", default="gpu")
    parser.add_argument("--requirement", action="append", default=None,
                        help="check these requirements instead of the extra's (repeatable)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from qdc_export.engines.trt_rules import TENSORRT_REQUIREMENT

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = args.requirement or project["optional-dependencies"][args.extra]
    extra = resolve_wheels(requirements)
    # where the whole extra does not resolve, name the requirement that is not a wheel
    not_wheels = [] if extra["wheels"] else [r for r in requirements if not resolve_wheels([r])["wheels"]]
    tensorrt = {"requirement": TENSORRT_REQUIREMENT, **resolve_wheels([f"{TENSORRT_REQUIREMENT}"]),
                "how": "a separate step from NVIDIA's index (docs/tensorrt.md, Runtime pieces)"}
    base = [Requirement(r).name for r in project["dependencies"]]
    clash = [n for n in ("onnxruntime", "onnxruntime-gpu") if n in base]
    ok = extra["wheels"] and not clash
    print(json.dumps({"extra": args.extra, "ok": ok, "requirements": requirements, "extra_from_wheels": extra,
                      "not_wheels": not_wheels, "tensorrt": tensorrt, "onnxruntime_in_base_dependencies": clash},
                     indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
