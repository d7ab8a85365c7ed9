"""Progress of long passes (training, evaluation, diagnostics): a tqdm bar on a terminal, plain lines in a log.

tqdm redraws its bar with carriage returns; written to a file or a pipe
(a batch job's log) every redraw lands on one ever-growing line. So
:func:`bar` shows tqdm only when the stream is a terminal, and otherwise
prints one complete line at each quarter of the work (and at the end).
"""

from __future__ import annotations

import sys
import time
from typing import Optional

from .callbacks import Callback

__all__ = ["bar", "LineProgress", "TrainingBar"]


class LineProgress:
    """A tqdm-like counter that prints ``desc: i/total (p%), s elapsed`` lines at 25% steps (for logs)."""

    def __init__(self, total: int, desc: str, unit: str, file=None, steps: int = 4, initial: int = 0):
        self.total, self.desc, self.unit = max(1, int(total)), desc, unit
        self.file = file if file is not None else sys.stderr
        self.n, self.steps, self.postfix = int(initial), steps, ""
        self.shown = min(self.steps, self.n * self.steps // self.total)  # a resumed fit: no line for epochs done
        self.t0 = time.perf_counter()

    def set_postfix(self, **values) -> None:
        """Numbers shown at the end of the next line (tqdm's ``set_postfix``)."""
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def update(self, k: int = 1) -> None:
        self.n += k
        level = min(self.steps, self.n * self.steps // self.total)
        if level > self.shown:
            self.shown = level
            print(f"{self.desc}: {self.n}/{self.total} {self.unit} ({100 * self.n // self.total}%), "
                  f"{time.perf_counter() - self.t0:.1f} s" + (f", {self.postfix}" if self.postfix else ""),
                  file=self.file, flush=True)

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _Off:
    def update(self, k: int = 1) -> None:
        pass

    def set_postfix(self, **values) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


def bar(total: int, desc: str, *, enabled: bool = True, unit: str = "batch", file=None, initial: int = 0,
        leave: bool = False):
    """A progress counter with ``update(k)``, ``set_postfix(**values)`` and ``close()`` (also a context manager).

    ``enabled=False``: silent. On a terminal or in a Jupyter kernel: a tqdm bar starting at
    ``initial`` (kept on screen when done with ``leave=True``). Otherwise (a file, a pipe):
    :class:`LineProgress`, whole lines only.
    """
    if not enabled:
        return _Off()
    stream = file if file is not None else sys.stderr
    isatty: Optional[bool] = getattr(stream, "isatty", lambda: False)()
    if isatty or (file is None and "ipykernel" in sys.modules):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, file=stream, dynamic_ncols=True, leave=leave,
                    initial=initial)
    return LineProgress(total, desc, unit, file=stream, initial=initial)


class TrainingBar(Callback):
    """``fit``'s progress: one bar over epochs with the last epoch's loss, validation loss and throughput.

    A callback (:mod:`pyrovi.callbacks`) like any other; ``fit(progress=True)`` adds it.
    In a log file it prints whole lines (:class:`LineProgress`) instead of redraws.
    """

    def __init__(self, file=None):
        self.file, self.bar, self.val = file, None, None

    def on_train_begin(self, state) -> None:
        name = getattr(state.run.objective, "name", "fit")
        self.bar = bar(state.epochs, name + (f" x{state.world_size}" if state.world_size > 1 else ""),
                       unit="epoch", file=self.file, initial=state.epoch, leave=True)

    def on_epoch_end(self, state, record: dict) -> None:
        if record.get("val_loss") is not None:
            self.val = record["val_loss"]
        shown = {"loss": f"{record['train_loss']:.3f}"}
        if self.val is not None:
            shown["val"] = f"{self.val:.3f}"
        self.bar.set_postfix(**shown, it_s=f"{record['items_per_second']:.0f}")
        self.bar.update(1)

    def on_train_end(self, state) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
