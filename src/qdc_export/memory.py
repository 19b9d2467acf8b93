"""Giving freed memory back to the system between the build's large stages."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
from pathlib import Path

log = logging.getLogger("qdc_export.memory")


def resident_gb() -> float:
    """This process's resident set size (VmRSS) in GB; 0.0 where /proc is absent."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024**2
    except OSError:
        pass
    return 0.0


def log_resident(what: str) -> None:
    """One INFO line per phase of the large stages (benchmarks/scale.py prints them)."""
    log.info("%s: RSS %.2f GB", what, resident_gb())


def release_memory() -> None:
    """Collect garbage, then ask glibc to return free heap pages (``malloc_trim``): without it the peak RSS of
    a full-size build counts weights already freed by an earlier stage. A no-op where glibc is absent."""
    gc.collect()
    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError):
        pass
