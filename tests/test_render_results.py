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


def test_published_numbers_are_generated_from_their_records():
    for path, expected in render.render_all().items():
        text = path.read_text()
        stale = [m["name"] for m, e in zip(render.BLOCK.finditer(text), render.BLOCK.finditer(expected))
                 if m["body"] != e["body"]]
        assert not stale, f"{path.name} blocks differ from their records: {stale}; run python scripts/render_results.py"
        assert text == expected


def test_the_readme_quotes_no_figure_typed_by_hand():
    assert render.typed_figures(render.README.read_text()) == []
    typed = render.README.read_text().replace("## Use a build", "The engine is 2.5x faster.\n\n## Use a build")
    assert render.typed_figures(typed) == ["The engine is 2.5x faster."]


def test_a_dirty_record_is_published_with_its_mark(tmp_path, monkeypatch):
    """A record made from a tree with uncommitted changes renders as such wherever its commit is shown."""
    results = tmp_path / "results"
    shutil.copytree(render.RESULTS, results)
    power = json.loads((results / "parity_power.json").read_text())
    power["run"]["git_dirty"] = True
    (results / "parity_power.json").write_text(json.dumps(power))
    speed = json.loads((results / "engine_speed.json").read_text())
    for run in [speed["meta"]["run"], *(m["run"] for m in speed["models"] if "run" in m)]:
        run["git_dirty"] = True
    (results / "engine_speed.json").write_text(json.dumps(speed))
    monkeypatch.setattr(render, "RESULTS", results)
    assert "(dirty tree)" in render.block_parity_power()
    assert "(dirty tree)" in render.block_engine_speed()
    assert render.commit_mark({"git_commit": "0123456789", "git_dirty": False}) == "0123456"
    assert "not recorded" in render.commit_mark({"git_commit": "0123456789"})


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


def test_documents_without_a_block_are_refused():
    texts = {path: path.read_text() for path in render.DOCUMENTS}
    text = texts[render.README]
    start = text.index("<!-- generated:main-build -->")
    end = text.index("<!-- /generated:main-build -->") + len("<!-- /generated:main-build -->")
    texts[render.README] = text[:start] + text[end:]
    with pytest.raises(SystemExit, match="lack the generated blocks: main-build"):
        render.render_documents(texts)
