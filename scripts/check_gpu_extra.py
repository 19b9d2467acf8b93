"""Check, without a GPU, that every requirement of pyproject's GPU extra resolves to a published distribution
for this interpreter and platform (``pip index versions``, which lists only installable releases), and that
the extras keep CPU and GPU ONNX Runtime apart. Prints one JSON object; exit 1 when anything fails.

    python scripts/check_gpu_extra.py [--extra gpu]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def published_versions(name: str) -> list[Version]:
    out = subprocess.run([sys.executable, "-m", "pip", "index", "versions", name], capture_output=True,
                         text=True, timeout=180)
    match = re.search(r"Available versions:\s*(.+)", out.stdout)
    return [Version(v.strip()) for v in match.group(1).split(",")] if match else []


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--extra", default="gpu")
    args = parser.parse_args()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    results, ok = [], True
    for text in extras[args.extra]:
        requirement = Requirement(text)
        versions = published_versions(requirement.name)
        matching = sorted(v for v in versions if requirement.specifier.contains(v, prereleases=False))
        resolved = str(matching[-1]) if matching else None
        ok &= resolved is not None
        results.append({"requirement": text, "resolves_to": resolved, "oldest_allowed": str(matching[0]) if matching
                        else None, "published": len(versions)})
    base = [Requirement(r).name for r in project["dependencies"]]
    clash = [n for n in ("onnxruntime", "onnxruntime-gpu") if n in base]
    ok &= not clash
    print(json.dumps({"extra": args.extra, "ok": ok, "requirements": results,
                      "onnxruntime_in_base_dependencies": clash}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
