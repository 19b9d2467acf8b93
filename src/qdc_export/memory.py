"""Giving freed memory back to the system between the build's large stages."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc


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
