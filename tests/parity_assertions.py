"""The verdict of a quantized parity report, re-derived from its raw numbers (not from ``passed``): every step's
ONNX Runtime SNR and cosine meet that step's threshold, no threshold is above the absolute one, and the final-image
PSNR gap is within the allowed gap. Failure messages carry the summary line (max/mean/p99 errors)."""

from __future__ import annotations

from typing import Any

from qdc_export.check.parity import summarize


def assert_statistical_parity(report: dict[str, Any]) -> None:
    summary = summarize(report)
    assert report["mode"] == "statistical", summary
    assert report["passed"], summary
    tol, floor, trajectory = report["tolerances"], report["noise_floor"], report["trajectory"]
    assert len(floor["required_snr_db"]) == len(report["per_step"]) == report["steps"], summary  # one call a step
    for k, (stats, snr_req, cos_req) in enumerate(zip(report["per_step"], floor["required_snr_db"],
                                                       floor["required_cosine"])):
        assert snr_req <= tol["step_min_snr_db"] and cos_req <= tol["step_min_cosine"], (k, summary)
        assert stats["snr_db"] >= snr_req, f"step {k}: SNR {stats['snr_db']:.2f} < {snr_req:.2f} dB; {summary}"
        assert stats["cosine"] >= cos_req, f"step {k}: cosine {stats['cosine']:.6f} < {cos_req:.6f}; {summary}"
    assert trajectory["allowed_gap_db"] >= tol["trajectory_psnr_margin_db"], summary
    assert trajectory["gap_db"] <= trajectory["allowed_gap_db"], summary
