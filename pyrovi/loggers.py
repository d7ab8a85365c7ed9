"""Loggers: where ``fit`` sends its numbers besides the run directory, as callbacks.

``fit(logger=...)`` / ``pyrovi train --logger ...`` takes a name (or a list of names):

- ``"csv"`` (always on): ``history.csv`` in the run directory, one row per epoch, written
  with the run; naming it changes nothing.
- ``"tensorboard"``: :class:`TensorBoard`, scalars through PyTorch's own
  ``torch.utils.tensorboard.SummaryWriter`` into ``RUN/tensorboard/``; needs the
  ``tensorboard`` package (``pip install "pyrovi[tensorboard]"``). View with
  ``tensorboard --logdir RUN/tensorboard``.

A logger is a :class:`pyrovi.callbacks.Callback`: build one yourself (e.g.
``TensorBoard(log_dir=..., every_n_steps=10)``) and pass it in ``callbacks=``.
"""

from __future__ import annotations

import os
from typing import Optional

from .callbacks import Callback
from .errors import ConfigError, lookup

__all__ = ["TensorBoard", "LOGGERS", "resolve", "TENSORBOARD_DIR", "TENSORBOARD_HINT"]

#: the run directory's folder of TensorBoard event files
TENSORBOARD_DIR = "tensorboard"
TENSORBOARD_HINT = 'pip install "pyrovi[tensorboard]"'


def _summary_writer():
    """``torch.utils.tensorboard.SummaryWriter``, or a ConfigError saying how to install it."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:  # torch imports the tensorboard package lazily, here
        raise ConfigError(f"logger='tensorboard' needs the tensorboard package ({e}); install it with "
                          f"{TENSORBOARD_HINT}, or use logger='csv' (history.csv, always written)") from None
    return SummaryWriter


class TensorBoard(Callback):
    """Training scalars as TensorBoard event files.

    Tags (x axis: optimizer steps over the whole run, so a resumed fit continues the curves):

    - every ``every_n_steps`` steps: ``step/loss`` (the batch's loss, nats per datapoint; rank 0's
      batch under DDP), ``step/beta``, ``step/lr``;
    - every epoch, at the epoch's last step: ``epoch/train_loss``, ``epoch/val_loss`` (epochs that
      validate, see ``val_every``), ``epoch/lr``, ``epoch/beta``, ``epoch/items_per_second`` and
      ``epoch/epoch`` — the numbers of ``history.csv`` (stored as float32).

    Args:
        log_dir: folder of the event files; default ``RUN/tensorboard`` (needs ``fit(out=...)``).
        every_n_steps: log step scalars every this many steps (1: every step).
    """

    def __init__(self, log_dir: Optional[str] = None, *, every_n_steps: int = 1):
        _summary_writer()  # fail before training when tensorboard is missing
        if not isinstance(every_n_steps, int) or isinstance(every_n_steps, bool) or every_n_steps < 1:
            raise ConfigError(f"every_n_steps must be a positive integer, got {every_n_steps!r}")
        self.log_dir, self.every_n_steps, self.writer = log_dir, every_n_steps, None

    def on_train_begin(self, state) -> None:
        log_dir = self.log_dir or (state.directory and os.path.join(state.directory, TENSORBOARD_DIR))
        if not log_dir:
            raise ConfigError("logger='tensorboard' writes into the run directory: pass out=, or build "
                              "pyrovi.loggers.TensorBoard(log_dir=...) and pass it in callbacks=")
        # a resumed fit drops events from steps after its checkpoint (a killed run's unsaved tail)
        self.writer = _summary_writer()(log_dir=log_dir, purge_step=state.step or None)

    def on_step_end(self, state, record: dict) -> None:
        if record["step"] % self.every_n_steps == 0:
            for k in ("loss", "beta", "lr"):
                self.writer.add_scalar(f"step/{k}", record[k], record["step"])

    def on_epoch_end(self, state, record: dict) -> None:
        for k, v in record.items():
            if v is not None:
                self.writer.add_scalar(f"epoch/{k}", v, state.step)
        self.writer.flush()

    def on_train_end(self, state) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


#: logger names of ``fit(logger=...)``; "csv" is history.csv, always written (no callback)
LOGGERS = {"csv": None, "tensorboard": TensorBoard}


def resolve(logger, out: Optional[str]) -> list:
    """The callbacks ``fit(logger=...)`` stands for: None/"csv" -> [], "tensorboard" -> [TensorBoard()]."""
    if logger is None:
        return []
    names = [logger] if isinstance(logger, str) else logger
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"logger must be a name ({', '.join(LOGGERS)}) or a list of names, got {logger!r}; "
                          "pass logger objects in callbacks=")
    made = []
    for name in names:
        cls = lookup(LOGGERS, name, "logger")
        if cls is TensorBoard and out is None:
            raise ConfigError("logger='tensorboard' writes into the run directory: pass out=, or build "
                              "pyrovi.loggers.TensorBoard(log_dir=...) and pass it in callbacks=")
        if cls is not None:
            made.append(cls())
    return made
