"""The one progress bar (training iterations, tokenized bytes). No torch import: the preprocessing workers import
this module and should start fast."""
from __future__ import annotations

import sys
import time


class ProgressBar:
    """A dependency-free bar on stderr: redrawn in place on a terminal (at most every 0.1 s), otherwise a plain line
    every ``every`` percent, so CI logs stay short. ``scale``/``unit`` show counts in other units (bytes as MB)."""

    def __init__(self, total: int, start: int = 0, enabled: bool = True, label: str = "", unit: str = "",
                 scale: float = 1.0, every: int = 10, width: int = 30, stream=None):
        self.total, self.start, self.enabled, self.label = total, start, enabled, label
        self.unit, self.scale, self.every, self.width = unit, scale, every, width
        self.stream = stream or sys.stderr
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.t0 = self.last = time.time()
        self.last_step = -1  # the last printed pct // every (non-terminal output)
        self.line_open = False  # a redrawn terminal line not yet ended by a newline

    def update(self, n: int, postfix: str = "") -> None:
        if not self.enabled or self.total <= 0:
            return
        now, finished = time.time(), n >= self.total
        pct = min(100, int(100 * n / self.total))
        if self.tty and now - self.last < 0.1 and not finished and self.line_open:
            return
        if not self.tty and pct // self.every == self.last_step and not finished:
            return
        self.last, self.last_step = now, pct // self.every
        self._write(self._line(n, pct, now, postfix), end=finished)

    def close(self, summary: str) -> None:
        """A final line (``label: summary``) in place of an open terminal bar."""
        if self.enabled:
            self._write(f"{self.label}: {summary}" if self.label else summary, end=True)

    def _line(self, n: int, pct: int, now: float, postfix: str) -> str:
        filled = pct * self.width // 100
        bar = "#" * filled + "." * (self.width - filled)
        if self.scale == 1:
            count = f"{n}/{self.total}"
        else:
            count = f"{n / self.scale:.1f}/{self.total / self.scale:.1f}"
        elapsed, done = max(now - self.t0, 1e-9), n - self.start
        eta = max(elapsed / done * (self.total - n), 0.0) if done > 0 else 0.0
        rate = f" {done / self.scale / elapsed:.1f} {self.unit}/s" if self.unit else ""
        unit = f" {self.unit}" if self.unit else ""
        head = f"{self.label}: " if self.label else ""
        return f"{head}[{bar}] {count}{unit} {pct:3d}%{rate} eta {int(eta) // 60}m{int(eta) % 60:02d}s {postfix}"

    def _write(self, line: str, end: bool) -> None:
        if self.tty:
            self.stream.write("\r\033[K" + line + ("\n" if end else ""))
            self.line_open = not end
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
