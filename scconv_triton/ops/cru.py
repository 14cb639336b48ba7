"""The fused CRU: autograd glue around the Triton kernels of ``scconv_triton.kernels.cru``.

Forward (``cru_forward_core``), with s the CRU input (N, Cin, H, W), NCHW or channels_last:

1. ``cru_weights`` (Triton, weight-sized): the merged Y1 weight W = dense(GWC.weight)
   (block-diagonal) + PWC1.weight in the centre tap, and the squeeze weight used by
   the backward (cat of both squeezes for a groups=2 conv when u == l, else block-diagonal).
2. up = squeeze1(s[:, :u]), low = squeeze2(s[:, u:]): two GEMMs (``mm`` on the
   channels_last rows, ``bmm`` over the batch for NCHW) that read the two halves of s
   in place through strides and write up and low as two separately contiguous tensors,
   so the convolutions below get contiguous inputs (no hidden ``.contiguous()`` copy
   inside cuDNN, which a channel slice of one grouped-conv output would cause).
3. Y1 = conv(up, W, GWC.bias, k x k, stride s)        (GWC + PWC1 as one convolution)
4. P2 = conv(low, PWC2.weight, stride s)              (skipped when PWC2 has 0 channels)
5. ``cru_pool`` (Triton): means of Y1, P2 and ident = low[:, :, ::s, ::s] (a view).
6. ``cru_combine`` (Triton): softmax (channel or pairwise), out = A1*Y1 + A2*Y2; stores A.

Backward (``cru_backward_core``): ``cru_reduce`` (dA = sums of dout*Z), ``cru_combine_bwd``
(softmax Jacobian; dY1, dP2, dident), ``convolution_backward`` of Y1 and of PWC2,
``cru_dsq`` (d_up and d_low + the strided identity gradient as one tensor), one
``convolution_backward`` of the squeezes (groups=2 when u == l) giving ds and both squeeze
weight gradients, and ``cru_wgrad`` (Triton, weight-sized) splitting the merged weight's
gradient back into GWC.weight and PWC1.weight gradients.

The Triton launchers are torch.library custom ops (``scconv_triton::cru_*``) with fake
implementations, so torch.compile(fullgraph=True) traces CRUFunction without graph breaks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .._config import CRUShape
from ..kernels import cru as K
from ..kernels._launch import acc_dtype, memory_format
from ._dispatch import eager_direct

__all__ = [
    "cru_forward_core",
    "cru_backward_core",
    "cru_conv_backward",
    "cru_convs_backward",
    "cru_squeeze_backward",
    "CRUFunction",
    "cru",
]

_LIB = "scconv_triton"


# ----------------------------------------------------------------------------- custom ops
@torch.library.custom_op(f"{_LIB}::cru_weights", mutates_args=())
def _cru_weights_op(
    w_gwc: Tensor, w_pwc1: Tensor, w_sq1: Tensor, w_sq2: Tensor, groups: int, channels_last: bool
) -> tuple[Tensor, Tensor]:
    return K.cru_weights(w_gwc, w_pwc1, w_sq1, w_sq2, groups, channels_last)


@_cru_weights_op.register_fake
def _(w_gwc, w_pwc1, w_sq1, w_sq2, groups, channels_last):
    c, cig, k, _ = w_gwc.shape
    usq, u = w_sq1.shape[:2]
    lsq, l_ = w_sq2.shape[:2]
    qin = u if u == l_ else u + l_
    wm = w_gwc.new_empty((c, cig * groups, k, k)).contiguous(memory_format=memory_format(channels_last))
    return wm, w_sq1.new_empty((usq + lsq, qin, 1, 1))


@torch.library.custom_op(f"{_LIB}::cru_pool", mutates_args=())
def _cru_pool_op(y1: Tensor, p2: Tensor, ident: Tensor) -> Tensor:
    return K.cru_pool(y1, p2, ident)


@_cru_pool_op.register_fake
def _(y1, p2, ident):
    return y1.new_empty((y1.shape[0], 2 * y1.shape[1]), dtype=acc_dtype(y1.dtype))


@torch.library.custom_op(f"{_LIB}::cru_combine", mutates_args=())
def _cru_combine_op(y1: Tensor, p2: Tensor, ident: Tensor, m: Tensor, pairwise: bool) -> tuple[Tensor, Tensor]:
    return K.cru_combine(y1, p2, ident, m, pairwise)


@_cru_combine_op.register_fake
def _(y1, p2, ident, m, pairwise):
    return torch.empty_like(y1), torch.empty_like(m)


@torch.library.custom_op(f"{_LIB}::cru_reduce", mutates_args=())
def _cru_reduce_op(dout: Tensor, y1: Tensor, p2: Tensor, ident: Tensor) -> Tensor:
    return K.cru_reduce(dout, y1, p2, ident)


@_cru_reduce_op.register_fake
def _(dout, y1, p2, ident):
    return y1.new_empty((y1.shape[0], 2 * y1.shape[1]), dtype=acc_dtype(y1.dtype))


@torch.library.custom_op(f"{_LIB}::cru_combine_bwd", mutates_args=())
def _cru_combine_bwd_op(
    dout: Tensor, a: Tensor, da: Tensor, p: int, pairwise: bool, dtype: torch.dtype, channels_last: bool
) -> tuple[Tensor, Tensor, Tensor]:
    return K.cru_combine_bwd(dout, a, da, p, pairwise, dtype, channels_last)


@_cru_combine_bwd_op.register_fake
def _(dout, a, da, p, pairwise, dtype, channels_last):
    n, c, ho, wo = dout.shape
    kw = dict(dtype=dtype, device=dout.device, memory_format=memory_format(channels_last))
    return (
        torch.empty((n, c, ho, wo), **kw),
        torch.empty((n, p, ho, wo), **kw),
        torch.empty((n, c - p, ho, wo), **kw),
    )


@torch.library.custom_op(f"{_LIB}::cru_dsq", mutates_args=())
def _cru_dsq_op(d_up: Tensor, d_low: Tensor, d_id: Tensor, stride: int, channels_last: bool) -> Tensor:
    return K.cru_dsq(d_up, d_low, d_id, stride, channels_last)


@_cru_dsq_op.register_fake
def _(d_up, d_low, d_id, stride, channels_last):
    n, cu, h, w = d_up.shape
    return torch.empty(
        (n, cu + d_id.shape[1], h, w), dtype=d_up.dtype, device=d_up.device, memory_format=memory_format(channels_last)
    )


@torch.library.custom_op(f"{_LIB}::cru_wgrad", mutates_args=())
def _cru_wgrad_op(dwm: Tensor, groups: int) -> tuple[Tensor, Tensor]:
    return K.cru_wgrad(dwm, groups)


@_cru_wgrad_op.register_fake
def _(dwm, groups):
    c, cin, k, _ = dwm.shape
    return dwm.new_empty((c, cin // groups, k, k)), dwm.new_empty((c, cin, 1, 1))


# eager: the launchers directly; under torch.compile: the custom ops (ops/_dispatch.py)
cru_weights = eager_direct(_cru_weights_op, K.cru_weights)
cru_pool = eager_direct(_cru_pool_op, K.cru_pool)
cru_combine = eager_direct(_cru_combine_op, K.cru_combine)
cru_reduce = eager_direct(_cru_reduce_op, K.cru_reduce)
cru_combine_bwd = eager_direct(_cru_combine_bwd_op, K.cru_combine_bwd)
cru_dsq = eager_direct(_cru_dsq_op, K.cru_dsq)
cru_wgrad = eager_direct(_cru_wgrad_op, K.cru_wgrad)


# ----------------------------------------------------------------------------- helpers
def _as_nchw_or_cl(s: Tensor) -> tuple[Tensor, bool]:
    """(s, channels_last): s itself when it is NCHW- or channels_last-contiguous, else
    an explicit NCHW copy (the only copy of the path; never taken for the outputs of
    this library's own SRU, of a conv, or of a user's NCHW / channels_last tensor)."""
    if s.is_contiguous():
        return s, False
    if s.is_contiguous(memory_format=torch.channels_last):
        return s, True
    return s.contiguous(), False


def _pointwise(x: Tensor, w2d: Tensor, channels_last: bool) -> Tensor:
    """1x1 conv of x (N, Ci, H, W), a channel slice of an NCHW / channels_last tensor,
    with w2d (Co, Ci): one GEMM reading x in place, output contiguous in the same format."""
    n, ci, h, w = x.shape
    co = w2d.shape[0]
    if channels_last:
        # rows of the NHWC storage: (N*H*W, Ci) with row stride Cin, a view (no copy)
        y = torch.mm(x.permute(0, 2, 3, 1).view(n * h * w, ci), w2d.t())
        return y.view(n, h, w, co).permute(0, 3, 1, 2)
    y = torch.bmm(w2d.expand(n, co, ci), x.view(n, ci, h * w))
    return y.view(n, co, h, w)


def _out_hw(shape: CRUShape, h: int, w: int) -> tuple[int, int]:
    s = shape.stride
    return (h - 1) // s + 1, (w - 1) // s + 1


def _squeeze_groups(shape: CRUShape) -> int:
    return 2 if shape.up == shape.low else 1


# ----------------------------------------------------------------------------- cores
def cru_forward_core(
    s: Tensor,
    w_sq1: Tensor,
    w_sq2: Tensor,
    w_gwc: Tensor,
    b_gwc: Tensor,
    w_pwc1: Tensor,
    w_pwc2: Tensor,
    shape: CRUShape,
    softmax: str,
    recompute: bool,
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """CRU forward from its input s. Returns (out, saved), ``saved`` being everything the
    backward needs except s and the parameters: (up, low, A) and, unless ``recompute``,
    (Y1, P2) too. up/low: squeezed tensors (N, up_sq|low_sq, H, W); A: softmax
    coefficients (N, 2*Cout) fp32 (fp64 for fp64). The merged weights are not saved:
    at small spatial sizes they outweigh the activations (512 channels at 7x7: the
    merged Y1 weight is ~6x an input-sized tensor at batch 2), and the backward
    rebuilds them with one weight-sized launch."""
    s, cl = _as_nchw_or_cl(s)
    u, st, k = shape.up, shape.stride, shape.kernel_size
    wm, wsq = cru_weights(w_gwc, w_pwc1, w_sq1, w_sq2, shape.group_size, cl)
    up = _pointwise(s[:, :u], w_sq1.view(shape.up_sq, u), cl)
    low = _pointwise(s[:, u:], w_sq2.view(shape.low_sq, shape.low), cl)
    y1 = F.conv2d(up, wm, b_gwc, stride=st, padding=k // 2)
    p2 = pwc2_forward(low, w_pwc2, shape, y1)
    ident = low[:, :, ::st, ::st]
    m = cru_pool(y1, p2, ident)
    out, a = cru_combine(y1, p2, ident, m, softmax == "pairwise")
    saved = (up, low, a) if recompute else (up, low, a, y1, p2)
    return out, saved


def pwc2_forward(low: Tensor, w_pwc2: Tensor, shape: CRUShape, y1: Tensor) -> Tensor:
    """PWC2's output (1 x 1, this stride) by cuDNN; an empty (N, 0, Ho, Wo) tensor, shaped like
    y1, when PWC2 has no channels."""
    if shape.pwc2_out == 0:
        n, _, ho, wo = y1.shape
        return low.new_empty((n, 0, ho, wo))
    return F.conv2d(low, w_pwc2, None, stride=shape.stride)


def cru_conv_backward(
    dout: Tensor,
    saved: tuple[Tensor, ...],
    w_sq1: Tensor,
    w_sq2: Tensor,
    w_gwc: Tensor,
    b_gwc: Tensor,
    w_pwc1: Tensor,
    w_pwc2: Tensor,
    shape: CRUShape,
    softmax: str,
    recompute: bool,
    channels_last: bool,
):
    """The CRU backward down to the squeezed tensors: (d_up, d_low, d_id, d_gwc_w, d_gwc_b, d_pwc1,
    d_pwc2, wsq). d_low is PWC2's input gradient (an empty tensor when PWC2 has no channels),
    d_id (N, low_sq, Ho, Wo) the identity branch's, wsq the squeeze weight of the squeezes'
    backward (``cru_weights``). ``saved`` as ``cru_forward_core`` returned it; with ``recompute``
    Y1 and P2 are recomputed here from up and low (two convolutions)."""
    if recompute:
        up, low, a = saved
    else:
        up, low, a, y1, p2 = saved
    st, k, g = shape.stride, shape.kernel_size, shape.group_size
    wm, wsq = cru_weights(w_gwc, w_pwc1, w_sq1, w_sq2, g, channels_last)
    if recompute:
        y1 = F.conv2d(up, wm, b_gwc, stride=st, padding=k // 2)
        p2 = pwc2_forward(low, w_pwc2, shape, y1)
    ident = low[:, :, ::st, ::st]
    da = cru_reduce(dout, y1, p2, ident)
    d_up, d_low, did, d_wm, d_b, d_pwc2 = cru_convs_backward(
        dout, a, da, up, low, wm, w_pwc2, shape, softmax, channels_last, True)
    d_gwc_w, d_pwc1 = cru_wgrad(d_wm, g)
    return d_up, d_low, did, d_gwc_w, d_b, d_pwc1, d_pwc2, wsq


def cru_convs_backward(dout: Tensor, a: Tensor, da: Tensor, up: Tensor, low: Tensor, wm: Tensor, w_pwc2: Tensor,
                       shape: CRUShape, softmax: str, channels_last: bool, wgrad: bool):
    """From dout, A and dA: the combine's backward (``cru_combine_bwd``: dY1, dP2, d_id) and the
    convolutions' (cuDNN, with the merged Y1 weight ``wm``). Returns (d_up, d_low, d_id, d_wm,
    d_b, d_pwc2); the last three None unless ``wgrad``. d_low is empty when PWC2 has no channels."""
    st, k = shape.stride, shape.kernel_size
    dy1, dp2, did = cru_combine_bwd(dout, a, da, shape.pwc2_out, softmax == "pairwise", up.dtype, channels_last)
    conv_bwd = torch.ops.aten.convolution_backward.default
    d_up, d_wm, d_b = conv_bwd(
        dy1, up, wm, [shape.out_channels], [st, st], [k // 2, k // 2], [1, 1], False, [0, 0], 1, [True, wgrad, wgrad]
    )
    d_low, d_pwc2 = pwc2_backward(dp2, low, w_pwc2, shape, wgrad)
    return d_up, d_low, did, d_wm, d_b, d_pwc2


def pwc2_backward(dp2: Tensor, low: Tensor, w_pwc2: Tensor, shape: CRUShape, wgrad: bool):
    """(d_low, d_pwc2) of PWC2 (1 x 1, this stride) by cuDNN: d_low empty when PWC2 has no
    channels, d_pwc2 None unless ``wgrad``."""
    if shape.pwc2_out == 0:
        return low.new_empty((0,)), torch.empty_like(w_pwc2) if wgrad else None  # no output channels: no launch
    st = shape.stride
    d_low, d_pwc2, _ = torch.ops.aten.convolution_backward.default(
        dp2, low, w_pwc2, None, [st, st], [0, 0], [1, 1], False, [0, 0], 1, [True, wgrad, False]
    )
    return d_low, d_pwc2


def cru_backward_core(
    dout: Tensor,
    s: Tensor,
    saved: tuple[Tensor, ...],
    w_sq1: Tensor,
    w_sq2: Tensor,
    w_gwc: Tensor,
    b_gwc: Tensor,
    w_pwc1: Tensor,
    w_pwc2: Tensor,
    shape: CRUShape,
    softmax: str,
    recompute: bool,
    need_ds: bool,
):
    """Gradients (ds, d_sq1, d_sq2, d_gwc_w, d_gwc_b, d_pwc1, d_pwc2) of the CRU.

    ``s`` is the CRU input (saved by CRUFunction, recomputed by the SCConv Function);
    ``saved`` is what ``cru_forward_core`` returned. With ``recompute`` Y1 and P2 are
    recomputed here from the saved up/low (two convolutions). ds is None unless need_ds.
    """
    s, cl = _as_nchw_or_cl(s)
    d_up, d_low, did, d_gwc_w, d_b, d_pwc1, d_pwc2, wsq = cru_conv_backward(
        dout, saved, w_sq1, w_sq2, w_gwc, b_gwc, w_pwc1, w_pwc2, shape, softmax, recompute, cl
    )
    ds, d_sq1, d_sq2 = cru_squeeze_backward(d_up, d_low, did, s, wsq, shape, cl, need_ds)
    return ds, d_sq1, d_sq2, d_gwc_w, d_b, d_pwc1, d_pwc2


def cru_squeeze_backward(d_up: Tensor, d_low: Tensor, did: Tensor, s: Tensor, wsq: Tensor, shape: CRUShape,
                         channels_last: bool, need_ds: bool):
    """(ds or None, d_sq1, d_sq2): the squeezes' backward from the squeezed tensors' gradients
    (``cru_conv_backward``) and the CRU input s: ``cru_dsq`` merges them, one cuDNN
    convolution backward (groups 2 when up == low) gives ds and both weights' gradients."""
    d_sq = cru_dsq(d_up, d_low, did, shape.stride, channels_last)
    gq = _squeeze_groups(shape)
    conv_bwd = torch.ops.aten.convolution_backward.default
    ds, d_wsq, _ = conv_bwd(
        d_sq, s, wsq, None, [1, 1], [0, 0], [1, 1], False, [0, 0], gq, [bool(need_ds), True, False]
    )
    usq = shape.up_sq
    if gq == 2:
        d_sq1, d_sq2 = d_wsq[:usq], d_wsq[usq:]
    else:
        d_sq1, d_sq2 = d_wsq[:usq, : shape.up], d_wsq[usq:, shape.up :]
    return (ds if need_ds else None), d_sq1, d_sq2


# ----------------------------------------------------------------------------- Function
class CRUFunction(torch.autograd.Function):
    """Fused CRU as one autograd node.

    Saves for backward: the input s, the squeezed tensors up (N, up_sq, H, W) and low
    (N, low_sq, H, W), the softmax coefficients A (N, 2*Cout), the parameters, and, when
    ``recompute`` is False, the convolution outputs Y1 (N, Cout, Ho, Wo) and P2
    (N, pwc2_out, Ho, Wo). The backward rebuilds the merged Y1 weight and the squeeze
    weight (one weight-sized launch) and, with ``recompute=True``, recomputes Y1 and P2
    from up and low (two convolutions) instead of saving them. Nothing else is saved: Y2, Z, the pooled
    means and the identity branch (a strided view of low) are never materialised.
    """

    @staticmethod
    def forward(ctx, s, w_sq1, w_sq2, w_gwc, b_gwc, w_pwc1, w_pwc2, shape, softmax, recompute):
        out, saved = cru_forward_core(s, w_sq1, w_sq2, w_gwc, b_gwc, w_pwc1, w_pwc2, shape, softmax, recompute)
        ctx.save_for_backward(s, w_sq1, w_sq2, w_gwc, b_gwc, w_pwc1, w_pwc2, *saved)
        ctx.shape, ctx.softmax, ctx.recompute = shape, softmax, recompute
        return out

    @staticmethod
    def backward(ctx, dout):
        s, w_sq1, w_sq2, w_gwc, b_gwc, w_pwc1, w_pwc2, *saved = ctx.saved_tensors
        grads = cru_backward_core(
            dout, s, tuple(saved), w_sq1, w_sq2, w_gwc, b_gwc, w_pwc1, w_pwc2,
            ctx.shape, ctx.softmax, ctx.recompute, ctx.needs_input_grad[0],
        )
        return (*grads, None, None, None)


def cru(
    x: Tensor,
    w_sq1: Tensor,
    w_sq2: Tensor,
    w_gwc: Tensor,
    b_gwc: Tensor,
    w_pwc1: Tensor,
    w_pwc2: Tensor,
    shape: CRUShape,
    softmax: str = "channel",
    recompute: bool = False,
) -> Tensor:
    """Functional fused CRU (differentiable in x and every weight)."""
    return CRUFunction.apply(x, w_sq1, w_sq2, w_gwc, b_gwc, w_pwc1, w_pwc2, shape, softmax, recompute)
