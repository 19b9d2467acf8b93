"""Resident memory that ONNX Runtime's session creation adds for a build's model.onnx, per session option
(optimization level, weight prepacking). One fresh process per option, so the numbers do not mix.

    python benchmarks/ort_session_memory.py BUILD_DIR
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

OPTIONS = (("all", True), ("all", False), ("basic", True))


def measure(model: Path, level: str, prepack: bool) -> str:
    import onnx
    import onnxruntime as ort

    from qdc_export.engines.providers import make_session_options
    from qdc_export.memory import reset_peak, resident_gb

    options, providers = make_session_options(onnx.load(str(model), load_external_data=False), provider="cpu",
                                              optimization=level)
    options.enable_cpu_mem_arena = False  # as the parity check creates it
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    base = resident_gb()
    reset_peak()
    ort.InferenceSession(str(model), options, providers=providers)
    return (f"{level:>5s}, prepacking {'on ' if prepack else 'off'}: session +{resident_gb() - base:.2f} GB, "
            f"peak +{resident_gb('VmHWM') - base:.2f} GB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("build_dir", type=Path)
    parser.add_argument("--one", nargs=2, metavar=("LEVEL", "PREPACK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    model = args.build_dir / "model.onnx"
    if args.one:
        print(measure(model, args.one[0], args.one[1] == "on"), flush=True)
        return
    print(f"{model}: {model.stat().st_size / 1e9:.2f} GB")
    for level, prepack in OPTIONS:
        subprocess.run([sys.executable, __file__, str(args.build_dir), "--one", level, "on" if prepack else "off"],
                       check=True)


if __name__ == "__main__":
    main()
