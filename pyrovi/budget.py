"""A memory budget for sizes that users type: refuse what cannot fit before allocating it.

``--particles 10**9`` or ``sample --n 10**10`` used to end in an allocator traceback, or in
the kernel killing the process after it had taken the machine's memory. Each such size is
turned into an estimate of the bytes of the biggest thing it makes pyrovi hold at once,
and compared with a budget before anything is allocated. The estimate is deliberately
simple (rows x widest layer x bytes per number): its job is to stop sizes that are off by
orders of magnitude, with a message naming the option, the estimate, the budget and how
to lower it, not to predict a peak to the byte.

The budget is ``PYROVI_MEMORY_BUDGET`` when set (bytes, or with a unit: ``512M``, ``8G``,
``1.5T``; ``0``/``off`` turns the check off), else half the physical memory, and never more
than what the process's address-space limit (``ulimit -v``) leaves.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from .errors import ConfigError

__all__ = ["ENV", "limit", "check", "widest", "network_bytes", "check_rows"]

ENV = "PYROVI_MEMORY_BUDGET"
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _parse(text: str) -> Optional[int]:
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    if t in ("0", "OFF", "NONE"):
        return None
    unit = t[-1:] if t[-1:] in _UNITS else ""
    try:
        value = float(t[:len(t) - len(unit)])
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise ConfigError(f"{ENV}={text!r:.40} is not a size; use bytes or a number with K, M, G or T "
                          "(e.g. 8G), or 0 to turn the check off")
    return int(value * _UNITS[unit])


def _vm_size() -> int:
    """This process's current virtual size in bytes (0 where /proc is not there)."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmSize:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def limit() -> Optional[int]:
    """The memory budget in bytes (None: no check), read afresh on every call (see the module doc)."""
    env = os.environ.get(ENV)
    if env is not None and env.strip():
        return _parse(env)
    try:
        budget = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):
        budget = 8 << 30  # no sysconf: a laptop's worth
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
        if soft != resource.RLIM_INFINITY:
            budget = min(budget, max(soft - _vm_size(), 0))
    except (ImportError, ValueError, OSError):
        pass
    return budget


def _fmt(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} EiB"  # pragma: no cover


def check(option: str, nbytes: float, what: str, fix: str) -> None:
    """Raise :class:`ConfigError` when ``nbytes`` (an estimate for ``option``) exceeds the budget.

    Args:
        option: the option as the user spelled it, e.g. ``"--particles 1000000000"``.
        nbytes: estimated bytes of the biggest tensor (or set of tensors) it makes pyrovi hold.
        what: that tensor, in words (``"the decoder's output, particles x batch x 784"``).
        fix: how to lower it (``"use fewer --particles or a smaller --batch-size"``).
    """
    budget = limit()
    if budget is not None and nbytes > budget:
        raise ConfigError(f"{option} needs about {_fmt(nbytes)} for {what}, more than the memory budget of "
                          f"{_fmt(budget)}; {fix} (or raise the budget with {ENV}=..., e.g. {ENV}=64G)")


def widest(*modules, default: int = 1) -> int:
    """The largest dimension of any parameter of ``modules`` (the widest layer; ``default`` without any)."""
    w = default
    for m in modules:
        if isinstance(m, torch.nn.Module):
            for p in m.parameters():
                if p.dim():
                    w = max(w, max(p.shape))
    return w


def network_bytes(model_config: dict, guide_config: dict) -> Optional[int]:
    """Bytes of the weights of pyrovi's model and guide these configs describe, counted on the ``meta`` device.

    None when the pair cannot be built without real values (some guides trace the model).
    """
    from . import guides, models

    try:
        with torch.device("meta"):
            m = models.build(model_config)
            g = guides.build(m, guide_config)
    except (NotImplementedError, RuntimeError, ConfigError):
        return None  # needs real values; a wrong option is reported when it is really built
    except (OverflowError, ValueError, MemoryError):
        return 1 << 62  # sizes beyond what torch can even describe
    return sum(t.numel() * t.element_size() for mod in (m, g) if isinstance(mod, torch.nn.Module)
               for t in mod.state_dict().values())


def check_rows(option: str, rows: float, width: float, fix: str, itemsize: int = 4, what: str = "") -> None:
    """:func:`check` for ``rows`` rows of ``width`` numbers (``(rows, width)`` activations of a network)."""
    check(option, float(rows) * float(width) * itemsize,
          what or f"{rows:.0f} rows of {width:.0f} numbers at once", fix)
