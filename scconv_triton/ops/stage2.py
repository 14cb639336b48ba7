"""Stage 2 of the fused SCConv: the SRU and the convolutions in three Triton kernels after the
statistics (kernels/stage2.py: squeeze with the SRU as prologue, pooled means, conv-combine), as one
custom op ``scconv_triton::stage2_fwd`` with a fake implementation (torch.compile(fullgraph=True)
traces it), and its autograd Function.

Backward: dA and the convolution weights' gradients by kernels/stage2_bwd.py
(``scconv_triton::stage2_dw``: one pass over dout, up and low; Y1 and PWC2's output never
rebuilt) where it has a tile and moves less (``dw_pass_pays``); else Y1 and PWC2's output are
rebuilt by cuDNN, through the module's grouped weights (``grouped_rebuild_pays``) or stage 1's
``cru_conv_backward``; the convolutions' input gradients by ``scconv_triton::stage2_dgrad`` (dY formed on
the fly, the identity branch's gradient folded into d_low) where it has a tile and the fused
squeeze backward runs, else stage 1's combine backward and cuDNN: with the module's grouped GWC
and PWC1 weights where the merged dense Y1 weight would move more (``grouped_dgrad_pays``: small
images with wide groups), else with the merged one (``cru_convs_backward``); the
squeezes' and the SRU's is stage 2's (``scconv_triton::stage2_sq_bwd``: s and ds rebuilt in
registers, never stored) where that moves fewer bytes (``squeeze_backward_pays``: not at small
images with many channels, whose per-tile weight gradients outweigh s and ds), else stage 1's.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F

from ..kernels import sru as _ks
from ..kernels import stage2 as _k
from ..kernels import stage2_bwd as _kb
from .._config import SRUMath
from ..kernels._launch import acc_dtype, channels_fastest, memory_format
from ._dispatch import eager_direct
from .cru import (
    cru_combine_bwd, cru_conv_backward, cru_convs_backward, cru_reduce, cru_squeeze_backward, cru_weights,
    pwc2_backward, pwc2_forward,
)
from .sru import gate_mode, sru_apply_op, sru_backward_op

__all__ = ["Stage2Function", "scconv_stage2", "supports"]

supports = _k.supports


def _fwd_impl(
    x: torch.Tensor, gn_w: torch.Tensor, gn_b: torch.Tensor, w_sq1: torch.Tensor, w_sq2: torch.Tensor,
    w_gwc: torch.Tensor, b_gwc: torch.Tensor, w_pwc1: torch.Tensor, w_pwc2: torch.Tensor,
    group_num: int, eps: float, torch_gn: bool, tau: float, mode: int, stride: int, groups: int,
    pairwise: bool, tf32: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    mean, rstd, wsum = _ks.sru_stats(x, group_num, eps, torch_gn, weight=gn_w, mode=mode)
    out, up, low, a = _k.stage2_forward(
        x, mean, rstd, wsum, gn_w, gn_b, w_sq1, w_sq2, w_gwc, b_gwc, w_pwc1, w_pwc2,
        tau, mode, stride, groups, pairwise, tf32,
    )
    return out, mean, rstd, wsum, up, low, a


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
        x.new_empty((2,), dtype=adt),
        torch.empty((n, w_sq1.shape[0], h, w), **kw),
        torch.empty((n, w_sq2.shape[0], h, w), **kw),
        x.new_empty((n, 2 * cout), dtype=adt),
    )


_fwd_call = eager_direct(_fwd_op, _fwd_impl)


def _squeeze_impl(
    x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, wsum: torch.Tensor, gn_w: torch.Tensor,
    gn_b: torch.Tensor, w_sq1: torch.Tensor, w_sq2: torch.Tensor, tau: float, mode: int, tf32: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _k.stage2_squeeze(x, mean, rstd, wsum, gn_w, gn_b, w_sq1, w_sq2, tau, mode, tf32)


_squeeze_op = torch.library.custom_op("scconv_triton::stage2_squeeze", _squeeze_impl, mutates_args=())


@_squeeze_op.register_fake
def _squeeze_fake(x, mean, rstd, wsum, gn_w, gn_b, w_sq1, w_sq2, tau, mode, tf32):
    n, _, h, w = x.shape
    kw = dict(dtype=x.dtype, device=x.device, memory_format=memory_format(channels_fastest(x)))
    return torch.empty((n, w_sq1.shape[0], h, w), **kw), torch.empty((n, w_sq2.shape[0], h, w), **kw)


_squeeze_call = eager_direct(_squeeze_op, _squeeze_impl)


def _sq_bwd_impl(
    x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, gn_w: torch.Tensor, gn_b: torch.Tensor,
    w_sq1: torch.Tensor, w_sq2: torch.Tensor, d_up: torch.Tensor, d_low: torch.Tensor, d_id: Optional[torch.Tensor],
    tau: float, mode: int, torch_gn: bool, eps: float, stride: int, need_params: bool, need_x: bool, tf32: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, dgw, dgb, d_sq1, d_sq2 = _k.stage2_squeeze_backward(
        x, mean, rstd, gn_w, gn_b, w_sq1, w_sq2, d_up, d_low, d_id, tau, mode, torch_gn, eps, stride,
        need_params, need_x, tf32,
    )
    # custom ops cannot return None: "no gradient" travels as an empty tensor (allocations only)
    return (
        dx if dx is not None else x.new_empty((0,)),
        dgw if dgw is not None else gn_w.new_empty((0,)),
        dgb if dgb is not None else gn_w.new_empty((0,)),
        d_sq1, d_sq2,
    )


_sq_bwd_op = torch.library.custom_op("scconv_triton::stage2_sq_bwd", _sq_bwd_impl, mutates_args=())


@_sq_bwd_op.register_fake
def _sq_bwd_fake(x, mean, rstd, gn_w, gn_b, w_sq1, w_sq2, d_up, d_low, d_id, tau, mode, torch_gn, eps, stride,
                 need_params, need_x, tf32):
    c = gn_w.numel() if (SRUMath.from_code(mode).param_grad and need_params) else 0
    dx = torch.empty_like(x) if need_x else x.new_empty((0,))
    return (dx, gn_w.new_empty((c,)), gn_w.new_empty((c,)), torch.empty(w_sq1.shape, dtype=w_sq1.dtype, device=x.device),
            torch.empty(w_sq2.shape, dtype=w_sq2.dtype, device=x.device))


_sq_bwd_call = eager_direct(_sq_bwd_op, _sq_bwd_impl)


def _dw_impl(
    dout: torch.Tensor, up: torch.Tensor, low: torch.Tensor, a: torch.Tensor, w_gwc: torch.Tensor,
    b_gwc: torch.Tensor, w_pwc1: torch.Tensor, w_pwc2: torch.Tensor, stride: int, groups: int, pairwise: bool,
    tf32: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    da, kv, dwg, db, dw1, dw2 = _kb.stage2_dw(dout, up, low, a, w_gwc, b_gwc, w_pwc1, w_pwc2, stride, groups,
                                              pairwise, tf32)
    return (da, kv, dwg.to(w_gwc.dtype), db.to(b_gwc.dtype), dw1.to(w_pwc1.dtype).view(w_pwc1.shape),
            dw2.to(w_pwc2.dtype).view(w_pwc2.shape))


_dw_op = torch.library.custom_op("scconv_triton::stage2_dw", _dw_impl, mutates_args=())


@_dw_op.register_fake
def _dw_fake(dout, up, low, a, w_gwc, b_gwc, w_pwc1, w_pwc2, stride, groups, pairwise, tf32):
    # contiguous, as the launcher returns them (empty_like would keep a channels_last weight's strides)
    return (torch.empty_like(a), torch.empty_like(a), *(torch.empty(t.shape, dtype=t.dtype, device=t.device)
                                                         for t in (w_gwc, b_gwc, w_pwc1, w_pwc2)))


_dw_call = eager_direct(_dw_op, _dw_impl)


def _dgrad_impl(
    dout: torch.Tensor, a: torch.Tensor, kv: torch.Tensor, w_gwc: torch.Tensor, w_pwc1: torch.Tensor,
    w_pwc2: torch.Tensor, h: int, w: int, stride: int, channels_last: bool, tf32: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _kb.stage2_dgrad(dout, a, kv, w_gwc, w_pwc1, w_pwc2, h, w, stride, channels_last, tf32)


_dgrad_op = torch.library.custom_op("scconv_triton::stage2_dgrad", _dgrad_impl, mutates_args=())


@_dgrad_op.register_fake
def _dgrad_fake(dout, a, kv, w_gwc, w_pwc1, w_pwc2, h, w, stride, channels_last, tf32):
    kw = dict(dtype=dout.dtype, device=dout.device, memory_format=memory_format(channels_last))
    n = dout.shape[0]
    return torch.empty((n, w_pwc1.shape[1], h, w), **kw), torch.empty((n, w_pwc2.shape[1], h, w), **kw)


_dgrad_call = eager_direct(_dgrad_op, _dgrad_impl)


def _conv_backward(dout, up, low, a, w_sq1, w_sq2, w_gwc, b_gwc, w_pwc1, w_pwc2, shape, softmax, tf32, cl,
                   fuse_dgrad):
    """(d_up, d_low, d_id, d_gwc_w, d_gwc_b, d_pwc1, d_pwc2, wsq) as ``cru_conv_backward``: dA and the
    weight gradients by stage2_dw (no Y1 or PWC2 output rebuilt) where ``dw_pass_pays``; the input
    gradients by stage2_dgrad where it has one and ``fuse_dgrad`` (then d_low includes the identity
    branch's gradient, and d_id and wsq are None), else the combine's and cuDNN's backward."""
    dw_pass, grouped_rebuild, grouped_dgrad = backward_path(dout, up, w_gwc, w_pwc2, shape.stride, shape.group_size,
                                                            tf32, fuse_dgrad)
    if not dw_pass:
        if grouped_rebuild:
            return _grouped_rebuild(dout, up, low, a, w_sq1, w_sq2, w_gwc, b_gwc, w_pwc1, w_pwc2, shape, softmax,
                                    cl, fuse_dgrad)
        return cru_conv_backward(dout, (up, low, a), w_sq1, w_sq2, w_gwc, b_gwc, w_pwc1, w_pwc2, shape, softmax,
                                 True, cl)
    da, kv, d_gwc_w, d_gwc_b, d_pwc1, d_pwc2 = _dw_call(
        dout, up, low, a, w_gwc, b_gwc, w_pwc1, w_pwc2, int(shape.stride), int(shape.group_size),
        softmax == "pairwise", bool(tf32),
    )
    h, w = up.shape[2:]
    if fuse_dgrad and _kb.dgrad_plan_for(dout, w_gwc, w_pwc1, w_pwc2, h, w, shape.stride, tf32) is not None:
        d_up, d_low = _dgrad_call(dout, a, kv, w_gwc, w_pwc1, w_pwc2, h, w, int(shape.stride), cl, bool(tf32))
        return d_up, d_low, None, d_gwc_w, d_gwc_b, d_pwc1, d_pwc2, None
    if grouped_dgrad:
        d_up, d_low, d_id = _grouped_convs_backward(dout, a, da, up, low, w_gwc, w_pwc1, w_pwc2, shape, softmax, cl,
                                                    False)[:3]
        return d_up, d_low, d_id, d_gwc_w, d_gwc_b, d_pwc1, d_pwc2, None if fuse_dgrad else _squeeze_weight(w_sq1, w_sq2)
    wm, wsq = cru_weights(w_gwc, w_pwc1, w_sq1, w_sq2, shape.group_size, cl)
    d_up, d_low, d_id, _, _, _ = cru_convs_backward(dout, a, da, up, low, wm, w_pwc2, shape, softmax, cl, False)
    return d_up, d_low, d_id, d_gwc_w, d_gwc_b, d_pwc1, d_pwc2, wsq


def backward_path(dout, up, w_gwc, w_pwc2, stride: int, groups: int, tf32: bool, fuse_dgrad: bool = False,
                  batch: Optional[int] = None) -> tuple:
    """_conv_backward's batch-dependent choices at the batch (default: ``dispatch_batch`` of dout's):
    (dw_pass_pays, grouped_rebuild_pays, grouped_dgrad_pays). benchmarks/run.py compares them
    across batches to know which path a batch's counts belong to."""
    return (dw_pass_pays(dout, up, w_gwc, w_pwc2, stride, groups, tf32, fuse_dgrad, batch),
            grouped_rebuild_pays(dout, up, w_gwc, batch), grouped_dgrad_pays(dout, up, w_gwc, batch))


def dispatch_batch(n: int) -> int:
    """The batch that batch-dependent choices (dw_pass_pays, grouped_rebuild_pays, grouped_dgrad_pays)
    are made for: n, or
    SCCONV_DISPATCH_BATCH where set. The benchmarks count a layer at batches 1 and 2 and
    extrapolate launch by launch to a training batch; for that they must count the path the
    training batch takes (benchmarks/run.py sets it for the whole networks' floor)."""
    v = os.environ.get("SCCONV_DISPATCH_BATCH")
    return int(v) if v else n


# A launch's fixed cost in bytes of traffic: about 2 us at 3 TB/s (the report's floor charges
# 2.5 us on an H100). Where the Triton dgrad follows, the dw pass runs 4 launches (dw, dsoft,
# reduce, dgrad) in place of the rebuild path's 8 (merged weights, two convolutions, the pooled
# sums, the combine's backward, cuDNN's two backward calls, the weights' reduction).
LAUNCH_BYTES = 6 << 20
_PASS_SAVES_LAUNCHES = 4


def dw_pass_pays(dout, up, w_gwc, w_pwc2, stride: int, groups: int, tf32: bool, fuse_dgrad: bool = False,
                 batch: Optional[int] = None) -> bool:
    """Whether dA and the convolution weight gradients go through stage2_dw: where it has a tile
    (``dw_plan``) and costs less than the rebuild path (``_grouped_rebuild`` or
    ``cru_conv_backward``) at the batch. The pass's own costs grow with the batch: per sample
    it writes N_SP weight-sized rows of products and reads them back (in the accumulation
    dtype), reads the weights (dA comes from the products), and reads dout once per
    input-channel chunk (N_CI). The rebuild path's are the weight traffic of the cheaper of its
    two forms (_rebuild_weight_cost: the merged dense Y1 weight, per step, or the grouped
    weights' extra activation passes, per sample), and per sample Y1 and PWC2's output written
    and read back with dout once more. With ``fuse_dgrad`` (the squeeze backward is fused, so
    the Triton dgrad follows where it has a tile) the pass also saves launches, LAUNCH_BYTES
    each. Weight-sized rows per sample lose where the weights are large against
    the activations: R50's layer4 (512@7) at batch 1 moves 129.3 S with the pass, 89.9 S on the
    grouped rebuild (counted). ``batch``: decide for that batch (default: ``dispatch_batch``
    of dout's)."""
    plan = _kb.dw_plan_for(up, w_gwc, w_pwc2, stride, groups, tf32)
    if plan is None:
        return False
    n = batch or dispatch_batch(max(dout.shape[0], 1))
    cout, cig, k, _ = w_gwc.shape
    p, lsq = w_pwc2.shape[:2]
    usq, h, w = up.shape[1:]
    es, acc = up.element_size(), 8 if up.dtype == torch.float64 else 4
    rwc = cig * k * k + usq + lsq + 1
    hw = dout.shape[2] * dout.shape[3]
    # a model, checked against the meter where the choice flips (tests/test_stage2.py): it leaves
    # out what both paths move alike, and the rebuild path's re-reads of up and low
    per_pass = (2 * plan["N_SP"] * acc + es) * cout * rwc + (plan["N_CI"] - 1) * cout * hw * es
    per_rebuild = (2 * (cout + p) + cout) * hw * es
    merged, grouped = _rebuild_weight_cost(dout, up, w_gwc, n)
    ieee = up.dtype == torch.float32 and not tf32
    dgrad = fuse_dgrad and _kb.dgrad_plan(h, w, k, stride, usq, lsq, cout, ieee) is not None
    launches = LAUNCH_BYTES * _PASS_SAVES_LAUNCHES if dgrad else 0
    return n * per_pass <= min(merged, grouped) * es + n * per_rebuild + launches


def _rebuild_weight_cost(dout, up, w_gwc, n: int):
    """Elements the rebuild path's two forms move beyond each other's, at batch n: (merged, grouped).
    The merged dense Y1 weight is written, read by the Y1 convolution, its gradient written by
    cuDNN and read back: 4 weight sizes per step. With the grouped weights (_grouped_rebuild)
    Y1 is two convolutions added (written twice, read twice more) and dY1 read twice, and the
    two input gradients added (3 x up): per sample."""
    cout, _, k, _ = w_gwc.shape
    per_grouped = 4 * cout * dout.shape[2] * dout.shape[3] + 3 * up[0].numel()
    return 4 * cout * up.shape[1] * k * k, n * per_grouped


def grouped_rebuild_pays(dout, up, w_gwc, batch: Optional[int] = None) -> bool:
    """Whether the rebuild path forms Y1 and the weight gradients with the module's grouped GWC
    and PWC1 weights (_grouped_rebuild) rather than through the merged dense Y1 weight
    (``cru_conv_backward``): by the bytes of _rebuild_weight_cost at the batch (default:
    ``dispatch_batch`` of dout's). The grouped weights win at small batches of small images with
    wide groups (R50's layer4 at batch 1: 89.9 S against 177.4 S counted)."""
    merged, grouped = _rebuild_weight_cost(dout, up, w_gwc, batch or dispatch_batch(max(dout.shape[0], 1)))
    return grouped < merged


def grouped_dgrad_pays(dout, up, w_gwc, batch: Optional[int] = None) -> bool:
    """Whether the input gradients through the grouped GWC and PWC1 weights (_grouped_convs_backward) move
    fewer bytes than through the merged dense Y1 weight (``cru_weights``, one cuDNN call): the
    merged weight is written and read again (2 x its size, once per step), the grouped path reads
    dY1 twice and adds the two gradients (dY1 + 3 x d_up per sample). Weight-sized traffic wins
    at small batches of small images with wide groups (R50's layer3 and layer4 at batch 1 or 2);
    the merged weight at training batches, where the activations dominate. ``batch``: decide
    for that batch instead (default: ``dispatch_batch`` of dout's)."""
    n = max(dout.shape[0], 1)
    cout, _, k, _ = w_gwc.shape
    merged = cout * up.shape[1] * k * k
    return 2 * merged > (batch or dispatch_batch(n)) * (dout.numel() + 3 * up.numel()) // n


def _squeeze_weight(w_sq1, w_sq2):
    """The squeezes' weight as ``cru_weights`` gives it to stage 1's squeeze backward, without
    the merged Y1 weight: (up_sq + low_sq, u, 1, 1) when u == l (groups 2), else block-diagonal."""
    if w_sq1.shape[1] == w_sq2.shape[1]:
        return torch.cat([w_sq1, w_sq2])
    return torch.block_diag(w_sq1.flatten(1), w_sq2.flatten(1))[:, :, None, None]


def _grouped_convs_backward(dout, a, da, up, low, w_gwc, w_pwc1, w_pwc2, shape, softmax, cl, wgrad: bool):
    """From dout, A and dA, by cuDNN with the module's own weights (no merged weight is formed):
    (d_up, d_low, d_id, d_gwc_w, d_gwc_b, d_pwc1, d_pwc2), the last four None unless ``wgrad``.
    d_up = the grouped GWC's input gradient + PWC1's (a 1 x 1 convolution of this stride), d_low
    = PWC2's; as ``cru_convs_backward`` does with the merged weight."""
    st, k = shape.stride, shape.kernel_size
    dy1, dp2, did = cru_combine_bwd(dout, a, da, shape.pwc2_out, softmax == "pairwise", up.dtype, cl)
    conv_bwd = torch.ops.aten.convolution_backward.default
    d_up, d_gw, d_b = conv_bwd(dy1, up, w_gwc, [w_gwc.shape[0]] if wgrad else None, [st, st], [k // 2, k // 2],
                               [1, 1], False, [0, 0], shape.group_size, [True, wgrad, wgrad])
    d_up1, d_pw1, _ = conv_bwd(dy1, up, w_pwc1, None, [st, st], [0, 0], [1, 1], False, [0, 0], 1,
                               [True, wgrad, False])
    d_low, d_pw2 = pwc2_backward(dp2, low, w_pwc2, shape, wgrad)
    return d_up.add_(d_up1), d_low, did, d_gw, d_b, d_pw1, d_pw2


def _grouped_rebuild(dout, up, low, a, w_sq1, w_sq2, w_gwc, b_gwc, w_pwc1, w_pwc2, shape, softmax, cl,
                     fuse_dgrad):
    """``cru_conv_backward`` (Y1 and PWC2's output rebuilt by cuDNN) with the module's grouped GWC
    and PWC1 weights where the merged dense Y1 weight would move more (``grouped_rebuild_pays``):
    that weight is never formed, and cuDNN gives the grouped weights' gradients directly. Y1 is
    the sum of two convolutions, d_up of two input gradients."""
    st, k, g = shape.stride, shape.kernel_size, shape.group_size
    y1 = F.conv2d(up, w_gwc, b_gwc, stride=st, padding=k // 2, groups=g).add_(F.conv2d(up, w_pwc1, stride=st))
    p2 = pwc2_forward(low, w_pwc2, shape, y1)
    da = cru_reduce(dout, y1, p2, low[:, :, ::st, ::st])
    del y1, p2
    grads = _grouped_convs_backward(dout, a, da, up, low, w_gwc, w_pwc1, w_pwc2, shape, softmax, cl, True)
    return (*grads, None if fuse_dgrad else _squeeze_weight(w_sq1, w_sq2))


class Stage2Function(torch.autograd.Function):
    """out = CRU(SRU(x)), forward by the stage-2 kernels.

    forward(ctx, x, gn_weight, gn_bias, w_sq1, w_sq2, w_gwc, b_gwc, w_pwc1, w_pwc2,
            group_num, eps, torch_gn, tau, mode, shape, softmax, tf32, recompute)
    mode: the SRU's math (``SRUMath.code``, any upstream revision).
    Saves: x, the SRU statistics (N x group_num, and w's (denom, shift), 2 values), the
    parameters, the softmax coefficients A (N, 2 Cout) and, unless ``recompute``, the squeezed
    tensors up (N, up_sq, H, W) and low (N, low_sq, H, W).
    Never stored, forward or backward: s, ds, Y2; not saved: Y1, PWC2's output (never stored in
    the forward) and the pooled-mean partial sums.
    Recomputes in backward: with ``recompute`` up and low (the squeeze kernel again, from x and
    the statistics); s, xhat and the gate from x in the squeeze backward's registers (twice: its
    two passes); dY1 and dY2 in the input-gradient pass's registers. Where the Triton passes
    have no tile: dY1 / dY2 and, unless ``grouped_dgrad_pays``, the merged convolution weight
    (cuDNN's input gradients); where the dw pass is not taken (``dw_pass_pays``) also Y1 and
    PWC2's output (cuDNN convolutions: with the grouped weights, ``_grouped_rebuild``, or the
    merged one, ``cru_conv_backward``).
    """

    @staticmethod
    def forward(ctx, x, gn_w, gn_b, w_sq1, w_sq2, w_gwc, b_gwc, w_pwc1, w_pwc2,
                group_num, eps, torch_gn, tau, mode, shape, softmax, tf32, recompute):
        out, mean, rstd, wsum, up, low, a = _fwd_call(
            x, gn_w, gn_b, w_sq1, w_sq2, w_gwc, b_gwc, w_pwc1, w_pwc2, int(group_num), float(eps),
            bool(torch_gn), float(tau), int(mode), int(shape.stride), int(shape.group_size),
            softmax == "pairwise", bool(tf32),
        )
        kept = () if recompute else (up, low)
        ctx.save_for_backward(x, mean, rstd, wsum, gn_w, gn_b, w_sq1, w_sq2, w_gwc, b_gwc, w_pwc1, w_pwc2, a, *kept)
        ctx.cfg = (float(tau), int(mode), bool(torch_gn), float(eps), shape, softmax, bool(tf32), bool(recompute))
        return out

    @staticmethod
    def backward(ctx, dout):
        x, mean, rstd, wsum, gn_w, gn_b, w_sq1, w_sq2, w_gwc, b_gwc, w_pwc1, w_pwc2, a, *kept = ctx.saved_tensors
        tau, mode, torch_gn, eps, shape, softmax, tf32, recompute = ctx.cfg
        need = ctx.needs_input_grad
        need_x = need[0]
        need_gn = (need[1] or need[2]) and SRUMath.from_code(mode).param_grad
        if recompute:
            up, low = _squeeze_call(x, mean, rstd, wsum, gn_w, gn_b, w_sq1, w_sq2, tau, mode, tf32)
        else:
            up, low = kept
        cl = channels_fastest(x)
        n, c, h, w = x.shape
        pays = _k.squeeze_backward_pays(n, c, h, w, shape.up_sq, shape.up, shape.low_sq, x.element_size())
        d_up, d_low, d_id, d_gwc_w, d_gwc_b, d_pwc1, d_pwc2, wsq = _conv_backward(
            dout, up, low, a, w_sq1, w_sq2, w_gwc, b_gwc, w_pwc1, w_pwc2, shape, softmax, tf32, cl, pays,
        )
        del up, low
        if pays:
            dx, d_gw, d_gb, d_sq1, d_sq2 = _sq_bwd_call(
                x, mean, rstd, gn_w, gn_b, w_sq1, w_sq2, d_up, d_low, d_id, tau, mode, torch_gn, eps,
                int(shape.stride), bool(need_gn), bool(need_x), tf32,
            )
        else:  # stage 1's: s and ds through memory (kernels/stage2.py, squeeze_backward_pays)
            s = sru_apply_op(x, mean, rstd, gn_w, gn_b, tau, mode)
            ds, d_sq1, d_sq2 = cru_squeeze_backward(d_up, d_low, d_id, s, wsq, shape, cl, need_x or need_gn)
            del s
            dx = d_gw = d_gb = None
            if need_x or need_gn:
                dx, d_gw, d_gb = sru_backward_op(ds, x, mean, rstd, gn_w, gn_b, tau, mode, torch_gn, eps, need_gn,
                                                 need_x)
        if w_pwc2.numel() == 0:  # PWC2 has no channels (out_channels == l//r): unused, like the reference
            d_pwc2 = None
        return (
            dx if need_x else None,
            d_gw if need[1] and need_gn else None,
            d_gb if need[2] and need_gn else None,
            d_sq1, d_sq2, d_gwc_w, d_gwc_b, d_pwc1, d_pwc2,
            None, None, None, None, None, None, None, None, None,
        )


def scconv_stage2(x, gn_w, gn_b, w_sq1, w_sq2, w_gwc, b_gwc, w_pwc1, w_pwc2, *, group_num, eps, torch_gn,
                  gate_treshold, shape, softmax, gate="soft", mode=None, tf32=None, recompute=False):
    """Functional stage-2 SCConv; parameters in the module's state_dict order (any shapes).
    ``mode`` / ``gate``: the SRU's math as in :func:`scconv_triton.ops.scconv.scconv`. ``tf32``: fp32
    convolutions on TF32 tensor cores (default: torch.backends.cudnn.allow_tf32). ``recompute``:
    save only x and the statistics; the backward rebuilds up and low (one more squeeze launch)."""
    c = x.shape[1]
    if tf32 is None:
        tf32 = torch.backends.cudnn.allow_tf32
    return Stage2Function.apply(
        x, gn_w.reshape(c), gn_b.reshape(c), w_sq1, w_sq2, w_gwc, b_gwc, w_pwc1, w_pwc2,
        int(group_num), float(eps), bool(torch_gn), float(gate_treshold), gate_mode(gate, mode),
        shape, softmax, bool(tf32) and x.dtype == torch.float32, bool(recompute),
    )
