"""The README's "Use a build" snippets run as written: its shell lines through the installed `qdc-export` entry
point and its Python block in a fresh interpreter, from a folder laid out as the README's main command leaves it
(`build/digits-w8a8-tcec` beside the checkout's `models/`). The build is the main command's (W8A8, TCEC, 20 DDIM
steps of the bundled model) with fewer calibration and parity samples, so the suite stays short."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from qdc_export.build import build
from qdc_export.config import BuildConfig

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Use a build"


def _snippets(language: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index(SECTION):]
    section = section[:section.index("\n## ", len(SECTION))]
    return re.findall(rf"```{language}\n(.*?)```", section, re.S)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("readme")
    (folder / "models").symlink_to(ROOT / "models")
    config = BuildConfig(precision="w8a8", compensation="tcec", calib_samples=2, parity_samples=1)
    build(str(ROOT / "models" / "digits-uncond"), config, folder / "build" / "digits-w8a8-tcec", write_report=False)
    return folder


def test_the_shell_snippet_runs(workdir):
    [block] = _snippets("bash")
    for line in block.strip().splitlines():
        proc = subprocess.run(line, shell=True, cwd=workdir, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{line}: {proc.stdout[-2000:]}{proc.stderr[-2000:]}"
    pngs = sorted((workdir / "samples").glob("*.png"))
    assert len(pngs) == 8, pngs


def test_the_python_snippet_runs(workdir):
    [block] = _snippets("python")
    proc = subprocess.run([sys.executable, "-c", block], cwd=workdir, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with Image.open(workdir / "digit.png") as image:
        assert image.size == (32, 32)
        assert len(set(image.convert("L").getdata())) > 8  # an image, not a flat field
