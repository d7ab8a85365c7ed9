"""pyrovi's error types and the one name-lookup rule.

Every error a user can cause derives from :class:`PyroviError` (itself a
``ValueError``), so scripts and the CLI can tell "you handed in something
wrong" from a bug. Messages name the argument, the value found and the fix.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Mapping, Optional


class PyroviError(ValueError):
    """Base class of every error caused by user input."""


class DataError(PyroviError):
    """Data that cannot be used: NaN/inf, wrong shape, out of range, corrupt file."""


class ConfigError(PyroviError):
    """A bad argument, hyperparameter, unknown name or malformed config."""


class CheckpointError(PyroviError):
    """A run directory or checkpoint that is missing, corrupt or untrusted."""


class TrainingError(PyroviError):
    """Training could not go on (e.g. a non-finite loss); saved work is kept."""


class SeedWarning(UserWarning):
    """``fit(seed=s)`` was asked for but nets handed in were built from another random state."""


def lookup(table: Mapping[str, Any], name: str, what: str) -> Any:
    """Resolve ``name`` in ``table``; unknown names list the valid ones.

    Names are case-insensitive and ``-``/``_`` are interchangeable.
    """
    if not isinstance(name, str):
        raise ConfigError(f"{what} must be a name (str), got {type(name).__name__} {name!r}")
    key = name.strip().lower().replace("-", "_")
    if key not in table:
        valid = ", ".join(sorted(table))
        raise ConfigError(f"unknown {what} {name!r}; valid {what}s: {valid}")
    return table[key]


@contextmanager
def rebuilding(what: str, config: Mapping, cls: type, options: Optional[Mapping] = None):
    """Around ``cls(**config)``: the errors a config edited by hand or crafted raises become :class:`ConfigError`.

    ``what`` names the object (``"model"``, ``"guide"``); ``options``, when given, are shown instead of
    the whole config in the message for options that do not fit ``cls``.
    """
    try:
        yield
    except PyroviError:
        raise
    except KeyError as e:
        raise ConfigError(f"{what} config {config!r:.200} lacks the key {e}; "
                          "rebuild it from the object's config()") from None
    except (TypeError, ValueError, AttributeError) as e:
        shown = f"{what} config {config!r:.300} does" if options is None else f"{what} options {options!r:.300} do"
        raise ConfigError(f"{shown} not fit {cls.__name__}: {(str(e).splitlines() or [repr(e)])[0][:200]}") from None


def check_positive(name: str, value: Any, *, integer: bool = False, allow_zero: bool = False) -> None:
    """Raise :class:`ConfigError` unless ``value`` is a positive (int) number."""
    kind = "integer" if integer else "number"
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        raise ConfigError(f"{name} must be a positive {kind}, got {value!r}")
    if value != value or value in (float("inf"), float("-inf")):
        raise ConfigError(f"{name} must be finite, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{name} must be {bound}, got {value!r}")


def check_seed(name: str, value: Any) -> None:
    """Raise :class:`ConfigError` unless ``value`` is an integer seed in ``[0, 2**32)``.

    The bound is NumPy's (``pyro.set_rng_seed`` seeds NumPy too), so a seed that
    passes here seeds every generator pyrovi touches.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer in [0, 2**32), got {value!r}")
    if not 0 <= value < 2**32:
        raise ConfigError(f"{name} must be in [0, 2**32), got {value!r}; pick a non-negative seed")
