"""The whole SCConv as one autograd Function: fused SRU, then the fused CRU.

One node instead of two lets the backward recompute the SRU output s from x (one
read of x, one write) instead of saving it: s is an N x C x H x W tensor that the
squeeze weights' gradient needs, and it can be rebuilt from x and the per-group
statistics.
"""
from __future__ import annotations

import torch

from .cru import cru_backward_core, cru_forward_core
from .sru import sru_apply_op, sru_backward_op, sru_forward_op

__all__ = ["SCConvFunction", "scconv"]


class SCConvFunction(torch.autograd.Function):
    """out = CRU(SRU(x)) with the SRU and CRU kernels of this package.

    forward(ctx, x, gn_weight, gn_bias, w_sq1, w_sq2, w_gwc, b_gwc, w_pwc1, w_pwc2,
            group_num, eps, torch_gn, tau, hard, shape, softmax, recompute)
    gn_weight and gn_bias are the GroupNorm affine parameters flattened to (C,).

    Saves: x, the SRU statistics (N x group_num), the parameters, and what the CRU
    backward needs (``cru_forward_core``'s ``saved``): the squeezed tensors, the
    softmax coefficients (N x 2*Cout) and, unless ``recompute``, the convolution
    outputs Y1 and PWC2's output.
    Recomputes in backward: the SRU output s (``sru_apply`` from x and the stats),
    the merged convolution weights (one weight-sized launch) and, with ``recompute``,
    Y1 and PWC2's output (two convolutions).
    """

    @staticmethod
    def forward(ctx, x, gn_w, gn_b, w_sq1, w_sq2, w_gwc, b_gwc, w_pwc1, w_pwc2,
                group_num, eps, torch_gn, tau, hard, shape, softmax, recompute):
        s, mean, rstd = sru_forward_op(x, gn_w, gn_b, group_num, eps, torch_gn, tau, hard)
        out, saved = cru_forward_core(s, w_sq1, w_sq2, w_gwc, b_gwc, w_pwc1, w_pwc2, shape, softmax, recompute)
        ctx.save_for_backward(x, mean, rstd, gn_w, gn_b, w_sq1, w_sq2, w_gwc, b_gwc, w_pwc1, w_pwc2, *saved)
        ctx.cfg = (float(tau), bool(hard), bool(torch_gn), float(eps), shape, softmax, bool(recompute))
        return out

    @staticmethod
    def backward(ctx, dout):
        x, mean, rstd, gn_w, gn_b, w_sq1, w_sq2, w_gwc, b_gwc, w_pwc1, w_pwc2, *saved = ctx.saved_tensors
        tau, hard, torch_gn, eps, shape, softmax, recompute = ctx.cfg
        need = ctx.needs_input_grad
        need_x = need[0]
        need_gn = (need[1] or need[2]) and not hard
        s = sru_apply_op(x, mean, rstd, gn_w, gn_b, tau, hard)
        ds, d_sq1, d_sq2, d_gwc_w, d_gwc_b, d_pwc1, d_pwc2 = cru_backward_core(
            dout, s, tuple(saved), w_sq1, w_sq2, w_gwc, b_gwc, w_pwc1, w_pwc2, shape, softmax, recompute,
            need_x or need_gn,
        )
        del s
        if w_pwc2.numel() == 0:  # PWC2 has no channels (out_channels == l//r): unused, like the reference
            d_pwc2 = None
        dx = d_gw = d_gb = None
        if need_x or need_gn:
            dx, d_gw, d_gb = sru_backward_op(ds, x, mean, rstd, gn_w, gn_b, tau, hard, torch_gn, eps, need_gn, need_x)
        return (
            dx if need_x else None,
            d_gw if need[1] else None,
            d_gb if need[2] else None,
            d_sq1, d_sq2, d_gwc_w, d_gwc_b, d_pwc1, d_pwc2,
            None, None, None, None, None, None, None, None,
        )


def scconv(x, gn_w, gn_b, w_sq1, w_sq2, w_gwc, b_gwc, w_pwc1, w_pwc2, *, group_num, eps, torch_gn,
           gate_treshold, gate, shape, softmax, recompute):
    """Functional fused SCConv; parameters in the module's state_dict order (any shapes)."""
    c = x.shape[1]
    return SCConvFunction.apply(
        x, gn_w.reshape(c), gn_b.reshape(c), w_sq1, w_sq2, w_gwc, b_gwc, w_pwc1, w_pwc2,
        int(group_num), float(eps), bool(torch_gn), float(gate_treshold), gate == "hard",
        shape, softmax, bool(recompute),
    )
