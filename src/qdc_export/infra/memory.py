"""Giving freed memory back to the system between the build's large stages."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
from pathlib import Path

log = logging.getLogger("qdc_export.infra.memory")


def resident_gb(key: str = "VmRSS") -> float:
    """This process's resident set size (``VmRSS``) or its peak (``VmHWM``) in GB; 0.0 where /proc is absent."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024**2
    except OSError:
        pass
    return 0.0


def log_resident(what: str) -> None:
    """One INFO line per phase of the large stages (benchmarks/scale.py prints them): RSS now and the peak
    since the previous line (the kernel's high-water mark, reset here when logging is on)."""
    if not log.isEnabledFor(logging.INFO):
        return
    log.info("%s: RSS %.2f GB (peak since last %.2f GB)", what, resident_gb(), resident_gb("VmHWM"))
    reset_peak()


def reset_peak() -> bool:
    """Reset the kernel's high-water mark (VmHWM) to the current RSS; False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


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
