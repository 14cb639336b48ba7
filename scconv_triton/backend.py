"""Which implementation runs: the Triton kernels or the pure-PyTorch reference.

``auto`` (the default) takes Triton for CUDA tensors, and for CPU tensors when the
Triton interpreter is on (``TRITON_INTERPRET=1`` set before the kernels were
imported); otherwise the reference math. Force a choice per module
(``SCConv(..., backend="reference")``), per region (``with use_backend("triton"):``)
or per process (``SCCONV_BACKEND=reference``). Under torch.compile the choice is
read when a graph is traced and stays fixed for that graph.
"""
from __future__ import annotations

import contextlib
import contextvars
import os

import torch

BACKENDS = ("auto", "triton", "reference")
_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("scconv_backend", default=None)


def interpreter_enabled() -> bool:
    """True when Triton kernels run in the interpreter (on CPU tensors)."""
    try:
        from triton import knobs

        return bool(knobs.runtime.interpret)
    except Exception:  # older triton without knobs
        return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """Force ``name`` ("auto", "triton" or "reference") inside the ``with`` block."""
    token = _forced.set(_check(name))
    try:
        yield
    finally:
        _forced.reset(token)


@torch.compiler.assume_constant_result
def _ambient() -> tuple[str, bool]:
    """(the choice forced by use_backend or SCCONV_BACKEND, whether the interpreter is on).

    Read in Python, not traced: under torch.compile the result is a constant of the
    graph, so choosing a backend never breaks a graph.
    """
    forced = _forced.get()
    if forced in (None, "auto"):
        forced = _check(os.environ.get("SCCONV_BACKEND", "auto"))
    return forced, interpreter_enabled()


def resolve(x: torch.Tensor, requested: str | None = None) -> str:
    """Return "triton" or "reference" for input ``x``.

    Precedence: an explicit ``requested`` other than "auto", then ``use_backend``,
    then the SCCONV_BACKEND environment variable, then auto.
    """
    forced, interpret = _ambient()
    choice = requested if requested not in (None, "auto") else None
    if choice is None and forced != "auto":
        choice = forced
    can_triton = x.is_cuda or (x.device.type == "cpu" and interpret)
    if choice is None:
        return "triton" if can_triton else "reference"
    _check(choice)
    if choice == "triton" and not can_triton:
        raise RuntimeError(
            f"backend='triton' needs a CUDA tensor, or TRITON_INTERPRET=1 for CPU tensors; got a tensor on {x.device}"
        )
    return choice
