"""Stage 2 of the fused SCConv: the convolutions in Triton; s, Y1, Y2 and P2 never stored.

With x (N, C, H, W), h = C // 2, u / l the CRU's up / low split of s, squeezed to USQ / LSQ
channels, GWC k x k (G groups of CIG input and COG output channels, pad p = k // 2, stride st),
PWC1 (Cout x USQ), PWC2 (P x LSQ, P = Cout - LSQ) and output Ho x Wo (DESIGN.md, "Stage 2"):

  _s2_squeeze_kernel  per (n, pixel tile): loads x for channel pairs (c, c + h), forms s in
                      registers (kernels/sru.py's _pair_s: every SRU revision), multiplies by the
                      squeeze weights (tl.dot) and writes up and low; epilogue: per-tile partial
                      sums from which the pooled means follow exactly,
                        T[ci, dy, dx] = sum of up[ci] over rows R_dy x columns C_dx,
                        R_dy = {oh * st + dy - p : 0 <= oh < Ho} inside [0, H)  (C_dx alike),
                        L[ci] = sum of low[ci] over the strided grid {(oh * st, ow * st)}.
  _s2_means_kernel    per (group, output-channel block), all samples: the tile partials reduced
                      in a fixed order, then
                        mean(Y1[c]) = b[c] + (sum_{ci, dy, dx} Wg[c, ci, dy, dx] T[g(c) CIG + ci, dy, dx]
                                              + sum_ci W1[c, ci] T[ci, p, p]) / (Ho Wo),
                        mean(Y2[c]) = sum_ci W2[c, ci] L[ci] / (Ho Wo)   (c < P)
                                    = L[c - P] / (Ho Wo)                (c >= P, identity),
                      as [samples x channels] products over the samples (weights read once per 16).
  _s2_conv_kernel     per (n, output tile of BH x BW pixels, block of output channels of every
                      group): loads the up tile the taps need (halo included) once, forms each
                      tap's operand from it in registers (tl.gather), the grouped k x k GWC as
                      batched dots over the group's channels only (never a densified
                      block-diagonal weight), PWC1 at the centre tap, the bias, PWC2 / the identity
                      channels of low at the strided positions (low loaded once), the softmax of
                      the means (channel or pairwise), out = A1 Y1 + A2 Y2 written once.

Backward, the squeezes' and the SRU's (s and ds rebuilt in registers, never stored; the
convolutions' backward is kernels/stage2_bwd.py's where its tiles fit):
  _s2_sq_bwd_kernel   per (n, pixel tile): s from x (kernels/sru.py's _pair_gate), the per-tile
                      squeeze-weight gradients [d_up s[:u]^T, d_low s[u:]^T], ds = Wsq^T [d_up;
                      d_low] and the SRU's P / Q sums (reduced by sru.py's sru_reduce);
  _s2_sq_wsum_kernel  the weight-gradient rows summed in a fixed order;
  _s2_sq_dx_kernel    per (n, pixel tile): ds again, dx through sru.py's _pair_dx.

Precision: the dots take the storage dtype (fp16 / bf16 tensor cores with fp32 accumulation;
fp32 with TF32 exactly when the launcher is asked for it, IEEE otherwise; fp64 in fp64).
Reductions have a fixed order (no atomics): results are bitwise reproducible. Offsets are int64.
"""
from __future__ import annotations

import functools
import itertools
import os

import torch
import triton
import triton.language as tl

from ._launch import (
    acc, acc_dtype, cdiv, channels_fastest, launcher, memory_format, np2, pix_off, pixel_layout, split_float,
    strides4,
)
from .cru import _softmax_coeffs, _softmax_stats
from .sru import (
    _block_w, _get_wnorm, _grad_z, _pair_dx, _pair_gate, _pair_s, _pair_tile, _pair_x, _switches,
    sru_reduce,
)
from .._config import SRUMath

__all__ = ["stage2_forward", "stage2_squeeze", "stage2_squeeze_backward", "squeeze_backward_pays", "supports", "conv_plan", "AS_GPU"]


# ----------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------
# The interpreter's dot has no bf16 (numpy): there the operands go through fp32 (products of
# bf16 values are exact in fp32: only the summation order differs from a tensor-core dot).
# A global, not a launch argument, so the captured launches compile the GPU's variant.
_INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def _mma(a, b, c, TF32: tl.constexpr):
    """c += a @ b (2-D, or batched 3-D); fp32 operands on TF32 tensor cores when TF32, else IEEE."""
    if _INTERPRETED and a.dtype == tl.bfloat16:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), c, input_precision="ieee")
    elif TF32:
        return tl.dot(a, b, c, input_precision="tf32")
    else:
        return tl.dot(a, b, c, input_precision="ieee")


@triton.jit
def _on_taps(i, d, PAD, STRIDE, NOUT):
    """Whether input row (column) i is read by tap d of some output row: i = o * STRIDE + d - PAD
    for an o in [0, NOUT)."""
    t = i - d + PAD
    return (t >= 0) & (t % STRIDE == 0) & (t < NOUT * STRIDE)


@triton.jit
def _tap_row_sums(row, uq, hh, ww, mp, ou, mu_, dy, PAD, STRIDE, HO, WO, K: tl.constexpr):
    """The squeeze tile's partial sums T of kernel row dy (its K taps): for each up channel ou,
    the sum of uq [BU, BP] over the tile's pixels (rows hh, columns ww) that tap reads; stored
    at row + ou K K + dy K + dx."""
    rm = _on_taps(hh, dy, PAD, STRIDE, HO) & mp
    for dx in tl.static_range(K):
        sel = rm & _on_taps(ww, dx, PAD, STRIDE, WO)
        t = tl.sum(tl.where(sel[None, :], uq, 0.0), axis=1)
        tl.store(row + ou * (K * K) + (dy * K + dx), t, mask=mu_)


@triton.jit
def _tile_sums(part_ptr, nn, mn, idx, mi, R, N_PB):
    """[BN, BJ] sums over the N_PB pixel tiles of sample nn of the partial-sum entries idx
    (part_ptr: (N * N_PB, R)), tiles in a fixed order."""
    off = (nn.to(tl.int64) * N_PB)[:, None] * R + idx.to(tl.int64)[None, :]
    m = mn[:, None] & mi[None, :]
    s = tl.load(part_ptr + off, mask=m, other=0.0)
    for t in range(1, N_PB):
        s += tl.load(part_ptr + (off + t * R), mask=m, other=0.0)
    return s


@triton.jit
def _sq_tile(pid, C, HALF, W, HW, N_PB, gw_ptr, wsum_ptr, tau_hi, tau_lo, sx_n, sx_h, sx_w,
             HAS_WSUM: tl.constexpr, SOFTMAX: tl.constexpr, FLAT: tl.constexpr, FP64: tl.constexpr,
             BK: tl.constexpr, BP: tl.constexpr, BLOCK_W: tl.constexpr):
    """The squeeze kernels' pixel tile (program pid = n N_PB + tile): n, n as int64, the BK channel
    lanes, the pixel indices (int32) and their mask, x's pixel offsets, w's (denom, shift) and tau."""
    n, n64, cb, _cp, _mc, _m, pix = _pair_tile(pid, HALF, HW, 1, N_PB, BK, BP)
    wn = _get_wnorm(gw_ptr, wsum_ptr, C, HAS_WSUM, SOFTMAX, FP64, BLOCK_W)
    tau = acc(tau_hi, FP64) + acc(tau_lo, FP64)
    xo = pix_off(pix, W, sx_h, sx_w, FLAT)[None, :] + n64 * sx_n
    return n, n64, cb, pix, pix < HW, xo, wn, tau


# ----------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------
@triton.jit
def _s2_squeeze_kernel(
    x_ptr, mean_ptr, rstd_ptr, gw_ptr, gb_ptr, wsum_ptr, w1_ptr, w2_ptr, up_ptr, low_ptr, part_ptr,
    C, HALF, U, USQ, LSQ, W, HW, G, CG, PAD, STRIDE, HO, WO,
    sx_n, sx_c, sx_h, sx_w,
    su_n, su_c, su_h, su_w,
    sl_n, sl_c, sl_h, sl_w,
    tau_hi, tau_lo, N_PB,
    MASK: tl.constexpr, ON: tl.constexpr, SOFTMAX: tl.constexpr,
    FLAT: tl.constexpr, FP64: tl.constexpr, EVEN: tl.constexpr, TF32: tl.constexpr, K: tl.constexpr,
    BU: tl.constexpr, BL: tl.constexpr, BK: tl.constexpr, BP: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """up = Wsq1 s[:U], low = Wsq2 s[U:] for BP pixels of sample n, s formed from x in registers.

    x_ptr: (N, C, H, W), strides sx_*; mean (fp64) / rstd: (N, G) from sru_stats; gw / gb: (C,)
    GroupNorm gamma / beta; wsum_ptr: (2,) their weighting's (denom, shift) from sru_stats.
    w1_ptr (USQ, U), w2_ptr (LSQ, C - U): contiguous squeeze weights. up_ptr / low_ptr:
    (N, USQ | LSQ, H, W), strides su_* / sl_*. part_ptr: (N * N_PB, USQ * K * K + LSQ) per-tile
    partial sums T, then L (module doc). EVEN: U == HALF, so s[c] (c < HALF) is all up and
    s[c + HALF] all low (two dots, not four). MASK, ON, SOFTMAX: the SRU's switches
    (kernels/sru.py). Grid (N * N_PB,).
    """
    pid = tl.program_id(0)
    n, n64, cb, pix, mp, xo, wn, tau = _sq_tile(pid, C, HALF, W, HW, N_PB, gw_ptr, wsum_ptr, tau_hi, tau_lo,
                                                sx_n, sx_h, sx_w, True, SOFTMAX, FLAT, FP64, BK, BP, BLOCK_W)
    xdt = x_ptr.dtype.element_ty
    L = C - U
    ou = tl.arange(0, BU)
    ol = tl.arange(0, BL)
    mu_ = ou < USQ
    ml_ = ol < LSQ
    acc_u = acc(tl.zeros([BU, BP], tl.float32), FP64)
    acc_l = acc(tl.zeros([BL, BP], tl.float32), FP64)
    for k0 in range(0, HALF, BK):
        c = k0 + cb
        mc = c < HALF
        m = mc[:, None] & mp[None, :]
        sa, sb = _pair_s(x_ptr, xo, sx_c, n, c, c + HALF, mc, m, mean_ptr, rstd_ptr, gw_ptr, gb_ptr, G, CG, wn,
                         tau, MASK, ON, SOFTMAX, FP64)
        # s in the storage dtype, as the reference's squeeze convolutions see it
        sa = sa.to(xdt)
        sb = sb.to(xdt)
        if EVEN:
            wua = tl.load(w1_ptr + ou[:, None] * U + c[None, :], mask=mu_[:, None] & mc[None, :], other=0.0)
            wlb = tl.load(w2_ptr + ol[:, None] * L + c[None, :], mask=ml_[:, None] & mc[None, :], other=0.0)
            acc_u = _mma(wua, sa, acc_u, TF32)
            acc_l = _mma(wlb, sb, acc_l, TF32)
        else:
            ca = c[None, :]
            cp = c + HALF
            cbb = cp[None, :]
            wua = tl.load(w1_ptr + ou[:, None] * U + ca, mask=mu_[:, None] & (mc & (c < U))[None, :], other=0.0)
            wub = tl.load(w1_ptr + ou[:, None] * U + cbb, mask=mu_[:, None] & (mc & (cp < U))[None, :], other=0.0)
            wla = tl.load(w2_ptr + ol[:, None] * L + (ca - U), mask=ml_[:, None] & (mc & (c >= U))[None, :],
                          other=0.0)
            wlb = tl.load(w2_ptr + ol[:, None] * L + (cbb - U), mask=ml_[:, None] & (mc & (cp >= U))[None, :],
                          other=0.0)
            acc_u = _mma(wua, sa, acc_u, TF32)
            acc_u = _mma(wub, sb, acc_u, TF32)
            acc_l = _mma(wla, sa, acc_l, TF32)
            acc_l = _mma(wlb, sb, acc_l, TF32)
    udt = up_ptr.dtype.element_ty
    up = acc_u.to(udt)
    low = acc_l.to(udt)
    uo = pix_off(pix, W, su_h, su_w, FLAT)[None, :] + n64 * su_n
    lo = pix_off(pix, W, sl_h, sl_w, FLAT)[None, :] + n64 * sl_n
    tl.store(up_ptr + uo + ou.to(tl.int64)[:, None] * su_c, up, mask=mu_[:, None] & mp[None, :])
    tl.store(low_ptr + lo + ol.to(tl.int64)[:, None] * sl_c, low, mask=ml_[:, None] & mp[None, :])

    # epilogue: the pooled means' partial sums, from the stored (rounded) values
    hh = pix // W  # int32: a 64-bit division is a subroutine call on the GPU (pix_off)
    ww = pix % W
    uq = acc(up, FP64)
    R = USQ * K * K + LSQ
    row = part_ptr + pid.to(tl.int64) * R
    # the rows' taps in a loop up to k = 5: nine unrolled reductions put 2 registers on sm_80's
    # stack (C = 128, fp32, k = 3); at k = 7 a loop puts 2 on sm_90's (fp32) and rolling the
    # columns too 1 on sm_80's (bf16, alpha != 1/2): unrolled there (the AOT check)
    if K <= 5:
        for dy in range(K):
            _tap_row_sums(row, uq, hh, ww, mp, ou, mu_, dy, PAD, STRIDE, HO, WO, K)
    else:
        for dy in tl.static_range(K):
            _tap_row_sums(row, uq, hh, ww, mp, ou, mu_, dy, PAD, STRIDE, HO, WO, K)
    grid = mp & (hh % STRIDE == 0) & (ww % STRIDE == 0)
    lsum = tl.sum(tl.where(grid[None, :], acc(low, FP64), 0.0), axis=1)
    tl.store(row + USQ * K * K + ol, lsum, mask=ml_)


@triton.jit
def _s2_means_kernel(
    part_ptr, m_ptr, wg_ptr, bg_ptr, wp1_ptr, wp2_ptr,
    N, USQ, LSQ, COUT, COG, CIG, P, N_PB, N_CB, inv_hw,
    HAS_P: tl.constexpr, FP64: tl.constexpr, K: tl.constexpr, BN: tl.constexpr, BCO: tl.constexpr,
    BJ: tl.constexpr,
):
    """Pooled means m (N, 2 COUT) of Y1 (first COUT) and Y2 from the squeeze's partial sums.

    part_ptr: (N * N_PB, R), R = USQ K K + LSQ (_s2_squeeze_kernel). wg (COUT, CIG, K, K),
    bg (COUT,), wp1 (COUT, USQ), wp2 (P, LSQ): contiguous weights. inv_hw = 1 / (Ho Wo).
    Program (g, cb): output channels g COG + [cb BCO, (cb + 1) BCO), all samples in blocks of
    BN; each weight block is read once per sample block. Grid (G * N_CB,).
    """
    KK: tl.constexpr = K * K
    g = tl.program_id(0) // N_CB
    cb = tl.program_id(0) % N_CB
    co = cb * BCO + tl.arange(0, BCO)
    c = g * COG + co
    c64 = c.to(tl.int64)  # masked lanes past the weights: no int32 wrap-around
    mc = co < COG
    mp = mc & (c < P)
    R = USQ * KK + LSQ
    js = tl.arange(0, BJ)
    dt = m_ptr.dtype.element_ty
    for n0 in range(0, N, BN):
        nn = n0 + tl.arange(0, BN)
        mn = nn < N
        s1 = acc(tl.zeros([BN, BCO], tl.float32), FP64)
        for j0 in range(0, CIG * KK, BJ):  # GWC: j = ci * KK + tap over the group's channels
            j = j0 + js
            mj = j < CIG * KK
            t = _tile_sums(part_ptr, nn, mn, g * CIG * KK + j, mj, R, N_PB)
            w = tl.load(wg_ptr + (c[:, None] * (CIG * KK) + j[None, :]), mask=mc[:, None] & mj[None, :], other=0.0)
            s1 += tl.sum(t[:, None, :] * w.to(dt)[None, :, :], axis=2)
        for j0 in range(0, USQ, BJ):  # PWC1: the centre tap of every up channel
            j = j0 + js
            mj = j < USQ
            t = _tile_sums(part_ptr, nn, mn, j * KK + KK // 2, mj, R, N_PB)
            w = tl.load(wp1_ptr + (c[:, None] * USQ + j[None, :]), mask=mc[:, None] & mj[None, :], other=0.0)
            s1 += tl.sum(t[:, None, :] * w.to(dt)[None, :, :], axis=2)
        # identity channels: L[c - P]; PWC2 channels: W2 L
        s2 = _tile_sums(part_ptr, nn, mn, USQ * KK + (c - P), mc & (c >= P), R, N_PB)
        if HAS_P:
            for j0 in range(0, LSQ, BJ):
                j = j0 + js
                mj = j < LSQ
                t = _tile_sums(part_ptr, nn, mn, USQ * KK + j, mj, R, N_PB)
                w = tl.load(wp2_ptr + (c[:, None] * LSQ + j[None, :]), mask=mp[:, None] & mj[None, :], other=0.0)
                s2 += tl.sum(t[:, None, :] * w.to(dt)[None, :, :], axis=2)
        b = tl.load(bg_ptr + c, mask=mc, other=0.0).to(dt)
        off = nn.to(tl.int64)[:, None] * (2 * COUT) + c64[None, :]
        mm = mn[:, None] & mc[None, :]
        tl.store(m_ptr + off, b[None, :] + s1 * inv_hw, mask=mm)
        tl.store(m_ptr + (off + COUT), s2 * inv_hw, mask=mm)


@triton.jit
def _gwc_weights(wg_ptr, c, mc, CIG, c0, t0, K: tl.constexpr, CIGP: tl.constexpr, TPD: tl.constexpr):
    """[BR, TPD * CIGP] GWC weights of taps t0 .. t0 + TPD and input channels c0 + [0, CIGP) of
    the group (columns (tap, ci)), zero past K * K and CIG."""
    KK: tl.constexpr = K * K
    kk = tl.arange(0, TPD * CIGP)
    kc = c0 + kk % CIGP
    kt = t0 + kk // CIGP
    return tl.load(wg_ptr + c.to(tl.int64)[:, None] * (CIG * KK) + (kc * KK + kt)[None, :],
                   mask=mc[:, None] & ((kc < CIG) & (kt < KK))[None, :], other=0.0)


@triton.jit
def _tap(tile, dy, dx, STRIDE: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr):
    """[GP, CIGP, BH * BW] operand of tap (dy, dx) from the up tile [GP, CIGP, RHP, RWP]: output
    lane (i, j) reads tile row i st + dy, column j st + dx. Two
    gathers along short axes (columns, then rows): register shuffles, no memory. Lanes past the
    tile clamp to its edge (they are outputs the tile does not own, never stored)."""
    GP: tl.constexpr = tile.shape[0]
    CIGP: tl.constexpr = tile.shape[1]
    RHP: tl.constexpr = tile.shape[2]
    RWP: tl.constexpr = tile.shape[3]
    ci = tl.minimum(tl.arange(0, BW) * STRIDE + dx, RWP - 1)
    cols = tl.gather(tile, tl.broadcast_to(ci[None, None, None, :], [GP, CIGP, RHP, BW]), axis=3)
    ri = tl.minimum(tl.arange(0, BH) * STRIDE + dy, RHP - 1)
    rows = tl.gather(cols, tl.broadcast_to(ri[None, None, :, None], [GP, CIGP, BH, BW]), axis=2)
    return tl.reshape(rows, [GP, CIGP, BH * BW])


@triton.jit
def _tile_lanes(GP: tl.constexpr, CIGP: tl.constexpr, RHP: tl.constexpr, RWP: tl.constexpr, BH: tl.constexpr,
                BW: tl.constexpr):
    """The conv kernels' lane indices: output lanes (row, column) of BH x BW, groups, a group's
    input channels, the up tile's rows and columns."""
    q = tl.arange(0, BH * BW)
    return q // BW, q % BW, tl.arange(0, GP), tl.arange(0, CIGP), tl.arange(0, RHP), tl.arange(0, RWP)


@triton.jit
def _tap_block(tile, i, K: tl.constexpr, STRIDE: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr,
               TPD: tl.constexpr):
    """[GP, TPD * CIGP, BH * BW] operand of the GWC's K block i: taps i TPD .. i TPD + TPD - 1
    (rows (tap, ci)). Past the last tap the last one again (its weights are 0, its products
    never stored)."""
    KK: tl.constexpr = K * K
    t = i * TPD
    op = _tap(tile, t // K, t % K, STRIDE, BH, BW)
    if TPD == 2:
        t2 = tl.minimum(t + 1, KK - 1)
        op2 = _tap(tile, t2 // K, t2 % K, STRIDE, BH, BW)
        op = tl.reshape(tl.permute(tl.join(op, op2), (0, 3, 1, 2)), [op.shape[0], 2 * op.shape[1], op.shape[2]])
    return op


@triton.jit
def _y2_weights(wp2_ptr, c, mc, lch, a2, P, LSQ, HAS_P: tl.constexpr, FP64: tl.constexpr):
    """A2-scaled rows of Y2's matrix [BR, BL]: PWC2's weights (HAS_P; rows c < P) and the one-hot
    rows of the identity channels c - P of low."""
    w = tl.where((mc & (c >= P))[:, None] & (lch[None, :] == (c - P)[:, None]), 1.0, 0.0)
    if HAS_P:
        w += acc(tl.load(wp2_ptr + c.to(tl.int64)[:, None] * LSQ + lch[None, :],
                         mask=(mc & (c < P))[:, None] & (lch < LSQ)[None, :], other=0.0), FP64)
    return acc(w, FP64) * a2[:, None]


@triton.jit
def _pwc1_weights(wp1_ptr, c, mc, kg, c0, G, CIG, USQ, CIGP: tl.constexpr):
    """[BR, GP * CIGP] PWC1 weights of the up channels (g, c0 + ci) (columns (g, ci))."""
    gk = kg // CIGP
    ck = c0 + kg % CIGP
    return tl.load(wp1_ptr + c.to(tl.int64)[:, None] * USQ + (gk * CIG + ck)[None, :],
                   mask=mc[:, None] & ((gk < G) & (ck < CIG))[None, :], other=0.0)


@triton.jit
def _conv_tile(up_ptr, low_ptr, wg_ptr, wp1_ptr, wp2_ptr, out_ptr, n64, rb, wb, c, mc, lch, kg, a1, a2, a1b,
               wall, w1h, w2h, H, W, HO, WO, G, CIG, USQ, LSQ, P, PAD, OHT, OWT,
               su_n, su_c, su_h, su_w, sl_n, sl_c, sl_h, sl_w, so_n, so_c, so_h, so_w,
               HAS_P: tl.constexpr, FP64: tl.constexpr, TF32: tl.constexpr, K: tl.constexpr, STRIDE: tl.constexpr,
               HOLD: tl.constexpr, GP: tl.constexpr, CIGP: tl.constexpr, TPD: tl.constexpr, NCH: tl.constexpr,
               BCO: tl.constexpr, RHP: tl.constexpr, RWP: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr):
    """_s2_conv_kernel's output tile (rb, wb) of sample n64 and channels c: the weights are
    wall / w1h / w2h (HOLD) or loaded block by block."""
    KK: tl.constexpr = K * K
    BQ: tl.constexpr = BH * BW
    BR: tl.constexpr = GP * BCO
    BKG: tl.constexpr = TPD * CIGP
    wdt = wg_ptr.dtype.element_ty
    qh, qw, gi, ci, tr, tc = _tile_lanes(GP, CIGP, RHP, RWP, BH, BW)
    oh = rb * OHT + qh
    ow = wb * OWT + qw
    mq = (qh < OHT) & (qw < OWT) & (oh < HO) & (ow < WO)
    # Y2 first: the identity channels of low and A2 PWC2 at the strided positions (low read once)
    lo = n64 * sl_n + (oh * STRIDE).to(tl.int64) * sl_h + (ow * STRIDE).to(tl.int64) * sl_w
    lt = tl.load(low_ptr + lo[None, :] + lch.to(tl.int64)[:, None] * sl_c,
                 mask=(lch < LSQ)[:, None] & mq[None, :], other=0.0)
    o = acc(tl.zeros([BR, BQ], tl.float32), FP64) + a1b[:, None]
    if HOLD:
        o = _mma(w2h, lt, o, TF32)
    else:
        o = _mma(_y2_weights(wp2_ptr, c, mc, lch, a2, P, LSQ, HAS_P, FP64).to(wdt), lt, o, TF32)

    ih = rb * (OHT * STRIDE) - PAD + tr
    iw = wb * (OWT * STRIDE) - PAD + tc
    mpix = ((ih >= 0) & (ih < H))[:, None] & ((iw >= 0) & (iw < W))[None, :]
    po = n64 * su_n + ih.to(tl.int64)[:, None] * su_h + iw.to(tl.int64)[None, :] * su_w
    for c0 in range(0, CIG, CIGP):
        # the up tile of this channel chunk, once: [GP, CIGP, RHP, RWP]
        ch = (gi[:, None] * CIG + c0 + ci[None, :]).to(tl.int64)
        mch = (gi < G)[:, None] & (c0 + ci < CIG)[None, :]
        tile = tl.load(up_ptr + ch[:, :, None, None] * su_c + po[None, None, :, :],
                       mask=mch[:, :, None, None] & mpix[None, None, :, :], other=0.0)
        # PWC1: every up channel at the centre tap, which is in the tile too
        cen = tl.reshape(_tap(tile, PAD, PAD, STRIDE, BH, BW), [GP * CIGP, BQ])
        if HOLD:
            o = _mma(w1h, cen, o, TF32)
        else:
            w1 = _pwc1_weights(wp1_ptr, c, mc, kg, c0, G, CIG, USQ, CIGP)
            o = _mma((acc(w1, FP64) * a1[:, None]).to(wdt), cen, o, TF32)
        # GWC: per K block TPD taps x CIGP channels of each group, formed from the tile
        o = tl.reshape(o, [GP, BCO, BQ])
        for i in range(0, (KK + TPD - 1) // TPD):
            op = _tap_block(tile, i, K, STRIDE, BH, BW, TPD)
            if HOLD:  # block i of the held weights (a select in registers, no load)
                w = tl.sum(tl.where((tl.arange(0, NCH) == i)[None, :, None], wall, 0.0), axis=1).to(wdt)
            else:
                w = (acc(_gwc_weights(wg_ptr, c, mc, CIG, c0, i * TPD, K, CIGP, TPD), FP64) * a1[:, None]).to(wdt)
            o = _mma(tl.reshape(w, [GP, BCO, BKG]), op, o, TF32)
        o = tl.reshape(o, [BR, BQ])
    oo = n64 * so_n + c.to(tl.int64)[:, None] * so_c + (oh.to(tl.int64) * so_h + ow.to(tl.int64) * so_w)[None, :]
    tl.store(out_ptr + oo, o.to(out_ptr.dtype.element_ty), mask=mc[:, None] & mq[None, :])


@triton.jit
def _s2_conv_kernel(
    up_ptr, low_ptr, m_ptr, wg_ptr, bg_ptr, wp1_ptr, wp2_ptr, out_ptr, a_ptr,
    H, W, HO, WO, G, CIG, USQ, LSQ, COUT, COG, P, PAD, OHT, OWT, N_RB, N_WB, N_ST, RPP,
    su_n, su_c, su_h, su_w,
    sl_n, sl_c, sl_h, sl_w,
    so_n, so_c, so_h, so_w,
    HAS_P: tl.constexpr, PAIRWISE: tl.constexpr, FP64: tl.constexpr, TF32: tl.constexpr, K: tl.constexpr,
    STRIDE: tl.constexpr, HOLD: tl.constexpr, GP: tl.constexpr, CIGP: tl.constexpr, TPD: tl.constexpr,
    NCH: tl.constexpr, BCO: tl.constexpr, RHP: tl.constexpr, RWP: tl.constexpr, BH: tl.constexpr,
    BW: tl.constexpr, BL: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """out[n, c] = A1[n, c] Y1[n, c] + A2[n, c] Y2[n, c] on OHT x OWT output tiles.

    up_ptr / low_ptr: (N, USQ | LSQ, H, W); out_ptr: (N, COUT, HO, WO); m_ptr: (N, 2 COUT) pooled
    means from _s2_means_kernel; a_ptr: (N, 2 COUT) the softmax coefficients A (written by the
    programs of the first output tile, for the backward); weights as there. A program computes
    output channels g COG + cb BCO + [0, BCO) of every group g < G (rows r = g BCO + i).
    Output tile (rb, wb): rows rb OHT + [0, OHT), columns wb OWT + [0, OWT); its up tile: input
    rows rb OHT st - PAD + [0, RHP), columns likewise [0, RWP), the group's input channels in
    chunks of CIGP (channels (g, ci) as [GP, CIGP]), each loaded once (zero outside the image): OHT = (RHP - K) // st + 1 output rows fit in it, so
    neighbouring tiles overlap by the halo only. Lanes: BH x BW (powers of two >= OHT x OWT).
    HOLD: a program walks RPP row tiles (a strip; N_ST strips of the N_RB row tiles) of one of
    the N_WB column blocks and loads its weights once for the strip (HOLD needs one chunk, CIGP
    >= CIG); else it computes one tile (RPP = 1, N_ST = N_RB) and loads each weight block where
    it is used, so no weight or pointer tile lives across the others. A K block of the GWC dot
    spans TPD (1 or 2) taps x CIGP channels; NCH >= the number of tap blocks (a power of two: the
    held weights' shape). Grid (N * N_ST * N_WB, N_CB).
    """
    KK: tl.constexpr = K * K
    BKG: tl.constexpr = TPD * CIGP
    pid = tl.program_id(0)
    wb = pid % N_WB
    rb0 = ((pid // N_WB) % N_ST) * RPP
    n64 = (pid // (N_WB * N_ST)).to(tl.int64)
    cb = tl.program_id(1)
    r = tl.arange(0, GP * BCO)
    rg = r // BCO
    co = cb * BCO + r % BCO
    c = rg * COG + co
    mc = (rg < G) & (co < COG)
    lch = tl.arange(0, BL)
    kg = tl.arange(0, GP * CIGP)
    # the softmax of the pooled means -> A1, A2 of these channels
    if PAIRWISE:
        mx = 0.0
        den = 1.0
    else:
        mx, den = _softmax_stats(m_ptr, n64, COUT, BLOCK_M)
    a1, a2 = _softmax_coeffs(m_ptr, n64, c, mc, COUT, mx, den, PAIRWISE)
    wa = mc & ((c * 0 + rb0 + wb) == 0)  # a vector test: rb0, wb may be constants
    tl.store(a_ptr + n64 * (2 * COUT) + c, a1, mask=wa)
    tl.store(a_ptr + n64 * (2 * COUT) + COUT + c, a2, mask=wa)
    # out = A1 (GWC + PWC1 + b) + A2 (PWC2 | identity): A1 and A2 scale the weights' rows, so the
    # dots of both branches accumulate into the output tile itself (one accumulator, not three)
    a1b = a1 * acc(tl.load(bg_ptr + c, mask=mc, other=0.0), FP64)
    if HOLD:  # every weight of these channels, once: [BR, NCH, BKG] GWC blocks, PWC1, PWC2
        wdt = wg_ptr.dtype.element_ty
        ich = tl.arange(0, NCH)
        kk = tl.arange(0, BKG)
        kc = kk % CIGP
        kt = ich[:, None] * TPD + (kk // CIGP)[None, :]  # [NCH, BKG] taps
        wall = tl.load(wg_ptr + c.to(tl.int64)[:, None, None] * (CIG * KK) + (kc[None, :] * KK + kt)[None, :, :],
                       mask=mc[:, None, None] & ((kc[None, :] < CIG) & (kt < KK))[None, :, :], other=0.0)
        wall = (acc(wall, FP64) * a1[:, None, None]).to(wdt)
        w1h = (acc(_pwc1_weights(wp1_ptr, c, mc, kg, 0, G, CIG, USQ, CIGP), FP64) * a1[:, None]).to(wdt)
        w2h = _y2_weights(wp2_ptr, c, mc, lch, a2, P, LSQ, HAS_P, FP64).to(wdt)
        for rb in range(rb0, rb0 + tl.minimum(RPP, N_RB - rb0)):
            _conv_tile(up_ptr, low_ptr, wg_ptr, wp1_ptr, wp2_ptr, out_ptr, n64, rb, wb, c, mc, lch, kg, a1, a2, a1b,
                       wall, w1h, w2h, H, W, HO, WO, G, CIG, USQ, LSQ, P, PAD, OHT, OWT,
                       su_n, su_c, su_h, su_w, sl_n, sl_c, sl_h, sl_w, so_n, so_c, so_h, so_w,
                       HAS_P, FP64, TF32, K, STRIDE, True, GP, CIGP, TPD, NCH, BCO, RHP, RWP, BH, BW)
    else:  # one tile, no loop: in one, the weight blocks' pointers were hoisted and lived across it
        _conv_tile(up_ptr, low_ptr, wg_ptr, wp1_ptr, wp2_ptr, out_ptr, n64, rb0, wb, c, mc, lch, kg, a1, a2, a1b,
                   a1, a1, a1, H, W, HO, WO, G, CIG, USQ, LSQ, P, PAD, OHT, OWT,
                   su_n, su_c, su_h, su_w, sl_n, sl_c, sl_h, sl_w, so_n, so_c, so_h, so_w,
                   HAS_P, FP64, TF32, K, STRIDE, False, GP, CIGP, TPD, NCH, BCO, RHP, RWP, BH, BW)


# ----------------------------------------------------------------------------------------
# backward kernels: the squeeze and the SRU, s and ds rebuilt in registers
# ----------------------------------------------------------------------------------------
@triton.jit
def _sq_out_grads(du_ptr, dl_ptr, did_ptr, n64, pix, mp, W, STRIDE, USQ, LSQ,
                  sdu_n, sdu_c, sdu_h, sdu_w, sdl_n, sdl_c, sdl_h, sdl_w, sdi_n, sdi_c, sdi_h, sdi_w,
                  HAS_DL: tl.constexpr, HAS_ID: tl.constexpr, FLAT: tl.constexpr, FP64: tl.constexpr,
                  BU: tl.constexpr, BL: tl.constexpr):
    """(d_up [BU, BP], d_low [BL, BP]) of a pixel tile in d_up's dtype (the squeeze's dot operands):
    d_low = PWC2's input gradient (dl_ptr, when HAS_DL) + the identity branch's gradient
    (did_ptr, (N, LSQ, Ho, Wo), when HAS_ID; else dl_ptr holds it already) at the strided
    positions, summed in the accumulation dtype."""
    ou = tl.arange(0, BU)
    ol = tl.arange(0, BL)
    ml = (ol < LSQ)[:, None]
    duo = pix_off(pix, W, sdu_h, sdu_w, FLAT)[None, :] + n64 * sdu_n
    du = tl.load(du_ptr + duo + ou.to(tl.int64)[:, None] * sdu_c, mask=(ou < USQ)[:, None] & mp[None, :], other=0.0)
    hh = pix // W  # int32: a 64-bit division is a subroutine call on the GPU (pix_off)
    ww = pix % W
    on_grid = mp & (hh % STRIDE == 0) & (ww % STRIDE == 0)
    dl = acc(tl.zeros([BL, pix.shape[0]], tl.float32), FP64)
    if HAS_ID:
        dio = ((hh // STRIDE).to(tl.int64) * sdi_h + (ww // STRIDE).to(tl.int64) * sdi_w)[None, :] + n64 * sdi_n
        dl += acc(tl.load(did_ptr + dio + ol.to(tl.int64)[:, None] * sdi_c, mask=ml & on_grid[None, :], other=0.0),
                  FP64)
    if HAS_DL:
        dlo = pix_off(pix, W, sdl_h, sdl_w, FLAT)[None, :] + n64 * sdl_n
        dl += acc(tl.load(dl_ptr + dlo + ol.to(tl.int64)[:, None] * sdl_c, mask=ml & mp[None, :], other=0.0), FP64)
    return du, dl.to(du.dtype)


@triton.jit
def _sq_wt(w_ptr, ch, mch, o, mo, LD):
    """[BK, BO] transposed squeeze-weight block: w[o, ch] (w_ptr (BO rows, LD columns)), 0 off mch."""
    return tl.load(w_ptr + ch[:, None] + o[None, :] * LD, mask=mch[:, None] & mo[None, :], other=0.0)


@triton.jit
def _sq_ds(w1_ptr, w2_ptr, du, dl, c, cp, mc, U, L, USQ, LSQ, zero, EVEN: tl.constexpr, TF32: tl.constexpr):
    """(ds_c, ds_cp) [BK, BP] of the channel pairs (c, cp = c + HALF): the squeezes' input gradient
    Wsq^T [d_up; d_low] (channel ch < U is up's column ch, else low's column ch - U)."""
    ou = tl.arange(0, du.shape[0])
    ol = tl.arange(0, dl.shape[0])
    mu_ = ou < USQ
    ml_ = ol < LSQ
    if EVEN:  # c < U <= cp
        dsa = _mma(_sq_wt(w1_ptr, c, mc, ou, mu_, U), du, zero, TF32)
        dsb = _mma(_sq_wt(w2_ptr, c, mc, ol, ml_, L), dl, zero, TF32)
    else:
        dsa = _mma(_sq_wt(w1_ptr, c, mc & (c < U), ou, mu_, U), du, zero, TF32)
        dsa = _mma(_sq_wt(w2_ptr, c - U, mc & (c >= U), ol, ml_, L), dl, dsa, TF32)
        dsb = _mma(_sq_wt(w1_ptr, cp, mc & (cp < U), ou, mu_, U), du, zero, TF32)
        dsb = _mma(_sq_wt(w2_ptr, cp - U, mc & (cp >= U), ol, ml_, L), dl, dsb, TF32)
    return dsa, dsb


@triton.jit
def _sq_wgrad_store(row_ptr, g, o, mo, ch, mch, LD):
    """Store a [BO, BK] block of a squeeze weight's per-tile gradient at row_ptr[o * LD + ch]."""
    tl.store(row_ptr + o[:, None] * LD + ch[None, :], g, mask=mo[:, None] & mch[None, :])


@triton.jit
def _s2_sq_bwd_kernel(
    x_ptr, mean_ptr, rstd_ptr, gw_ptr, gb_ptr, w1_ptr, w2_ptr, du_ptr, dl_ptr, did_ptr, p_ptr, q_ptr, dw_ptr,
    C, HALF, U, USQ, LSQ, W, HW, G, CG, STRIDE,
    sx_n, sx_c, sx_h, sx_w,
    sdu_n, sdu_c, sdu_h, sdu_w,
    sdl_n, sdl_c, sdl_h, sdl_w,
    sdi_n, sdi_c, sdi_h, sdi_w,
    tau_hi, tau_lo, N_PB,
    MASK: tl.constexpr, ON: tl.constexpr, SOFTMAX: tl.constexpr, GN_GRAD: tl.constexpr, HAS_DL: tl.constexpr,
    HAS_ID: tl.constexpr,
    FLAT: tl.constexpr, FP64: tl.constexpr, EVEN: tl.constexpr, TF32: tl.constexpr,
    BU: tl.constexpr, BL: tl.constexpr, BK: tl.constexpr, BP: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """Squeeze + SRU backward, pass 1, for BP pixels of sample n: s rebuilt from x (_pair_gate),
    ds = Wsq^T [d_up; d_low] in registers (_sq_ds), never stored.

    Writes per pixel tile (row pid = n N_PB + tile): the squeeze weights' gradient
    dw_ptr (N N_PB, USQ U + LSQ (C - U)) = [d_up s[:U]^T, d_low s[U:]^T] (s in x's dtype, as the
    forward's squeeze saw it) and, when GN_GRAD, the SRU's P = sum dz and Q = sum dz xhat into
    p_ptr / q_ptr (N N_PB, C) (kernels/sru.py's _sru_bwd_reduce_kernel layout, SPLIT = N_PB).
    du_ptr (N, USQ, H, W), dl_ptr (N, LSQ, H, W) (read when HAS_DL), did_ptr (N, LSQ, Ho, Wo): the
    squeezed tensors' gradients (_sq_out_grads). Other arguments as _s2_squeeze_kernel's.
    Grid (N * N_PB,).
    """
    pid = tl.program_id(0)
    n, n64, cb, pix, mp, xo, wn, tau = _sq_tile(pid, C, HALF, W, HW, N_PB, gw_ptr, gw_ptr, tau_hi, tau_lo,
                                                sx_n, sx_h, sx_w, False, SOFTMAX, FLAT, FP64, BK, BP, BLOCK_W)
    xdt = x_ptr.dtype.element_ty
    L = C - U
    du, dl = _sq_out_grads(du_ptr, dl_ptr, did_ptr, n64, pix, mp, W, STRIDE, USQ, LSQ,
                           sdu_n, sdu_c, sdu_h, sdu_w, sdl_n, sdl_c, sdl_h, sdl_w, sdi_n, sdi_c, sdi_h, sdi_w,
                           HAS_DL, HAS_ID, FLAT, FP64, BU, BL)
    ou = tl.arange(0, BU)
    ol = tl.arange(0, BL)
    mu_ = ou < USQ
    ml_ = ol < LSQ
    zero = acc(tl.zeros([BK, BP], tl.float32), FP64)
    zu = acc(tl.zeros([BU, BK], tl.float32), FP64)
    zl = acc(tl.zeros([BL, BK], tl.float32), FP64)
    row = dw_ptr + pid.to(tl.int64) * (USQ * U + LSQ * L)
    row2 = row + USQ * U
    for k0 in range(0, HALF, BK):
        c = k0 + cb
        cp = c + HALF
        mc = c < HALF
        m = mc[:, None] & mp[None, :]
        xa, xb = _pair_x(x_ptr, xo, sx_c, c, cp, m, FP64)
        sa, sb, xha, ra, wga, xhb, rb, wgb = _pair_gate(
            xa, xb, n, c, cp, mc, mean_ptr, rstd_ptr, gw_ptr, gb_ptr, G, CG, wn, tau, MASK, ON, SOFTMAX, FP64)
        sa = tl.trans(sa.to(xdt))
        sb = tl.trans(sb.to(xdt))
        if EVEN:
            _sq_wgrad_store(row, _mma(du, sa, zu, TF32), ou, mu_, c, mc, U)
            _sq_wgrad_store(row2, _mma(dl, sb, zl, TF32), ol, ml_, c, mc, L)
        else:
            _sq_wgrad_store(row, _mma(du, sa, zu, TF32), ou, mu_, c, mc & (c < U), U)
            _sq_wgrad_store(row2, _mma(dl, sa, zl, TF32), ol, ml_, c - U, mc & (c >= U), L)
            _sq_wgrad_store(row, _mma(du, sb, zu, TF32), ou, mu_, cp, mc & (cp < U), U)
            _sq_wgrad_store(row2, _mma(dl, sb, zl, TF32), ol, ml_, cp - U, mc & (cp >= U), L)
        if GN_GRAD:
            dsa, dsb = _sq_ds(w1_ptr, w2_ptr, du, dl, c, cp, mc, U, L, USQ, LSQ, zero, EVEN, TF32)
            dza = _grad_z(xa, ra, wga, dsa, dsb, tau, MASK, ON)
            dzb = _grad_z(xb, rb, wgb, dsb, dsa, tau, MASK, ON)
            prow = pid.to(tl.int64) * C
            tl.store(p_ptr + prow + c, tl.sum(dza, axis=1), mask=mc)
            tl.store(q_ptr + prow + c, tl.sum(dza * xha, axis=1), mask=mc)
            tl.store(p_ptr + prow + cp, tl.sum(dzb, axis=1), mask=mc)
            tl.store(q_ptr + prow + cp, tl.sum(dzb * xhb, axis=1), mask=mc)


@triton.jit
def _s2_sq_dx_kernel(
    x_ptr, mean_ptr, rstd_ptr, gw_ptr, gb_ptr, wsum_ptr, a_ptr, bsum_ptr, w1_ptr, w2_ptr, du_ptr, dl_ptr,
    did_ptr, dx_ptr,
    C, HALF, U, USQ, LSQ, W, HW, G, CG, M, eps_hi, eps_lo, STRIDE,
    sx_n, sx_c, sx_h, sx_w,
    sdu_n, sdu_c, sdu_h, sdu_w,
    sdl_n, sdl_c, sdl_h, sdl_w,
    sdi_n, sdi_c, sdi_h, sdi_w,
    sg_n, sg_c, sg_h, sg_w,
    tau_hi, tau_lo, N_PB,
    MASK: tl.constexpr, ON: tl.constexpr, SOFTMAX: tl.constexpr, TORCH_GN: tl.constexpr,
    HAS_WSUM: tl.constexpr, HAS_DL: tl.constexpr, HAS_ID: tl.constexpr,
    FLAT: tl.constexpr, FP64: tl.constexpr, EVEN: tl.constexpr, TF32: tl.constexpr,
    BU: tl.constexpr, BL: tl.constexpr, BK: tl.constexpr, BP: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """Squeeze + SRU backward, pass 2: dx of BP pixels of sample n (program pid = n N_PB + tile),
    ds rebuilt as in pass 1 and the SRU's dx through kernels/sru.py's _pair_dx (a_ptr, bsum_ptr:
    the group sums of _sru_bwd_reduce_kernel; wsum_ptr its (denom, shift), read when HAS_WSUM).
    dx_ptr: (N, C, H, W), strides sg_*. Grid (N * N_PB,).
    """
    pid = tl.program_id(0)
    n, n64, cb, pix, mp, xo, wn, tau = _sq_tile(pid, C, HALF, W, HW, N_PB, gw_ptr, wsum_ptr, tau_hi, tau_lo,
                                                sx_n, sx_h, sx_w, HAS_WSUM, SOFTMAX, FLAT, FP64, BK, BP, BLOCK_W)
    go = pix_off(pix, W, sg_h, sg_w, FLAT)[None, :] + n64 * sg_n
    gdt = dx_ptr.dtype.element_ty
    du, dl = _sq_out_grads(du_ptr, dl_ptr, did_ptr, n64, pix, mp, W, STRIDE, USQ, LSQ,
                           sdu_n, sdu_c, sdu_h, sdu_w, sdl_n, sdl_c, sdl_h, sdl_w, sdi_n, sdi_c, sdi_h, sdi_w,
                           HAS_DL, HAS_ID, FLAT, FP64, BU, BL)
    zero = acc(tl.zeros([BK, BP], tl.float32), FP64)
    for k0 in range(0, HALF, BK):
        c = k0 + cb
        cp = c + HALF
        mc = c < HALF
        m = mc[:, None] & mp[None, :]
        xa, xb = _pair_x(x_ptr, xo, sx_c, c, cp, m, FP64)
        dsa, dsb = _sq_ds(w1_ptr, w2_ptr, du, dl, c, cp, mc, U, C - U, USQ, LSQ, zero, EVEN, TF32)
        dxa, dxb = _pair_dx(xa, xb, dsa, dsb, n, c, cp, mc, mean_ptr, rstd_ptr, gw_ptr, gb_ptr, a_ptr, bsum_ptr,
                            G, CG, wn, tau, M, eps_hi, eps_lo, MASK, ON, SOFTMAX, TORCH_GN, FP64)
        tl.store(dx_ptr + go + c.to(tl.int64)[:, None] * sg_c, dxa.to(gdt), mask=m)
        tl.store(dx_ptr + go + cp.to(tl.int64)[:, None] * sg_c, dxb.to(gdt), mask=m)


@triton.jit
def _s2_sq_wsum_kernel(dwp_ptr, dw1_ptr, dw2_ptr, ROWS, RW, N1, FP64: tl.constexpr, BR: tl.constexpr,
                       BCOL: tl.constexpr):
    """The squeeze weights' gradients from pass 1's per-tile rows dwp_ptr (ROWS, RW), summed in a
    fixed order: columns [0, N1) into dw1_ptr (USQ U), the rest into dw2_ptr (LSQ (C - U)), in
    their dtype. A launch of its own: a reduction over the batch (its grid does not scale with
    it, so benchmarks/meter.py interprets it rather than inferring it per sample).
    Grid (cdiv(RW, BCOL),)."""
    col = tl.program_id(0) * BCOL + tl.arange(0, BCOL)
    mcol = col < RW
    rr = tl.arange(0, BR)
    tot = acc(tl.zeros([BR, BCOL], tl.float32), FP64)
    for r0 in range(0, ROWS, BR):
        r = r0 + rr
        tot += tl.load(dwp_ptr + r.to(tl.int64)[:, None] * RW + col[None, :], mask=(r < ROWS)[:, None] & mcol[None, :],
                       other=0.0)
    tot = tl.sum(tot, axis=0).to(dw1_ptr.dtype.element_ty)
    tl.store(dw1_ptr + col, tot, mask=mcol & (col < N1))
    tl.store(dw2_ptr + (col - N1), tot, mask=mcol & (col >= N1))


# ----------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------
_MAX_SQ = 256  # squeezed channels a squeeze program holds in registers (both accumulators)
# Register caps of one 8-warp program, in elements (fp32; fp64 counts twice): the largest that
# the AOT check (tests/test_aot.py) compiles without spills. Squeeze: per thread (of up to 8 warps).
_SQ_PER_THREAD = 128
_SQB_PER_THREAD = 96  # the squeeze backward's (live tiles x pixels): 128 spilled on sm_90 (AOT)
# Conv: its output tile (the accumulator), its up tile, a K block's operand, the weights it holds.
_OUT_TILE = 8192
_UP_TILE = 4096
_OPERAND = 8192  # half that from 4 groups up (spills at k = 5, 4 groups)
_HELD = 10240
# ... and all of them live at once, with PWC2's [BR, BL] weights (held, or loaded for the one
# tile): each cap alone let a tile that sits at several caps at once spill (k = 5 held, 8 B on
# sm_90), and IEEE fp32 dots (FMA, not MMA: their operands are replicated across the threads of
# a row) spilled 300 B at the TF32 tile of 64@56.
_LIVE = 25600
_LIVE_IEEE = 16384
# Left to itself ptxas capped the conv program of a one-tile plan (k = 5, 4 groups) at 128
# registers and put 16 B on the stack (sm_80, the AOT check); the held tiles take 230-255
# registers anyway, so the conv launch allows 255. (Not the squeeze: there 255 let ptxas grow
# tiles that fit in 128 into stack frames.)
_CONV_MAXNREG = 255


def _d(v: int) -> int:
    """A tl.dot dimension: a power of two, at least 16 (the GPU's smallest MMA tile)."""
    return max(16, np2(v))


@functools.lru_cache(maxsize=256)
def _squeeze_tiles(usq: int, lsq: int, hw: int, esize: int, live: int = 6, per_thread: int | None = None):
    """(BU, BL, BK, BP, num_warps) of _s2_squeeze_kernel: the most pixels a program can hold.

    Every program reads all the squeeze weights, so the more pixels it takes, the less weight
    traffic: the accumulators [BU + BL, BP], the SRU prologue's [BK, BP] tiles (about six live)
    (``live``) and a weight block must fit _SQ_PER_THREAD registers a thread of at most 8 warps (16 warps
    cap a thread at 128 registers: spills on sm_80); fp64 counts twice, 16-bit inputs 2x for
    their conversions.
    A program takes one pixel tile, not several in a loop with its weights held: at the batches
    that re-read the weights most for their size (DenseNet's 128 -> 32 at 28 x 28, N = 2: 14
    programs, 0.28 S of the 1.33 S the squeeze reads) the grid is already below an H100's 132
    SMs, so fewer programs would lengthen the kernel by as many tiles as each took, to save
    re-reads that L2 serves (16 KiB per program against its 64 KiB of x, at any batch)."""
    bu, bl, bk = _d(usq), _d(lsq), 16
    scale = {8: 2.0, 4: 1.0}.get(esize, 2.0)
    for bp in (1024, 512, 256, 128, 64, 32, 16):
        if bp > max(16, np2(hw)):
            continue
        need = ((bu + bl) * bp + live * bk * bp + (bu + bl) * bk) * scale
        cap = _SQ_PER_THREAD if per_thread is None else per_thread
        warps = next((wp for wp in (4, 8) if need <= cap * 32 * wp), None)
        if warps is not None:
            return bu, bl, bk, bp, warps
    return bu, bl, bk, 16, 8


def _pow2_floor(v: int) -> int:
    return 1 << (max(int(v), 1).bit_length() - 1)


def _lanes(span: int, k: int, st: int, out: int) -> tuple:
    """Output lanes (a power of two) along one axis of a conv tile whose up tile spans ``span``
    input rows (columns): as many as its up tile feeds, and, when fewer cover the outputs it
    owns (a small image: 7 x 7 in a 16-wide tile), that many too: lanes past them are dots on
    padding (_tap clamps their reads to the tile's edge, they are never stored)."""
    full = _pow2_floor(span // st)
    return tuple(sorted({full, min(full, np2(min((span - k) // st + 1, out)))}))


def _span(blocks: int, step: int, size: int, pad: int, limit: int) -> int:
    """Input rows (columns) the row (column) tiles load: sum over tiles of [b step - pad, + size)
    inside [0, limit)."""
    return sum(max(0, min(b * step - pad + size, limit) - max(b * step - pad, 0)) for b in range(blocks))


@functools.lru_cache(maxsize=1024)
def conv_plan(n: int, h: int, w: int, k: int, st: int, g: int, cig: int, cog: int, usq: int, lsq: int,
              p: int, fp64: bool, ieee: bool = False):
    """Tiles of _s2_conv_kernel for this shape: a dict of its constexprs and grid parameters
    (OHT, OWT, N_RB, N_WB, N_ST, RPP, N_CB) and num_warps; None if none fits (stage 1 runs then).

    Register caps (8 warps; fp64 counts 2.5x), set from the AOT check's registers (tests/test_aot.py:
    no spills): output tile BR x BQ <= 8192 elements, up tile <= 4096, a K block's gathered
    operand <= 8192 (4096 from 4 groups up), held weights <= 10240, and all of them with PWC2's
    weights <= 25600 (16384 for fp32 dots without TF32, ieee); the group's input channels in
    chunks of CIGP when its up tile would exceed the cap.
    Among the tiles within them, the one that loads the fewest elements: each output tile's up
    tile (the halo: k - st rows and columns shared with the neighbours), low once, and the
    weights of the program's channels (once per column of row tiles when it holds them, HOLD,
    else per tile). Ties: the less dot work (output rows x lanes, _lanes), then the larger tile."""
    for relax in (1, 4, 16):  # tiny odd configs (k 7, stride 3, 4 groups of 3 channels): looser caps
        plan = _conv_search(n, h, w, k, st, g, cig, cog, usq, lsq, fp64, ieee, relax)
        if plan is not None:
            return plan
    # supports() asks for the TF32 tiles: IEEE takes them where its own cap leaves none
    return conv_plan(n, h, w, k, st, g, cig, cog, usq, lsq, p, fp64) if ieee else None


def _conv_search(n, h, w, k, st, g, cig, cog, usq, lsq, fp64, ieee, relax):
    ho, wo = (h - 1) // st + 1, (w - 1) // st + 1
    kk = k * k
    gp = np2(g)
    bl = _d(lsq)
    wsz = cig * kk + usq + lsq  # weights of one output channel (PWC2 or the identity row)
    scale = (2.5 if fp64 else 1) / relax  # fp64: twice the registers, and more for its dot's layouts
    best = None
    # CIGP: input channels of a group per chunk; PWC1's K (GP * CIGP) and TPD * CIGP are dot dims
    for cigp, bco in itertools.product(sorted({max(np2(cig), cdiv(16, gp), 8), 64, 32, 16, 8}), (16, 32, 64)):
        if cigp > max(np2(cig), cdiv(16, gp), 8) or gp * cigp < 16:
            continue
        tpd = 2 if cigp < 16 else 1  # taps per GWC K block: at least 16 reduction lanes
        nch = np2(cdiv(kk, tpd))
        if bco > max(16, np2(cog)):
            continue
        br = gp * bco
        n_cb = cdiv(cog, bco)
        for rwp, rhp in itertools.product(*(2 * ((4, 8, 16, 32, 64, 128),))):
            for bw, bh in itertools.product(_lanes(rwp, k, st, wo), _lanes(rhp, k, st, ho)):
                owt = min(bw, (rwp - k) // st + 1)  # the output columns (rows) the tile owns
                oht = min(bh, (rhp - k) // st + 1)
                if owt < 1 or oht < 1:
                    continue
                bq = bh * bw
                if bq < 16 or br * bq * scale > _OUT_TILE or gp * cigp * rhp * rwp * scale > _UP_TILE:
                    continue
                if gp * tpd * cigp * bq * scale > (_OPERAND if gp <= 2 else _OPERAND // 2):  # a K block's operand
                    continue
                n_rb, n_wb = cdiv(ho, oht), cdiv(wo, owt)
                # per sample: up rows x columns the tiles load (the halo inside the image), low once
                act = usq * _span(n_rb, oht * st, rhp, k // 2, h) * _span(n_wb, owt * st, rwp, k // 2, w) + lsq * ho * wo
                for hold in (True, False):
                    held = br * (nch * tpd * cigp + gp * cigp + bl)
                    if hold and (cigp < cig or held * scale > _HELD):
                        continue
                    live = br * bq + gp * cigp * rhp * rwp + gp * tpd * cigp * bq + (held if hold else br * bl)
                    if live * scale > (_LIVE_IEEE if ieee else _LIVE):
                        continue
                    wl = min(br, g * cog) * wsz
                    loads = n * n_cb * act + n * n_wb * n_cb * wl * (1 if hold else n_rb)
                    key = (loads, n_cb * br * n_rb * n_wb * bq, -bq)  # then the dots' rows x lanes
                    if best is None or key < best[0]:
                        rpp = n_rb if hold else 1
                        best = (key, dict(HOLD=hold, GP=gp, CIGP=cigp, TPD=tpd, NCH=nch, BCO=bco, RHP=rhp, RWP=rwp,
                                          BH=bh, BW=bw, BL=bl, OHT=oht, OWT=owt, N_RB=n_rb, N_WB=n_wb, N_ST=cdiv(n_rb, rpp),
                                          RPP=rpp, N_CB=n_cb, num_warps=8))
    return None if best is None else best[1]


# tests/test_aot.py captures launches on a CPU: there supports() must decide as for a CUDA tensor
AS_GPU = False


def supports(shape, x_shape, dtype: torch.dtype, device=None) -> bool:
    """Whether stage 2 runs this CRU shape on an (N, C, H, W) input of this dtype and device
    (else stage 1). fp64 runs in the interpreter only: on a GPU the fp64 variant of
    _s2_means_kernel has stack spills in every tile tried (the AOT check), so stage 1 runs it."""
    if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        return False
    if dtype == torch.float64 and (AS_GPU or (device is not None and torch.device(device).type == "cuda")):
        return False
    n, _, h, w = x_shape
    if n == 0 or max(shape.up_sq, shape.low_sq) > _MAX_SQ:
        return False
    g = shape.group_size
    return conv_plan(n, h, w, shape.kernel_size, shape.stride, g, shape.up_sq // g, shape.out_channels // g,
                     shape.up_sq, shape.low_sq, shape.pwc2_out, dtype == torch.float64) is not None


def _c(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.contiguous()


def _squeeze(x, mean, rstd, wsum, gn_w, gn_b, w_sq1, w_sq2, k, stride, tau, mode, tf32):
    """(up, low, part, N_PB): _s2_squeeze_kernel's launch; part holds the pooled means' per-tile
    sums for a k x k GWC of this stride."""
    N, C, H, W = x.shape
    usq, u = w_sq1.shape[:2]
    lsq = w_sq2.shape[0]
    hw, half = H * W, C // 2
    ho, wo = (H - 1) // stride + 1, (W - 1) // stride + 1
    kw = dict(device=x.device, dtype=x.dtype, memory_format=memory_format(channels_fastest(x)))
    up = torch.empty((N, usq, H, W), **kw)
    low = torch.empty((N, lsq, H, W), **kw)
    w1 = _c(w_sq1).view(usq, u)
    w2 = _c(w_sq2).view(lsq, C - u)
    adt = acc_dtype(x.dtype)
    fp64 = adt == torch.float64
    bu, bl, bk, bp, warps = _squeeze_tiles(usq, lsq, hw, x.element_size())
    n_pb = cdiv(hw, bp)
    r = usq * k * k + lsq
    part = torch.empty((N * n_pb, r), device=x.device, dtype=adt)
    (sx, su, sl), flat = pixel_layout([x, up, low])
    th, tlo = split_float(tau)
    _s2_squeeze_kernel[(N * n_pb,)](
        x, mean, rstd, gn_w, gn_b, wsum, w1, w2, up, low, part,
        C, half, u, usq, lsq, W, hw, mean.shape[-1], C // mean.shape[-1], k // 2, stride, ho, wo,
        *sx, *su, *sl, th, tlo, n_pb,
        **_switches(mode), FLAT=flat, FP64=fp64, EVEN=u == half, TF32=bool(tf32), K=k,
        BU=bu, BL=bl, BK=bk, BP=bp, BLOCK_W=_block_w(C), num_warps=warps,
    )
    return up, low, part, n_pb



@launcher
def stage2_forward(x, mean, rstd, wsum, gn_w, gn_b, w_sq1, w_sq2, w_gwc, b_gwc, w_pwc1, w_pwc2,
                   tau: float, mode: int, stride: int, groups: int, pairwise: bool, tf32: bool):
    """Stage-2 forward from x and the SRU statistics (``sru_stats(..., weight=gn_w, mode=mode)``).

    ``mode``: the SRU's switches (``SRUMath.code``). Returns (out, up, low, A): out
    (N, Cout, Ho, Wo) in x's dtype and memory format, up / low (N, USQ | LSQ, H, W) likewise, A
    (N, 2 Cout) the softmax coefficients in the accumulation dtype. Three launches.
    """
    N, C, H, W = x.shape
    usq, u = w_sq1.shape[:2]
    lsq = w_sq2.shape[0]
    cout, cig, k, _ = w_gwc.shape
    p = w_pwc2.shape[0]
    pad = k // 2
    ho, wo = (H - 1) // stride + 1, (W - 1) // stride + 1
    hw, half = H * W, C // 2
    fp64 = x.dtype == torch.float64
    adt = acc_dtype(x.dtype)
    out = torch.empty((N, cout, ho, wo), device=x.device, dtype=x.dtype,
                      memory_format=memory_format(channels_fastest(x)))
    wg, wp1, wp2 = _c(w_gwc), _c(w_pwc1), _c(w_pwc2)
    wp2 = wp2 if p else wg  # a valid pointer; HAS_P = False never reads it

    up, low, part, n_pb = _squeeze(x, mean, rstd, wsum, gn_w, gn_b, w_sq1, w_sq2, k, stride, tau, mode, tf32)

    cog = cout // groups
    m = torch.empty((N, 2 * cout), device=x.device, dtype=adt)
    a = torch.empty((N, 2 * cout), device=x.device, dtype=adt)
    bco_m = 16 if fp64 else 32  # [BN, BCO, BJ = 16] products in registers
    n_cb_m = cdiv(cog, bco_m)
    _s2_means_kernel[(groups * n_cb_m,)](
        part, m, wg, b_gwc, wp1, wp2, N, usq, lsq, cout, cog, cig, p, n_pb, n_cb_m, 1.0 / (ho * wo),
        HAS_P=p > 0, FP64=fp64, K=k, BN=8 if fp64 else 16, BCO=bco_m, BJ=8 if fp64 else 16, num_warps=8,  # else stack spills (AOT)
    )

    plan = dict(conv_plan(N, H, W, k, stride, groups, cig, cog, usq, lsq, p, fp64,
                          x.dtype == torch.float32 and not tf32))
    grid = [plan.pop(key) for key in ("OHT", "OWT", "N_RB", "N_WB", "N_ST", "RPP", "N_CB")]
    n_wb, n_st, n_cb = grid[3], grid[4], grid[6]
    assert plan["HOLD"] or grid[5] == 1, "a program that streams its weights computes one tile"
    _s2_conv_kernel[(N * n_st * n_wb, n_cb)](
        up, low, m, wg, b_gwc, wp1, wp2, out, a,
        H, W, ho, wo, groups, cig, usq, lsq, cout, cog, p, pad, *grid[:6],
        *up.stride(), *low.stride(), *strides4(out),
        HAS_P=p > 0, PAIRWISE=bool(pairwise), FP64=fp64, TF32=bool(tf32), K=k, STRIDE=stride,
        BLOCK_M=min(np2(2 * cout), 1024), maxnreg=_CONV_MAXNREG, **plan,
    )
    return out, up, low, a


@launcher
def stage2_squeeze(x, mean, rstd, wsum, gn_w, gn_b, w_sq1, w_sq2, tau: float, mode: int, tf32: bool):
    """up, low (N, USQ | LSQ, H, W) of the stage-2 squeeze alone (the backward of
    ``recompute=True`` rebuilds them from x and the statistics). One launch."""
    return _squeeze(x, mean, rstd, wsum, gn_w, gn_b, w_sq1, w_sq2, 1, 1, tau, mode, tf32)[:2]


def _bwd_tiles(usq: int, lsq: int, hw: int, esize: int):
    """Tiles of the squeeze backward: the forward's rule (_squeeze_tiles) with about twice the
    live [BK, BP] tiles (x, xhat, r, ds, dz of both channels of a pair)."""
    return _squeeze_tiles(usq, lsq, hw, esize, live=12, per_thread=_SQB_PER_THREAD)


@functools.lru_cache(maxsize=1024)
def squeeze_backward_pays(n: int, c: int, h: int, w: int, usq: int, u: int, lsq: int, esize: int) -> bool:
    """Whether stage2_squeeze_backward moves fewer bytes than stage 1's squeeze + SRU backward.

    Stage 1 writes s, reads it twice (the squeeze weights' gradient, the convolution backward),
    writes ds and reads it twice (the SRU's two passes): 6 x-sized tensors beside what both read.
    The fused passes instead write and read the squeeze weights' gradient once per pixel tile
    (accumulation dtype) and read the weights once per tile and pass: weight-sized traffic per
    tile, which at small images with many channels (512 channels at 7 x 7) outweighs s and ds."""
    bp = _bwd_tiles(usq, lsq, h * w, esize)[3]
    tiles = n * cdiv(h * w, bp)
    rw = usq * u + lsq * (c - u)
    return tiles * rw * (2 * 4 + 2 * esize) < 6 * n * c * h * w * esize


@launcher
def stage2_squeeze_backward(x, mean, rstd, gn_w, gn_b, w_sq1, w_sq2, d_up, d_low, d_id, tau: float, mode: int,
                            torch_gn: bool, eps: float, stride: int, need_params: bool, need_x: bool, tf32: bool):
    """Gradients of the SRU and the squeezes from the squeezed tensors' gradients, s and ds never stored.

    d_up (N, USQ, H, W); d_low (N, LSQ, H, W), PWC2's input gradient, or an empty tensor when
    PWC2 has no channels; d_id (N, LSQ, Ho, Wo) the identity branch's gradient (strided), or None
    when d_low includes it (stage2_bwd.stage2_dgrad).
    Returns (dx or None, d gamma, d beta (None unless need_params and the mode has a
    GroupNorm gradient), d w_sq1, d w_sq2) in the input's / the weights' dtypes.
    Launches: pass 1 (_s2_sq_bwd_kernel), the SRU's reduce (and finalize for d gamma, d beta)
    when the GroupNorm has a gradient, the squeeze weights' gradient (_s2_sq_wsum_kernel), pass 2
    (_s2_sq_dx_kernel: dx, when needed): 2 to 5.
    """
    N, C, H, W = x.shape
    usq, u = w_sq1.shape[:2]
    lsq = w_sq2.shape[0]
    hw, half, lw = H * W, C // 2, C - u
    G = mean.shape[-1]
    CG = C // G
    adt = acc_dtype(x.dtype)
    fp64 = adt == torch.float64
    sw = _switches(mode)
    gn_grad = SRUMath.from_code(mode).param_grad
    want_params = bool(need_params) and gn_grad
    w1 = _c(w_sq1).view(usq, u)
    w2 = _c(w_sq2).view(lsq, lw)
    has_dl = d_low.numel() > 0
    bu, bl, bk, bp, warps = _bwd_tiles(usq, lsq, hw, x.element_size())
    n_pb = cdiv(hw, bp)
    rows = N * n_pb
    rw = usq * u + lsq * lw
    dwp = torch.empty((rows, rw), device=x.device, dtype=adt)
    p = q = dwp  # placeholders when the GroupNorm has no gradient
    if gn_grad:
        p = torch.empty((rows, C), device=x.device, dtype=adt)
        q = torch.empty((rows, C), device=x.device, dtype=adt)
    dl = d_low if has_dl else d_up  # a valid pointer; HAS_DL = False never reads it
    did = d_id if d_id is not None else d_up  # likewise for HAS_ID = False (d_low holds it)
    dx = torch.empty_like(x) if need_x else None
    (sx, sdu, sdl, sg), flat = pixel_layout([x, d_up, dl, dx if need_x else x])
    sdi = strides4(did)
    th, tlo = split_float(tau)
    common = dict(FLAT=flat, FP64=fp64, EVEN=u == half, TF32=bool(tf32), BU=bu, BL=bl, BK=bk, BP=bp,
                  BLOCK_W=_block_w(C), num_warps=warps)
    _s2_sq_bwd_kernel[(rows,)](
        x, mean, rstd, gn_w, gn_b, w1, w2, d_up, dl, did, p, q, dwp,
        C, half, u, usq, lsq, W, hw, G, CG, stride, *sx, *sdu, *sdl, *sdi, th, tlo, n_pb,
        **sw, GN_GRAD=gn_grad, HAS_DL=has_dl, HAS_ID=d_id is not None, **common,
    )
    dweight = dbias = None
    a = bsum = wsum = mean  # placeholders, unused by the dx of binary masks on x
    if gn_grad and (need_x or want_params):
        a, bsum, wsum, dweight, dbias = sru_reduce(p, q, gn_w, gn_b, N, C, G, n_pb, mode, want_params)
    d_sq1 = torch.empty(w_sq1.shape, device=x.device, dtype=w_sq1.dtype)
    d_sq2 = torch.empty(w_sq2.shape, device=x.device, dtype=w_sq2.dtype)
    bcol = 256
    _s2_sq_wsum_kernel[(cdiv(rw, bcol),)](dwp, d_sq1, d_sq2, rows, rw, usq * u, FP64=fp64, BR=8, BCOL=bcol,
                                          num_warps=4)
    if need_x:
        eh, el = split_float(eps)
        _s2_sq_dx_kernel[(rows,)](
            x, mean, rstd, gn_w, gn_b, wsum, a, bsum, w1, w2, d_up, dl, did, dx,
            C, half, u, usq, lsq, W, hw, G, CG, CG * hw, eh, el, stride,
            *sx, *sdu, *sdl, *sdi, *sg, th, tlo, n_pb,
            **sw, TORCH_GN=bool(torch_gn), HAS_WSUM=gn_grad, HAS_DL=has_dl, HAS_ID=d_id is not None, **common,
        )
    return dx, dweight, dbias, d_sq1, d_sq2
