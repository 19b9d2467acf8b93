"""Wall time per build stage, kept out of the hashed manifest content (manifest.UNHASHED_KEYS)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator


class StageTimer:
    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = round(time.perf_counter() - start, 3)
