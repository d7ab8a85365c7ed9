"""Numeric precision and compilation of a fit: ``fit(precision=..., compile=...)``.

``precision``:

* ``None`` / ``"32"``: float32 (or the run's ``dtype``) everywhere, TF32 off: the default.
* ``"tf32"``: float32, with CUDA matmuls and convolutions on TF32 tensor cores (10-bit
  mantissa inputs, float32 accumulation). Only the nets' matmuls change; every
  log-density is elementwise float32. Ignored on CPU.
* ``"bf16"`` (also ``"bf16-mixed"``): the loss runs under ``torch.autocast(dtype=bfloat16)``,
  so the nets' matmuls and convolutions run in bfloat16; pyrovi's guide heads, their
  draws and log q, the likelihood and the prior are computed in float32 (the trunk's and
  the decoder's outputs are cast up first), and so is the loss. No loss scaling is needed
  (bfloat16 has float32's exponent range).
* ``"16-mixed"``: the same with float16, plus dynamic loss scaling (``torch.amp.GradScaler``)
  so small gradients do not underflow.

The weights and Adam's state stay in float32 in every mode (mixed precision, not
half-precision training). A user's own Pyro model runs under the same autocast: its
``torch.nn`` layers run in the low precision and its distributions see what they give.

``compile``: None (off) or a ``torch.compile`` mode (``"default"``, ``"reduce-overhead"``,
``"max-autotune"``; ``True`` means ``"default"``). The model's and the guide's nets (their
direct ``torch.nn`` children: a VAE's decoder, a guide's trunk) are compiled in place with
``nn.Module.compile``, so parameter names, checkpoints and ``load_run`` are unchanged; Pyro's
sample statements stay eager (they are effect handlers, not tensor code).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Optional

import torch
from pyro.nn import PyroModule

from .errors import ConfigError

__all__ = ["PRECISIONS", "COMPILE_MODES", "canonical_precision", "canonical_compile", "autocast", "grad_scaler",
           "tf32", "compile_nets"]

#: names fit accepts for ``precision`` -> canonical name (None: full precision)
PRECISIONS = {"32": None, "32-true": None, "tf32": "tf32", "bf16": "bf16", "bf16-mixed": "bf16",
              "16-mixed": "16-mixed", "fp16": "16-mixed"}
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def canonical_precision(precision) -> Optional[str]:
    """``precision`` as stored in ``config.json``: None, ``"tf32"``, ``"bf16"`` or ``"16-mixed"``."""
    if precision is None:
        return None
    if isinstance(precision, int) and not isinstance(precision, bool):
        precision = str(precision)
    if not isinstance(precision, str):
        raise ConfigError(f"precision must be None, '32', 'tf32', 'bf16' or '16-mixed', got {precision!r}")
    key = precision.strip().lower().replace("_", "-")
    if key not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; valid: None, {', '.join(PRECISIONS)}")
    return PRECISIONS[key]


def canonical_compile(compile) -> Optional[str]:
    """``compile`` as stored in ``config.json``: None (off) or a ``torch.compile`` mode."""
    if compile is None or compile is False:
        return None
    if compile is True:
        return "default"
    if not isinstance(compile, str):
        raise ConfigError(f"compile must be True, False or a torch.compile mode {COMPILE_MODES}, got {compile!r}")
    key = compile.strip().lower().replace("_", "-")
    if key not in COMPILE_MODES:
        raise ConfigError(f"unknown compile mode {compile!r}; valid: True, False, {', '.join(COMPILE_MODES)}")
    return key


def _amp_dtype(precision: Optional[str]):
    return {"bf16": torch.bfloat16, "16-mixed": torch.float16}.get(precision)


def autocast(precision: Optional[str], device: torch.device):
    """The context the loss runs in: ``torch.autocast`` for the mixed modes, else nothing."""
    dt = _amp_dtype(precision)
    if dt is None:
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dt)


def grad_scaler(precision: Optional[str], device: torch.device):
    """A ``torch.amp.GradScaler`` for ``"16-mixed"`` (float16 gradients underflow without one), else None."""
    if precision != "16-mixed":
        return None
    return torch.amp.GradScaler(torch.device(device).type)


@contextmanager
def tf32(precision: Optional[str], device: torch.device):
    """TF32 matmuls/convolutions on CUDA for ``precision="tf32"`` while the fit runs; restored afterwards."""
    if precision != "tf32" or torch.device(device).type != "cuda":
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def compile_nets(mode: Optional[str], *objs) -> list:
    """Compile, in place, the direct plain-``torch.nn`` children (with parameters) of ``objs``; their names."""
    if mode is None:
        return []
    done = []
    for obj in objs:
        if not isinstance(obj, torch.nn.Module):
            continue
        for name, child in obj.named_children():
            if isinstance(child, (PyroModule, torch.nn.ModuleDict, torch.nn.ModuleList)):
                continue
            if next(child.parameters(), None) is None:
                continue
            child.compile(mode=mode)
            done.append(f"{type(obj).__name__}.{name}")
    return done
