"""Stage 2 of the fused SCConv: the SRU and the convolutions in three Triton kernels after the
statistics (kernels/stage2.py: squeeze with the SRU as prologue, pooled means, conv-combine), as one custom op ``scconv_triton::stage2_fwd`` with a fake
implementation (torch.compile(fullgraph=True) traces it), and its autograd Function.

The backward is stage 1's (``SCConvFunction.backward`` with ``recompute``): it rebuilds s from x
and the statistics, Y1 and PWC2's output from the saved up and low (two cuDNN convolutions), and
runs the stage-1 CRU and SRU backward kernels.
"""
from __future__ import annotations

import torch

from ..kernels import sru as _ks
from ..kernels import stage2 as _k
from ..kernels._launch import acc_dtype, channels_fastest, memory_format
from ._dispatch import eager_direct
from .scconv import SCConvFunction
from .sru import gate_mode

__all__ = ["Stage2Function", "scconv_stage2", "supports"]

supports = _k.supports


def _fwd_impl(
    x: torch.Tensor, gn_w: torch.Tensor, gn_b: torch.Tensor, w_sq1: torch.Tensor, w_sq2: torch.Tensor,
    w_gwc: torch.Tensor, b_gwc: torch.Tensor, w_pwc1: torch.Tensor, w_pwc2: torch.Tensor,
    group_num: int, eps: float, torch_gn: bool, tau: float, mode: int, stride: int, groups: int,
    pairwise: bool, tf32: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    mean, rstd, wsum = _ks.sru_stats(x, group_num, eps, torch_gn, weight=gn_w, mode=mode)
    out, up, low, a = _k.stage2_forward(
        x, mean, rstd, wsum, gn_w, gn_b, w_sq1, w_sq2, w_gwc, b_gwc, w_pwc1, w_pwc2,
        tau, mode, stride, groups, pairwise, tf32,
    )
    return out, mean, rstd, up, low, a


_fwd_op = torch.library.custom_op("scconv_triton::stage2_fwd", _fwd_impl, mutates_args=())


@_fwd_op.register_fake
def _fwd_fake(x, gn_w, gn_b, w_sq1, w_sq2, w_gwc, b_gwc, w_pwc1, w_pwc2, group_num, eps, torch_gn, tau, mode,
              stride, groups, pairwise, tf32):
    n, c, h, w = x.shape
    cout = w_gwc.shape[0]
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    cl = channels_fastest(x)
    kw = dict(dtype=x.dtype, device=x.device, memory_format=memory_format(cl))
    adt = acc_dtype(x.dtype)
    return (
        torch.empty((n, cout, ho, wo), **kw),
        x.new_empty((n, group_num), dtype=torch.float64),
        x.new_empty((n, group_num), dtype=adt),
        torch.empty((n, w_sq1.shape[0], h, w), **kw),
        torch.empty((n, w_sq2.shape[0], h, w), **kw),
        x.new_empty((n, 2 * cout), dtype=adt),
    )


_fwd_call = eager_direct(_fwd_op, _fwd_impl)


class Stage2Function(SCConvFunction):
    """out = CRU(SRU(x)), forward by the stage-2 kernels.

    forward(ctx, x, gn_weight, gn_bias, w_sq1, w_sq2, w_gwc, b_gwc, w_pwc1, w_pwc2,
            group_num, eps, torch_gn, tau, mode, shape, softmax, tf32)
    mode: the SRU's math (``SRUMath.code``, any upstream revision).
    Saves: x, the SRU statistics (N x group_num), the parameters, the squeezed tensors up
    (N, up_sq, H, W) and low (N, low_sq, H, W) and the softmax coefficients A (N, 2 Cout).
    Not saved: s, Y1, Y2, PWC2's output (never stored at all) and the pooled-mean partial sums
    (the backward below does not need them).
    Recomputes in backward (``SCConvFunction.backward`` with recompute): s from x and the stats,
    the merged convolution weights, and Y1 and PWC2's output from up and low (two convolutions).
    """

    @staticmethod
    def forward(ctx, x, gn_w, gn_b, w_sq1, w_sq2, w_gwc, b_gwc, w_pwc1, w_pwc2,
                group_num, eps, torch_gn, tau, mode, shape, softmax, tf32):
        out, mean, rstd, up, low, a = _fwd_call(
            x, gn_w, gn_b, w_sq1, w_sq2, w_gwc, b_gwc, w_pwc1, w_pwc2, int(group_num), float(eps),
            bool(torch_gn), float(tau), int(mode), int(shape.stride), int(shape.group_size),
            softmax == "pairwise", bool(tf32),
        )
        ctx.save_for_backward(x, mean, rstd, gn_w, gn_b, w_sq1, w_sq2, w_gwc, b_gwc, w_pwc1, w_pwc2, up, low, a)
        ctx.cfg = (float(tau), int(mode), bool(torch_gn), float(eps), shape, softmax, True)
        return out

    # backward: SCConvFunction's (17 inputs there and here: the same gradient tuple)


def scconv_stage2(x, gn_w, gn_b, w_sq1, w_sq2, w_gwc, b_gwc, w_pwc1, w_pwc2, *, group_num, eps, torch_gn,
                  gate_treshold, shape, softmax, gate="soft", mode=None, tf32=None):
    """Functional stage-2 SCConv; parameters in the module's state_dict order (any shapes).
    ``mode`` / ``gate``: the SRU's math as in :func:`scconv_triton.ops.scconv.scconv`. ``tf32``: fp32
    convolutions on TF32 tensor cores (default: torch.backends.cudnn.allow_tf32)."""
    c = x.shape[1]
    if tf32 is None:
        tf32 = torch.backends.cudnn.allow_tf32
    return Stage2Function.apply(
        x, gn_w.reshape(c), gn_b.reshape(c), w_sq1, w_sq2, w_gwc, b_gwc, w_pwc1, w_pwc2,
        int(group_num), float(eps), bool(torch_gn), float(gate_treshold), gate_mode(gate, mode),
        shape, softmax, bool(tf32) and x.dtype == torch.float32,
    )
