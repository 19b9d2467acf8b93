#!/usr/bin/env bash
# Type-check the TensorRT engine code against tensorrt-stubs (no TensorRT or GPU needed).
#
# tensorrt-stubs 10.13.0.35.1 ships stub files that do not parse (pybind11-stubgen output: a
# parameter named `in`, a required parameter after defaulted ones), and without py.typed markers
# in the tensorrt/ and tensorrt_bindings/ folders. We never edit site-packages: the stubs are
# copied to a temporary folder, the few unparsable signature lines are repaired mechanically
# (`in` -> `in_`; `= ...` added to required parameters that follow defaulted ones), and that
# folder goes on MYPYPATH. Every repair is printed. See mypy.ini for the remaining settings.
set -euo pipefail
cd "$(dirname "$0")/.."

stubs_dir="$(mktemp -d)"
trap 'rm -rf "$stubs_dir"' EXIT

python - "$stubs_dir" <<'PY'
import ast
import importlib.util
import pathlib
import re
import sys

dest = pathlib.Path(sys.argv[1])
spec = importlib.util.find_spec("tensorrt_stubs")
if spec is None or spec.origin is None:
    sys.exit("typecheck: tensorrt-stubs is not installed (pip install 'tensorrt-stubs>=10.12')")
site = pathlib.Path(spec.origin).parent.parent
keyword_param = re.compile(r"([(,]\s*)(in|is|not|and|or|from|lambda|def|class|pass|global)(\s*:)")

for package in ("tensorrt", "tensorrt_bindings"):
    for stub in sorted((site / package).rglob("*.pyi")):
        lines = stub.read_text().splitlines()
        for _ in range(200):
            try:
                ast.parse("\n".join(lines), filename=str(stub))
                break
            except SyntaxError as err:
                index = (err.lineno or 1) - 1
                line = lines[index]
                repaired = keyword_param.sub(r"\1\2_\3", line)
                if repaired == line and line.lstrip().startswith("def ") and "(" in line:
                    head, _, tail = line.partition("(")
                    params, _, rest = tail.rpartition(")")
                    parts, seen_default = [], False
                    for param in re.split(r",\s*(?![^\[]*\])", params):
                        if "=" in param:
                            seen_default = True
                        elif seen_default and param.strip() and not param.strip().startswith("*"):
                            param += " = ..."
                        parts.append(param)
                    repaired = f"{head}({', '.join(parts)}){rest}"
                if repaired == line:
                    sys.exit(f"typecheck: cannot repair {stub}:{err.lineno}: {line.strip()}")
                print(f"typecheck: repaired {stub.name}:{err.lineno}: {repaired.strip()[:100]}")
                lines[index] = repaired
        else:
            sys.exit(f"typecheck: too many unparsable lines in {stub}")
        out = dest / stub.relative_to(site)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(lines) + "\n")
PY

MYPYPATH="$stubs_dir" python -m mypy --config-file mypy.ini \
  src/qdc_export/engines/tensorrt.py src/qdc_export/engines/tensorrt_runtime.py src/qdc_export/engines/trt_rules.py src/qdc_export/engines/onnx_graph.py \
  src/qdc_export/engines/ort_tensorrt.py
