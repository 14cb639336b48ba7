"""Triton kernels of the fused CRU (Channel Reconstruction Unit) and their launchers.

Notation (SPEC.md): the CRU's convolutions give Y1 (N, C, Ho, Wo) (C = out_channels),
P2 = PWC2(low) (N, P, Ho, Wo) (P = pwc2_out, may be 0) and the identity branch
ident = low[:, :, ::s, ::s] (N, L, Ho, Wo) (L = low_sq, P + L = C). Y2 = [P2, ident]
is never materialised: every kernel reads P2 and ident in place, through strides,
and channel c of Y2 is P2[c] for c < P and ident[c - P] otherwise.

Kernels (forward):
  _cru_weights_kernel   merged k x k weight of GWC + PWC1, and the squeeze weight for backward
  _cru_zsum_kernel      m = per (n, channel) means of Y1 and Y2 (pool)     (N, 2C) fp32/fp64
  _cru_combine_kernel   A = softmax(m) (channel or pairwise), out = A1*Y1 + A2*Y2; writes A
Kernels (backward):
  _cru_zsum_kernel      dA_j = sum_hw dout_{j mod C} * Z_j (WEIGHTED)        (N, 2C)
  _cru_combine_bwd_kernel  softmax Jacobian, dY1, dP2, dident
  _cru_dsq_kernel       d_sq = [d_up, d_low + scatter(dident at stride s)] for the squeeze backward
  _cru_wgrad_kernel     split the merged weight's gradient into GWC.weight and PWC1.weight grads

Conventions: every tensor is passed with explicit strides (NCHW, channels_last or a
strided view all work without copies); offsets are int64; arithmetic is fp32 (fp64
for fp64 tensors); reductions are per-program tile sums (deterministic, no atomics).
Only thin launchers (allocate, grid, launch) follow the kernels; no autograd here.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import NUM_WARPS, acc, acc_dtype, cdiv, chw_tiles, launcher, memory_format, np2, pix_off, strides4

__all__ = [
    "cru_weights",
    "cru_pool",
    "cru_combine",
    "cru_reduce",
    "cru_combine_bwd",
    "cru_dsq",
    "cru_wgrad",
]


# ----------------------------------------------------------------------------- helpers
@triton.jit
def _hw_offsets(start, HW, Wo, s_h, s_w, BLOCK_HW: tl.constexpr):
    """Flat spatial indices [start, start + BLOCK_HW) -> (int64 offsets, mask)."""
    hw = start + tl.arange(0, BLOCK_HW)
    return pix_off(hw, Wo, s_h, s_w, False), hw < HW


@triton.jit
def _softmax_stats(m_ptr, n, C, BLOCK_M: tl.constexpr):
    """(max, sum of exp(m - max)) over the 2C pooled means of sample n: one online pass."""
    row = m_ptr + n * (2 * C)
    j = tl.arange(0, BLOCK_M)
    v = tl.load(row + j, mask=j < 2 * C, other=float("-inf"))
    mx = tl.max(v, axis=0)
    den = tl.sum(tl.exp(v - mx), axis=0)
    for start in range(BLOCK_M, 2 * C, BLOCK_M):
        v = tl.load(row + start + j, mask=start + j < 2 * C, other=float("-inf"))
        mnew = tl.maximum(mx, tl.max(v, axis=0))
        den = den * tl.exp(mx - mnew) + tl.sum(tl.exp(v - mnew), axis=0)
        mx = mnew
    return mx, den


@triton.jit
def _softmax_coeffs(m_ptr, n, c, cm, C, mx, den, PAIRWISE: tl.constexpr):
    """(A1_c, A2_c) for the channels c of sample n from the pooled means m (N, 2C).

    channel: exp(m - mx) / den with (mx, den) from _softmax_stats (all 2C entries);
    pairwise: per c, a two-way softmax of (m_c, m_{C+c}) (mx, den unused).
    """
    row = m_ptr + n * (2 * C)
    m1 = tl.load(row + c, mask=cm, other=0.0)
    m2 = tl.load(row + C + c, mask=cm, other=0.0)
    if PAIRWISE:
        mp = tl.maximum(m1, m2)
        e1 = tl.exp(m1 - mp)
        e2 = tl.exp(m2 - mp)
        a1 = e1 / (e1 + e2)
        a2 = e2 / (e1 + e2)
    else:
        a1 = tl.exp(m1 - mx) / den
        a2 = tl.exp(m2 - mx) / den
    return a1, a2


@triton.jit
def _softmax_dot(row_a, row_g, C, BLOCK_M: tl.constexpr):
    """sum over the 2C entries of one sample of A * dA (the channel softmax's backward term)."""
    j = tl.arange(0, BLOCK_M)
    jm = j < 2 * C
    dot = tl.sum(tl.load(row_a + j, mask=jm, other=0.0) * tl.load(row_g + j, mask=jm, other=0.0), axis=0)
    for start in range(BLOCK_M, 2 * C, BLOCK_M):
        jm = start + j < 2 * C
        dot += tl.sum(tl.load(row_a + start + j, mask=jm, other=0.0) * tl.load(row_g + start + j, mask=jm, other=0.0),
                      axis=0)
    return dot


@triton.jit
def _softmax_bwd(a1, a2, g1, g2, dot, HW, PAIRWISE: tl.constexpr):
    """(k1, k2) = dm / HW of the channels whose (A1, A2, dA1, dA2) are given: dm_j = A_j (dA_j -
    sum_k A_k dA_k), k over the sample's 2C entries (``dot``, _softmax_dot) or, PAIRWISE, over the
    pair. dY1 = A1 dout + k1 and dY2 = A2 dout + k2 (the pooled mean's gradient spread evenly)."""
    if PAIRWISE:
        k1 = a1 * (g1 - (a1 * g1 + a2 * g2)) / HW
        k2 = a2 * (g2 - (a1 * g1 + a2 * g2)) / HW
    else:
        k1 = a1 * (g1 - dot) / HW
        k2 = a2 * (g2 - dot) / HW
    return k1, k2


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _cru_weights_kernel(
    wg_ptr, w1_ptr, wq1_ptr, wq2_ptr, wm_ptr, wsq_ptr,
    C, CIN, CIG, COG, KS,
    U, USQ, QIN, TOTAL1, TOTAL2, GROUPED,
    swg_o, swg_i, swg_h, swg_w,
    sw1_o, sw1_i,
    swm_o, swm_i, swm_h, swm_w,
    sq1_o, sq1_i, sq2_o, sq2_i,
    BLOCK: tl.constexpr, F64: tl.constexpr,
):
    """Build the merged Y1 weight and the squeeze weight used by the backward.

    wg_ptr:  GWC.weight (C, CIG, KS, KS), grouped (CIG = CIN / groups, COG = C / groups).
    w1_ptr:  PWC1.weight (C, CIN, 1, 1), strides (sw1_o, sw1_i).
    wm_ptr:  out, merged dense weight (C, CIN, KS, KS), any strides: the block-diagonal
             dense form of GWC.weight with PWC1.weight added into the centre tap.
    wq1_ptr, wq2_ptr: squeeze1.weight (USQ, U), squeeze2.weight (LSQ, L) as 2-D strides.
    wsq_ptr: out, contiguous (USQ + LSQ, QIN): GROUPED=1 (u == l): cat of both, for a
             groups=2 conv (QIN = U); GROUPED=0: block-diagonal dense (QIN = U + L).
    TOTAL1 = C*CIN*KS*KS, TOTAL2 = (USQ+LSQ)*QIN: elements of the two outputs.
    """
    pid = tl.program_id(0)
    idx = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    # merged k x k weight
    msk = idx < TOTAL1
    kk = KS * KS
    co = idx // (CIN * kk)
    rem = idx % (CIN * kk)
    ci = rem // kk
    t = rem % kk
    kh = t // KS
    kw = t % KS
    g_o = co // COG
    g_i = ci // CIG
    in_blk = msk & (g_o == g_i)
    wg = tl.load(wg_ptr + co * swg_o + (ci - g_i * CIG) * swg_i + kh * swg_h + kw * swg_w, mask=in_blk, other=0.0)
    ctr = msk & (kh == KS // 2) & (kw == KS // 2)
    w1 = tl.load(w1_ptr + co * sw1_o + ci * sw1_i, mask=ctr, other=0.0)
    val = acc(wg, F64) + acc(w1, F64)
    tl.store(wm_ptr + co * swm_o + ci * swm_i + kh * swm_h + kw * swm_w, val.to(wm_ptr.dtype.element_ty), mask=msk)
    # squeeze weight
    msk2 = idx < TOTAL2
    o = idx // QIN
    i = idx % QIN
    first = o < USQ
    i2 = i - U * (1 - GROUPED)
    v1 = msk2 & first & (i < U + GROUPED * QIN)
    v2 = msk2 & (o >= USQ) & (i2 >= 0)
    q1 = tl.load(wq1_ptr + o * sq1_o + i * sq1_i, mask=v1, other=0.0)
    q2 = tl.load(wq2_ptr + (o - USQ) * sq2_o + i2 * sq2_i, mask=v2, other=0.0)
    q = acc(q1, F64) + acc(q2, F64)
    tl.store(wsq_ptr + idx, q.to(wsq_ptr.dtype.element_ty), mask=msk2)


@triton.jit
def _cru_zsum_kernel(
    do_ptr, y1_ptr, p2_ptr, id_ptr, out_ptr,
    C, P, Wo, HW,
    sd_n, sd_c, sd_h, sd_w,
    sy_n, sy_c, sy_h, sy_w,
    sp_n, sp_c, sp_h, sp_w,
    si_n, si_c, si_h, si_w,
    WEIGHTED: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, F64: tl.constexpr,
):
    """Per (n, channel) spatial reductions of Z = [Y1, Y2], written to out (N, 2C).

    WEIGHTED False (forward pool): out[n, c] = mean_hw Y1[n, c], out[n, C + c] = mean_hw Y2[n, c].
    WEIGHTED True (backward): out[n, c] = sum_hw dout[n, c] * Y1[n, c] and
    out[n, C + c] = sum_hw dout[n, c] * Y2[n, c] (dA); dout is read once for both halves.
    Grid (N, cdiv(C, BLOCK_C)); each program loops over the Ho*Wo = HW positions.
    y1_ptr (N, C, Ho, Wo), p2_ptr (N, P, Ho, Wo), id_ptr (N, C - P, Ho, Wo) (a strided
    view such as low[:, :, ::s, ::s]), do_ptr (N, C, Ho, Wo) (stride 0 allowed, e.g. an
    expanded gradient; unused unless WEIGHTED), each with its own (n, c, h, w) strides.
    out_ptr: contiguous (N, 2C), fp32 (fp64 when F64).
    """
    n = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    c64 = c.to(tl.int64)
    isp = cm & (c < P)
    isi = cm & (c >= P)
    d_row = do_ptr + n * sd_n + c64 * sd_c
    y_row = y1_ptr + n * sy_n + c64 * sy_c
    p_row = p2_ptr + n * sp_n + c64 * sp_c
    i_row = id_ptr + n * si_n + (c64 - P) * si_c
    acc1 = acc(tl.zeros([BLOCK_C, BLOCK_HW], tl.float32), F64)
    acc2 = acc(tl.zeros([BLOCK_C, BLOCK_HW], tl.float32), F64)
    for start in range(0, HW, BLOCK_HW):
        oy, hm = _hw_offsets(start, HW, Wo, sy_h, sy_w, BLOCK_HW)
        op, _ = _hw_offsets(start, HW, Wo, sp_h, sp_w, BLOCK_HW)
        oi, _ = _hw_offsets(start, HW, Wo, si_h, si_w, BLOCK_HW)
        mm = cm[:, None] & hm[None, :]
        y = acc(tl.load(y_row[:, None] + oy[None, :], mask=mm, other=0.0), F64)
        p = tl.load(p_row[:, None] + op[None, :], mask=isp[:, None] & hm[None, :], other=0.0)
        q = tl.load(i_row[:, None] + oi[None, :], mask=isi[:, None] & hm[None, :], other=0.0)
        y2 = acc(p, F64) + acc(q, F64)
        if WEIGHTED:
            od, _ = _hw_offsets(start, HW, Wo, sd_h, sd_w, BLOCK_HW)
            d = acc(tl.load(d_row[:, None] + od[None, :], mask=mm, other=0.0), F64)
            acc1 += d * y
            acc2 += d * y2
        else:
            acc1 += y
            acc2 += y2
    r1 = tl.sum(acc1, axis=1)
    r2 = tl.sum(acc2, axis=1)
    if not WEIGHTED:
        r1 = r1 / HW
        r2 = r2 / HW
    tl.store(out_ptr + n * (2 * C) + c, r1, mask=cm)
    tl.store(out_ptr + n * (2 * C) + C + c, r2, mask=cm)


@triton.jit
def _cru_combine_kernel(
    y1_ptr, p2_ptr, id_ptr, m_ptr, out_ptr, a_ptr,
    C, P, Wo, HW,
    sy_n, sy_c, sy_h, sy_w,
    sp_n, sp_c, sp_h, sp_w,
    si_n, si_c, si_h, si_w,
    so_n, so_c, so_h, so_w,
    C_ITERS,
    PAIRWISE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
    BLOCK_M: tl.constexpr, F64: tl.constexpr,
):
    """out = A1 * Y1 + A2 * Y2 with A = softmax of the pooled means m (N, 2C).

    Grid (N * cdiv(HW, BLOCK_HW), cdiv(C, BLOCK_C * C_ITERS)). A program computes the
    softmax normaliser of its sample once (channel: over all 2C means; PAIRWISE: per
    channel), then handles C_ITERS blocks of BLOCK_C channels on one spatial tile.
    The programs of the first spatial tile store A in a_ptr (N, 2C) for the backward.
    out_ptr (N, C, Ho, Wo) with strides so_*; inputs as in the pool kernel.
    """
    # spatial blocks and samples share axis 0 (limit 2**31 - 1): axes 1 and 2 are capped at
    # 65535 on CUDA, which cdiv(Ho*Wo, BLOCK_HW) passes for images above ~2 M pixels
    n_hw = tl.cdiv(HW, BLOCK_HW)
    n = (tl.program_id(0) // n_hw).to(tl.int64)
    pid_hw = tl.program_id(0) % n_hw
    pid_c = tl.program_id(1)
    if PAIRWISE:
        mx = 0.0
        den = 1.0
    else:
        mx, den = _softmax_stats(m_ptr, n, C, BLOCK_M)
    start = pid_hw * BLOCK_HW
    oy, hm = _hw_offsets(start, HW, Wo, sy_h, sy_w, BLOCK_HW)
    op, _ = _hw_offsets(start, HW, Wo, sp_h, sp_w, BLOCK_HW)
    oi, _ = _hw_offsets(start, HW, Wo, si_h, si_w, BLOCK_HW)
    oo, _ = _hw_offsets(start, HW, Wo, so_h, so_w, BLOCK_HW)
    for it in range(C_ITERS):
        c = (pid_c * C_ITERS + it) * BLOCK_C + tl.arange(0, BLOCK_C)
        cm = c < C
        c64 = c.to(tl.int64)
        isp = cm & (c < P)
        isi = cm & (c >= P)
        a1, a2 = _softmax_coeffs(m_ptr, n, c, cm, C, mx, den, PAIRWISE)
        first = cm & ((tl.zeros_like(c) + pid_hw) == 0)
        tl.store(a_ptr + n * (2 * C) + c, a1, mask=first)
        tl.store(a_ptr + n * (2 * C) + C + c, a2, mask=first)
        mm = cm[:, None] & hm[None, :]
        y = tl.load(y1_ptr + n * sy_n + c64[:, None] * sy_c + oy[None, :], mask=mm, other=0.0)
        p = tl.load(p2_ptr + n * sp_n + c64[:, None] * sp_c + op[None, :], mask=isp[:, None] & hm[None, :], other=0.0)
        q = tl.load(id_ptr + n * si_n + (c64[:, None] - P) * si_c + oi[None, :], mask=isi[:, None] & hm[None, :],
                    other=0.0)
        o = a1[:, None] * acc(y, F64) + a2[:, None] * (acc(p, F64) + acc(q, F64))
        tl.store(out_ptr + n * so_n + c64[:, None] * so_c + oo[None, :], o.to(out_ptr.dtype.element_ty), mask=mm)


@triton.jit
def _cru_combine_bwd_kernel(
    do_ptr, a_ptr, da_ptr, dy1_ptr, dp2_ptr, did_ptr,
    C, P, Wo, HW,
    sd_n, sd_c, sd_h, sd_w,
    sy_n, sy_c, sy_h, sy_w,
    sp_n, sp_c, sp_h, sp_w,
    si_n, si_c, si_h, si_w,
    C_ITERS,
    PAIRWISE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
    BLOCK_M: tl.constexpr, F64: tl.constexpr,
):
    """Gradients of the conv outputs from dout, A and dA (both (N, 2C)).

    dm_j = A_j * (dA_j - sum_k A_k dA_k) (channel: k over all 2C of the sample;
    PAIRWISE: k over the pair c, C + c); dZ_j = A_j * dout_{j mod C} + dm_j / HW.
    Writes dY1 -> dy1_ptr (N, C, Ho, Wo), dP2 -> dp2_ptr (N, P, Ho, Wo) and the
    identity part -> did_ptr (N, C - P, Ho, Wo), each with its strides.
    Grid (N * cdiv(HW, BLOCK_HW), cdiv(C, BLOCK_C * C_ITERS)); the per-sample sum
    is computed once per program. Y1 and Y2 are not needed.
    """
    # spatial blocks and samples share axis 0 (limit 2**31 - 1): axes 1 and 2 are capped at
    # 65535 on CUDA, which cdiv(Ho*Wo, BLOCK_HW) passes for images above ~2 M pixels
    n_hw = tl.cdiv(HW, BLOCK_HW)
    n = (tl.program_id(0) // n_hw).to(tl.int64)
    pid_hw = tl.program_id(0) % n_hw
    pid_c = tl.program_id(1)
    row_a = a_ptr + n * (2 * C)
    row_g = da_ptr + n * (2 * C)
    dot = 0.0
    if not PAIRWISE:
        dot = _softmax_dot(row_a, row_g, C, BLOCK_M)
    start = pid_hw * BLOCK_HW
    od, hm = _hw_offsets(start, HW, Wo, sd_h, sd_w, BLOCK_HW)
    oy, _ = _hw_offsets(start, HW, Wo, sy_h, sy_w, BLOCK_HW)
    op, _ = _hw_offsets(start, HW, Wo, sp_h, sp_w, BLOCK_HW)
    oi, _ = _hw_offsets(start, HW, Wo, si_h, si_w, BLOCK_HW)
    for it in range(C_ITERS):
        c = (pid_c * C_ITERS + it) * BLOCK_C + tl.arange(0, BLOCK_C)
        cm = c < C
        c64 = c.to(tl.int64)
        isp = cm & (c < P)
        isi = cm & (c >= P)
        a1 = tl.load(row_a + c, mask=cm, other=0.0)
        a2 = tl.load(row_a + C + c, mask=cm, other=0.0)
        g1 = tl.load(row_g + c, mask=cm, other=0.0)
        g2 = tl.load(row_g + C + c, mask=cm, other=0.0)
        k1, k2 = _softmax_bwd(a1, a2, g1, g2, dot, HW, PAIRWISE)
        mm = cm[:, None] & hm[None, :]
        d = acc(tl.load(do_ptr + n * sd_n + c64[:, None] * sd_c + od[None, :], mask=mm, other=0.0), F64)
        dy1 = a1[:, None] * d + k1[:, None]
        dy2 = (a2[:, None] * d + k2[:, None]).to(dp2_ptr.dtype.element_ty)
        tl.store(dy1_ptr + n * sy_n + c64[:, None] * sy_c + oy[None, :], dy1.to(dy1_ptr.dtype.element_ty), mask=mm)
        tl.store(dp2_ptr + n * sp_n + c64[:, None] * sp_c + op[None, :], dy2, mask=isp[:, None] & hm[None, :])
        tl.store(did_ptr + n * si_n + (c64[:, None] - P) * si_c + oi[None, :], dy2, mask=isi[:, None] & hm[None, :])


@triton.jit
def _cru_dsq_kernel(
    du_ptr, dl_ptr, di_ptr, out_ptr,
    CU, CL, W, HW, Wo, STRIDE,
    su_n, su_c, su_h, su_w,
    sl_n, sl_c, sl_h, sl_w,
    si_n, si_c, si_h, si_w,
    so_n, so_c, so_h, so_w,
    HAS_LOW: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, F64: tl.constexpr,
):
    """Gradient of the squeeze outputs as one tensor, for one squeeze backward.

    out (N, CU + CL, H, W): channels < CU copy d_up = du_ptr (N, CU, H, W); channel
    CU + l gets d_low[l] = dl_ptr (N, CL, H, W) (PWC2's input gradient; absent when
    not HAS_LOW) plus the identity gradient di_ptr (N, CL, Ho, Wo) at the positions
    (h, w) with h % STRIDE == 0 and w % STRIDE == 0. HW = H*W.
    Grid (N * cdiv(HW, BLOCK_HW), cdiv(CU + CL, BLOCK_C)).
    """
    # spatial blocks and samples share axis 0 (limit 2**31 - 1): axes 1 and 2 are capped at
    # 65535 on CUDA, which cdiv(Ho*Wo, BLOCK_HW) passes for images above ~2 M pixels
    n_hw = tl.cdiv(HW, BLOCK_HW)
    n = (tl.program_id(0) // n_hw).to(tl.int64)
    pid_hw = tl.program_id(0) % n_hw
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < CU + CL
    c64 = c.to(tl.int64)
    isu = cm & (c < CU)
    isl = cm & (c >= CU)
    hw = pid_hw * BLOCK_HW + tl.arange(0, BLOCK_HW)
    hm = hw < HW
    h = (hw // W).to(tl.int64)
    w = (hw % W).to(tl.int64)
    on_grid = hm & (h % STRIDE == 0) & (w % STRIDE == 0)
    ho = h // STRIDE
    wo = w // STRIDE
    u = tl.load(du_ptr + n * su_n + c64[:, None] * su_c + (h * su_h + w * su_w)[None, :],
                mask=isu[:, None] & hm[None, :], other=0.0)
    q = tl.load(di_ptr + n * si_n + (c64[:, None] - CU) * si_c + (ho * si_h + wo * si_w)[None, :],
                mask=isl[:, None] & on_grid[None, :], other=0.0)
    v = acc(u, F64) + acc(q, F64)
    if HAS_LOW:
        lo = tl.load(dl_ptr + n * sl_n + (c64[:, None] - CU) * sl_c + (h * sl_h + w * sl_w)[None, :],
                     mask=isl[:, None] & hm[None, :], other=0.0)
        v += acc(lo, F64)
    tl.store(out_ptr + n * so_n + c64[:, None] * so_c + (h * so_h + w * so_w)[None, :],
             v.to(out_ptr.dtype.element_ty), mask=cm[:, None] & hm[None, :])


@triton.jit
def _cru_wgrad_kernel(
    dwm_ptr, dg_ptr, d1_ptr,
    CIN, CIG, COG, KS, TOTAL1, TOTAL2,
    sm_o, sm_i, sm_h, sm_w,
    BLOCK: tl.constexpr,
):
    """Split the merged weight's gradient dW (C, CIN, KS, KS) (strides sm_*).

    dg_ptr: out, contiguous (C, CIG, KS, KS): GWC.weight's gradient, the diagonal
    blocks of dW (TOTAL1 elements). d1_ptr: out, contiguous (C, CIN): PWC1.weight's
    gradient, dW's centre tap (TOTAL2 elements). Pure copies, no arithmetic.
    """
    pid = tl.program_id(0)
    idx = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    kk = KS * KS
    msk = idx < TOTAL1
    co = idx // (CIG * kk)
    rem = idx % (CIG * kk)
    cil = rem // kk
    t = rem % kk
    kh = t // KS
    kw = t % KS
    ci = (co // COG) * CIG + cil
    v = tl.load(dwm_ptr + co * sm_o + ci * sm_i + kh * sm_h + kw * sm_w, mask=msk, other=0.0)
    tl.store(dg_ptr + idx, v, mask=msk)
    msk2 = idx < TOTAL2
    co2 = idx // CIN
    ci2 = idx % CIN
    v2 = tl.load(dwm_ptr + co2 * sm_o + ci2 * sm_i + (KS // 2) * (sm_h + sm_w), mask=msk2, other=0.0)
    tl.store(d1_ptr + idx, v2, mask=msk2)


# ----------------------------------------------------------------------------- launchers
# weight-sized kernels (merged weight, its gradient split): 2048 elements on 8 warps per program.
# Enough programs on a GPU even for small layers, and 8x fewer than 256-element blocks for the
# interpreter, whose cost is per program (these two kernels were 90% of a fused ResNet-50's).
_WBLOCK = 2048
_WWARPS = 8


def _is_f64(t: torch.Tensor) -> bool:
    return t.dtype == torch.float64


def _c_iters(c: int, bc: int) -> int:
    """Channel blocks per program of the combine kernels: up to 64 channels, so the
    per-sample softmax row (2C values) is read once per 64 x BLOCK_HW outputs."""
    return max(1, min(cdiv(c, bc), 64 // bc))


def _block_m(c: int) -> int:
    return min(1024, np2(2 * c))


@launcher
def cru_weights(w_gwc, w_pwc1, w_sq1, w_sq2, groups: int, channels_last: bool):
    """Merged Y1 weight (C, up_sq, k, k) (channels_last strides if asked) and the
    squeeze weight for the backward: (up_sq + low_sq, u, 1, 1) (cat, use groups=2)
    when u == l, else (up_sq + low_sq, u + l, 1, 1) block-diagonal (groups=1)."""
    c, cig, k, _ = w_gwc.shape
    cin = cig * groups
    usq, u = w_sq1.shape[:2]
    lsq, l_ = w_sq2.shape[:2]
    grouped = int(u == l_)
    qin = u if grouped else u + l_
    wm = torch.empty((c, cin, k, k), dtype=w_gwc.dtype, device=w_gwc.device, memory_format=memory_format(channels_last))
    wsq = torch.empty((usq + lsq, qin, 1, 1), dtype=w_sq1.dtype, device=w_sq1.device)
    total1 = wm.numel()
    total2 = wsq.numel()
    grid = (cdiv(max(total1, total2), _WBLOCK),)
    _cru_weights_kernel[grid](
        w_gwc, w_pwc1, w_sq1, w_sq2, wm, wsq,
        c, cin, cig, c // groups, k,
        u, usq, qin, total1, total2, grouped,
        *w_gwc.stride(),
        w_pwc1.stride(0), w_pwc1.stride(1),
        *wm.stride(),
        w_sq1.stride(0), w_sq1.stride(1), w_sq2.stride(0), w_sq2.stride(1),
        BLOCK=_WBLOCK, F64=_is_f64(wm), num_warps=_WWARPS,
    )
    return wm, wsq


def _zsum(dout, y1, p2, ident):
    n, c, ho, wo = y1.shape
    hw = ho * wo
    out = torch.empty((n, 2 * c), dtype=acc_dtype(y1.dtype), device=y1.device)
    bc, bhw = chw_tiles(y1, c, hw, loop=True)
    p2a = p2 if p2.numel() else ident
    weighted = dout is not None
    grid = (n, cdiv(c, bc))
    _cru_zsum_kernel[grid](
        dout if weighted else y1, y1, p2a, ident, out,
        c, p2.shape[1], wo, hw,
        *(dout.stride() if weighted else (0, 0, 0, 0)), *y1.stride(), *strides4(p2), *ident.stride(),
        WEIGHTED=weighted, BLOCK_C=bc, BLOCK_HW=bhw, F64=_is_f64(y1), num_warps=NUM_WARPS,
    )
    return out


@launcher
def cru_pool(y1, p2, ident):
    """m (N, 2C): per (n, channel) means of Y1 and of Y2 = [p2, ident] (read in place)."""
    return _zsum(None, y1, p2, ident)


@launcher
def cru_combine(y1, p2, ident, m, pairwise: bool):
    """(out, A): out = A1*Y1 + A2*Y2 (same dtype and memory format as y1), A (N, 2C)."""
    n, c, ho, wo = y1.shape
    p = p2.shape[1]
    hw = ho * wo
    out = torch.empty_like(y1)
    a = torch.empty_like(m)
    bc, bhw = chw_tiles(y1, c, hw)
    ci = _c_iters(c, bc)
    p2a = p2 if p2.numel() else ident
    grid = (n * cdiv(hw, bhw), cdiv(c, bc * ci))
    _cru_combine_kernel[grid](
        y1, p2a, ident, m, out, a,
        c, p, wo, hw,
        *y1.stride(), *strides4(p2), *ident.stride(), *out.stride(), ci,
        PAIRWISE=bool(pairwise), BLOCK_C=bc, BLOCK_HW=bhw, BLOCK_M=_block_m(c),
        F64=_is_f64(y1), num_warps=NUM_WARPS,
    )
    return out, a


@launcher
def cru_reduce(dout, y1, p2, ident):
    """dA (N, 2C): per (n, channel) sums of dout * Y1 and dout * Y2."""
    return _zsum(dout, y1, p2, ident)


@launcher
def cru_combine_bwd(dout, a, da, p: int, pairwise: bool, dtype: torch.dtype, channels_last: bool):
    """(dY1, dP2, dident): gradients of Y1 (N, C, Ho, Wo), P2 (N, p, Ho, Wo) and the
    identity branch (N, C - p, Ho, Wo), in ``dtype`` and the given memory format."""
    n, c, ho, wo = dout.shape
    hw = ho * wo
    fmt = memory_format(channels_last)
    kw = dict(dtype=dtype, device=dout.device, memory_format=fmt)
    dy1 = torch.empty((n, c, ho, wo), **kw)
    dp2 = torch.empty((n, p, ho, wo), **kw)
    did = torch.empty((n, c - p, ho, wo), **kw)
    bc, bhw = chw_tiles(dy1, c, hw)
    ci = _c_iters(c, bc)
    dp2a = dp2 if dp2.numel() else did
    grid = (n * cdiv(hw, bhw), cdiv(c, bc * ci))
    _cru_combine_bwd_kernel[grid](
        dout, a, da, dy1, dp2a, did,
        c, p, wo, hw,
        *dout.stride(), *dy1.stride(), *strides4(dp2), *did.stride(), ci,
        PAIRWISE=bool(pairwise), BLOCK_C=bc, BLOCK_HW=bhw, BLOCK_M=_block_m(c),
        F64=dtype == torch.float64, num_warps=NUM_WARPS,
    )
    return dy1, dp2, did


@launcher
def cru_dsq(d_up, d_low, d_id, stride: int, channels_last: bool):
    """d_sq (N, CU + CL, H, W) = [d_up, d_low + d_id scattered at stride ``stride``].
    ``d_low`` may be empty (PWC2 has no channels): then only d_id contributes."""
    n, cu, h, w = d_up.shape
    cl = d_id.shape[1]
    ho, wo = d_id.shape[2:]
    out = torch.empty((n, cu + cl, h, w), dtype=d_up.dtype, device=d_up.device, memory_format=memory_format(channels_last))
    hw = h * w
    bc, bhw = chw_tiles(out, cu + cl, hw)
    has_low = d_low.numel() > 0
    dla = d_low if has_low else d_id
    grid = (n * cdiv(hw, bhw), cdiv(cu + cl, bc))
    _cru_dsq_kernel[grid](
        d_up, dla, d_id, out,
        cu, cl, w, hw, wo, stride,
        *d_up.stride(), *strides4(d_low), *d_id.stride(), *out.stride(),
        HAS_LOW=has_low, BLOCK_C=bc, BLOCK_HW=bhw, F64=_is_f64(out), num_warps=NUM_WARPS,
    )
    return out


@launcher
def cru_wgrad(dwm, groups: int):
    """(dGWC (C, CIN/groups, k, k), dPWC1 (C, CIN, 1, 1)), both contiguous, from the
    merged weight's gradient dwm (C, CIN, k, k)."""
    c, cin, k, _ = dwm.shape
    cig = cin // groups
    dg = torch.empty((c, cig, k, k), dtype=dwm.dtype, device=dwm.device)
    d1 = torch.empty((c, cin, 1, 1), dtype=dwm.dtype, device=dwm.device)
    total1, total2 = dg.numel(), d1.numel()
    grid = (cdiv(max(total1, total2), _WBLOCK),)
    _cru_wgrad_kernel[grid](
        dwm, dg, d1,
        cin, cig, c // groups, k, total1, total2,
        *dwm.stride(),
        BLOCK=_WBLOCK, num_warps=_WWARPS,
    )
    return dg, d1
