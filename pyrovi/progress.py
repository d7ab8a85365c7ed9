"""Progress of long passes (evaluation, diagnostics): a tqdm bar on a terminal, plain lines in a log.

tqdm redraws its bar with carriage returns; written to a file or a pipe
(a batch job's log) every redraw lands on one ever-growing line. So
:func:`bar` shows tqdm only when the stream is a terminal, and otherwise
prints one complete line at each quarter of the work (and at the end).
"""

from __future__ import annotations

import sys
import time
from typing import Optional

__all__ = ["bar", "LineProgress"]


class LineProgress:
    """A tqdm-like counter that prints ``desc: i/total (p%), s elapsed`` lines at 25% steps (for logs)."""

    def __init__(self, total: int, desc: str, unit: str, file=None, steps: int = 4):
        self.total, self.desc, self.unit = max(1, int(total)), desc, unit
        self.file = file if file is not None else sys.stderr
        self.n, self.steps, self.shown = 0, steps, 0
        self.t0 = time.perf_counter()

    def update(self, k: int = 1) -> None:
        self.n += k
        level = min(self.steps, self.n * self.steps // self.total)
        if level > self.shown:
            self.shown = level
            print(f"{self.desc}: {self.n}/{self.total} {self.unit} ({100 * self.n // self.total}%), "
                  f"{time.perf_counter() - self.t0:.1f} s", file=self.file, flush=True)

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _Off:
    def update(self, k: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


def bar(total: int, desc: str, *, enabled: bool = True, unit: str = "batch", file=None):
    """A progress counter with ``update(k)`` and ``close()`` (also a context manager).

    ``enabled=False``: silent. On a terminal: a tqdm bar. Otherwise (a file, a
    pipe): :class:`LineProgress`, whole lines only.
    """
    if not enabled:
        return _Off()
    stream = file if file is not None else sys.stderr
    isatty: Optional[bool] = getattr(stream, "isatty", lambda: False)()
    if isatty:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, file=stream, dynamic_ncols=True, leave=False)
    return LineProgress(total, desc, unit, file=stream)
