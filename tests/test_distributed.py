"""Distributed calibration: 2 processes (gloo, CPU) calibrating their share of the batches give observer
ranges, and so the scales and zero points of the converted graph, exactly equal to one process calibrating
every batch with the same seeds."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from qdc_export.errors import UserError

CALIB = {"scheduler_name": "ddim", "steps": 2, "seed": 0, "samples": 4, "batch": 1}  # 4 batches: 2 per process


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread, as in each torchrun process; restored afterwards, so later tests (and the builds they
    share through build_factory) keep conftest's thread count (a leaked 1 made later builds differ from earlier
    ones of the same options)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def observed_tiny(observer: str = "percentile"):
    from qdc_export.capture import capture
    from qdc_export.config import BuildConfig
    from qdc_export.load.models import load_model
    from qdc_export.quantize.graph import quantization_plan
    from qdc_export.quantize.qdq import insert_observers_

    model = load_model("tiny-unet2d")
    gm, _ = capture(model.unet, model.adapter)
    observed = insert_observers_(gm, quantization_plan(BuildConfig(precision="w8a8", observer=observer), model))
    return observed.module, model


def ranges_and_qparams(observed) -> dict[str, list]:
    from qdc_export.quantize.qdq import materialize_qdq_

    ranges = {name: (m.min_val.clone(), m.max_val.clone()) for name, m in observed.named_modules()
              if hasattr(m, "min_val")}
    converted = materialize_qdq_(observed).module
    qparams = []
    for node in converted.graph.nodes:
        if node.op == "call_function" and "quantize" in str(node.target):
            args = [getattr(converted, a.target) if isinstance(a, torch.fx.Node) and a.op == "get_attr" else a
                    for a in node.args[1:3]]
            qparams.append((node.name, *args))
    return {"ranges": ranges, "qparams": qparams}


def _worker(rank: int, world: int, init_file: str, result_file: str, observer: str) -> None:
    from qdc_export.quantize.calibrate import run_calibration
    from qdc_export.quantize.distributed import sharded_calibration

    warnings.filterwarnings("ignore")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        observed, model = observed_tiny(observer)
        with sharded_calibration():
            try:
                run_calibration(observed, model, **CALIB)
            except UserError as exc:
                if rank == 0:
                    torch.save({"error": str(exc)}, result_file)
                return
        if rank == 0:
            torch.save(ranges_and_qparams(observed), result_file)
    finally:
        dist.destroy_process_group()


def run_two_processes(tmp_path, observer: str = "percentile") -> dict:
    result = tmp_path / f"rank0-{observer}.pt"
    mp.spawn(_worker, args=(2, str(tmp_path / f"rdv-{observer}"), str(result), observer), nprocs=2, join=True)
    assert result.is_file()
    return torch.load(result, weights_only=False)


def assert_identical(single: dict, distributed: dict) -> None:
    assert single["ranges"].keys() == distributed["ranges"].keys() and single["ranges"]
    for name, (lo, hi) in single["ranges"].items():
        d_lo, d_hi = distributed["ranges"][name]
        assert torch.equal(lo, d_lo) and torch.equal(hi, d_hi), f"{name}: {lo}..{hi} vs {d_lo}..{d_hi}"
    assert len(single["qparams"]) == len(distributed["qparams"]) > 0
    for (name, scale, zp), (d_name, d_scale, d_zp) in zip(single["qparams"], distributed["qparams"], strict=True):
        assert name == d_name
        if isinstance(scale, torch.Tensor):
            assert torch.equal(scale, d_scale) and torch.equal(zp, d_zp), name
        else:
            assert scale == d_scale and zp == d_zp, name  # per-tensor: Python floats, compared exactly


def test_two_process_gloo_calibration_equals_one_process(tmp_path):
    from qdc_export.quantize.calibrate import run_calibration

    distributed = run_two_processes(tmp_path)
    observed, model = observed_tiny()
    run_calibration(observed, model, **CALIB)
    assert_identical(ranges_and_qparams(observed), distributed)


def test_histogram_observer_and_too_few_batches_are_refused_clearly():
    from qdc_export.quantize.distributed import CalibrationSharding

    observed, _ = observed_tiny("mse")
    with pytest.raises(UserError, match=r"observer 'mse' \(histogram\) cannot be calibrated across processes"):
        CalibrationSharding(rank=0, world=2).select([0, 8], observed)
    observed, _ = observed_tiny("minmax")
    with pytest.raises(UserError, match="1 calibration batch"):
        CalibrationSharding(rank=0, world=2).select([0], observed)
    assert CalibrationSharding(rank=1, world=2).select([0, 8, 16], observed) == [8]


@pytest.mark.slow
def test_torchrun_cli_build_matches_single_process_build(tmp_path):
    """The CLI under torchrun: rank 0 writes the folder; the manifest's content hash equals one process's."""
    import json

    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not on PATH")
    common = ["build", "tiny-unet2d", "--precision", "w8a8", "--steps", "2", "--calib-samples", "16",
              "--parity-samples", "1", "--compensation", "none"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([torchrun, "--nproc-per-node", "2", "--master-port", "29517", "-m", "qdc_export.cli", *common,
                    "--distributed", "--out", str(tmp_path / "dist")], check=True, env=env)
    subprocess.run([sys.executable, "-m", "qdc_export.cli", *common, "--out", str(tmp_path / "single")],
                   check=True, env=env)
    manifests = [json.loads((tmp_path / name / "manifest.json").read_text()) for name in ("dist", "single")]
    assert manifests[0]["artifacts"] == manifests[1]["artifacts"]
