"""Where a measurement came from: the full command, torch threads, the git commit (and whether the tree had
uncommitted changes), a hash of the package's own source, and the package versions. Written into every benchmark
row so that a published number can be traced to the code and settings that produced it (scripts/render_results.py
marks rows that predate these fields instead of guessing them)."""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shlex
import subprocess
from pathlib import Path
from typing import Any

import torch

from qdc_export.manifest import package_versions

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # src/qdc_export (this module lives in its infra/)


@functools.lru_cache(maxsize=1)
def source_hash() -> str:
    """sha256 (16 hex digits) over the path and bytes of every .py file of the package: changes whenever the code
    that builds or scores an engine changes, committed or not (a cache key that a git commit alone would miss)."""
    digest = hashlib.sha256()
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        digest.update(path.relative_to(PACKAGE_DIR).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def git_state(root: Path = PACKAGE_DIR) -> dict[str, Any]:
    """{"commit": sha or None, "dirty": bool or None} of the checkout holding ``root`` (None outside git)."""
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True, timeout=30).stdout.strip()
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, check=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": bool(status.strip())}


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux; platform.processor() elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_load() -> dict[str, Any]:
    """What else the machine was doing: load averages over 1, 5 and 15 minutes, cores, the CPU model."""
    return {"load_average_1_5_15": [round(v, 2) for v in os.getloadavg()], "cpu_count": os.cpu_count(),
            "cpu_model": cpu_model()}


def run_provenance(program: str, argv: list[str]) -> dict[str, Any]:
    """The record of one benchmark run: ``program`` and every argument as given, torch's thread count, and the
    machine's load when it started."""
    git = git_state()
    return {
        **machine_load(),
        "command": " ".join([program, *(shlex.quote(a) for a in argv)]),
        "torch_threads": torch.get_num_threads(),
        "git_commit": git["commit"],
        "git_dirty": git["dirty"],
        "code_version": source_hash(),
        "package_versions": package_versions(),
    }
