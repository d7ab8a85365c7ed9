"""Callbacks: code of your own that ``fit``'s training loop calls at fixed points.

A callback is an object with any of the hooks of :class:`Callback` (subclass it and
override what you need); pass a list as ``pyrovi.fit(..., callbacks=[...])``. The loop
of :mod:`pyrovi.loop` calls them on rank 0 only (one process: always), in list order:

| hook | when |
| --- | --- |
| ``on_train_begin(state)`` | before the first epoch of this fit (also on resume) |
| ``on_step_end(state, record)`` | after every optimizer step |
| ``on_epoch_end(state, record)`` | after every epoch, once its history row exists |
| ``on_checkpoint(state, path)`` | after the epoch's checkpoint was written to ``path`` |
| ``on_train_end(state)`` | when training stops: finished, early-stopped, or stopped by an error or Ctrl-C |

pyrovi's own progress bar (:class:`pyrovi.progress.TrainingBar`) and loggers
(:mod:`pyrovi.loggers`) are callbacks like yours; ``fit(progress=..., logger=...)``
only adds them to the list.

Under data-parallel training (``strategy="ddp"``) only rank 0 calls hooks; step records
hold rank 0's own batch loss, epoch records the loss over all ranks. A hook that raises
stops the fit on every rank (a step hook's error surfaces at the end of that epoch there).
Callbacks must not change the model, guide or optimizer: a resumed run would then no
longer continue the same trajectory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from .errors import ConfigError, PyroviError, TrainingError

__all__ = ["Callback", "State", "HOOKS", "check_callbacks", "Dispatch"]

#: the hooks a callback may define
HOOKS = ("on_train_begin", "on_step_end", "on_epoch_end", "on_checkpoint", "on_train_end")


@dataclass
class State:
    """Where a fit stands when a hook is called (read it; the loop updates it).

    Attributes:
        run: the :class:`pyrovi.Run` being trained (model, guide, objective, ``history`` so far).
        epoch: epochs completed (``on_step_end``: of earlier epochs; the step belongs to ``epoch + 1``).
        step: optimizer steps completed, over the whole run (a resumed fit continues the count).
        epochs: the epoch the fit trains to (``fit(epochs=)``).
        directory: the run directory (``fit(out=)``), or None.
        world_size: processes training together (1 without ``strategy=``).
    """

    run: Any
    epoch: int
    step: int
    epochs: int
    directory: Optional[str] = None
    world_size: int = 1


class Callback:
    """Base class of callbacks: every hook does nothing; override the ones you need.

    Records are plain dicts of floats (losses in nats per datapoint, loss = -bound):

    - step record: ``step`` (1-based, over the run), ``epoch`` (the epoch it belongs to, 1-based),
      ``loss`` (this batch), ``beta`` (KL weight used), ``lr``.
    - epoch record: the epoch's row of ``history.csv`` (``epoch``, ``train_loss``, ``val_loss`` (None
      on epochs without validation, see ``val_every``), ``lr``, ``beta``, ``seconds``,
      ``items_per_second``).
    """

    def on_train_begin(self, state: State) -> None:
        """Before the first epoch this fit trains."""

    def on_step_end(self, state: State, record: dict) -> None:
        """After an optimizer step."""

    def on_epoch_end(self, state: State, record: dict) -> None:
        """After an epoch (its history row is ``record``)."""

    def on_checkpoint(self, state: State, path: str) -> None:
        """After the checkpoint of epoch ``state.epoch`` was written to ``path``."""

    def on_train_end(self, state: State) -> None:
        """When training stops, however it stops."""


def check_callbacks(callbacks) -> list:
    """``callbacks`` as a list, refusing what has none of the hooks (with the argument named)."""
    if callbacks is None:
        return []
    if isinstance(callbacks, Callback) or not isinstance(callbacks, (list, tuple)):
        callbacks = [callbacks]
    for cb in callbacks:
        if not isinstance(cb, Callback) and not any(callable(getattr(cb, h, None)) for h in HOOKS):
            raise ConfigError(f"callbacks must hold pyrovi.callbacks.Callback objects (or objects with any of "
                              f"{', '.join(HOOKS)}), got {type(cb).__name__} {cb!r:.60}")
    return list(callbacks)


class Dispatch:
    """The loop's side: calls every callback's hook on rank 0 of ``world``; ranks > 0 call nothing.

    Epoch-level hooks run through :meth:`World.on_rank0`, so an error in one stops every
    rank alike; step hooks run without a collective (one per step would cost time), and
    under N ranks their error is kept and raised with the epoch's hooks.
    """

    def __init__(self, callbacks, world, state: State):
        self.callbacks = list(callbacks) if world.is_zero else []
        self.world, self.state, self.failed = world, state, None

    def _call(self, hook: str, *args) -> None:
        for cb in self.callbacks:
            fn = getattr(cb, hook, None)
            if callable(fn):
                fn(self.state, *args)

    def _everywhere(self, hook: str, *args) -> None:
        def call():
            if self.failed is not None:
                raise self.failed
            try:
                self._call(hook, *args)
            except PyroviError:
                raise
            except Exception as e:
                if self.world.size == 1:
                    raise
                raise TrainingError(f"a callback's {hook} failed on rank 0: {type(e).__name__}: {e}") from e

        self.world.on_rank0(f"callbacks {hook}", call)

    def sync(self, loop: dict) -> None:
        self.state.epoch, self.state.step = loop["epoch"], loop["step"]

    def begin(self, loop: dict) -> None:
        self.sync(loop)
        self._everywhere("on_train_begin")

    def step(self, loop: dict, record: dict) -> None:
        if not self.callbacks or self.failed is not None:
            return
        self.sync(loop)
        try:
            self._call("on_step_end", record)
        except Exception as e:
            if self.world.size == 1:
                raise
            self.failed = TrainingError(f"a callback's on_step_end failed on rank 0: {type(e).__name__}: {e}")

    def epoch(self, loop: dict, record: dict) -> None:
        self.sync(loop)
        self._everywhere("on_epoch_end", dict(record))

    def checkpoint(self, loop: dict, path: str) -> None:
        self.sync(loop)
        self._everywhere("on_checkpoint", path)

    def end(self, loop: dict) -> None:
        """``on_train_end`` on rank 0, no collective (the fit may be stopping on an error)."""
        self.sync(loop)
        self._call("on_train_end")
