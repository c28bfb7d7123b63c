"""A tiny stderr progress bar for model loading (no tqdm): redrawn in place on a terminal, a few
plain lines (0%, 25%, 50%, 75%, 100%) when stderr is a file or a pipe."""
from __future__ import annotations

import sys
import time
from typing import TextIO

WIDTH = 30


class LoadProgress:
    """A loading/model_loader.ProgressFn: pass it as Engine(..., progress=LoadProgress())."""

    def __init__(self, stream: TextIO | None = None, interval_s: float = 0.1) -> None:
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval_s = interval_s
        self._last = 0.0
        self._next_quarter = 0
        self.start = time.perf_counter()

    @staticmethod
    def fraction(done: int, total: int, nbytes: int, total_bytes: int) -> float:
        """By bytes (what loading and quantizing take time over), else by tensors."""
        if done >= total:
            return 1.0
        return nbytes / total_bytes if total_bytes else done / total

    def line(self, done: int, total: int, nbytes: int, total_bytes: int, what: str) -> str:
        frac = self.fraction(done, total, nbytes, total_bytes)
        fill = int(frac * WIDTH)
        bar = "#" * fill + "-" * (WIDTH - fill)
        return (f"{what} [{bar}] {frac:4.0%} {done}/{total} tensors, "
                f"{nbytes / 1e6:.1f}/{total_bytes / 1e6:.1f} MB, {time.perf_counter() - self.start:.1f}s")

    def __call__(self, done: int, total: int, nbytes: int, total_bytes: int, what: str) -> None:
        if done == 0:  # a new load (a server reload reuses the bar)
            self.start = time.perf_counter()
            self._next_quarter = 0
        finished = done >= total
        if self.tty:
            now = time.perf_counter()
            if not finished and now - self._last < self.interval_s and done:
                return
            self._last = now
            self.stream.write("\r\x1b[2K" + self.line(done, total, nbytes, total_bytes, what)
                              + ("\n" if finished else ""))
        else:
            quarter = int(4 * self.fraction(done, total, nbytes, total_bytes))
            if quarter < self._next_quarter:
                return
            self._next_quarter = quarter + 1
            self.stream.write(self.line(done, total, nbytes, total_bytes, what) + "\n")
        self.stream.flush()
