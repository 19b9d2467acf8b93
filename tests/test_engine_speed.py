"""benchmarks/engine_speed.py in --quick mode writes a record whose rows cover every runtime x form, with the
provenance of the run, the kernels each runtime selected and the fidelity beside the speed (slow: it builds four
forms of digits-uncond)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.mark.slow
def test_quick_run_writes_every_engine(tmp_path):
    pytest.importorskip("openvino")
    import engine_speed

    assert engine_speed.main(["--quick", "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache")]) == 0
    payload = json.loads((tmp_path / "out" / "engine_speed_quick.json").read_text())
    assert payload["meta"]["run"]["command"].startswith("python benchmarks/engine_speed.py --quick")
    assert payload["meta"]["threads"] == 2
    rows = {(r["runtime"], r["form"]): r for r in payload["models"][0]["rows"]}
    for form in ("fp32", "reference", "cpu", "tensorrt"):
        assert ("onnxruntime", form) in rows and ("openvino", form) in rows
    assert rows["onnxruntime", "cpu"]["kernels"].get("QLinearConv", 0) > 0, rows["onnxruntime", "cpu"]["kernels"]
    for row in rows.values():
        assert row["per_call"]["1"]["median_ms"] > 0 and "psnr_db_mean" in row["fidelity"]
    assert (tmp_path / "out" / "engine_speed_quick.md").is_file()
