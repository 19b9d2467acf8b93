"""Published numbers cannot drift from their records: the README's generated blocks and the committed example
reports (report.html, parity.json, manifest format) must equal what scripts/render_results.py makes from the
committed JSON records; and the check notices a tampered record."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _renderer():
    spec = importlib.util.spec_from_file_location("render_results", ROOT / "scripts" / "render_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render = _renderer()
REPORT_FOLDERS = sorted(p for p in render.REPORTS.iterdir() if p.is_dir())


def test_readme_numbers_are_generated_from_their_records():
    text = render.README.read_text()
    expected = render.render_readme(text)
    stale = [m["name"] for m, e in zip(render.BLOCK.finditer(text), render.BLOCK.finditer(expected))
             if m["body"] != e["body"]]
    assert not stale, f"README blocks differ from their records: {stale}; run python scripts/render_results.py"
    assert text == expected


@pytest.mark.parametrize("folder", REPORT_FOLDERS, ids=[p.name for p in REPORT_FOLDERS])
def test_committed_report_agrees_with_its_records_and_the_manifest_format(folder):
    assert render.report_problems(folder) == []


def test_the_check_notices_a_tampered_report(tmp_path):
    folder = tmp_path / "report"
    shutil.copytree(REPORT_FOLDERS[0], folder)
    html = (folder / "report.html").read_text()
    first_psnr = html.index("data-psnr='")
    (folder / "report.html").write_text(html[:first_psnr] + html[first_psnr:].replace(">", ">9", 1))
    parity = json.loads((folder / "parity.json").read_text())
    (folder / "parity.json").write_text(json.dumps({**parity, "passed": not parity["passed"]}))
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**manifest, "format_version": manifest["format_version"] + 1}))
    problems = "\n".join(render.report_problems(folder))
    for needle in ("report.html differs", "parity.json is not the one", "format_version", "content_sha256"):
        assert needle in problems, problems


def test_a_readme_without_a_block_is_refused():
    text = render.README.read_text()
    start = text.index("<!-- generated:parity -->")
    end = text.index("<!-- /generated:parity -->") + len("<!-- /generated:parity -->")
    with pytest.raises(SystemExit, match="lacks the generated blocks: parity"):
        render.render_readme(text[:start] + text[end:])
