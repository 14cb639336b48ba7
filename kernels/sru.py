"""Triton kernels of the fused SRU (Spatial Reconstruction Unit) and their launchers.

Semantics (SPEC.md), x of shape (N, C, H, W), h = C // 2, per sample n and group g:
    g    = GN(x) = xhat * gamma + beta,   xhat = (x - mean) * rstd
    w    = gamma / sum(gamma)                       SOFTMAX: softmax(gamma) over the C channels
    r    = sigmoid(g * w)
    MASK soft:    x1 = where(r > tau, 1, r) * x,  x2 = where(r > tau, 0, r) * x
    MASK gt/ge/channel: M1 = [r > tau] / [r >= tau] / [w_c > tau] (per channel), M2 = 1 - M1,
         x1 = M1 * o, x2 = M2 * o with the operand o = x, g or r * x (ON = x / gn / rx)
    s[:, c]     = x1_c + x2_{c+h}
    s[:, c + h] = x1_{c+h} + x2_c                                    (c < h)
The upstream revisions are points of these three switches (``scconv_triton._config.SRUMath``,
whose ``code`` the launchers take as ``mode``): one constexpr per difference.
GroupNorm flavours: ``torch_gn`` (nn.GroupNorm) rstd = 1 / sqrt(var_biased + eps);
otherwise (GroupBatchnorm2d) rstd = 1 / (std_unbiased + eps).

Kernels (all take explicit strides, so NCHW and channels_last run without a copy):
  forward   _sru_stats_partial_kernel  per (n, group, split): count / mean / M2 of a slice of the group
            _sru_stats_merge_kernel    Chan merge of the splits -> mean, rstd           (N x G sized)
            _sru_apply_kernel          GN, w_gamma, sigmoid, gate, cross-reconstruction -> s
  backward  _sru_bwd_partial_kernel    per (n, channel, split): P = sum dz, Q = sum dz * xhat   (soft gate)
            _sru_bwd_reduce_kernel     per (n, group): A = sum dxhat*xhat, B = sum dxhat;
                                       per channel: d beta, partial d gamma (deterministic, fixed order)
            _sru_bwd_finalize_kernel   d gamma -= sum_j(dw_j gamma_j) / S^2               (C sized)
            _sru_bwd_dx_kernel         dx through the gate, both halves of the cross-reconstruction
                                       and the GroupNorm (recomputed from x and the stats)

Backward math. With do_c = M1_c ds_c + M2_c ds_partner the gradient into the operand, dz is
the gradient into r's pre-activation t = g * w, or (ON gn) into g itself:
    soft: dz = [r <= tau] * x_c * (ds_c + ds_partner) * r * (1 - r)
    rx:   dz = x_c * do_c * r * (1 - r)            gn: dz = do_c        x (binary): none
    dg = dz * k_c with k_c = w_c (k_c = 1 for gn), dxhat = dg * gamma_c
    P_nc = sum_hw dz, Q_nc = sum_hw dz * xhat
    d beta_c  = k_c * sum_n P_nc,  d gamma_c (affine) = k_c * sum_n Q_nc
    dw_c      = sum dz * g = gamma_c * sum_n Q_nc + beta_c * sum_n P_nc     (0 for gn)
    d gamma_c += dw_c / S - sum_j dw_j gamma_j / S^2          (S = sum gamma)
    SOFTMAX:  d gamma_c += w_c dw_c - w_c sum_j w_j dw_j
    A_ng = sum_{c in g} gamma_c k_c Q_nc,  B_ng = sum_{c in g} gamma_c k_c P_nc
    dx = direct + rstd * (dxhat - B / M) - k * xhat * A,  direct = W1_c ds_c + W2_c ds_partner (soft),
         do_c (binary on x, and then nothing else), r * do_c (rx), 0 (gn)
    k = rstd / M (torch_gn);  k = 1 / ((M - 1) * std) (GroupBatchnorm2d: unbiased std, eps on std)
with M = (C / G) * H * W the group size.

Arithmetic is fp32 (fp64 for fp64 inputs), loads of fp16/bf16 are upcast, stores cast
back to the output's dtype. Offsets are int64. No float atomics: every reduction has a
fixed order, so results are bitwise reproducible.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._launch import (
    FLOATS, NUM_WARPS, acc, cdiv, div, acc_dtype, launcher, np2, pix_off, pixel_layout, split_float, stream_tiles,
    target_programs,
)

from .._config import MASKS, OPERANDS, SRUMath

__all__ = ["sru_stats", "sru_apply", "sru_backward", "sru_reduce"]


# ----------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------
@triton.jit
def _pair_tile(pid, HALF, HW, N_CB, N_PB, BC: tl.constexpr, BP: tl.constexpr):
    """Tile of a pair kernel: sample n, channels c < HALF and partners c + HALF, BP pixels.

    pid enumerates (n, channel block, pixel block), pixel blocks fastest. Returns
    n, n as int64, c, c + HALF, the channel mask, the 2-D (channel, pixel) mask and
    the pixel indices (int32, < H W: pix_off forms the int64 offsets).
    """
    pb = pid % N_PB
    rest = pid // N_PB
    cb = rest % N_CB
    n = rest // N_CB
    c = cb * BC + tl.arange(0, BC)
    p = pb * BP + tl.arange(0, BP)
    mc = c < HALF
    m = mc[:, None] & (p < HW)[None, :]
    return n, n.to(tl.int64), c, c + HALF, mc, m, p


@triton.jit
def _weight_norm(w_ptr, C, SOFTMAX: tl.constexpr, FP64: tl.constexpr, BLOCK_W: tl.constexpr):
    """(denom, shift) of w over the C channels (contiguous weight), fixed order:
    w = gamma / denom with denom = sum(gamma), shift unused (0); SOFTMAX: w = exp(gamma - shift)
    / denom with shift = max(gamma), denom = sum exp(gamma - shift)."""
    offs = tl.arange(0, BLOCK_W)
    tot = acc(tl.zeros([BLOCK_W], tl.float32), FP64)
    if SOFTMAX:
        mx = tot + float("-inf")
        for c0 in range(0, C, BLOCK_W):
            m = c0 + offs < C
            mx = tl.maximum(mx, acc(tl.load(w_ptr + c0 + offs, mask=m, other=float("-inf")), FP64))
        shift = tl.max(mx, axis=0)
        for c0 in range(0, C, BLOCK_W):
            m = c0 + offs < C
            g = acc(tl.load(w_ptr + c0 + offs, mask=m, other=0.0), FP64)
            tot += tl.where(m, tl.exp(g - shift), 0.0)
        return tl.sum(tot, axis=0), shift
    else:
        for c0 in range(0, C, BLOCK_W):
            tot += acc(tl.load(w_ptr + c0 + offs, mask=c0 + offs < C, other=0.0), FP64)
        return tl.sum(tot, axis=0), 0.0


@triton.jit
def _get_wnorm(w_ptr, wn_ptr, C, HAS_WSUM: tl.constexpr, SOFTMAX: tl.constexpr, FP64: tl.constexpr,
               BLOCK_W: tl.constexpr):
    """(denom, shift) of w: loaded from wn_ptr (2,) when HAS_WSUM, else computed here."""
    if HAS_WSUM:
        if SOFTMAX:
            return acc(tl.load(wn_ptr), FP64), acc(tl.load(wn_ptr + 1), FP64)
        else:
            return acc(tl.load(wn_ptr), FP64), 0.0
    else:
        return _weight_norm(w_ptr, C, SOFTMAX, FP64, BLOCK_W)


@triton.jit
def _store_wnorm(wn_ptr, wn, SOFTMAX: tl.constexpr):
    tl.store(wn_ptr, wn[0])
    if SOFTMAX:
        tl.store(wn_ptr + 1, wn[1])


@triton.jit
def _wfac(gam, wn, SOFTMAX: tl.constexpr):
    """w of channels with gamma ``gam``, from (denom, shift) = wn."""
    if SOFTMAX:
        return div(tl.exp(gam - wn[1]), wn[0])
    else:
        return div(gam, wn[0])


@triton.jit
def _mask1(r, wg, tau, MASK: tl.constexpr):
    """M1 as 0/1 for a [BC, BP] tile: [r > tau] (1), [r >= tau] (2), per channel [w > tau] (3)."""
    if MASK == 1:
        return tl.where(r > tau, 1.0, 0.0)
    elif MASK == 2:
        return tl.where(r >= tau, 1.0, 0.0)
    else:
        return tl.where(wg > tau, 1.0, 0.0)[:, None]  # [BC, 1]: broadcast, not a tile in registers


@triton.jit
def _gate(x, xhat, r, gam, bet, wg, tau, MASK: tl.constexpr, ON: tl.constexpr):
    """(x1, x2) of a [BC, BP] channel tile (see the module docstring)."""
    if MASK == 0:
        return tl.where(r > tau, 1.0, r) * x, tl.where(r > tau, 0.0, r) * x
    else:
        m1 = _mask1(r, wg, tau, MASK)
        if ON == 0:
            o = x
        elif ON == 1:
            o = xhat * gam[:, None] + bet[:, None]
        else:
            o = r * x
        return m1 * o, (1.0 - m1) * o


@triton.jit
def _grad_z(x, r, wg, ds_own, ds_other, tau, MASK: tl.constexpr, ON: tl.constexpr):
    """dz of a [BC, BP] tile: gradient into t = g * w (soft, rx) or into g (gn); ds_own is the
    output gradient of this channel, ds_other that of its partner (which receives x2)."""
    if MASK == 0:
        return tl.where(r <= tau, x * (ds_own + ds_other) * r * (1.0 - r), 0.0)
    else:
        m1 = _mask1(r, wg, tau, MASK)
        do = m1 * ds_own + (1.0 - m1) * ds_other
        if ON == 1:
            return do
        elif ON == 2:
            return x * do * r * (1.0 - r)
        else:
            return tl.zeros_like(do)


@triton.jit
def _channel_params(n, c, mask_c, mean_ptr, rstd_ptr, w_ptr, b_ptr, G, CG, wn, SOFTMAX: tl.constexpr,
                    FP64: tl.constexpr):
    """Per-channel vectors for channels c of sample n: mean as (hi, lo), rstd (of c's group),
    gamma, beta, w (from wn = (denom, shift)). The mean is stored in fp64 (mean_ptr, (N, G)); the fp32 path splits it into
    hi = fp32(mean), lo = fp32(mean - hi), so that xhat = ((x - hi) - lo) * rstd keeps the
    mean's low bits (x - hi is exact when x is close to the mean). FP64: hi = mean, lo = 0."""
    grp = n * G + c // CG
    mu = tl.load(mean_ptr + grp, mask=mask_c, other=0.0).to(tl.float64)
    if FP64:
        hi = mu
        lo = tl.zeros_like(mu)
    else:
        hi = mu.to(tl.float32)
        lo = (mu - hi.to(tl.float64)).to(tl.float32)
        lo = tl.where(tl.abs(hi) < float("inf"), lo, 0.0)  # inf / nan mean: no nan from inf - inf
    rs = acc(tl.load(rstd_ptr + grp, mask=mask_c, other=0.0), FP64)
    gam = acc(tl.load(w_ptr + c, mask=mask_c, other=0.0), FP64)
    bet = acc(tl.load(b_ptr + c, mask=mask_c, other=0.0), FP64)
    return (hi, lo), rs, gam, bet, _wfac(gam, wn, SOFTMAX)


@triton.jit
def _reweight(x, mu, rs, gam, bet, wg):
    """xhat and r = sigmoid((xhat * gamma + beta) * w) for a [BC, BP] tile; mu = (hi, lo)."""
    xhat = ((x - mu[0][:, None]) - mu[1][:, None]) * rs[:, None]
    r = tl.sigmoid((xhat * gam[:, None] + bet[:, None]) * wg[:, None])
    return xhat, r


@triton.jit
def _pair_x(x_ptr, xo, sx_c, c, cp, m, FP64: tl.constexpr):
    """x of the channel pairs (c, cp) of a [BC, BP] tile at pixel offsets xo, accumulation dtype."""
    xa = acc(tl.load(x_ptr + xo + c.to(tl.int64)[:, None] * sx_c, mask=m, other=0.0), FP64)
    xb = acc(tl.load(x_ptr + xo + cp.to(tl.int64)[:, None] * sx_c, mask=m, other=0.0), FP64)
    return xa, xb


@triton.jit
def _pair_gate(xa, xb, n, c, cp, mc, mean_ptr, rstd_ptr, w_ptr, b_ptr, G, CG, wn, tau,
               MASK: tl.constexpr, ON: tl.constexpr, SOFTMAX: tl.constexpr, FP64: tl.constexpr):
    """(s_c, s_cp, xhat_c, r_c, w_c, xhat_cp, r_cp, w_cp) of the channel pairs (c, cp = c + HALF)
    from their x: gates both halves and cross-reconstructs (s_c = x1_c + x2_cp,
    s_cp = x1_cp + x2_c). The backward kernels need xhat, r and w beside s."""
    mu, rs, gam, bet, wga = _channel_params(n, c, mc, mean_ptr, rstd_ptr, w_ptr, b_ptr, G, CG, wn, SOFTMAX, FP64)
    xha, ra = _reweight(xa, mu, rs, gam, bet, wga)
    a1, a2 = _gate(xa, xha, ra, gam, bet, wga, tau, MASK, ON)
    mu, rs, gam, bet, wgb = _channel_params(n, cp, mc, mean_ptr, rstd_ptr, w_ptr, b_ptr, G, CG, wn, SOFTMAX, FP64)
    xhb, rb = _reweight(xb, mu, rs, gam, bet, wgb)
    b1, b2 = _gate(xb, xhb, rb, gam, bet, wgb, tau, MASK, ON)
    return a1 + b2, b1 + a2, xha, ra, wga, xhb, rb, wgb


@triton.jit
def _pair_s(x_ptr, xo, sx_c, n, c, cp, mc, m, mean_ptr, rstd_ptr, w_ptr, b_ptr, G, CG, wn, tau,
            MASK: tl.constexpr, ON: tl.constexpr, SOFTMAX: tl.constexpr, FP64: tl.constexpr):
    """s of the channel pairs (c, cp = c + HALF) of a [BC, BP] tile, in the accumulation dtype:
    loads x at pixel offsets xo + channel * sx_c (mask m), then _pair_gate. Shared by the SRU
    forward and the stage-2 squeeze's prologue (kernels/stage2.py)."""
    xa, xb = _pair_x(x_ptr, xo, sx_c, c, cp, m, FP64)
    sa, sb, _xha, _ra, _wga, _xhb, _rb, _wgb = _pair_gate(
        xa, xb, n, c, cp, mc, mean_ptr, rstd_ptr, w_ptr, b_ptr, G, CG, wn, tau, MASK, ON, SOFTMAX, FP64)
    return sa, sb


@triton.jit
def _pair_dx(xa, xb, dsa, dsb, n, c, cp, mc, mean_ptr, rstd_ptr, w_ptr, b_ptr, a_ptr, bsum_ptr, G, CG, wn, tau,
             M, eps_hi, eps_lo, MASK: tl.constexpr, ON: tl.constexpr, SOFTMAX: tl.constexpr,
             TORCH_GN: tl.constexpr, FP64: tl.constexpr):
    """(dx_c, dx_cp) of the channel pairs (c, cp = c + HALF) of a [BC, BP] tile from their x and
    ds (accumulation dtype), the stats and the group sums A, B (a_ptr, bsum_ptr, (N, G); unused
    for binary masks on x). M: group size; eps = eps_hi + eps_lo. Shared by the SRU's dx kernel
    and the stage-2 squeeze backward (kernels/stage2.py)."""
    mua, rsa, gama, beta_, wga = _channel_params(n, c, mc, mean_ptr, rstd_ptr, w_ptr, b_ptr, G, CG, wn, SOFTMAX, FP64)
    mub, rsb, gamb, betb, wgb = _channel_params(n, cp, mc, mean_ptr, rstd_ptr, w_ptr, b_ptr, G, CG, wn, SOFTMAX, FP64)
    xha, ra = _reweight(xa, mua, rsa, gama, beta_, wga)
    xhb, rb = _reweight(xb, mub, rsb, gamb, betb, wgb)
    if MASK != 0 and ON == 0:
        w1a = _mask1(ra, wga, tau, MASK)
        w1b = _mask1(rb, wgb, tau, MASK)
        dxa = w1a * dsa + (1.0 - w1a) * dsb
        dxb = w1b * dsb + (1.0 - w1b) * dsa
    else:
        if MASK == 0:
            dsum = dsa + dsb
            dxa = tl.where(ra > tau, dsa, ra * dsum)
            dxb = tl.where(rb > tau, dsb, rb * dsum)
            ka_ = wga
            kb_ = wgb
        elif ON == 1:  # masks on gn(x): everything flows through the GroupNorm
            dxa = tl.zeros_like(xa)
            dxb = tl.zeros_like(xb)
            ka_ = tl.zeros_like(wga) + 1.0
            kb_ = ka_
        else:  # masks on r * x: the direct part is r * (M1 ds_c + M2 ds_partner)
            w1a = _mask1(ra, wga, tau, MASK)
            w1b = _mask1(rb, wgb, tau, MASK)
            dxa = ra * (w1a * dsa + (1.0 - w1a) * dsb)
            dxb = rb * (w1b * dsb + (1.0 - w1b) * dsa)
            ka_ = wga
            kb_ = wgb
        dza = _grad_z(xa, ra, wga, dsa, dsb, tau, MASK, ON)
        dzb = _grad_z(xb, rb, wgb, dsb, dsa, tau, MASK, ON)
        mf = acc(M, FP64)
        eps = acc(eps_hi, FP64) + acc(eps_lo, FP64)
        ga = n * G + c // CG
        gb = n * G + cp // CG
        aa = acc(tl.load(a_ptr + ga, mask=mc, other=0.0), FP64)
        ba = acc(tl.load(bsum_ptr + ga, mask=mc, other=0.0), FP64)
        ab = acc(tl.load(a_ptr + gb, mask=mc, other=0.0), FP64)
        bb = acc(tl.load(bsum_ptr + gb, mask=mc, other=0.0), FP64)
        if TORCH_GN:
            ka = rsa / mf
            kb = rsb / mf
        else:
            # d std / d x_i = (x_i - mean) / ((M - 1) std), std = 1 / rstd - eps
            sta = 1.0 / tl.where(mc, rsa, 1.0) - eps
            stb = 1.0 / tl.where(mc, rsb, 1.0) - eps
            ka = tl.where(sta > 0, 1.0 / ((mf - 1.0) * tl.where(sta > 0, sta, 1.0)), 0.0)
            kb = tl.where(stb > 0, 1.0 / ((mf - 1.0) * tl.where(stb > 0, stb, 1.0)), 0.0)
        dxa += rsa[:, None] * (dza * (ka_ * gama)[:, None] - (ba / mf)[:, None]) - (ka * aa)[:, None] * xha
        dxb += rsb[:, None] * (dzb * (kb_ * gamb)[:, None] - (bb / mf)[:, None]) - (kb * ab)[:, None] * xhb
    return dxa, dxb


# ----------------------------------------------------------------------------------------
# forward kernels
# ----------------------------------------------------------------------------------------
@triton.jit
def _sru_stats_partial_kernel(
    x_ptr, part_ptr,
    W, HW, G, CG,
    sx_n, sx_c, sx_h, sx_w,
    TILES_PER_PROG, SPLIT,
    FLAT: tl.constexpr, FP64: tl.constexpr, BJ: tl.constexpr, BP: tl.constexpr,
):
    """Partial statistics of one slice of one (sample, group).

    x_ptr: input (N, C, H, W), any strides (sx_*), any float dtype.
    part_ptr: (N*G, SPLIT, 4) accumulation-dtype buffer: count, mean - K, M2 of the slice, and
    K, the group's first element: every value is shifted by K before it is accumulated, so a
    large common mean costs no precision (mean = K + shifted mean).
    W, HW: width and H*W; G: groups; CG: channels per group.
    TILES_PER_PROG: [BJ channels x BP pixels] tiles per program; SPLIT: programs per group.
    Grid (N*G, SPLIT). Each tile's mean and M2 come from values in registers (exact two-pass),
    then merge into the running result with Chan's formula: no E[x^2] - E[x]^2 cancellation.
    """
    pid_ng = tl.program_id(0)
    pid_s = tl.program_id(1)
    n = pid_ng // G
    g = pid_ng % G
    base = n.to(tl.int64) * sx_n + (g * CG).to(tl.int64) * sx_c
    n_pb = tl.cdiv(HW, BP)
    n_tiles = tl.cdiv(CG, BJ) * n_pb
    t0 = pid_s * TILES_PER_PROG
    t1 = tl.minimum(t0 + TILES_PER_PROG, n_tiles)
    shift = acc(tl.load(x_ptr + base), FP64)
    zero = tl.sum(acc(tl.zeros([BJ], tl.float32), FP64), axis=0)
    cnt = zero
    mean = zero
    m2 = zero
    for t in range(t0, t1):
        jb = t // n_pb
        pb = t % n_pb
        j = jb * BJ + tl.arange(0, BJ)
        p = pb * BP + tl.arange(0, BP)
        m = (j < CG)[:, None] & (p < HW)[None, :]
        offs = base + j.to(tl.int64)[:, None] * sx_c + pix_off(p, W, sx_h, sx_w, FLAT)[None, :]
        v = tl.where(m, acc(tl.load(x_ptr + offs, mask=m, other=0.0), FP64) - shift, 0.0)
        nb = acc(tl.minimum(CG - jb * BJ, BJ) * tl.minimum(HW - pb * BP, BP), FP64)
        mb = tl.sum(tl.sum(v, axis=1), axis=0) / nb
        d = tl.where(m, v - mb, 0.0)
        m2b = tl.sum(tl.sum(d * d, axis=1), axis=0)
        tot = cnt + nb
        delta = mb - mean
        mean = mean + delta * (nb / tot)
        m2 = m2 + m2b + delta * delta * (cnt * (nb / tot))
        cnt = tot
    out = part_ptr + (pid_ng * SPLIT + pid_s).to(tl.int64) * 4
    tl.store(out, cnt)
    tl.store(out + 1, mean)
    tl.store(out + 2, m2)
    tl.store(out + 3, shift)


@triton.jit
def _sru_stats_merge_kernel(
    part_ptr, mean_ptr, rstd_ptr, w_ptr, wsum_ptr,
    NG, SPLIT, M, eps_hi, eps_lo, C,
    TORCH_GN: tl.constexpr, FP64: tl.constexpr, BLOCK: tl.constexpr,
    WRITE_WSUM: tl.constexpr, SOFTMAX: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """Merge the SPLIT partials of each (sample, group) and write mean and rstd.

    part_ptr: (NG, SPLIT, 4) from _sru_stats_partial_kernel (shifted by the group's K);
    mean_ptr: (NG,) fp64 (always: for fp32/fp16/bf16 inputs too, see _channel_params);
    rstd_ptr: (NG,) accumulation dtype.
    M: elements per group; eps = eps_hi + eps_lo (an fp64 eps split into two fp32 halves).
    TORCH_GN: rstd = 1/sqrt(M2/M + eps), else rstd = 1/(sqrt(M2/(M-1)) + eps).
    WRITE_WSUM: program 0 also writes sum(gamma) of w_ptr (C,) to wsum_ptr (2,) (SOFTMAX: the
    softmax's denominator and shift, see _weight_norm), so that the apply kernel need not
    re-sum gamma in every program. Grid (cdiv(NG, BLOCK),).
    """
    if WRITE_WSUM:
        if tl.program_id(0) == 0:
            _store_wnorm(wsum_ptr, _weight_norm(w_ptr, C, SOFTMAX, FP64, BLOCK_W), SOFTMAX)
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = rows < NG
    zero = acc(tl.zeros([BLOCK], tl.float32), FP64)
    cnt = zero
    mean = zero
    m2 = zero
    for s in range(0, SPLIT):
        ptr = part_ptr + (rows.to(tl.int64) * SPLIT + s) * 4
        nb = tl.load(ptr, mask=mask, other=0.0)
        mb = tl.load(ptr + 1, mask=mask, other=0.0)
        m2b = tl.load(ptr + 2, mask=mask, other=0.0)
        tot = cnt + nb
        frac = tl.where(tot > 0, nb / tl.where(tot > 0, tot, 1.0), 0.0)
        delta = mb - mean
        mean = mean + delta * frac
        m2 = m2 + m2b + delta * delta * (cnt * frac)
        cnt = tot
    # mean = K + shifted mean, formed in fp64 (exact for two fp32 terms): the fp32 path keeps
    # the low bits that one fp32 mean would round away (up to ulp(mean) / 2).
    mean64 = mean.to(tl.float64) + tl.load(part_ptr + rows.to(tl.int64) * SPLIT * 4 + 3, mask=mask,
                                           other=0.0).to(tl.float64)
    eps = acc(eps_hi, FP64) + acc(eps_lo, FP64)
    mf = acc(M, FP64)
    if TORCH_GN:
        rstd = 1.0 / tl.sqrt(m2 / mf + eps)
    else:
        rstd = 1.0 / (tl.sqrt(m2 / (mf - 1.0)) + eps)
    tl.store(mean_ptr + rows, mean64, mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=mask)


@triton.jit
def _sru_apply_kernel(
    x_ptr, out_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, wsum_ptr,
    C, HALF, W, HW, G, CG,
    sx_n, sx_c, sx_h, sx_w,
    so_n, so_c, so_h, so_w,
    tau_hi, tau_lo, N_CB, N_PB,
    MASK: tl.constexpr, ON: tl.constexpr, SOFTMAX: tl.constexpr,
    FLAT: tl.constexpr, FP64: tl.constexpr, HAS_WSUM: tl.constexpr,
    BC: tl.constexpr, BP: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """Fused SRU forward for channel pairs (c, c + HALF), c in a block of BC, and BP pixels.

    x_ptr/out_ptr: (N, C, H, W) input and output, strides sx_*/so_* (out may differ from x).
    mean_ptr, rstd_ptr: (N, G) stats (mean fp64, rstd accumulation dtype);
    w_ptr, b_ptr: (C,) gamma, beta (contiguous).
    wsum_ptr: (2,) w's (denom, shift) (_weight_norm), read when HAS_WSUM (else computed in every program).
    MASK, ON, SOFTMAX: the SRU's switches (module docstring).
    tau = tau_hi + tau_lo. N_CB = cdiv(HALF, BC), N_PB = cdiv(HW, BP); grid (N * N_CB * N_PB,).
    Reads x once (both halves of each pair in one program), writes s once.
    """
    n, n64, c, cp, mc, m, pix = _pair_tile(tl.program_id(0), HALF, HW, N_CB, N_PB, BC, BP)
    wn = _get_wnorm(w_ptr, wsum_ptr, C, HAS_WSUM, SOFTMAX, FP64, BLOCK_W)
    tau = acc(tau_hi, FP64) + acc(tau_lo, FP64)

    xo = pix_off(pix, W, sx_h, sx_w, FLAT)[None, :] + n64 * sx_n
    oa, ob = _pair_s(x_ptr, xo, sx_c, n, c, cp, mc, m, mean_ptr, rstd_ptr, w_ptr, b_ptr, G, CG, wn, tau,
                     MASK, ON, SOFTMAX, FP64)
    oo = pix_off(pix, W, so_h, so_w, FLAT)[None, :] + n64 * so_n
    odt = out_ptr.dtype.element_ty
    tl.store(out_ptr + oo + c.to(tl.int64)[:, None] * so_c, oa.to(odt), mask=m)
    tl.store(out_ptr + oo + cp.to(tl.int64)[:, None] * so_c, ob.to(odt), mask=m)


# ----------------------------------------------------------------------------------------
# backward kernels
# ----------------------------------------------------------------------------------------
@triton.jit
def _sru_bwd_partial_kernel(
    x_ptr, ds_ptr, p_ptr, q_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr,
    C, HALF, W, HW, G, CG,
    sx_n, sx_c, sx_h, sx_w,
    sd_n, sd_c, sd_h, sd_w,
    tau_hi, tau_lo, N_CB, SPLIT, PB_PER_PROG,
    MASK: tl.constexpr, ON: tl.constexpr, SOFTMAX: tl.constexpr, FLAT: tl.constexpr, FP64: tl.constexpr,
    BC: tl.constexpr, BP: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """Backward pass 1 (every mode with a gradient into the GroupNorm): per (sample, channel,
    split) P = sum dz and Q = sum dz * xhat.

    x_ptr, ds_ptr: input and output gradient (N, C, H, W), strides sx_*, sd_*.
    p_ptr, q_ptr: (N * SPLIT, C) accumulation-dtype buffers, row n * SPLIT + split.
    Program (n, channel-pair block, split) covers PB_PER_PROG pixel blocks of BP.
    dz as in the module docstring (_grad_z). Grid (N * N_CB * SPLIT,).
    """
    pid = tl.program_id(0)
    s = pid % SPLIT
    rest = pid // SPLIT
    cb = rest % N_CB
    n = rest // N_CB
    c = cb * BC + tl.arange(0, BC)
    cp = c + HALF
    mc = c < HALF
    n64 = n.to(tl.int64)
    wn = _weight_norm(w_ptr, C, SOFTMAX, FP64, BLOCK_W)
    tau = acc(tau_hi, FP64) + acc(tau_lo, FP64)
    mua, rsa, gama, beta_, wga = _channel_params(n, c, mc, mean_ptr, rstd_ptr, w_ptr, b_ptr, G, CG, wn, SOFTMAX, FP64)
    mub, rsb, gamb, betb, wgb = _channel_params(n, cp, mc, mean_ptr, rstd_ptr, w_ptr, b_ptr, G, CG, wn, SOFTMAX, FP64)
    zero = acc(tl.zeros([BC, BP], tl.float32), FP64)
    pa = zero
    qa = zero
    pbv = zero
    qb = zero
    pb0 = s * PB_PER_PROG
    pb1 = tl.minimum(pb0 + PB_PER_PROG, tl.cdiv(HW, BP))
    for pb in range(pb0, pb1):
        p = pb * BP + tl.arange(0, BP)
        m = mc[:, None] & (p < HW)[None, :]
        xo = pix_off(p, W, sx_h, sx_w, FLAT)[None, :] + n64 * sx_n
        do = pix_off(p, W, sd_h, sd_w, FLAT)[None, :] + n64 * sd_n
        xa, xb = _pair_x(x_ptr, xo, sx_c, c, cp, m, FP64)
        dsa, dsb = _pair_x(ds_ptr, do, sd_c, c, cp, m, FP64)
        xha, ra = _reweight(xa, mua, rsa, gama, beta_, wga)
        xhb, rb = _reweight(xb, mub, rsb, gamb, betb, wgb)
        dza = _grad_z(xa, ra, wga, dsa, dsb, tau, MASK, ON)
        dzb = _grad_z(xb, rb, wgb, dsb, dsa, tau, MASK, ON)
        pa += dza
        qa += dza * xha
        pbv += dzb
        qb += dzb * xhb
    row = (n64 * SPLIT + s) * C
    tl.store(p_ptr + row + c, tl.sum(pa, axis=1), mask=mc)
    tl.store(q_ptr + row + c, tl.sum(qa, axis=1), mask=mc)
    tl.store(p_ptr + row + cp, tl.sum(pbv, axis=1), mask=mc)
    tl.store(q_ptr + row + cp, tl.sum(qb, axis=1), mask=mc)


@triton.jit
def _sru_bwd_reduce_kernel(
    p_ptr, q_ptr, w_ptr, b_ptr, a_ptr, bsum_ptr, dbias_ptr, xg_ptr, t_ptr, wsum_ptr,
    N, C, G, CG, SPLIT,
    ON: tl.constexpr, SOFTMAX: tl.constexpr, FP64: tl.constexpr, BG: tl.constexpr, BJ: tl.constexpr,
    BR: tl.constexpr, BCR: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """Backward pass 2 (tiny): deterministic reductions of the P, Q partials.

    p_ptr, q_ptr: (N * SPLIT, C). w_ptr, b_ptr: (C,) gamma, beta.
    Programs 0..N-1 (one per sample n) write, per group g, into a_ptr / bsum_ptr (N, G):
        A = sum_{c in g, split} gamma_c k_c Q,   B = sum_{c in g, split} gamma_c k_c P.
    Programs N.. (one per block of BCR channels; only launched when parameter gradients
    are needed) write d beta (dbias_ptr, (C,), weight dtype), the partial d gamma
    X_c = k_c sum Q + dw_c / S (SOFTMAX: + w_c dw_c) into xg_ptr (C,), and
    sum_{c in block} dw_c gamma_c (SOFTMAX: dw_c w_c) into t_ptr[block], with
    dw_c = gamma_c sum Q + beta_c sum P (0 when ON is gn). Fixed summation order.
    k_c = w_c, or 1 when ON is gn (dz is then the gradient into g itself).
    Program 0 also writes w's (denom, shift) to wsum_ptr (2,) for the dx kernel.
    """
    pid = tl.program_id(0)
    wn = _weight_norm(w_ptr, C, SOFTMAX, FP64, BLOCK_W)
    wsum = wn[0]
    if pid == 0:
        _store_wnorm(wsum_ptr, wn, SOFTMAX)
    if pid < N:
        rows0 = pid.to(tl.int64) * SPLIT
        for g0 in range(0, G, BG):
            g = g0 + tl.arange(0, BG)
            acc_a = acc(tl.zeros([BG, BJ], tl.float32), FP64)
            acc_b = acc(tl.zeros([BG, BJ], tl.float32), FP64)
            for j0 in range(0, CG, BJ):
                j = j0 + tl.arange(0, BJ)
                m = (g < G)[:, None] & (j < CG)[None, :]
                c = g[:, None] * CG + j[None, :]
                gam = acc(tl.load(w_ptr + c, mask=m, other=0.0), FP64)
                if ON == 1:
                    coef = gam
                else:
                    coef = gam * _wfac(gam, wn, SOFTMAX)
                for s in range(0, SPLIT):
                    row = (rows0 + s) * C
                    acc_a += acc(tl.load(q_ptr + row + c, mask=m, other=0.0), FP64) * coef
                    acc_b += acc(tl.load(p_ptr + row + c, mask=m, other=0.0), FP64) * coef
            gm = g < G
            tl.store(a_ptr + pid * G + g, tl.sum(acc_a, axis=1), mask=gm)
            tl.store(bsum_ptr + pid * G + g, tl.sum(acc_b, axis=1), mask=gm)
    else:
        cb = pid - N
        c = cb * BCR + tl.arange(0, BCR)
        mc = c < C
        acc_p = acc(tl.zeros([BR, BCR], tl.float32), FP64)
        acc_q = acc(tl.zeros([BR, BCR], tl.float32), FP64)
        for r0 in range(0, N * SPLIT, BR):
            r = r0 + tl.arange(0, BR)
            m = (r < N * SPLIT)[:, None] & mc[None, :]
            offs = r.to(tl.int64)[:, None] * C + c[None, :]
            acc_p += acc(tl.load(p_ptr + offs, mask=m, other=0.0), FP64)
            acc_q += acc(tl.load(q_ptr + offs, mask=m, other=0.0), FP64)
        sp = tl.sum(acc_p, axis=0)
        sq = tl.sum(acc_q, axis=0)
        gam = acc(tl.load(w_ptr + c, mask=mc, other=0.0), FP64)
        bet = acc(tl.load(b_ptr + c, mask=mc, other=0.0), FP64)
        wg = _wfac(gam, wn, SOFTMAX)
        if ON == 1:
            tl.store(dbias_ptr + c, sp.to(dbias_ptr.dtype.element_ty), mask=mc)
            tl.store(xg_ptr + c, sq, mask=mc)
            tl.store(t_ptr + cb, tl.sum(tl.zeros_like(sq), axis=0))
        else:
            dw = gam * sq + bet * sp
            tl.store(dbias_ptr + c, (wg * sp).to(dbias_ptr.dtype.element_ty), mask=mc)
            if SOFTMAX:
                tl.store(xg_ptr + c, wg * sq + wg * dw, mask=mc)
                tl.store(t_ptr + cb, tl.sum(tl.where(mc, dw * wg, 0.0), axis=0))
            else:
                tl.store(xg_ptr + c, wg * sq + div(dw, wsum), mask=mc)
                tl.store(t_ptr + cb, tl.sum(tl.where(mc, dw * gam, 0.0), axis=0))


@triton.jit
def _sru_bwd_finalize_kernel(
    xg_ptr, t_ptr, w_ptr, dw_ptr, C, NT,
    SOFTMAX: tl.constexpr, FP64: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """d gamma_c = X_c - (sum_b t_b) / S^2 (SOFTMAX: X_c - w_c sum_b t_b), one program over the C channels.

    xg_ptr: (C,) partial d gamma; t_ptr: (NT,) block sums of dw_j gamma_j; w_ptr: gamma;
    dw_ptr: (C,) output in the weight's dtype. Grid (1,).
    """
    offs = tl.arange(0, BLOCK_T)
    t = tl.sum(acc(tl.load(t_ptr + offs, mask=offs < NT, other=0.0), FP64), axis=0)
    wn = _weight_norm(w_ptr, C, SOFTMAX, FP64, BLOCK_W)
    corr = t / (wn[0] * wn[0])
    cw = tl.arange(0, BLOCK_W)
    for c0 in range(0, C, BLOCK_W):
        c = c0 + cw
        mc = c < C
        if SOFTMAX:
            v = acc(tl.load(xg_ptr + c, mask=mc, other=0.0), FP64) - t * _wfac(
                acc(tl.load(w_ptr + c, mask=mc, other=0.0), FP64), wn, SOFTMAX)
        else:
            v = acc(tl.load(xg_ptr + c, mask=mc, other=0.0), FP64) - corr
        tl.store(dw_ptr + c, v.to(dw_ptr.dtype.element_ty), mask=mc)


@triton.jit
def _sru_bwd_dx_kernel(
    x_ptr, ds_ptr, dx_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, a_ptr, bsum_ptr, wsum_ptr,
    C, HALF, W, HW, G, CG, M, eps_hi, eps_lo,
    sx_n, sx_c, sx_h, sx_w,
    sd_n, sd_c, sd_h, sd_w,
    sg_n, sg_c, sg_h, sg_w,
    tau_hi, tau_lo, N_CB, N_PB,
    MASK: tl.constexpr, ON: tl.constexpr, SOFTMAX: tl.constexpr,
    TORCH_GN: tl.constexpr, FLAT: tl.constexpr, FP64: tl.constexpr,
    HAS_WSUM: tl.constexpr, BC: tl.constexpr, BP: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """dx for channel pairs (c, c + HALF) and BP pixels, recomputed from x and the stats.

    x_ptr, ds_ptr, dx_ptr: (N, C, H, W) with strides sx_*, sd_*, sg_*.
    a_ptr, bsum_ptr: (N, G) A and B from _sru_bwd_reduce_kernel (unused for binary masks on x).
    M: group size; eps = eps_hi + eps_lo (GroupBatchnorm2d needs std = 1/rstd - eps).
    wsum_ptr: (2,) w's (denom, shift) from the reduce kernel, read when HAS_WSUM.
    Binary masks on x (MASK > 0, ON x): dx = M1 ds_c + M2 ds_partner only (no gradient
    through the masks). Grid (N * N_CB * N_PB,).
    """
    n, n64, c, cp, mc, m, pix = _pair_tile(tl.program_id(0), HALF, HW, N_CB, N_PB, BC, BP)
    c64 = c.to(tl.int64)[:, None]
    cp64 = cp.to(tl.int64)[:, None]
    wn = _get_wnorm(w_ptr, wsum_ptr, C, HAS_WSUM, SOFTMAX, FP64, BLOCK_W)
    tau = acc(tau_hi, FP64) + acc(tau_lo, FP64)

    xo = pix_off(pix, W, sx_h, sx_w, FLAT)[None, :] + n64 * sx_n
    do = pix_off(pix, W, sd_h, sd_w, FLAT)[None, :] + n64 * sd_n
    xa, xb = _pair_x(x_ptr, xo, sx_c, c, cp, m, FP64)
    dsa, dsb = _pair_x(ds_ptr, do, sd_c, c, cp, m, FP64)
    dxa, dxb = _pair_dx(xa, xb, dsa, dsb, n, c, cp, mc, mean_ptr, rstd_ptr, w_ptr, b_ptr, a_ptr, bsum_ptr, G, CG,
                        wn, tau, M, eps_hi, eps_lo, MASK, ON, SOFTMAX, TORCH_GN, FP64)
    go = pix_off(pix, W, sg_h, sg_w, FLAT)[None, :] + n64 * sg_n
    gdt = dx_ptr.dtype.element_ty
    tl.store(dx_ptr + go + c64 * sg_c, dxa.to(gdt), mask=m)
    tl.store(dx_ptr + go + cp64 * sg_c, dxb.to(gdt), mask=m)


# ----------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------
def _check_x(x: torch.Tensor, who: str):
    if x.dim() != 4:
        raise ValueError(f"{who}: expected a 4-D (N, C, H, W) tensor, got shape {tuple(x.shape)}")
    if x.dtype not in FLOATS:
        raise TypeError(f"{who}: unsupported dtype {x.dtype}")
    if x.shape[1] % 2:
        raise ValueError(f"{who}: channels ({x.shape[1]}) must be even")


def _vec(t: torch.Tensor, c: int, name: str) -> torch.Tensor:
    t = t.reshape(-1)
    if t.numel() != c:
        raise ValueError(f"{name} must have {c} elements, got {t.numel()}")
    return t if t.is_contiguous() else t.contiguous()


@functools.lru_cache(maxsize=None)
def _switches(mode) -> dict:
    """The kernels' constexprs of an SRU mode (``scconv_triton._config.SRUMath.code``; a bool
    ``hard`` is mode 0 or 1)."""
    m = SRUMath.from_code(mode)
    return dict(MASK=MASKS.index(m.mask), ON=OPERANDS.index(m.operand), SOFTMAX=m.weighting == "softmax")


@launcher
def sru_stats(x: torch.Tensor, group_num: int, eps: float, torch_gn: bool, *,
              weight: torch.Tensor | None = None, split: int | None = None, tile: int | None = None,
              mode: int = 0):
    """Per (sample, group) mean and rstd of x (N, C, H, W), numerically robust (Chan merging).

    Returns (mean, rstd), each (N, group_num): mean in fp64 for every input dtype (an fp32 mean
    would round by up to ulp(mean)/2, a large error when the spread is tiny next to the mean;
    the kernels use it as an fp32 hi/lo pair), rstd fp32 (fp64 for fp64 x). rstd = 1/sqrt(var + eps)
    with the biased variance when ``torch_gn``, else 1/(std + eps) with the unbiased std.
    With ``weight`` (gamma, C elements) it returns (mean, rstd, wsum): wsum = sum(weight) (for a
    softmax-weighting ``mode``: its denominator and shift), a (2,) tensor written by the merge
    kernel for ``sru_apply(..., wsum=wsum)`` (no extra launch).
    ``split`` (programs per group) and ``tile`` (elements per tile) override the defaults.
    Launches 2 kernels.
    """
    _check_x(x, "sru_stats")
    N, C, H, W = x.shape
    if C % group_num:
        raise ValueError(f"channels ({C}) must be divisible by group_num ({group_num})")
    G, CG, HW = group_num, C // group_num, H * W
    adt = acc_dtype(x.dtype)
    fp64 = adt == torch.float64
    mean = torch.empty((N, G), device=x.device, dtype=torch.float64)  # fp64: see _channel_params
    rstd = torch.empty((N, G), device=x.device, dtype=adt)
    wsum = None
    if weight is not None:
        weight = _vec(weight, C, "weight")
        wsum = torch.empty((2,), device=x.device, dtype=adt)
    softmax = _switches(mode)["SOFTMAX"]
    if N == 0:
        if wsum is not None:
            if softmax:
                wsum[1] = weight.max()
                wsum[0] = (weight - wsum[1]).exp().sum()
            else:
                wsum[0] = weight.sum()
            return mean, rstd, wsum
        return mean, rstd
    bj, bp, warps = stream_tiles(x, CG, HW, tile, scale=2)
    n_tiles = cdiv(CG, bj) * cdiv(HW, bp)
    if split is None:
        split = max(1, target_programs(x) // (N * G))
    split = max(1, min(int(split), n_tiles))
    per = cdiv(n_tiles, split)
    split = cdiv(n_tiles, per)
    part = torch.empty((N * G, split, 4), device=x.device, dtype=adt)
    (sx,), flat = pixel_layout([x])
    _sru_stats_partial_kernel[(N * G, split)](
        x, part, W, HW, G, CG, *sx, per, split,
        FLAT=flat, FP64=fp64, BJ=bj, BP=bp, num_warps=warps,
    )
    eh, el = split_float(eps)
    block = min(np2(N * G), 256)
    _sru_stats_merge_kernel[(cdiv(N * G, block),)](
        part, mean, rstd, weight if wsum is not None else part, wsum if wsum is not None else part,
        N * G, split, CG * HW, eh, el, C,
        TORCH_GN=bool(torch_gn), FP64=fp64, BLOCK=block, WRITE_WSUM=wsum is not None, SOFTMAX=softmax,
        BLOCK_W=_block_w(C), num_warps=NUM_WARPS,
    )
    return (mean, rstd) if wsum is None else (mean, rstd, wsum)


def _block_w(c: int) -> int:
    return min(np2(c), 1024)


@launcher
def sru_apply(x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor,
              bias: torch.Tensor, tau: float, mode: int, *, wsum: torch.Tensor | None = None,
              tile: int | None = None) -> torch.Tensor:
    """Fused SRU forward: s = cross-reconstruction of the gated x. One launch.

    ``mode``: the SRU's switches (``SRUMath.code``; False / True: the soft / hard gate).
    x: (N, C, H, W) any strides; mean (fp64), rstd: (N, G) from :func:`sru_stats`; weight, bias:
    gamma and beta with C elements; w_gamma = weight / sum(weight), with sum(weight) read from
    ``wsum`` ((2,) tensor from ``sru_stats(..., weight=, mode=)``) or else summed in-kernel.
    Returns s = torch.empty_like(x) (same memory format, dtype of x).
    """
    _check_x(x, "sru_apply")
    N, C, H, W = x.shape
    G = mean.shape[-1]
    weight = _vec(weight, C, "weight")
    bias = _vec(bias, C, "bias")
    out = torch.empty_like(x)
    if out.numel() == 0:
        return out
    HW, half = H * W, C // 2
    bc, bp, warps = stream_tiles(x, half, HW, tile)
    n_cb, n_pb = cdiv(half, bc), cdiv(HW, bp)
    (sx, so), flat = pixel_layout([x, out])
    th, tlo = split_float(tau)
    _sru_apply_kernel[(N * n_cb * n_pb,)](
        x, out, mean, rstd, weight, bias, wsum if wsum is not None else mean,
        C, half, W, HW, G, C // G, *sx, *so, th, tlo, n_cb, n_pb,
        **_switches(mode), FLAT=flat, FP64=x.dtype == torch.float64, HAS_WSUM=wsum is not None,
        BC=bc, BP=bp, BLOCK_W=_block_w(C), num_warps=warps,
    )
    return out


def sru_reduce(p: torch.Tensor, q: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, N: int, C: int, G: int,
               split: int, mode: int, want_params: bool):
    """The SRU backward's reductions of the per-(sample, split) sums P = sum dz, Q = sum dz xhat
    (p, q: (N * split, C), accumulation dtype; row n * split + s): returns (A, B, wsum, d gamma,
    d beta), A and B (N, G) the group sums the dx kernels take, wsum (2,) w's (denom, shift),
    d gamma / d beta (C,) in weight's dtype (None unless ``want_params``).
    Launches _sru_bwd_reduce_kernel, and _sru_bwd_finalize_kernel for d gamma. Fixed order."""
    adt, dev = p.dtype, p.device
    fp64 = adt == torch.float64
    sw = _switches(mode)
    CG = C // G
    bw = _block_w(C)
    a = torch.empty((N, G), device=dev, dtype=adt)
    wsum = torch.empty((2,), device=dev, dtype=adt)
    bsum = torch.empty((N, G), device=dev, dtype=adt)
    dweight = torch.empty(C, device=dev, dtype=weight.dtype) if want_params else None
    dbias = torch.empty(C, device=dev, dtype=weight.dtype) if want_params else None
    bcr = min(np2(C), 128)
    n_crb = cdiv(C, bcr) if want_params else 0
    xg = torch.empty(C, device=dev, dtype=adt) if want_params else a
    t = torch.empty(max(n_crb, 1), device=dev, dtype=adt)
    bj = min(np2(CG), 64)
    bg = min(np2(G), max(1, 256 // bj))
    _sru_bwd_reduce_kernel[(N + n_crb,)](
        p, q, weight, bias, a, bsum, dbias if want_params else a, xg, t, wsum,
        N, C, G, CG, split,
        ON=sw["ON"], SOFTMAX=sw["SOFTMAX"], FP64=fp64, BG=bg, BJ=bj, BR=min(np2(N * split), 8), BCR=bcr, BLOCK_W=bw,
        num_warps=NUM_WARPS,
    )
    if want_params:
        _sru_bwd_finalize_kernel[(1,)](
            xg, t, weight, dweight, C, n_crb,
            SOFTMAX=sw["SOFTMAX"], FP64=fp64, BLOCK_T=np2(n_crb), BLOCK_W=bw, num_warps=NUM_WARPS,
        )
    return a, bsum, wsum, dweight, dbias


@launcher
def sru_backward(ds: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                 weight: torch.Tensor, bias: torch.Tensor, tau: float, mode: int, torch_gn: bool,
                 eps: float, needs_input_grad_params: bool, needs_input_grad_x: bool = True, *,
                 split: int | None = None, tile: int | None = None):
    """SRU backward from x and the saved stats: returns (dx, dweight, dbias).

    ``mode``: the SRU's switches (``SRUMath.code``; False / True: the soft / hard gate).
    dx like x (same memory format) or None when not needed; dweight, dbias: (C,) in
    weight's dtype, None when binary masks on x (no gradient through the masks) or not needed.
    With a gradient into the GroupNorm: partial kernel (reads x, ds), reduce kernel (tiny),
    finalize (C-sized, only for parameter gradients), dx kernel (reads x, ds, writes dx).
    Binary masks on x: the dx kernel only.
    Per-channel sums over the batch use per-(n, split) partials then one fixed-order reduction.
    """
    _check_x(x, "sru_backward")
    if ds.shape != x.shape:
        raise ValueError(f"ds shape {tuple(ds.shape)} != x shape {tuple(x.shape)}")
    N, C, H, W = x.shape
    G = mean.shape[-1]
    CG, HW, half = C // G, H * W, C // 2
    weight = _vec(weight, C, "weight")
    bias = _vec(bias, C, "bias")
    adt = acc_dtype(x.dtype)
    fp64 = adt == torch.float64
    sw = _switches(mode)
    gn_grad = SRUMath.from_code(mode).param_grad  # a gradient reaches the GroupNorm
    want_params = bool(needs_input_grad_params) and gn_grad
    dx = torch.empty_like(x) if needs_input_grad_x else None
    dweight = dbias = None
    if x.numel() == 0:
        if dx is not None:
            dx.zero_()
        if want_params:
            dweight = torch.zeros(C, device=x.device, dtype=weight.dtype)
            dbias = torch.zeros(C, device=x.device, dtype=weight.dtype)
        return dx, dweight, dbias
    bc, bp, warps = stream_tiles(x, half, HW, tile)
    n_cb, n_pb = cdiv(half, bc), cdiv(HW, bp)
    th, tlo = split_float(tau)
    eh, el = split_float(eps)
    bw = _block_w(C)
    a = bsum = wsum = mean  # placeholders, unused by the dx kernel of binary masks on x
    if gn_grad and (needs_input_grad_x or want_params):
        if split is None:
            split = max(1, target_programs(x) // (N * n_cb))
        split = max(1, min(int(split), n_pb))
        per = cdiv(n_pb, split)
        split = cdiv(n_pb, per)
        p = torch.empty((N * split, C), device=x.device, dtype=adt)
        q = torch.empty((N * split, C), device=x.device, dtype=adt)
        (sx, sd), flat = pixel_layout([x, ds])
        _sru_bwd_partial_kernel[(N * n_cb * split,)](
            x, ds, p, q, mean, rstd, weight, bias,
            C, half, W, HW, G, CG, *sx, *sd, th, tlo, n_cb, split, per,
            # twice the warps of the streaming kernels (half the tile per thread): four
            # accumulators plus the recomputed gate took fp64 to spills and the 2023-07-22 form
            # (softmax weighting, r * x) to 252 registers at the streaming kernels' warps
            **sw, FLAT=flat, FP64=fp64, BC=bc, BP=bp, BLOCK_W=bw, num_warps=2 * warps,
        )
        a, bsum, wsum, dweight, dbias = sru_reduce(p, q, weight, bias, N, C, G, split, mode, want_params)
    if needs_input_grad_x:
        (sx, sd, sg), flat = pixel_layout([x, ds, dx])
        _sru_bwd_dx_kernel[(N * n_cb * n_pb,)](
            x, ds, dx, mean, rstd, weight, bias, a, bsum, wsum,
            C, half, W, HW, G, CG, CG * HW, eh, el, *sx, *sd, *sg, th, tlo, n_cb, n_pb,
            **sw, TORCH_GN=bool(torch_gn), FLAT=flat, FP64=fp64, HAS_WSUM=gn_grad,
            BC=bc, BP=bp, BLOCK_W=bw, num_warps=warps,
        )
    return dx, dweight, dbias
