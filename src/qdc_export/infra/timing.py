"""Wall time per build stage, kept out of the hashed manifest content (manifest.UNHASHED_KEYS). With ``report``
each finished stage prints one line with its time (the build's progress lines on the terminal; a stage that fails
prints nothing, so a refusal stays one line)."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator


def to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class StageTimer:
    def __init__(self, report: Callable[[str], None] | None = None) -> None:
        self.timings: dict[str, float] = {}
        self.report = report

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        except BaseException:
            self.timings[name] = round(time.perf_counter() - start, 3)
            raise
        self.timings[name] = round(time.perf_counter() - start, 3)
        if self.report:
            self.report(f"[{name}] done in {self.timings[name]:.1f} s")
