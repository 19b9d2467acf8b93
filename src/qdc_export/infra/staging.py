"""Atomic build folders: everything is written to a hidden sibling staging folder, then renamed into
place. An interrupted or failed build leaves the previous folder (or nothing), never a half-written one.
Existing output is replaced only with ``force``. A complete build that failed its parity check
(:class:`RejectedBuild`) is kept beside the target as ``NAME.failed-check``, never in its place.

A build killed outright (SIGKILL, power loss) cannot clean up after itself: it leaves its hidden
``.NAME.partial-PID`` (or, killed between the two renames, ``.NAME.old-PID`` holding the previous
build). The next build of the same target removes such folders whose PID is no longer running, and
puts a stranded previous build back in place first. Folders of running builds are left alone."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from qdc_export.errors import OutputExistsError, RejectedBuild, UserError

FAILED_SUFFIX = ".failed-check"


def failed_folder(out: Path) -> Path:
    """Where a build that failed its check is kept: beside ``out``, never in its place."""
    return out.with_name(out.name + FAILED_SUFFIX)


def check_output(out: Path, force: bool) -> None:
    """Refusals that need no work first: an existing --out without --force, a file in its place, a folder that
    cannot be written, another running build of the same --out."""
    if out.exists() and not force:
        raise OutputExistsError(f"{out} exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder")
    existing = next(p for p in (out.absolute(), *out.absolute().parents) if p.exists())
    if existing == out.absolute():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {out}: {existing} is not a writable folder")
    refuse_if_locked(out)


def refuse_if_locked(out: Path) -> None:
    """One line naming the running build that holds ``out``'s lock; nothing when no live process holds it."""
    holder = lock_holder(out)
    if holder is not None:
        raise UserError(f"another build (process {holder}) is writing {out}; wait for it or choose another --out")


def _lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


def lock_holder(out: Path) -> int | None:
    """The PID of a running build that holds ``out``'s lock, or None (no lock, or its process has ended)."""
    try:
        pid = int(_lock_path(out).read_text().strip() or 0)
    except (OSError, ValueError):
        return None
    return pid if pid and pid != os.getpid() and _pid_alive(pid) else None


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold ``.NAME.lock`` (this process's PID) beside ``out`` for the whole build: a second build of the same
    --out is refused at its start (check_output) instead of failing after all its work. A lock left by a killed
    build names a dead process and is taken over."""
    path = _lock_path(out)
    for _ in range(2):  # a second try only after removing a dead process's lock
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            refuse_if_locked(out)
            path.unlink(missing_ok=True)
    else:
        raise UserError(f"cannot take the lock {path} of {out}: another build is starting there")
    with os.fdopen(fd, "w") as lock:
        lock.write(str(os.getpid()))
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            if path.read_text().strip() == str(os.getpid()):
                path.unlink()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def stale_staging(out: Path) -> list[Path]:
    """Hidden staging/retired siblings of ``out`` left by builds that are no longer running."""
    stale = []
    for kind in ("partial", "old"):
        for path in out.parent.glob(f".{out.name}.{kind}-*"):
            pid = path.name.rsplit("-", 1)[-1]
            if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                stale.append(path)
    return sorted(stale)


def clean_stale(out: Path) -> list[Path]:
    """Remove what killed builds of ``out`` left behind; restore a stranded previous build. Returns
    the removed paths."""
    removed = []
    for path in stale_staging(out):
        if ".old-" in path.name and not out.exists() and (path / "manifest.json").is_file():
            os.replace(path, out)  # killed between retiring the old build and moving the new one in
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


@contextlib.contextmanager
def staged_folder(out: Path, force: bool) -> Iterator[Path]:
    check_output(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    with output_lock(out):
        clean_stale(out)
        with _staging(out, force) as staging:
            yield staging


@contextlib.contextmanager
def _staging(out: Path, force: bool) -> Iterator[Path]:
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
    except RejectedBuild as rejected:  # complete but wrong: kept for inspection under its own name
        aside = failed_folder(out)
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(staging, aside)
        raise RejectedBuild(f"{rejected.summary}; the build was kept at {aside} for inspection, {out} was not "
                            "written") from None
    except BaseException:  # Ctrl-C included: leave nothing half-written
        shutil.rmtree(staging, ignore_errors=True)
        raise
    check_output(out, force)
    if out.exists():
        retired = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, retired)
        os.replace(staging, out)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, out)
