"""Byte-level fingerprints of a fixed set of builds, to show that a refactoring changed no artifact.

    python scripts/fingerprint_builds.py --out benchmarks/results/fingerprints-after.json
    python scripts/fingerprint_builds.py --src /path/to/other/checkout/src --out before.json   # another tree
    python scripts/fingerprint_builds.py --compare before.json after.json                     # exit 1 if any differ

Each build runs the CLI in a fresh process (``python -m qdc_export.cli build ...``) with PYTHONPATH set to the
``--src`` tree, so the same script fingerprints any checkout. Recorded per build: the command, the sha256 of
model.onnx (and its external data), reference.pt2 and the compensation tables. The record carries the tree's git
commit, threads and package versions (qdc_export.infra.provenance).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The README's main command (the bundled default model), a default INT4 build and the TensorRT form.
BUILDS: dict[str, list[str]] = {
    "default-w8a8-tcec": ["--compensation", "tcec"],
    "w4a8-default-recipe": ["--precision", "w4a8", "--steps", "8", "--calib-samples", "4", "--parity-samples", "1"],
    "w8a8-tensorrt-form": ["--precision", "w8a8", "--target", "tensorrt", "--steps", "8", "--calib-samples", "4",
                           "--parity-samples", "1"],
}
HASHED = ("model.onnx", "model.onnx.data", "reference.pt2", "compensation/compensation.json",
          "compensation/compensation.safetensors")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fingerprint(folder: Path) -> dict[str, str]:
    return {name: sha256(folder / name) for name in HASHED if (folder / name).is_file()}


def git_commit(src: Path) -> str:
    result = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--", "."], capture_output=True,
                           text=True).stdout.strip()
    return result.stdout.strip() + ("+dirty" if dirty else "")


def run_builds(src: Path, work: Path) -> dict[str, dict[str, object]]:
    env = {**os.environ, "PYTHONPATH": str(src)}
    rows = {}
    for name, args in BUILDS.items():
        out = work / name
        command = [sys.executable, "-m", "qdc_export.cli", "build", *args, "--out", str(out), "--force"]
        print(f"building {name}", flush=True)
        done = subprocess.run(command, env=env, cwd=src.parent, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"{name}: build failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
        rows[name] = {"command": "qdc-export build " + " ".join(args), "sha256": fingerprint(out)}
    return rows


def compare(a_path: Path, b_path: Path) -> int:
    a, b = (json.loads(p.read_text()) for p in (a_path, b_path))
    differing = []
    for name in sorted(a["builds"].keys() | b["builds"].keys()):
        ha, hb = a["builds"].get(name, {}).get("sha256", {}), b["builds"].get(name, {}).get("sha256", {})
        for artifact in sorted(ha.keys() | hb.keys()):
            same = ha.get(artifact) == hb.get(artifact)
            print(f"{'same   ' if same else 'DIFFERS'} {name}/{artifact}")
            differing += [] if same else [f"{name}/{artifact}"]
    print(f"{a['tree']['commit']} vs {b['tree']['commit']}: "
          + ("identical" if not differing else f"{len(differing)} artifacts differ"))
    return 1 if differing else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", type=Path, default=ROOT / "src", help="the src/ folder of the tree to build")
    parser.add_argument("--out", type=Path, help="JSON record to write")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("A", "B"))
    parser.add_argument("--existing", type=Path, help="hash build folders already made by these commands from "
                                                      "--src's tree (DIR/<build name>) instead of building")
    args = parser.parse_args()
    if args.compare:
        return compare(*args.compare)
    if args.out is None:
        parser.error("--out is required unless --compare")
    sys.path.insert(0, str(ROOT / "src"))
    from qdc_export.infra.provenance import run_provenance

    if args.existing is not None:
        builds = {name: {"command": "qdc-export build " + " ".join(a), "sha256": fingerprint(args.existing / name),
                         "built_earlier_in": str(args.existing)} for name, a in BUILDS.items()}
    else:
        with tempfile.TemporaryDirectory(prefix="fingerprint-") as tmp:
            builds = run_builds(args.src.resolve(), Path(tmp))
    record = {"tree": {"src": str(args.src), "commit": git_commit(args.src.resolve())},
              "run": run_provenance("python scripts/fingerprint_builds.py", sys.argv[1:]), "builds": builds}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
