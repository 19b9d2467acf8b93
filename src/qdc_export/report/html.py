"""The HTML of ``report.html``, rendered from records only (the manifest, ``report/report.json`` and
``parity.json``), so that a committed report can be re-rendered and checked against its records
(scripts/render_results.py, tests/test_render_results.py)."""

from __future__ import annotations

import html
import math
from typing import Any

import numpy as np

from qdc_export.config import BuildConfig
from qdc_export.manifest import PARITY_FILE

REPORT_DIR = "report"


def column_titles(precision: str, method: str, quantized: bool) -> dict[str, str]:
    """Titles of the image columns that carry PSNR values, by their key in report.json's ``psnr_db``."""
    if not quantized:
        return {"engine": f"engine ({precision})"}
    if method != "none":
        return {"no_compensation": f"{precision}, no\ncompensation",
                "compensated": f"{precision} + {method}\n(engine as built)"}
    return {"no_compensation": f"{precision}, no\ncompensation\n(engine as built)",
            "compensated": f"{precision} + tcec-m0\n(fitted for this\nreport, not in\nthe engine)"}


def _mean(values: list[float]) -> float:
    return float(np.mean(values))


def _fmt_db(v: float) -> str:
    return "inf" if math.isinf(v) else f"{v:.2f}"


def render_html(manifest: dict[str, Any], summary: dict[str, Any], parity: dict[str, Any] | None) -> str:
    """report.html from its records alone: the manifest, report.json's summary and parity.json (None without
    a parity check). scripts/render_results.py re-renders committed reports with it."""
    from qdc_export.check.parity import summarize

    esc = html.escape
    config = BuildConfig.from_dict(manifest["build"])
    titles = column_titles(config.precision, summary["method"], config.plan.quantized)
    value_cols = [(titles[key].replace("\n", " "), values) for key, values in summary["psnr_db"].items()]
    layer_rows = summary.get("layer_sensitivity") or []
    model_name = manifest["model"]["source"].get("name", manifest["model"]["source"].get("path", "?"))
    title = f"qdc-export report: {model_name}, {config.precision}, {config.scheduler} x {config.steps}"
    head_rows = [
        ("model", model_name),
        ("precision", config.precision),
        ("sampler", f"{config.scheduler}, {config.steps} steps"),
        ("compensation", summary["method"]),
        ("third image column", summary["third_column"]),
        ("evaluation seeds", f"0..{len(summary['seeds']) - 1}"),
        ("manifest content sha256", manifest.get("content_sha256", "?")),
    ]
    parts = [
        (
            f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title><style>"
            "body{font-family:sans-serif;max-width:1100px;margin:1em auto;padding:0 1em}"
            "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}"
            "th{background:#f3f3f3}td.l{text-align:left}img{max-width:100%}</style></head><body>"
        ),
        f"<h1>{esc(title)}</h1><table>",
    ]
    parts += [f"<tr><th>{esc(k)}</th><td class='l'>{esc(str(v))}</td></tr>" for k, v in head_rows]
    parts.append("</table>")
    parts.append(
        "<h2>Images</h2><p>PSNR (dB) of each image against the FP model's image from the same seed "
        "(images in [0, 1]); upscaled x4, nearest neighbour.</p>"
        f"<img src='{REPORT_DIR}/images.png' alt='image grid'>"
    )
    parts.append(
        "<table id='psnr'><tr><th>seed</th>" + "".join(f"<th>{esc(t)}</th>" for t, _ in value_cols) + "</tr>"
    )
    for i, seed in enumerate(summary["seeds"]):
        cells = "".join(f"<td data-psnr='{v[i]!r}'>{_fmt_db(v[i])}</td>" for _, v in value_cols)
        parts.append(f"<tr><td>{seed}</td>{cells}</tr>")
    means = "".join(f"<td>{_fmt_db(_mean(v))}</td>" for _, v in value_cols)
    parts.append(f"<tr><th>mean</th>{means}</tr></table>")
    parts.append(
        "<h2>Per-step latent error</h2><p>||x~_n - x_n|| / ||x_n||, mean over the images; step 0 is the "
        "shared starting noise.</p>"
        f"<img src='{REPORT_DIR}/latent_error.png' alt='latent error curves'>"
    )
    parts.append("<h2>Per-layer sensitivity</h2>")
    if layer_rows:
        parts.append(
            "<p>Output SQNR of each quantized layer with only that layer's input and weight quantized "
            "(quantizers re-created from the build config), on inputs recorded along FP calibration "
            "trajectories. Lowest = most sensitive.</p>"
            f"<img src='{REPORT_DIR}/layer_sensitivity.png' alt='per-layer sensitivity'>"
            "<details><summary>all layers</summary><table><tr><th>layer</th><th>SQNR dB</th></tr>"
        )
        parts += [
            f"<tr><td class='l'>{esc(r['layer'])}</td><td>{_fmt_db(r['sqnr_db'])}</td></tr>"
            for r in layer_rows
        ]
        parts.append("</table></details>")
    else:
        parts.append("<p>No quantized layers (fp32 build) or sensitivity skipped.</p>")
    parts.append("<h2>Parity</h2>")
    if parity is None:
        parts.append(f"<p>No {PARITY_FILE}: the build ran without the parity check.</p>")
    else:
        parts.append(f"<pre>{esc(summarize(parity))}</pre>")
    parts.append(
        "<p style='color:#777'>Numbers in full precision: "
        f"<a href='{REPORT_DIR}/report.json'>{REPORT_DIR}/report.json</a>.</p></body></html>"
    )
    return "\n".join(parts)
