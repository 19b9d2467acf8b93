"""Resident memory that ONNX Runtime's session creation adds for a build's model.onnx, per session option
(optimization level, weight prepacking). One fresh process per option, so the numbers do not mix.
RSS is split into anonymous memory (heap copies) and file-backed pages (the mmapped external weight
file, which the kernel can drop under pressure).

    python benchmarks/ort_session_memory.py BUILD_DIR
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

OPTIONS = (("all", True), ("all", False), ("basic", True), ("disable", True))


def measure(model: Path, level: str, prepack: bool) -> str:
    import onnx
    import onnxruntime as ort

    from qdc_export.engines.providers import make_session_options
    from qdc_export.infra.memory import reset_peak, resident_gb

    options, providers = make_session_options(onnx.load(str(model), load_external_data=False), provider="cpu",
                                              optimization=level)
    options.enable_cpu_mem_arena = False  # as the parity check creates it
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    base, base_anon, base_file = resident_gb(), resident_gb("RssAnon"), resident_gb("RssFile")
    reset_peak()
    ort.InferenceSession(str(model), options, providers=providers)
    return (f"{level:>7s}, prepacking {'on ' if prepack else 'off'}: session +{resident_gb() - base:.2f} GB "
            f"(anonymous +{resident_gb('RssAnon') - base_anon:.2f}, file-backed +{resident_gb('RssFile') - base_file:.2f}), "
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
    weights = sum(f.stat().st_size for f in args.build_dir.iterdir() if f.name.startswith("model.onnx"))
    print(f"{model}: {weights / 1e9:.2f} GB with its external data")
    for level, prepack in OPTIONS:
        subprocess.run([sys.executable, __file__, str(args.build_dir), "--one", level, "on" if prepack else "off"],
                       check=True)


if __name__ == "__main__":
    main()
