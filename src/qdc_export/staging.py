"""Atomic build folders: everything is written to a hidden sibling staging folder, then renamed into
place. An interrupted or failed build leaves the previous folder (or nothing), never a half-written one.
Existing output is replaced only with ``force``."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from .errors import OutputExistsError, UserError


def check_output(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise OutputExistsError(f"{out} exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder")


@contextlib.contextmanager
def staged_folder(out: Path, force: bool) -> Iterator[Path]:
    check_output(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
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
