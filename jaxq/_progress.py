"""A one-line progress report on stderr, redrawn in place (no dependency), for the long-running
commands (``jaxq sweep``, ``jaxq simulate``).

A batched simulation is one device call that can run for minutes with nothing to report until it
returns, so the line is redrawn by a background thread every ``tick`` seconds (1 s on a terminal, 30 s
into a file or pipe): the elapsed time moves even when no unit of work has finished."""

from __future__ import annotations

import math
import sys
import threading
import time
from typing import Callable


def clock(seconds: float) -> str:
    """m:ss, or h:mm:ss from an hour; "?" for an unknown (non-finite) time."""
    if not math.isfinite(seconds):
        return "?"
    s = round(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class ProgressLine:
    """Redraws ``line(elapsed_seconds)`` with a carriage return; :meth:`close` ends it with a newline."""

    def __init__(self, line: Callable[[float], str], stream=None, enabled: bool = True, tick: float | None = None):
        self._line = line
        self.stream = sys.stderr if stream is None else stream
        self.enabled = enabled
        self.t0 = time.perf_counter()
        self.width = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ticker = None
        if tick is None:
            tick = 1.0 if getattr(self.stream, "isatty", lambda: False)() else 30.0
        if enabled and tick > 0:
            self._ticker = threading.Thread(target=self._tick, args=(tick,), daemon=True)
            self._ticker.start()
        self.draw()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def _tick(self, every: float) -> None:
        while not self._stop.wait(every):
            self.draw()

    def draw(self) -> None:
        if not self.enabled:
            return
        with self._lock:
            text = self._line(self.elapsed)
            self.stream.write("\r" + text.ljust(self.width))
            self.stream.flush()
            self.width = len(text)

    def message(self, text: str) -> None:
        """Print ``text`` as its own line above the progress line, which is then redrawn below it."""
        with self._lock:
            if self.enabled:
                self.stream.write("\r" + " " * self.width + "\r")
            self.stream.write(text + "\n")
            self.stream.flush()
            self.width = 0
        self.draw()

    def close(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
        if self.enabled:
            self.draw()  # the final state (a line that reads its own progress shows it finished)
            self.stream.write("\n")
            self.stream.flush()
