"""Eager calls skip the custom-op dispatcher; torch.compile sees the custom ops.

A ``torch.library.custom_op`` call costs ~20 us of host time in eager mode (schema
parsing, dispatch keys, autograd checks), a direct call of its implementation ~1 us,
and a fused SCConv step makes 11 of them: on launch-bound layers (DenseNet's, small
batches) that is a large part of the step. So the wrappers below call the launcher
directly on plain tensors in eager mode, and the custom op (with its fake kernel)
while torch.compile traces or when an argument is a tensor subclass (fake, functional
or other wrapper tensors of make_fx / export / FSDP, which the launchers cannot read).
"""
from __future__ import annotations

import functools

import torch

__all__ = ["eager_direct"]

_PLAIN = (torch.Tensor, torch.nn.Parameter)


def eager_direct(op, impl):
    """Return a callable running ``impl`` in eager mode on plain tensors and ``op`` otherwise.

    ``op`` is the custom op whose implementation is ``impl`` (same positional arguments).
    """

    @functools.wraps(impl)
    def call(*args):
        if type(args[0]) in _PLAIN and not torch.compiler.is_compiling():
            return impl(*args)
        return op(*args)

    call.op = op
    return call
