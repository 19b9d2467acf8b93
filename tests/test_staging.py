"""A failed or interrupted build leaves the previous folder or nothing; --force replaces atomically."""

import pytest

from qdc_export import build as build_module
from qdc_export.config import BuildConfig
from qdc_export.errors import OutputExistsError
from qdc_export.infra.staging import staged_folder


def test_exception_inside_staging_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with staged_folder(out, force=False) as staging:
            (staging / "model.onnx").write_text("partial")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_interrupt_keeps_the_previous_build(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text("previous")
    with pytest.raises(KeyboardInterrupt):
        with staged_folder(out, force=True) as staging:
            (staging / "model.onnx").write_text("partial")
            raise KeyboardInterrupt
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert (out / "manifest.json").read_text() == "previous"


def test_force_replaces_and_no_force_refuses(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(OutputExistsError):
        with staged_folder(out, force=False):
            pass
    with staged_folder(out, force=True) as staging:
        (staging / "new.txt").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in out.iterdir()] == ["new.txt"]


def test_build_interrupted_during_export_leaves_no_folder(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(build_module, "export_onnx", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_module.build("tiny-unet2d", BuildConfig(precision="fp32", steps=2), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_a_build_that_fails_its_check_is_kept_aside_and_leaves_out_alone(tmp_path, monkeypatch):
    """A build whose engine is wrong (one weight scale doubled inside the staging folder, then the real check)
    raises RejectedBuild: --out keeps the previous build, the failed one sits beside it as OUT.failed-check."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from engine_breakers import double_one_weight_scale

    from qdc_export.errors import RejectedBuild
    from qdc_export.infra.staging import failed_folder

    real_check = build_module.check_build

    def check_a_broken_engine(folder, **kwargs):
        double_one_weight_scale(folder)
        return real_check(folder, **kwargs)

    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text("previous")
    monkeypatch.setattr(build_module, "check_build", check_a_broken_engine)
    config = BuildConfig(precision="w8a8", steps=4, calib_samples=2, parity_samples=1, compensation="none")
    with pytest.raises(RejectedBuild) as raised:
        build_module.build("tiny-unet2d", config, out, force=True, write_report=False)
    aside = failed_folder(out)
    assert str(aside) in str(raised.value) and str(raised.value).startswith("parity check failed: FAIL")
    assert (out / "manifest.json").read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "out.failed-check"]
    assert (aside / "parity.json").is_file() and (aside / "model.onnx").is_file()


def test_a_second_build_of_the_same_out_is_refused_at_once_naming_the_first(tmp_path):
    """A lock beside --out held by a live process (a real one: `sleep`) refuses a second build before any work,
    naming that process; a lock left by a process that has ended is taken over."""
    import subprocess

    from qdc_export.errors import UserError

    out = tmp_path / "out"
    holder = subprocess.Popen(["sleep", "60"])
    try:
        (tmp_path / ".out.lock").write_text(str(holder.pid))
        with pytest.raises(UserError, match=f"another build \\(process {holder.pid}\\) is writing"):
            with staged_folder(out, force=False):
                pass
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    with staged_folder(out, force=False) as staging:  # the holder has ended: its lock is stale
        assert (tmp_path / ".out.lock").read_text() == str(__import__("os").getpid())
        (staging / "manifest.json").write_text("{}")
    assert (out / "manifest.json").is_file() and not (tmp_path / ".out.lock").exists()


def test_an_out_that_cannot_be_written_is_refused_before_any_work(tmp_path):
    import os

    from qdc_export.errors import UserError

    locked = tmp_path / "read-only"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        if os.access(locked, os.W_OK):  # root ignores the mode bits: a file in the way instead
            (tmp_path / "file").write_text("x")
            target = tmp_path / "file" / "out"
        else:
            target = locked / "build" / "out"
        with pytest.raises(UserError, match="cannot write"):
            build_module.build("tiny-unet2d", BuildConfig(precision="fp32", steps=2), target)
    finally:
        locked.chmod(0o755)
