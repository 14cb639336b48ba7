"""Stage 2's convolution backward: dA, every convolution weight's gradient and the input gradients
without Y1, Y2, dY1 or dY2 in memory.

Notation as in kernels/stage2.py (G groups of CIG input / COG output channels, k x k taps, pad
p, stride st, PWC1 Cout x USQ, PWC2 P x LSQ, output Ho x Wo). With D = dout, the combine's
gradient is dY1 = A1 D + k1 and dY2 = A2 D + k2 (k = dm / (Ho Wo), the pooled means' gradient
spread over the image; ``_softmax_bwd``). Everything needed follows from per-sample products of
D with the convolutions' operands, which one pass over (D, up, low) forms tile by tile:

  G[n, c, ci, tap] = sum_o D[n, c, o] up[n, g(c) CIG + ci, o st + tap - p]   (GWC; zero padded)
  G1[n, c, ci]     = the same at the centre tap, over all USQ channels         (PWC1)
  G2[n, c, cl]     = sum_o D[n, c, o] low[n, cl, o st]                         (PWC2, identity)

  dA1[n, c] = sum_o D Y1 = sum Wg G + sum W1 G1 + b sum_o D[n, c]
  dA2[n, c] = sum W2 G2 (c < P), G2[n, c, c - P] (identity channels)
  dWg[c]    = sum_n A1[n, c] G[n, c] + k1[n, c] T[n]      (T: up's per-sample tap sums)
  dW1, dW2  likewise (T at the centre tap; L: low's sums on the strided grid)
  db[c]     = sum_n A1[n, c] sum_o D[n, c] + Ho Wo k1[n, c]

The products are per-sample weight-sized rows (one per program and sample, reduced in a fixed
order); dA contracts them with the weights (in the pass that forms them, while they are in
registers), the weight gradients weight them by A and add k T.

  _s2_dw_kernel        per (set of output tiles, block of output channels of every group,
                       chunk of each group's input channels, sample): G, G1, G2, sum_o D
                       (gpart), T and L (tpart), its share of dA (dpart). The GWC's tap blocks
                       accumulate in two sets whose sizes are powers of two (k = 3: 4 + 1
                       blocks of two taps, not 8): fewer registers.
  _s2_dsoft_kernel     per sample: T, L and dA summed over the programs, the softmax backward -> k.
  _s2_dw_reduce_kernel per (group, block of its channels, column block): the weight gradients,
                       sum over samples of A x the products + k x the per-sample sum the
                       weight multiplies (the k part of dY1, dY2 is constant over the image).

The input gradients, with dY formed on the fly (A1 dout + k1: the A part scales the held weights,
the k part is a per-tap constant added where the tap's source is an output):

  _s2_dgrad_kernel     per (sample, column block), every row tile: d_up = the merged Y1 weight
                       (GWC block-diagonal + PWC1 at the centre)^T dY1 over the taps, gathered from
                       one dout tile (all Cout channels, the outputs the tile's taps read);
                       d_low = [PWC2; identity one-hot]^T dY2 at the strided positions, 0 elsewhere
                       (so the squeeze backward reads no separate identity gradient).

Reductions have a fixed order (no atomics); offsets are int64.
"""
from __future__ import annotations

import functools
import itertools

import torch
import triton
import triton.language as tl

from ._launch import acc, acc_dtype, cdiv, launcher, memory_format, np2
from .cru import _softmax_bwd, _softmax_dot
from .stage2 import _d, _mma, _pow2_floor, _pwc1_weights, _span, _tap, _tap_block, _tile_lanes, _y2_weights

__all__ = ["dgrad_plan", "dgrad_plan_for", "dw_plan", "dw_plan_for", "stage2_dgrad", "stage2_dw"]


# ----------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------
@triton.jit
def _g_block(gacc, tacc, tile, d3, mq, i, i0, K: tl.constexpr, STRIDE: tl.constexpr, BH: tl.constexpr,
             BW: tl.constexpr, TPD: tl.constexpr, TF32: tl.constexpr, FP64: tl.constexpr):
    """(gacc, tacc) with tap block i (slot i - i0) added: G = dout x the block's operand
    [BR, BKG] (a dot per group over the tile's pixels) and its tap sums T over the tile's
    output lanes mq."""
    GP: tl.constexpr = d3.shape[0]
    BCO: tl.constexpr = d3.shape[1]
    NS: tl.constexpr = gacc.shape[1]
    BKG: tl.constexpr = gacc.shape[2]
    op = _tap_block(tile, i, K, STRIDE, BH, BW, TPD)
    gb = _mma(d3, tl.permute(op, (0, 2, 1)), acc(tl.zeros([GP, BCO, BKG], tl.float32), FP64), TF32)
    sel = (tl.arange(0, NS) == i - i0)[None, :, None]
    gacc += tl.where(sel, tl.reshape(gb, [GP * BCO, BKG])[:, None, :], 0.0)
    ts = tl.sum(tl.where(mq[None, None, :], acc(op, FP64), 0.0), axis=2)  # summed in fp32, not bf16
    tacc += tl.where(sel, ts[:, None, :], 0.0)
    return gacc, tacc


@triton.jit
def _g_cols(i0, c0, CIG, NS: tl.constexpr, BKG: tl.constexpr, K: tl.constexpr, TPD: tl.constexpr):
    """[NS, BKG] columns ci K K + tap (of a gpart row and of a GWC weight row alike) of tap
    blocks i0 + [0, NS) and input channels c0 + [0, CIGP) of a group, and their mask (lanes
    past CIG or K K)."""
    KK: tl.constexpr = K * K
    CIGP: tl.constexpr = BKG // TPD
    kk = tl.arange(0, BKG)
    kc = c0 + kk % CIGP
    kt = (i0 + tl.arange(0, NS))[:, None] * TPD + (kk // CIGP)[None, :]  # taps
    return kc[None, :] * KK + kt, (kc[None, :] < CIG) & (kt < KK)


@triton.jit
def _g_dot(gacc, wg_ptr, c, mc, i0, c0, CIG, K: tl.constexpr, TPD: tl.constexpr):
    """[BR] sum over tap blocks i0 + [0, NS) of the products gacc x the GWC weights they multiply."""
    NS: tl.constexpr = gacc.shape[1]
    BKG: tl.constexpr = gacc.shape[2]
    col, mk = _g_cols(i0, c0, CIG, NS, BKG, K, TPD)
    w = tl.load(wg_ptr + c.to(tl.int64)[:, None, None] * (CIG * K * K) + col[None, :, :],
                mask=mc[:, None, None] & mk[None, :, :], other=0.0)
    return tl.sum(tl.sum(gacc * w.to(gacc.dtype), axis=2), axis=1)


@triton.jit
def _g_store(grow, trow, gacc, tacc, i0, mc, lead, c0, CIG, K: tl.constexpr, TPD: tl.constexpr):
    """Stores the G of tap blocks i0 + [0, NS) of input channels c0 + [0, CIGP) of each group
    into the gpart rows grow (columns ci K K + tap) and, where ``lead`` (per group), their T into
    the tpart row trow (columns (g CIG + ci) K K + tap). Lanes past CIG or K K are not stored."""
    KK: tl.constexpr = K * K
    GP: tl.constexpr = tacc.shape[0]
    NS: tl.constexpr = gacc.shape[1]
    BKG: tl.constexpr = gacc.shape[2]
    col, mk = _g_cols(i0, c0, CIG, NS, BKG, K, TPD)
    tl.store(grow[:, None, None] + col[None, :, :], gacc, mask=mc[:, None, None] & mk[None, :, :])
    gi = tl.arange(0, GP)
    tl.store(trow + gi[:, None, None] * (CIG * KK) + col[None, :, :], tacc, mask=lead[:, None, None] & mk[None, :, :])


@triton.jit
def _s2_dw_kernel(
    do_ptr, up_ptr, low_ptr, wg_ptr, bg_ptr, wp1_ptr, wp2_ptr, gpart_ptr, tpart_ptr, dpart_ptr,
    N, H, W, HO, WO, G, CIG, USQ, LSQ, COUT, COG, P, PAD, OHT, OWT, N_RB, N_T, TPP, N_SP, N_CB, N_CI, RWC, RT,
    sd_n, sd_c, sd_h, sd_w,
    su_n, su_c, su_h, su_w,
    sl_n, sl_c, sl_h, sl_w,
    HAS_P: tl.constexpr, TF32: tl.constexpr, FP64: tl.constexpr, K: tl.constexpr, STRIDE: tl.constexpr,
    GP: tl.constexpr, CIGP: tl.constexpr, TPD: tl.constexpr, NCH: tl.constexpr, NCHB: tl.constexpr,
    BCO: tl.constexpr, RHP: tl.constexpr, RWP: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr,
    BL: tl.constexpr, CARRY: tl.constexpr,
):
    """Per-sample products G, G1, G2 and sum_o D of output tiles [pid TPP, (pid + 1) TPP) (of N_T =
    N_RB N_WB per sample, column by column: tile t is row tile t % N_RB of column t // N_RB) of
    sample n; T and L likewise.

    do_ptr: dout (N, COUT, HO, WO); up / low: (N, USQ | LSQ, H, W). Mirrors _s2_conv_kernel: the
    rows r = g BCO + i are output channels cb BCO + [0, BCO) of every group, the up tile (halo
    included) is loaded once per output tile, each tap's operand is gathered from it. The input
    channels come in chunks: program axis 1 is cb + N_CB cj, and chunk cj takes input channels
    cj CIGP + [0, CIGP) of every group and low channels cj BL + [0, BL) (one chunk where CIGP >=
    CIG: the usual case; wide groups split, each chunk re-reading dout, so that its accumulators
    fit the registers); sum_o D is chunk 0's. Walking down a column, the up tile's rows that the
    previous tile also covered (its halo) are taken from that tile in registers, not loaded again
    (CARRY; without it, a tile is loaded whole: one up tile live instead of two). Writes
      gpart[pid, n, c, :RWC]: [G (CIG K K, (ci, tap)), G1 (USQ), G2 (LSQ), sum_o D]
      tpart[pid, n, :RT]:     [T (USQ K K, (ci, tap)), L (LSQ)]   (channel block 0's programs)
      dpart[pid N_CI + cj, n, :2 COUT]: the chunk's share of dA = the products x the weights
                              they multiply (Y1: GWC, PWC1, bias; Y2: PWC2 or the identity's
                              one-hot), formed here while the products are in registers, so
                              that dA does not read the gpart rows back
    Grid (N_SP * N, N_CB * N_CI), N_SP = cdiv(N_T, TPP): the partials are per sample anyway, so the
    samples are programs of their own (parallelism at no cost in traffic); on axis 0, whose
    limit is 2**31 - 1 (CUDA's axes 1 and 2 stop at 65535).
    """
    KK: tl.constexpr = K * K
    BQ: tl.constexpr = BH * BW
    BR: tl.constexpr = GP * BCO
    BKG: tl.constexpr = TPD * CIGP
    NB: tl.constexpr = (KK + TPD - 1) // TPD
    pid = tl.program_id(0) % N_SP
    cb = tl.program_id(1) % N_CB
    cj = tl.program_id(1) // N_CB
    c0 = cj * CIGP  # the chunk's first input channel of each group
    t0 = pid * TPP
    t1 = tl.minimum(t0 + TPP, N_T)
    r = tl.arange(0, BR)
    rg = r // BCO
    co = cb * BCO + r % BCO
    c = rg * COG + co
    c64 = c.to(tl.int64)
    mc = (rg < G) & (co < COG)
    lch = cj * BL + tl.arange(0, BL)
    kg = tl.arange(0, GP * CIGP)
    kgc = (kg // CIGP) * CIG + c0 + kg % CIGP  # PWC1's column of lane kg: up channel (g, ci)
    mkg = (kg // CIGP < G) & (c0 + kg % CIGP < CIG)
    qh, qw, gi, ci, tr, tc = _tile_lanes(GP, CIGP, RHP, RWP, BH, BW)
    ci = c0 + ci
    ch = (gi[:, None] * CIG + ci[None, :]).to(tl.int64)
    mch = (gi < G)[:, None] & (ci < CIG)[None, :]
    n64 = (tl.program_id(0) // N_SP).to(tl.int64)  # one sample per program: its rows of the partials
    # G and T of tap blocks [0, NCH) and [NCH, NB) (NCHB slots): two powers of two, not one
    # (k = 3: 4 + 1 blocks of two taps, 8 + 1 of one, instead of 8 and 16)
    gacc = acc(tl.zeros([BR, NCH, BKG], tl.float32), FP64)
    gaccb = acc(tl.zeros([BR, NCHB, BKG], tl.float32), FP64)
    g1acc = acc(tl.zeros([BR, GP * CIGP], tl.float32), FP64)
    g2acc = acc(tl.zeros([BR, BL], tl.float32), FP64)
    dacc = acc(tl.zeros([BR], tl.float32), FP64)
    tacc = acc(tl.zeros([GP, NCH, BKG], tl.float32), FP64)
    taccb = acc(tl.zeros([GP, NCHB, BKG], tl.float32), FP64)
    lacc = acc(tl.zeros([BL], tl.float32), FP64)
    tile = tl.zeros([GP, CIGP, RHP, RWP], up_ptr.dtype.element_ty)
    sh = OHT * STRIDE  # rows from one row tile to the next
    for t in range(t0, t1):
        t = t + tl.zeros([], tl.int32)  # a tensor in the interpreter too (the masks below)
        rb = t % N_RB
        wb = t // N_RB
        oh = rb * OHT + qh
        ow = wb * OWT + qw
        mq = (qh < OHT) & (qw < OWT) & (oh < HO) & (ow < WO)
        do = n64 * sd_n + c64[:, None] * sd_c + (oh.to(tl.int64) * sd_h + ow.to(tl.int64) * sd_w)[None, :]
        d = tl.load(do_ptr + do, mask=mc[:, None] & mq[None, :], other=0.0)  # [BR, BQ], 0 off the tile
        dacc += tl.sum(acc(d, FP64), axis=1)
        # Y2's operand: low at the strided positions (PWC2 and the identity channels)
        lo = n64 * sl_n + (oh * STRIDE).to(tl.int64) * sl_h + (ow * STRIDE).to(tl.int64) * sl_w
        lt = tl.load(low_ptr + lo[None, :] + lch.to(tl.int64)[:, None] * sl_c,
                     mask=(lch < LSQ)[:, None] & mq[None, :], other=0.0)
        lacc += tl.sum(acc(lt, FP64), axis=1)
        g2acc = _mma(d, tl.trans(lt), g2acc, TF32)
        # the up tile (halo included): [GP, CIGP, RHP, RWP]; rows the tile above held, from it
        ih = rb * sh - PAD + tr
        iw = wb * (OWT * STRIDE) - PAD + tc
        mrow = (ih >= 0) & (ih < H)
        if CARRY:
            kept = (tr + sh < RHP) & (rb > 0) & (t > t0)
            mrow = mrow & (kept == 0)
        mpix = mrow[:, None] & ((iw >= 0) & (iw < W))[None, :]
        po = n64 * su_n + ih.to(tl.int64)[:, None] * su_h + iw.to(tl.int64)[None, :] * su_w
        new = tl.load(up_ptr + ch[:, :, None, None] * su_c + po[None, None, :, :],
                      mask=mch[:, :, None, None] & mpix[None, None, :, :], other=0.0)
        if CARRY:
            up_ri = tl.broadcast_to(tl.minimum(tr + sh, RHP - 1)[None, None, :, None], [GP, CIGP, RHP, RWP])
            tile = tl.where(kept[None, None, :, None], tl.gather(tile, up_ri, axis=2), new)
        else:
            tile = new
        cen = tl.reshape(_tap(tile, PAD, PAD, STRIDE, BH, BW), [GP * CIGP, BQ])
        g1acc = _mma(d, tl.trans(cen), g1acc, TF32)
        d3 = tl.reshape(d, [GP, BCO, BQ])
        for i in range(0, NCH):
            gacc, tacc = _g_block(gacc, tacc, tile, d3, mq, i, 0, K, STRIDE, BH, BW, TPD, TF32, FP64)
        for i in range(NCH, NB):
            gaccb, taccb = _g_block(gaccb, taccb, tile, d3, mq, i, NCH, K, STRIDE, BH, BW, TPD, TF32, FP64)
    grow = gpart_ptr + ((pid.to(tl.int64) * N + n64) * COUT + c64) * RWC
    trow = tpart_ptr + (pid.to(tl.int64) * N + n64) * RT
    lead = (gi < G) & (gi * 0 + cb == 0)  # T and L by channel block 0's programs (cb may be a constant)
    # dA's share: dA1 = G . Wg + G1 . W1 + b sum_o D, dA2 = G2 . (PWC2 | one-hot); each product
    # stored right after its dot, the largest (G) last, so that the accumulators die one by one
    # and G's weight tile is live beside G alone
    tl.store(trow + USQ * KK + lch, lacc, mask=(lch < LSQ) & (lch * 0 + cb == 0))
    da2 = tl.sum(g2acc * _y2_weights(wp2_ptr, c, mc, lch, dacc * 0 + 1.0, P, LSQ, HAS_P, FP64), axis=1)
    tl.store(grow[:, None] + (CIG * KK + USQ) + lch[None, :], g2acc, mask=mc[:, None] & (lch < LSQ)[None, :])
    da1 = tl.where(c * 0 + cj == 0, dacc * acc(tl.load(bg_ptr + c, mask=mc, other=0.0), FP64), 0.0)
    tl.store(grow + (RWC - 1), dacc, mask=mc & (c * 0 + cj == 0))
    w1 = _pwc1_weights(wp1_ptr, c, mc, kg, c0, G, CIG, USQ, CIGP)
    da1 += tl.sum(g1acc * w1.to(g1acc.dtype), axis=1)
    tl.store(grow[:, None] + CIG * KK + kgc[None, :], g1acc, mask=mc[:, None] & mkg[None, :])
    if NB > NCH:
        da1 += _g_dot(gaccb, wg_ptr, c, mc, NCH, c0, CIG, K, TPD)
        _g_store(grow, trow, gaccb, taccb, NCH, mc, lead, c0, CIG, K, TPD)
    da1 += _g_dot(gacc, wg_ptr, c, mc, 0, c0, CIG, K, TPD)
    _g_store(grow, trow, gacc, tacc, 0, mc, lead, c0, CIG, K, TPD)
    drow = dpart_ptr + ((pid.to(tl.int64) * N_CI + cj) * N + n64) * (2 * COUT)
    tl.store(drow + c, da1, mask=mc)
    tl.store(drow + COUT + c, da2, mask=mc)


@triton.jit
def _gpart_cols(c, j, CIG, USQ, LSQ, K: tl.constexpr):
    """[BC, BJ] views of the columns j of channels c's gpart rows: (j, j - the GWC's CIG K K
    columns (PWC1's index), that minus USQ (PWC2's / the identity's index), whether it is Y2's)."""
    jj = j[None, :] + c[:, None] * 0
    j2 = jj - CIG * K * K
    j3 = j2 - USQ
    return jj, j2, j3, (j3 >= 0) & (j3 < LSQ)


@triton.jit
def _s2_dsoft_kernel(dpart_ptr, tpart_ptr, a_ptr, ts_ptr, da_ptr, k_ptr, N, COUT, RT, N_SP, N_DP, HOWO,
                     PAIRWISE: tl.constexpr, BJ: tl.constexpr, BLOCK_M: tl.constexpr):
    """Per sample n (the program): ts[n] = T, L summed over the N_SP programs and dA[n] = the
    N_DP = N_SP N_CI programs' shares of it summed (fixed orders); k[n] = (k1, k2) of the
    softmax backward (_softmax_bwd). dpart (N_DP, N, 2 COUT), tpart (N_SP, N, RT); a, da, k
    (N, 2 COUT); ts (N, RT). Grid (N,)."""
    n64 = tl.program_id(0).to(tl.int64)
    jt = tl.arange(0, BJ)
    for j0 in range(0, RT, BJ):
        mj = j0 + jt < RT
        s = tl.load(tpart_ptr + n64 * RT + j0 + jt, mask=mj, other=0.0)
        for sp in range(1, N_SP):
            s += tl.load(tpart_ptr + (sp * N + n64) * RT + j0 + jt, mask=mj, other=0.0)
        tl.store(ts_ptr + n64 * RT + j0 + jt, s, mask=mj)
    for j0 in range(0, 2 * COUT, BJ):
        mj = j0 + jt < 2 * COUT
        d = tl.load(dpart_ptr + n64 * (2 * COUT) + j0 + jt, mask=mj, other=0.0)
        for sp in range(1, N_DP):
            d += tl.load(dpart_ptr + (sp * N + n64) * (2 * COUT) + j0 + jt, mask=mj, other=0.0)
        tl.store(da_ptr + n64 * (2 * COUT) + j0 + jt, d, mask=mj)
    tl.debug_barrier()  # the dA just stored (by other threads of this program) are read below
    row_a = a_ptr + n64 * (2 * COUT)
    row_g = da_ptr + n64 * (2 * COUT)
    dot = 0.0
    if not PAIRWISE:
        dot = _softmax_dot(row_a, row_g, COUT, BLOCK_M)
    for c0 in range(0, COUT, BJ):
        c = c0 + jt
        mc = c < COUT
        k1, k2 = _softmax_bwd(tl.load(row_a + c, mask=mc, other=0.0), tl.load(row_a + COUT + c, mask=mc, other=0.0),
                              tl.load(row_g + c, mask=mc, other=0.0), tl.load(row_g + COUT + c, mask=mc, other=0.0),
                              dot, HOWO, PAIRWISE)
        tl.store(k_ptr + n64 * (2 * COUT) + c, k1, mask=mc)
        tl.store(k_ptr + n64 * (2 * COUT) + COUT + c, k2, mask=mc)


@triton.jit
def _s2_dw_reduce_kernel(gpart_ptr, ts_ptr, a_ptr, k_ptr, dwg_ptr, db_ptr, dw1_ptr, dw2_ptr,
                         N, COUT, COG, CIG, USQ, LSQ, P, RWC, RT, N_SP, HOWO,
                         K: tl.constexpr, BC: tl.constexpr, BJ: tl.constexpr):
    """The weight gradients of channels c (block pid 0: group g, its output channels cb BC +
    [0, BC)) and columns j (block pid 1) of the RWC columns of a gpart row: sum over samples of
    A x (the products summed over the programs, in a fixed order) + k x the per-sample sum the
    column's weight multiplies (T at its tap, T at the centre, L; Ho Wo for the bias), written
    into dWg (COUT, CIG, K, K), dW1 (COUT, USQ), dW2 (P, LSQ), db (COUT). A block's rows are of
    one group, so that sum is a [BJ] vector, loaded once per sample. Grid (G N_RB, cdiv(RWC,
    BJ)), N_RB = cdiv(COG, BC)."""
    KK: tl.constexpr = K * K
    N_RB = (COG + BC - 1) // BC
    g = tl.program_id(0) // N_RB
    co = (tl.program_id(0) % N_RB) * BC + tl.arange(0, BC)
    c = g * COG + co
    j = tl.program_id(1) * BJ + tl.arange(0, BJ)
    mc = co < COG
    c64 = c.to(tl.int64)
    sps = (tl.zeros([], tl.int64) + N) * COUT * RWC  # a program's gpart block, int64
    m = mc[:, None] & (j < RWC)[None, :]
    nw = CIG * KK
    jj, j2, j3, y2 = _gpart_cols(c, j, CIG, USQ, LSQ, K)  # Y2's columns: A2 and k2
    jv2 = j - nw
    tcol = tl.where(j < nw, g * nw + j, tl.where(jv2 < USQ, jv2 * KK + KK // 2, USQ * KK + jv2 - USQ))  # [BJ]
    has_t = j < RWC - 1
    tcol = tl.where(has_t, tcol, 0)  # masked lanes inside ts too
    s = tl.zeros([BC, BJ], tl.float32).to(dwg_ptr.dtype.element_ty)
    for n in range(0, N):
        n64 = n + tl.zeros([], tl.int64)  # n is a plain int in the interpreter
        off = (n64 * COUT + c64)[:, None] * RWC + j[None, :]
        gs = tl.load(gpart_ptr + off, mask=m, other=0.0)
        for sp in range(1, N_SP):
            gs += tl.load(gpart_ptr + (sp * sps + off), mask=m, other=0.0)
        ar = a_ptr + n64 * (2 * COUT)
        kr = k_ptr + n64 * (2 * COUT)
        # int64 offsets: a group's masked rows may point past the row (most lanes, at small COG)
        av = tl.where(y2, tl.load(ar + COUT + c64, mask=mc, other=0.0)[:, None],
                      tl.load(ar + c64, mask=mc, other=0.0)[:, None])
        kv = tl.where(y2, tl.load(kr + COUT + c64, mask=mc, other=0.0)[:, None],
                      tl.load(kr + c64, mask=mc, other=0.0)[:, None])
        tv = tl.load(ts_ptr + n64 * RT + tcol, mask=has_t, other=0.0)
        s += av * gs + kv * tl.where(jj == RWC - 1, HOWO, tv[None, :])
    tl.store(dwg_ptr + (c64[:, None] * nw + jj), s, mask=m & (jj < nw))
    tl.store(dw1_ptr + (c64[:, None] * USQ + j2), s, mask=m & (j2 >= 0) & (j2 < USQ))
    tl.store(dw2_ptr + (c64[:, None] * LSQ + j3), s, mask=m & y2 & (c < P)[:, None])
    tl.store(db_ptr + c64[:, None] + jj * 0, s, mask=m & (jj == RWC - 1))


@triton.jit
def _floor_div(v, STRIDE: tl.constexpr):
    """floor(v / STRIDE) for v > -64 STRIDE (Triton's // truncates towards zero)."""
    return (v + STRIDE * 64) // STRIDE - 64


@triton.jit
def _src(i0, lane, n_own, size, d, o0, n_out, PAD, STRIDE: tl.constexpr):
    """(row of dout's tile, valid) for the input lanes i0 + lane and tap offset d: the output o
    with o STRIDE + d - PAD = i; valid where o is an integer in [0, n_out) and the lane is owned
    (lane < n_own) and inside the image (i < size). Invalid lanes read row 0 (then zeroed); the
    valid ones are inside the tile by the plan's choice of its size (dgrad_plan)."""
    i = i0 + lane
    o = _floor_div(i + PAD - d, STRIDE)
    ok = (o * STRIDE == i + PAD - d) & (o >= 0) & (o < n_out) & (lane < n_own) & (i < size)
    return tl.where(ok, o - o0, 0), ok


@triton.jit
def _dg_operand(tile, ri, oki, cj, okj):
    """[BC, BH * BW] dout's tile [BC, ORH, ORW] at rows ri [BH] x columns cj [BW] (two gathers
    along short axes), zero where not (oki x okj); and that mask, flat [BH * BW]."""
    BC: tl.constexpr = tile.shape[0]
    ORH: tl.constexpr = tile.shape[1]
    BH: tl.constexpr = ri.shape[0]
    BW: tl.constexpr = cj.shape[0]
    cols = tl.gather(tile, tl.broadcast_to(cj[None, None, :], [BC, ORH, BW]), axis=2)
    op = tl.gather(cols, tl.broadcast_to(ri[None, :, None], [BC, BH, BW]), axis=1)
    vm = oki[:, None] & okj[None, :]
    op = tl.where(vm[None, :, :], op, 0.0)
    return tl.reshape(op, [BC, BH * BW]), tl.reshape(vm, [BH * BW])


@triton.jit
def _dg_weights(wg_ptr, w1, u, mu, c, mc, a1, k1, t0, CIG, COG, K: tl.constexpr, NS: tl.constexpr,
                FP64: tl.constexpr):
    """Taps t0 + [0, NS) of the merged Y1 weight, transposed: [BU, NS, BC] = GWC (c and u of one
    group) + PWC1 (w1 [BU, BC], the centre tap), A1-scaled (dY1's A1 dout part), in the
    accumulation dtype (a tap's slot is cast to the operands' dtype where it is used); and
    [BU, NS] = sum_c weight x k1 (dY1's constant part). Zero past K K."""
    KK: tl.constexpr = K * K
    tt = t0 + tl.arange(0, NS)
    same = ((u[:, None] // CIG) == (c[None, :] // COG)) & mu[:, None] & mc[None, :]
    off = c.to(tl.int64)[None, None, :] * (CIG * KK) + ((u % CIG)[:, None, None] * KK + tt[None, :, None])
    w = acc(tl.load(wg_ptr + off, mask=same[:, None, :] & (tt < KK)[None, :, None], other=0.0), FP64)
    w += tl.where((tt == KK // 2)[None, :, None], w1[:, None, :], 0.0)
    v = tl.sum(w * k1[None, None, :], axis=2)
    return w * a1[None, None, :], v


@triton.jit
def _dg_tap(du, tile, wset, vset, t, t0, i0, j0, oh0, ow0, lh, lw, IHT, IWT, H, W, HO, WO, PAD,
            K: tl.constexpr, STRIDE: tl.constexpr, TF32: tl.constexpr):
    """du [BU, BQ] + tap t's input gradient: the held weights' slot t - t0 times dout at the tap's
    source outputs, plus its constant part where that source is an output. lh [BH], lw [BW]: the
    lanes' rows and columns."""
    NS: tl.constexpr = wset.shape[1]
    ri, oki = _src(i0, lh, IHT, H, t // K, oh0, HO, PAD, STRIDE)
    cj, okj = _src(j0, lw, IWT, W, t % K, ow0, WO, PAD, STRIDE)
    op, vm = _dg_operand(tile, ri, oki, cj, okj)
    sel = tl.arange(0, NS) == t - t0
    w = tl.sum(tl.where(sel[None, :, None], wset, 0.0), axis=1)
    v = tl.sum(tl.where(sel[None, :], vset, 0.0), axis=1)
    du = _mma(w.to(tile.dtype), op, du, TF32)
    return du + v[:, None] * tl.where(vm, 1.0, 0.0)[None, :]


@triton.jit
def _s2_dgrad_kernel(
    do_ptr, a_ptr, k_ptr, wg_ptr, wp1_ptr, wp2_ptr, du_ptr, dl_ptr,
    H, W, HO, WO, CIG, COG, USQ, LSQ, COUT, P, PAD, IHT, IWT, N_RB, N_WB,
    sd_n, sd_c, sd_h, sd_w,
    su_n, su_c, su_h, su_w,
    sl_n, sl_c, sl_h, sl_w,
    HAS_P: tl.constexpr, FP64: tl.constexpr, TF32: tl.constexpr, K: tl.constexpr, STRIDE: tl.constexpr,
    NCH: tl.constexpr, NCHB: tl.constexpr, BU: tl.constexpr, BL: tl.constexpr, BC: tl.constexpr,
    ORH: tl.constexpr, ORW: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr,
):
    """d_up (N, USQ, H, W) and d_low (N, LSQ, H, W) from dout, A and k, dY1 / dY2 formed on the fly.

    d_up = merged-weight^T (A1 dout + k1) over the taps (GWC block-diagonal + PWC1 at the centre,
    as one [USQ, COUT] matrix a tap); d_low = [PWC2; one-hot identity rows]^T (A2 dout + k2) at
    the strided positions, 0 elsewhere (the identity branch's gradient included). A program:
    sample n, column block wb (input columns wb IWT + [0, IWT)), every row tile (input rows
    rb IHT + [0, IHT)); it holds the A-scaled weights of its sample, and per tile loads dout's
    outputs rows oh0 + [0, ORH) x columns ow0 + [0, ORW) (every output a tap of the tile reads),
    all COUT channels, once; the rows the tile above loaded too come from it, in registers.
    Grid (N * N_WB,).
    """
    KK: tl.constexpr = K * K
    BQ: tl.constexpr = BH * BW
    pid = tl.program_id(0)
    wb = pid % N_WB
    n64 = (pid // N_WB).to(tl.int64)
    c = tl.arange(0, BC)
    mc = c < COUT
    c64 = c.to(tl.int64)
    arow = a_ptr + n64 * (2 * COUT)
    krow = k_ptr + n64 * (2 * COUT)
    a1 = tl.load(arow + c, mask=mc, other=0.0)
    a2 = tl.load(arow + COUT + c, mask=mc, other=0.0)
    k1 = tl.load(krow + c, mask=mc, other=0.0)
    k2 = tl.load(krow + COUT + c, mask=mc, other=0.0)
    u = tl.arange(0, BU)
    mu = u < USQ
    w1 = acc(tl.load(wp1_ptr + c64[None, :] * USQ + u[:, None], mask=mu[:, None] & mc[None, :], other=0.0), FP64)
    # the merged weight's taps in two sets of powers of two (k = 3: 8 + 1 taps, not 16)
    wa, va = _dg_weights(wg_ptr, w1, u, mu, c, mc, a1, k1, 0, CIG, COG, K, NCH, FP64)
    wb2, vb = _dg_weights(wg_ptr, w1, u, mu, c, mc, a1, k1, NCH, CIG, COG, K, NCHB, FP64)
    # Y2's matrix, transposed [BL, BC]: PWC2 (c < P) and the identity's one-hot (c = P + l)
    l = tl.arange(0, BL)
    ml = l < LSQ
    m2 = tl.where(ml[:, None] & mc[None, :] & (c[None, :] - P == l[:, None]), 1.0, 0.0)
    if HAS_P:
        m2 += acc(tl.load(wp2_ptr + c64[None, :] * LSQ + l[:, None], mask=ml[:, None] & (mc & (c < P))[None, :],
                          other=0.0), FP64)
    m2 = acc(m2, FP64)
    v2 = tl.sum(m2 * k2[None, :], axis=1)
    m2 = m2 * a2[None, :]
    q = tl.arange(0, BQ)
    qh = q // BW
    qw = q % BW
    lh = tl.arange(0, BH)
    lw = tl.arange(0, BW)
    tr = tl.arange(0, ORH)
    tc = tl.arange(0, ORW)
    j0 = wb * IWT
    # the outputs the owned columns' taps read: ow0 .. ow_end
    ow0 = _floor_div(j0 - PAD, STRIDE)
    ow_end = _floor_div(j0 + IWT - 1 + PAD, STRIDE)
    ow = ow0 + tc
    iw = j0 + qw
    tile = tl.zeros([BC, ORH, ORW], do_ptr.dtype.element_ty)
    oh0 = _floor_div(-PAD, STRIDE)
    oh_end = oh0 - 1  # the rows the previous tile holds: none
    for rb in range(0, N_RB):
        i0 = rb * IHT
        prev0 = oh0
        prev_end = oh_end
        oh0 = _floor_div(i0 - PAD, STRIDE)
        oh_end = _floor_div(i0 + IHT - 1 + PAD, STRIDE)
        oh = oh0 + tr
        # rows the tile above loaded (its last ones: the halo) are taken from it in registers
        kept = oh <= prev_end
        mo = (((oh >= 0) & (oh < HO) & (oh <= oh_end) & (kept == 0))[:, None]
              & ((ow >= 0) & (ow < WO) & (ow <= ow_end))[None, :])
        do = n64 * sd_n + oh.to(tl.int64)[:, None] * sd_h + ow.to(tl.int64)[None, :] * sd_w
        new = tl.load(do_ptr + c64[:, None, None] * sd_c + do[None, :, :], mask=mc[:, None, None] & mo[None, :, :],
                      other=0.0)
        ri = tl.broadcast_to(tl.minimum(tr + (oh0 - prev0), ORH - 1)[None, :, None], [BC, ORH, ORW])
        tile = tl.where(kept[None, :, None], tl.gather(tile, ri, axis=1), new)
        du = acc(tl.zeros([BU, BQ], tl.float32), FP64)
        for t in range(0, NCH):
            du = _dg_tap(du, tile, wa, va, t, 0, i0, j0, oh0, ow0, lh, lw, IHT, IWT, H, W, HO, WO, PAD, K, STRIDE,
                         TF32)
        for t in range(NCH, KK):
            du = _dg_tap(du, tile, wb2, vb, t, NCH, i0, j0, oh0, ow0, lh, lw, IHT, IWT, H, W, HO, WO, PAD, K,
                         STRIDE, TF32)
        # d_low: Y2's matrix times dout at the centre tap's sources (the strided positions)
        ri, oki = _src(i0, lh, IHT, H, PAD, oh0, HO, PAD, STRIDE)
        cj, okj = _src(j0, lw, IWT, W, PAD, ow0, WO, PAD, STRIDE)
        op, vm = _dg_operand(tile, ri, oki, cj, okj)
        dl = _mma(m2.to(tile.dtype), op, acc(tl.zeros([BL, BQ], tl.float32), FP64), TF32)
        dl += v2[:, None] * tl.where(vm, 1.0, 0.0)[None, :]
        ih = i0 + qh
        mq = (qh < IHT) & (qw < IWT) & (ih < H) & (iw < W)
        pix = n64 * su_n + ih.to(tl.int64) * su_h + iw.to(tl.int64) * su_w
        tl.store(du_ptr + pix[None, :] + u.to(tl.int64)[:, None] * su_c, du.to(du_ptr.dtype.element_ty),
                 mask=mu[:, None] & mq[None, :])
        pix = n64 * sl_n + ih.to(tl.int64) * sl_h + iw.to(tl.int64) * sl_w
        tl.store(dl_ptr + pix[None, :] + l.to(tl.int64)[:, None] * sl_c, dl.to(dl_ptr.dtype.element_ty),
                 mask=ml[:, None] & mq[None, :])


# ----------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------
# Register caps of one 8-warp _s2_dw_kernel program, in elements, the largest the AOT check
# (tests/test_aot.py) compiles without spills: what it holds across a sample's tiles (the
# accumulators), what one tile keeps live, and dout's tile (rows x pixels; half that for fp32
# dots without TF32, on CUDA cores). 2048 rows x pixels spill on sm_80 and sm_90; so do up
# channels in chunks of 32 (held 13888 at 256 channels: those layers take chunks of 16).
_DW_HELD = 12288
_DW_TILE = 12288
_DW_DOUT = 1024
_DW_HELD_IEEE = 8192  # k = 5 without TF32 (9728 held, an 8 x 8 up tile) spilled 24 B on sm_90
_DW_UP_IEEE = 1536  # live up tiles without TF32: 2 x 1024 (4 x 16, 16 channels) spilled 8 B on sm_90
# Programs per (sample, channel block), N_SP: each writes a weight-sized row of products; as
# many as keep their round trip under this share of dout's bytes, at most _DW_MAX_SP (the
# per-sample reduction reads N_SP rows). Independent of the batch (the samples are programs of
# their own: a training batch fills a GPU; batch 1-2 runs few programs), so traffic is linear
# in it (benchmarks/meter.py's per-sample inference relies on that).
_DW_PARTIAL_SHARE = 0.125
_DW_MAX_SP = 32


@functools.lru_cache(maxsize=1024)
def dw_plan(h: int, w: int, k: int, st: int, g: int, cig: int, cog: int, usq: int, lsq: int,
            fp64: bool, esize: int, ieee: bool = False):
    """Tiles of _s2_dw_kernel: a dict of its constexprs and grid parameters (OHT, OWT, N_RB,
    N_T, TPP, N_SP, N_CB, N_CI) and num_warps; None if none fits (the rebuild path runs then;
    where one fits, ops.stage2.dw_pass_pays decides by bytes). All of a group's input channels
    in one chunk where a tile fits (dout read once); else the fewest chunks of 32, 16 or 8
    channels that fit (each chunk reads dout again: N_CI times in all)."""
    gp = np2(g)
    full = max(np2(cig), cdiv(16, gp), 8)
    for cigp in sorted({full} | {c for c in (32, 16, 8) if c < full and c * gp >= 16}, reverse=True):
        plan = _dw_tiles(h, w, k, st, g, cig, cog, usq, lsq, ieee, cigp)
        if plan is not None:
            break
    else:
        return None
    ho, wo = (h - 1) // st + 1, (w - 1) // st + 1
    cout = g * cog
    rwc = cig * k * k + usq + lsq + 1
    part = 2 * 4 * (2 if fp64 else 1) * (cout * rwc + usq * k * k + lsq)  # a row's round trip, per sample
    n_sp = max(1, min(plan["N_T"], _DW_MAX_SP, int(_DW_PARTIAL_SHARE * cout * ho * wo * esize / part)))
    tpp = cdiv(plan["N_T"], n_sp)
    plan.update(TPP=tpp, N_SP=cdiv(plan["N_T"], tpp), num_warps=8)
    return plan


def _dw_tiles(h: int, w: int, k: int, st: int, g: int, cig: int, cog: int, usq: int, lsq: int, ieee: bool,
              cigp: int):
    """dw_plan's tiles for chunks of ``cigp`` input channels per group (None: none fits). Among
    tiles within the caps, the one that loads the fewest up elements (the column halo; the
    rows' comes from the tile above), ties to fewer lanes run. ``ieee``: fp32 dots without TF32
    (on CUDA cores: more registers)."""
    ho, wo = (h - 1) // st + 1, (w - 1) // st + 1
    kk = k * k
    gp = np2(g)
    if cigp > 64:
        return None
    n_ci = cdiv(cig, cigp)
    bl = _d(cdiv(lsq, n_ci))  # each chunk takes a share of the low channels (G2, L)
    tpd = 2 if cigp < 16 else 1
    nb = cdiv(kk, tpd)
    nch = _pow2_floor(nb)
    nchb = np2(nb - nch) if nb > nch else 1
    bkg = tpd * cigp
    # fp64 runs in the interpreter only (stage2.supports): the fp32 caps serve it
    best = None
    for bco in (16, 32, 64):
        if bco > max(16, np2(cog)):
            continue
        br = gp * bco
        held = br * ((nch + nchb) * bkg + gp * cigp + bl) + gp * (nch + nchb) * bkg  # the accumulators
        if held > (_DW_HELD_IEEE if ieee else _DW_HELD):
            continue
        n_cb = cdiv(cog, bco)
        for rwp, rhp, bw, bh in itertools.product(*(2 * ((4, 8, 16, 32, 64),)), *(2 * ((1, 2, 4, 8, 16, 32),))):
            owt, oht = min(bw, (rwp - k) // st + 1), min(bh, (rhp - k) // st + 1)
            # lanes no wider than the outputs the tile covers (_tap clamps the rest to its edge)
            if owt < 1 or oht < 1 or bw * bh < 16 or bw > _pow2_floor(rwp // st) or bh > _pow2_floor(rhp // st):
                continue
            if bh > 1 and bw < 16 and cigp >= 16:  # 2 x 8 lanes of 16-channel chunks: 48-64 B on sm_90's
                continue                           # stack (512 channels at 7 x 7, the AOT check)
            bq = bh * bw
            n_rb, n_wb = cdiv(ho, oht), cdiv(wo, owt)
            # CARRY (one row tile: nothing to carry) keeps two up tiles live across the row step
            # (the one above, the gathered one), and walking down a column loads each row once
            # (the halo comes from the tile above); without it each tile loads its halo again
            carry = n_rb > 1
            upt = gp * cigp * rhp * rwp * (2 if carry else 1)
            live = upt + br * bq + 2 * gp * bkg * bq + br * bkg + bl * bq
            if live > _DW_TILE or br * bq > _DW_DOUT // (2 if ieee else 1):
                continue
            if ieee and carry and upt > _DW_UP_IEEE:
                carry, upt = False, upt // 2
            if ieee and upt > _DW_UP_IEEE:
                continue
            if carry:
                rows = max(0, min(h, (n_rb - 1) * oht * st - k // 2 + rhp))
            else:
                rows = _span(n_rb, oht * st, rhp, k // 2, h)
            # up elements loaded; then the lanes the dots run on (masked ones too)
            loads = n_cb * usq * rows * _span(n_wb, owt * st, rwp, k // 2, w)
            key = (loads, n_rb * n_wb * bq, -bco)
            if best is None or key < best[0]:
                best = (key, dict(GP=gp, CIGP=cigp, TPD=tpd, NCH=nch, NCHB=nchb, BCO=bco, RHP=rhp, RWP=rwp, BH=bh, BW=bw,
                                  BL=bl, CARRY=carry, OHT=oht, OWT=owt, N_RB=n_rb, N_T=n_rb * n_wb, N_CB=n_cb,
                                  N_CI=n_ci))
    return None if best is None else best[1]


def dw_plan_for(up, w_gwc, w_pwc2, stride: int, groups: int, tf32: bool):
    """dw_plan for stage2_dw's arguments (None: no tile; the caller takes the rebuild path, as
    where ops.stage2.dw_pass_pays finds it moves less)."""
    _, usq, h, w = up.shape
    cout, cig, k, _ = w_gwc.shape
    return dw_plan(h, w, k, stride, groups, cig, cout // groups, usq, w_pwc2.shape[1], up.dtype == torch.float64,
                   up.element_size(), up.dtype == torch.float32 and not tf32)


@launcher
def stage2_dw(dout, up, low, a, w_gwc, b_gwc, w_pwc1, w_pwc2, stride: int, groups: int, pairwise: bool, tf32: bool):
    """dA and the convolution weights' gradients of stage 2 from dout, the saved up / low and A.

    Returns (dA (N, 2 Cout), k (N, 2 Cout), dWg, db, dW1, dW2): k = dm / (Ho Wo) of the softmax
    backward (dY1 = A1 dout + k1, dY2 = A2 dout + k2), the gradients in the accumulation dtype
    (fp32; fp64 for fp64). Three launches; None if dw_plan has no tile for the shape."""
    N, usq, H, W = up.shape
    lsq = low.shape[1]
    cout, cig, k, _ = w_gwc.shape
    p = w_pwc2.shape[0]
    ho, wo = (H - 1) // stride + 1, (W - 1) // stride + 1
    fp64 = up.dtype == torch.float64
    cog = cout // groups
    plan = dw_plan_for(up, w_gwc, w_pwc2, stride, groups, tf32)
    if plan is None:
        return None
    plan = dict(plan)
    oht, owt, n_rb, n_t, tpp, n_sp, n_cb, n_ci = (plan.pop(key) for key in
                                                  ("OHT", "OWT", "N_RB", "N_T", "TPP", "N_SP", "N_CB", "N_CI"))
    adt = acc_dtype(up.dtype)
    kk = k * k
    rwc = cig * kk + usq + lsq + 1
    rt = usq * kk + lsq
    kw = dict(device=up.device, dtype=adt)
    gpart = torch.empty((n_sp, N, cout, rwc), **kw)
    tpart = torch.empty((n_sp, N, rt), **kw)
    dpart = torch.empty((n_sp * n_ci, N, 2 * cout), **kw)
    wg, wp1 = w_gwc.contiguous(), w_pwc1.contiguous()
    wp2 = w_pwc2.contiguous() if p else wg  # a valid pointer; HAS_P = False never reads it
    _s2_dw_kernel[(n_sp * N, n_cb * n_ci)](
        dout, up, low, wg, b_gwc, wp1, wp2, gpart, tpart, dpart,
        N, H, W, ho, wo, groups, cig, usq, lsq, cout, cog, p, k // 2, oht, owt, n_rb, n_t, tpp, n_sp, n_cb, n_ci,
        rwc, rt, *dout.stride(), *up.stride(), *low.stride(),
        HAS_P=p > 0, TF32=bool(tf32), FP64=fp64, K=k, STRIDE=stride, **plan,
    )
    ts = torch.empty((N, rt), **kw)
    kv = torch.empty((N, 2 * cout), **kw)
    da = torch.empty((N, 2 * cout), **kw)
    _s2_dsoft_kernel[(N,)](
        dpart, tpart, a, ts, da, kv, N, cout, rt, n_sp, n_sp * n_ci, ho * wo,
        PAIRWISE=bool(pairwise), BJ=64, BLOCK_M=min(np2(2 * cout), 1024), num_warps=8,
    )
    dwg = torch.empty((cout, cig, k, k), **kw)
    db = torch.empty((cout,), **kw)
    dw1 = torch.empty((cout, usq), **kw)
    dw2 = torch.empty((max(p, 1), lsq), **kw)
    bc, bj = 16, 64
    _s2_dw_reduce_kernel[(groups * cdiv(cog, bc), cdiv(rwc, bj))](
        gpart, ts, a, kv, dwg, db, dw1, dw2, N, cout, cog, cig, usq, lsq, p, rwc, rt, n_sp, ho * wo,
        K=k, BC=bc, BJ=bj, num_warps=8,  # 4: an 8-byte stack frame on sm_90 (AOT)
    )
    return da, kv, dwg, db, dw1, dw2[:p]


# Register caps of one 8-warp _s2_dgrad_kernel program, in elements (fp32), the largest the AOT
# check compiles without spills: the A-scaled weights it holds (10240 at 64 and at 128 -> 32
# channels), dout's tile, a tap's operand (rows x lanes), the two accumulators; all but the
# first halved for fp32 dots without TF32 (CUDA cores). Twice the tile or the operand, or the
# accumulators of 32 + 32 channels x 32 lanes, spilled 8-272 B.
_DG_HELD = 12288
_DG_TILE = 4096
_DG_OP = 2048
_DG_ACC = 1024


def _owned(lanes: int, rows: int, size: int, k: int, st: int) -> int:
    """The most input rows (<= lanes) a tile can own such that the outputs its taps read fit
    ``rows`` dout rows, for every tile of the image."""
    p = k // 2
    for own in range(min(lanes, size), 0, -1):
        if all((i0 + own - 1 + p) // st - (i0 - p) // st + 1 <= rows for i0 in range(0, size, own)):
            return own
    return 0


@functools.lru_cache(maxsize=1024)
def dgrad_plan(h: int, w: int, k: int, st: int, usq: int, lsq: int, cout: int, ieee: bool = False):
    """Tiles of _s2_dgrad_kernel: a dict (IHT, IWT, N_RB, N_WB and its constexprs) or None if no
    tile fits (cuDNN's input gradients run then). Among the tiles within the caps, the one that
    loads the fewest dout elements (the outputs its taps read: the column halo; the rows' comes
    from the tile above), ties to fewer lanes run.
    ``ieee``: fp32 dots without TF32 (CUDA cores: half the caps)."""
    ho, wo = (h - 1) // st + 1, (w - 1) // st + 1
    bu, bl, bc = _d(usq), _d(lsq), _d(cout)
    kk = k * k
    nch = _pow2_floor(kk)
    nchb = np2(kk - nch) if kk > nch else 1
    if bu * (nch + nchb) * bc + bl * bc > _DG_HELD:
        return None
    best = None
    for bh, bw, orh, orw in itertools.product(*(2 * ((1, 2, 4, 8, 16, 32),)), *(2 * ((4, 8, 16, 32),))):
        bq = bh * bw
        cut = 2 if ieee else 1
        if bq < 16 or bc * orh * orw * cut > _DG_TILE or bc * bq * cut > _DG_OP or (bu + bl) * bq * cut > _DG_ACC:
            continue
        iht, iwt = _owned(bh, orh, h, k, st), _owned(bw, orw, w, k, st)
        if iht == 0 or iwt == 0:
            continue
        n_rb, n_wb = cdiv(h, iht), cdiv(w, iwt)
        # dout columns the column blocks load inside the image; down a block, each output row
        # once (the halo rows come from the tile above); then the lanes the dots run on
        cols = sum(max(0, min((j0 + iwt - 1 + k // 2) // st + 1, wo) - max((j0 - k // 2) // st, 0))
                   for j0 in range(0, w, iwt))
        key = (cols, n_rb * n_wb * bq)
        if best is None or key < best[0]:
            best = (key, dict(IHT=iht, IWT=iwt, N_RB=n_rb, N_WB=n_wb, NCH=nch, NCHB=nchb, BU=bu, BL=bl, BC=bc,
                              ORH=orh, ORW=orw, BH=bh, BW=bw, num_warps=8))
    return None if best is None else best[1]


def dgrad_plan_for(dout, w_gwc, w_pwc1, w_pwc2, h: int, w: int, stride: int, tf32: bool):
    """dgrad_plan for stage2_dgrad's arguments (None: no tile; the caller takes cuDNN's)."""
    return dgrad_plan(h, w, w_gwc.shape[2], stride, w_pwc1.shape[1], w_pwc2.shape[1], dout.shape[1],
                      dout.dtype == torch.float32 and not tf32)


@launcher
def stage2_dgrad(dout, a, kv, w_gwc, w_pwc1, w_pwc2, h: int, w: int, stride: int, channels_last: bool, tf32: bool):
    """(d_up (N, USQ, H, W), d_low (N, LSQ, H, W)) of stage 2 from dout, A and k (stage2_dw):
    dY1 = A1 dout + k1 and dY2 = A2 dout + k2 formed on the fly, d_low with the identity branch's
    gradient at the strided positions. One launch; None if dgrad_plan has no tile."""
    N, cout, ho, wo = dout.shape
    cig, k = w_gwc.shape[1], w_gwc.shape[2]
    usq = w_pwc1.shape[1]
    lsq = w_pwc2.shape[1]
    p = w_pwc2.shape[0]
    plan = dgrad_plan_for(dout, w_gwc, w_pwc1, w_pwc2, h, w, stride, tf32)
    if plan is None:
        return None
    plan = dict(plan)
    iht, iwt, n_rb, n_wb = (plan.pop(key) for key in ("IHT", "IWT", "N_RB", "N_WB"))
    kw = dict(device=dout.device, dtype=dout.dtype, memory_format=memory_format(channels_last))
    d_up = torch.empty((N, usq, h, w), **kw)
    d_low = torch.empty((N, lsq, h, w), **kw)
    wg, wp1 = w_gwc.contiguous(), w_pwc1.contiguous()
    wp2 = w_pwc2.contiguous() if p else wg  # a valid pointer; HAS_P = False never reads it
    _s2_dgrad_kernel[(N * n_wb,)](
        dout, a, kv, wg, wp1, wp2, d_up, d_low,
        h, w, ho, wo, cig, cout // (usq // cig), usq, lsq, cout, p, k // 2, iht, iwt, n_rb, n_wb,
        *dout.stride(), *d_up.stride(), *d_low.stride(),
        HAS_P=p > 0, FP64=dout.dtype == torch.float64, TF32=bool(tf32), K=k, STRIDE=stride, **plan,
    )
    return d_up, d_low
