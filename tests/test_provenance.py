"""Benchmark provenance: a fidelity row's run record holds the full command, the torch threads, the git commit,
the code version and the package versions, and the engine cache key changes with the code version."""

from __future__ import annotations

import subprocess
from pathlib import Path

import torch

from qdc_export.config import BuildConfig
from qdc_export.infra import provenance
from qdc_export.manifest import package_versions
from qdc_export.report import fidelity

ROOT = Path(__file__).resolve().parents[1]


def test_run_record_keeps_every_argument_and_the_code_it_ran():
    argv = ["--models", "digits-cond", "--threads", "1", "--out", "/tmp/x y", "--cache", "/tmp/c"]
    run = provenance.run_provenance("python benchmarks/fidelity.py", argv)
    assert run["command"] == "python benchmarks/fidelity.py --models digits-cond --threads 1 --out '/tmp/x y' " \
                             "--cache /tmp/c"
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert run["git_commit"] == head.strip() and isinstance(run["git_dirty"], bool)
    assert run["torch_threads"] == torch.get_num_threads()
    assert run["code_version"] == provenance.source_hash() and len(run["code_version"]) == 16
    assert run["package_versions"] == package_versions() and run["package_versions"]["torch"] == torch.__version__


def test_engine_cache_key_changes_with_the_code_version(monkeypatch):
    config = BuildConfig(precision="w8a8")
    key = fidelity.engine_key(config)
    assert fidelity.engine_key(config) == key
    monkeypatch.setattr(fidelity, "source_hash", lambda: "another-version")
    assert fidelity.engine_key(config) != key
    monkeypatch.undo()
    assert fidelity.engine_key(BuildConfig(precision="w4a8")) != key


def test_source_hash_covers_the_whole_package():
    """The code version hashes every module of the package (a build-stage edit must change cache keys): its root
    is the package folder, not the folder of the module that computes it (infra/)."""
    assert (provenance.PACKAGE_DIR / "build.py").is_file() and (provenance.PACKAGE_DIR / "quantize").is_dir()
    hashed = sorted(p.relative_to(provenance.PACKAGE_DIR).as_posix() for p in provenance.PACKAGE_DIR.rglob("*.py"))
    assert "quantize/half.py" in hashed and "infra/provenance.py" in hashed, hashed[:5]
