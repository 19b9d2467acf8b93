#!/usr/bin/env bash
# GPU smoke run for a machine with only this repo and its installed extras (pip install -e ".[gpu,test]").
# Writes one JSON verdict per step into $OUT, or the folder given as $1, or ./gpu_smoke_out. Steps that cannot
# run (no TensorRT, no CUDA, an ONNX Runtime provider missing) write "skipped" with the reason; the run never
# stops early. Budget: under 8 minutes on one GPU (a 4-step W8A8 build of the bundled model and small probes).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-gpu_smoke_out}}"
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
timeout 470 python3 scripts/gpu_smoke.py "$out"
status=$?
if [ "$status" -eq 124 ]; then
  echo '{"step": "99_deadline", "status": "failed", "reason": "the smoke run passed its 470 s deadline"}' \
    > "$out/99_deadline.json"
fi
ls "$out"/*.json
