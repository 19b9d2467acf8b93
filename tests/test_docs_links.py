"""Every documentation reference in the repository resolves to a file in the repository.

Checked against the files on disk (no import of the package):
  * each ``docs/<name>.md`` cited in src/, scripts/, benchmarks/ (docstrings, comments, strings, recorded
    results) and in README.md exists;
  * a cited section (``docs/method.md, "How it is judged"`` or ``(method.md, "Propagation")``) is a heading
    of that file;
  * every relative Markdown link in docs/*.md and README.md points at an existing file, and its ``#anchor``
    (GitHub's heading slug) at an existing heading.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CODE_DIRS = ("src", "scripts", "benchmarks")
TEXT_SUFFIXES = {".py", ".md", ".sh", ".json", ".toml", ".txt"}

# Documents cited before they exist. Each entry says who adds it; remove the entry in the change that adds it
# (test_allow_list_is_not_stale fails once the file exists).
ALLOWED_MISSING: set[str] = set()

# ``docs/...`` paths of other projects, named with the project in front of them (onnx-tensorrt's operator
# support matrix and changelog, cited by engines/trt_rules.py as rule sources).
EXTERNAL_PREFIXES = ("onnx-tensorrt ",)

DOC_REFERENCE = re.compile(r"(?<![\w/.-])docs/([A-Za-z0-9_.-]+?\.md)\b")
SECTION_REFERENCE = re.compile(r"(?<![\w/.-])(?:docs/)?([A-Za-z0-9_-]+\.md),? \"([^\"]+)\"")
MARKDOWN_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCED_BLOCK = re.compile(r"^(```|~~~).*?^\1", re.DOTALL | re.MULTILINE)
INLINE_CODE = re.compile(r"`[^`\n]*`")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)


def _text_files() -> list[Path]:
    files = [ROOT / "README.md"]
    for folder in CODE_DIRS:
        files += sorted(p for p in (ROOT / folder).rglob("*")
                        if p.is_file() and p.suffix in TEXT_SUFFIXES and "__pycache__" not in p.parts)
    return files


def _doc_references() -> list[tuple[str, int, str, int]]:
    """(file, line, cited name, column) of every ``docs/<name>.md`` not qualified by another project."""
    found = []
    for path in _text_files():
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            for match in DOC_REFERENCE.finditer(line):
                if any(line[:match.start()].endswith(prefix) for prefix in EXTERNAL_PREFIXES):
                    continue
                found.append((str(path.relative_to(ROOT)), number, match.group(1), match.start()))
    return found


def _markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _prose(text: str) -> str:
    """Markdown without fenced code blocks and inline code (their brackets are not links)."""
    return INLINE_CODE.sub("", FENCED_BLOCK.sub("", text))


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces -> hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    for heading in HEADING.findall(FENCED_BLOCK.sub("", path.read_text(encoding="utf-8"))):
        slug = _slug(heading)
        count = seen.get(slug, 0)
        anchors.add(slug if count == 0 else f"{slug}-{count}")
        seen[slug] = count + 1
    return anchors


def _headings(path: Path) -> set[str]:
    return {h.strip() for h in HEADING.findall(FENCED_BLOCK.sub("", path.read_text(encoding="utf-8")))}


def test_cited_docs_exist():
    references = _doc_references()
    assert references, "no docs/ references found at all: the scan is broken"
    missing = [f"{file}:{line}: docs/{name}" for file, line, name, _ in references
               if name not in ALLOWED_MISSING and not (ROOT / "docs" / name).is_file()]
    assert not missing, "cited documents missing from docs/:\n" + "\n".join(missing)


def test_allow_list_is_not_stale():
    stale = sorted(name for name in ALLOWED_MISSING if (ROOT / "docs" / name).is_file())
    assert not stale, f"docs/{', docs/'.join(stale)} exists now: remove it from ALLOWED_MISSING"


def test_cited_sections_exist():
    problems, checked = [], 0
    for path in _text_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        for match in SECTION_REFERENCE.finditer(text):
            name, section = match.groups()
            doc = ROOT / "docs" / name
            if not doc.is_file():
                continue  # not ours (e.g. benchmarks/results/*.md), or test_cited_docs_exist reports it
            checked += 1
            if section not in _headings(doc):
                line = text.count("\n", 0, match.start()) + 1
                where = f"{path.relative_to(ROOT)}:{line}"
                problems.append(f"{where}: docs/{name} has no heading {section!r}")
    assert checked, "no section references found: the scan is broken"
    assert not problems, "\n".join(problems)


def test_relative_markdown_links_resolve():
    problems, checked = [], 0
    for path in _markdown_files():
        for target in MARKDOWN_LINK.findall(_prose(path.read_text(encoding="utf-8"))):
            if "://" in target or target.startswith("mailto:"):
                continue
            checked += 1
            file_part, _, anchor = target.partition("#")
            destination = (path.parent / file_part).resolve() if file_part else path
            where = f"{path.relative_to(ROOT)}: ({target})"
            if not destination.exists():
                problems.append(f"{where}: no such file")
            elif anchor and destination.suffix == ".md" and anchor not in _anchors(destination):
                problems.append(f"{where}: no heading with anchor #{anchor}")
    assert checked, "no relative links found: the scan is broken"
    assert not problems, "links that do not resolve:\n" + "\n".join(problems)


def test_slug_follows_github():
    """The anchor rule above, on headings of the kinds docs/ uses (GitHub's documented behaviour)."""
    assert _slug("Tables, lookup and the graph head") == "tables-lookup-and-the-graph-head"
    nonlinear = "Nonlinear updates (x0 clipping, thresholding)"
    assert _slug(nonlinear) == "nonlinear-updates-x0-clipping-thresholding"
    assert _slug("The form `--target tensorrt` writes") == "the-form---target-tensorrt-writes"
    assert _slug("DPM-Solver++ 2M") == "dpm-solver-2m"
