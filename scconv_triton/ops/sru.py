"""Fused SRU: torch.library custom ops around the Triton launchers, and its autograd Function.

``scconv_triton::sru_fwd`` returns (s, mean, rstd); ``scconv_triton::sru_apply`` rebuilds s
from x and the statistics (the SCConv backward's recompute); ``scconv_triton::sru_bwd``
returns (dx, dweight, dbias) with empty tensors standing for "no gradient". All have fake
(meta) implementations, so ``torch.compile(fullgraph=True)`` traces through them; in eager
mode the launchers are called directly (ops/_dispatch.py).
"""
from __future__ import annotations

import torch

from ..kernels import sru as _k
from ..kernels._launch import acc_dtype
from ._dispatch import eager_direct

__all__ = ["SRUFunction", "sru", "sru_forward_op", "sru_apply_op", "sru_backward_op"]


def _sru_fwd_impl(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    group_num: int,
    eps: float,
    torch_gn: bool,
    tau: float,
    hard: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    mean, rstd, wsum = _k.sru_stats(x, group_num, eps, torch_gn, weight=weight)
    s = _k.sru_apply(x, mean, rstd, weight, bias, tau, hard, wsum=wsum)
    return s, mean, rstd


_sru_fwd = torch.library.custom_op("scconv_triton::sru_fwd", _sru_fwd_impl, mutates_args=())


@_sru_fwd.register_fake
def _sru_fwd_fake(x, weight, bias, group_num, eps, torch_gn, tau, hard):
    acc = acc_dtype(x.dtype)
    n = x.shape[0]
    # mean is fp64 for every input dtype (kernels/sru.py: an fp32 hi/lo pair in the kernels)
    mean = x.new_empty((n, group_num), dtype=torch.float64)
    return torch.empty_like(x), mean, x.new_empty((n, group_num), dtype=acc)


@torch.library.custom_op("scconv_triton::sru_apply", mutates_args=())
def _sru_apply(
    x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
    tau: float, hard: bool,
) -> torch.Tensor:
    return _k.sru_apply(x, mean, rstd, weight, bias, tau, hard)


@_sru_apply.register_fake
def _sru_apply_fake(x, mean, rstd, weight, bias, tau, hard):
    return torch.empty_like(x)


def _sru_bwd_impl(
    ds: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    tau: float,
    hard: bool,
    torch_gn: bool,
    eps: float,
    needs_input_grad_params: bool,
    needs_input_grad_x: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, dw, db = _k.sru_backward(
        ds, x, mean, rstd, weight, bias, tau, hard, torch_gn, eps, needs_input_grad_params, needs_input_grad_x
    )
    # custom ops cannot return None: "no gradient" travels as an empty tensor (allocations only)
    return (
        dx if dx is not None else x.new_empty((0,)),
        dw if dw is not None else weight.new_empty((0,)),
        db if db is not None else weight.new_empty((0,)),
    )


_sru_bwd = torch.library.custom_op("scconv_triton::sru_bwd", _sru_bwd_impl, mutates_args=())


@_sru_bwd.register_fake
def _sru_bwd_fake(ds, x, mean, rstd, weight, bias, tau, hard, torch_gn, eps, needs_input_grad_params,
                  needs_input_grad_x):
    c = 0 if (hard or not needs_input_grad_params) else weight.numel()
    dx = torch.empty_like(x) if needs_input_grad_x else x.new_empty((0,))
    return dx, weight.new_empty((c,)), weight.new_empty((c,))


# eager: the launchers directly; under torch.compile: the custom ops (ops/_dispatch.py)
_sru_fwd_call = eager_direct(_sru_fwd, _sru_fwd_impl)
_sru_apply_call = eager_direct(_sru_apply, _k.sru_apply)
_sru_bwd_call = eager_direct(_sru_bwd, _sru_bwd_impl)


def sru_forward_op(x, weight, bias, group_num, eps, torch_gn, tau, hard):
    """(s, mean, rstd) of ``scconv_triton::sru_fwd``; weight, bias (C,)."""
    return _sru_fwd_call(x, weight, bias, int(group_num), float(eps), bool(torch_gn), float(tau), bool(hard))


def sru_apply_op(x, mean, rstd, weight, bias, tau, hard):
    """s from x and the statistics of :func:`sru_forward_op` (``scconv_triton::sru_apply``)."""
    return _sru_apply_call(x, mean, rstd, weight, bias, float(tau), bool(hard))


def sru_backward_op(ds, x, mean, rstd, weight, bias, tau, hard, torch_gn, eps, needs_input_grad_params,
                    needs_input_grad_x=True):
    """(dx, dweight, dbias) from ``scconv_triton::sru_bwd``, with None for absent gradients."""
    dx, dw, db = _sru_bwd_call(
        ds, x, mean, rstd, weight, bias, float(tau), bool(hard), bool(torch_gn), float(eps),
        bool(needs_input_grad_params), bool(needs_input_grad_x),
    )
    has_params = bool(needs_input_grad_params) and not hard
    return (dx if needs_input_grad_x else None, dw if has_params else None, db if has_params else None)


class SRUFunction(torch.autograd.Function):
    """Fused SRU with a recomputing backward.

    forward(ctx, x, weight, bias, group_num, eps, torch_gn, tau, hard): weight and bias are
    the (C,) GroupNorm affine parameters. Saves ONLY x, the per-(sample, group) mean (N x G,
    fp64) and rstd (N x G, fp32 or fp64), weight and bias: nothing of size N x C x H x W besides x.
    backward recomputes xhat, r = sigmoid(gn(x) * w_gamma) and the gate from x and the stats,
    then returns dx (through the gate, both halves of the cross-reconstruction and the
    GroupNorm), d weight (GroupNorm affine + w_gamma = weight / sum(weight)) and d bias; with
    the hard gate only dx (no gradient through the masks).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, group_num, eps, torch_gn, tau, hard):
        s, mean, rstd = sru_forward_op(x, weight, bias, group_num, eps, torch_gn, tau, hard)
        ctx.save_for_backward(x, mean, rstd, weight, bias)
        ctx.cfg = (float(tau), bool(hard), bool(torch_gn), float(eps))
        return s

    @staticmethod
    def backward(ctx, ds):
        x, mean, rstd, weight, bias = ctx.saved_tensors
        tau, hard, torch_gn, eps = ctx.cfg
        need_x = ctx.needs_input_grad[0]
        need_p = (ctx.needs_input_grad[1] or ctx.needs_input_grad[2]) and not hard
        if not (need_x or need_p):
            return (None,) * 8
        dx, dw, db = sru_backward_op(ds, x, mean, rstd, weight, bias, tau, hard, torch_gn, eps, need_p, need_x)
        if not ctx.needs_input_grad[1]:
            dw = None
        if not ctx.needs_input_grad[2]:
            db = None
        return dx, dw, db, None, None, None, None, None


def sru(x, weight, bias, *, group_num, eps, torch_gn, gate_treshold, gate="soft"):
    """Functional fused SRU. weight, bias: GroupNorm affine with C elements (any shape)."""
    if gate not in ("soft", "hard"):
        raise ValueError(f"gate must be 'soft' or 'hard', got {gate!r}")
    c = x.shape[1]
    return SRUFunction.apply(
        x, weight.reshape(c), bias.reshape(c), int(group_num), float(eps), bool(torch_gn), float(gate_treshold),
        gate == "hard",
    )
