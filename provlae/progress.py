"""A tiny throttled progress line on stderr: items done, rate, ETA.

Shown when stderr is a terminal (``show=None``, the default) or when ``show=True``; ``show=False``
silences it. Logs of batch jobs thus stay clean. On a terminal the line rewrites itself in place; on a
file or pipe each update is its own line.

    with Progress(total=n, label="dsprites") as bar:
        for chunk in chunks:
            ...
            bar.update(len(chunk))
"""
from __future__ import annotations

import sys
import time
from typing import TextIO


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    def __init__(self, total: int, label: str = "", unit: str = "rows", *, stream: TextIO | None = None,
                 show: bool | None = None, interval: float = 0.5):
        self.total, self.label, self.unit = int(total), label, unit
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.enabled = self.tty if show is None else bool(show)
        self.interval = interval
        self.done = 0
        self.start = time.monotonic()
        self._last = float("-inf")

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and (now - self._last >= self.interval or self.done >= self.total):
            self._last = now
            self._print(self.line(now))

    def line(self, now: float | None = None) -> str:
        elapsed = max((now if now is not None else time.monotonic()) - self.start, 1e-9)
        rate = self.done / elapsed
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta = _clock(left) if left != float("inf") else "?"
        pct = 100.0 * self.done / self.total if self.total else 100.0
        prefix = f"{self.label}: " if self.label else ""
        return (f"{prefix}{self.done:,}/{self.total:,} {self.unit} ({pct:5.1f}%)  "
                f"{rate:,.0f} {self.unit}/s  ETA {eta}")

    def close(self) -> None:
        if self.enabled:
            elapsed = time.monotonic() - self.start
            prefix = f"{self.label}: " if self.label else ""
            self._print(f"{prefix}{self.done:,} {self.unit} in {_clock(elapsed)}")
            if self.tty:
                self.stream.write("\n")
                self.stream.flush()

    def _print(self, text: str) -> None:
        if self.tty:
            self.stream.write("\r\033[K" + text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
