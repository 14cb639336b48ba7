"""Stage 2 (the default SCConv path) against scconv_triton.reference.SCConv: forward and every gradient.

Every config asserts that stage 2 ran (its three kernels were launched), so a silent fallback to
stage 1 cannot pass. Tolerances as in test_scconv.py: fp64 1e-10; fp32 (IEEE: TF32 off) 1e-5
where no gate value is within 1e-6 of tau; fp16 / bf16 within 2x the reference's own error in
that dtype. Plus bitwise determinism (NCHW and channels_last) and the FLOP count of the dots
(grouped GWC + PWC1, not a densified block-diagonal weight).
"""
import contextlib

import pytest
import torch

import scconv_triton
from scconv_triton import reference as ref
from scconv_triton.kernels import stage2 as ks2
from scconv_triton.kernels._launch import np2
from scconv_triton.kernels import stage2_bwd as kb
from scconv_triton.ops import stage2 as ops_s2
from scconv_triton.testing import capture_launches
from _helpers import TOL, cpu_only, draw_away_from_gate, needs_interpreter, rel
from test_scconv import _pair as _pair_cfg
from test_scconv import _run

STAGE2 = ["_sru_stats_partial_kernel", "_sru_stats_merge_kernel", "_s2_squeeze_kernel", "_s2_means_kernel",
          "_s2_conv_kernel"]
STAGE2_BWD = ["_s2_sq_bwd_kernel", "_s2_sq_wsum_kernel", "_s2_sq_dx_kernel"]  # the squeezes' + SRU's backward (ops/stage2.py)
STAGE2_DW = ["_s2_dw_kernel", "_s2_dsoft_kernel", "_s2_dw_reduce_kernel"]  # dA + conv weight gradients
STAGE2_DG = ["_s2_dgrad_kernel"]  # the convolutions' input gradients, dY formed on the fly
# k = 7: no _s2_dw_kernel / _s2_dgrad_kernel tile fits (dw_plan, dgrad_plan None): stage 1's conv backward
NO_DW = {"alpha0.75-g4-k7-s3-cl"}
# fp32 without TF32 (dots on CUDA cores) holds fewer accumulators: k = 5 takes the rebuild path too
NO_DW_IEEE = NO_DW | {"alpha0.25-s2-k5"}

# (SCConv kwargs, (N, H, W), channels_last): together every option of the module
CONFIGS = {
    "default": (dict(op_channel=16), (2, 6, 7), False),
    "default-cl": (dict(op_channel=16), (2, 6, 7), True),
    "alpha0.25-s2-k5": (dict(op_channel=16, alpha=0.25, stride=2, group_kernel_size=5), (2, 7, 9), False),
    "alpha0.75-g4-k7-s3-cl": (
        dict(op_channel=32, group_num=4, alpha=0.75, group_size=4, group_kernel_size=7, stride=3, out_channels=12),
        (2, 9, 11), True),
    "hard-gbn-pairwise": (dict(op_channel=16, gate="hard", torch_gn=False, softmax="pairwise"), (2, 5, 6), False),
    "pwc2-zero": (dict(op_channel=16, out_channels=4), (2, 6, 5), False),
    "pwc2-zero-s2-cl": (dict(op_channel=16, out_channels=4, stride=2, softmax="pairwise"), (2, 7, 5), True),
    "wider-out-r3": (dict(op_channel=12, group_num=3, out_channels=20, squeeze_radio=3), (2, 5, 5), False),
    "k1-g1-tau0.3": (dict(op_channel=20, group_num=5, group_size=1, group_kernel_size=1, gate_treshold=0.3),
                     (2, 4, 6), False),
    "batch1-odd": (dict(op_channel=16, group_kernel_size=3), (1, 5, 9), False),
    "r4-g3-alpha0.75": (dict(op_channel=32, group_num=8, alpha=0.75, squeeze_radio=4, group_size=3,
                             out_channels=15, gate_treshold=0.45), (2, 6, 6), True),
    "s2-even-size-hard": (dict(op_channel=16, stride=2, gate="hard", torch_gn=False), (1, 8, 6), False),
}


def _pair(kw, device, dtype=torch.float64):
    """Stage 2 (the default) and the reference with the same randomised parameters."""
    fused, base, _ = _pair_cfg(kw, device, dtype)
    return fused, base


def _input(kw, shape, cl, device, dtype):
    n, h, w = shape
    x = torch.randn(n, kw["op_channel"], h, w, dtype=dtype, device=device)
    return x.contiguous(memory_format=torch.channels_last) if cl else x


@contextlib.contextmanager
def _ieee():
    """fp32 convolutions and matmuls without TF32 (the reference's and stage 2's)."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


@contextlib.contextmanager
def _caps(monkeypatch, mod, plan_fn, **caps):
    """Module constants (register caps) set to ``caps`` while the block runs, the plan cache of
    ``plan_fn`` cleared on both sides (a cached plan would ignore them)."""
    for name, v in caps.items():
        monkeypatch.setattr(mod, name, v)
    plan_fn.cache_clear()
    try:
        yield
    finally:
        monkeypatch.undo()
        plan_fn.cache_clear()


def _dw_runs(fused, x):
    sh = fused.CRU.shape
    n, _, h, w = x.shape
    ho, wo = (h - 1) // sh.stride + 1, (w - 1) // sh.stride + 1
    meta = lambda *shape: torch.empty(*shape, dtype=x.dtype, device="meta")  # noqa: E731
    fuse = ks2.squeeze_backward_pays(n, x.shape[1], h, w, sh.up_sq, sh.up, sh.low_sq, x.element_size())
    return ops_s2.dw_pass_pays(meta(n, sh.out_channels, ho, wo), meta(n, sh.up_sq, h, w), fused.CRU.GWC.weight,
                               fused.CRU.PWC2.weight, sh.stride, sh.group_size, torch.backends.cudnn.allow_tf32, fuse)


def _check(fused, base, x, tol, dw=True):
    g = torch.randn(base(x).shape, dtype=x.dtype, device=x.device)
    with capture_launches(keep_args=False) as calls:
        yf, dxf, gf = _run(fused, x, g)
    names = [c.name for c in calls]
    assert names[:5] == STAGE2, names  # stage 2 ran, not the stage-1 fallback
    assert all(k in names for k in STAGE2_BWD) and "_sru_bwd_dx_kernel" not in names, names
    # dA and the conv weight gradients without Y1 (no _cru_zsum_kernel), the input gradients without
    # dY1 / dY2 (no _cru_combine_bwd_kernel, no cuDNN), except where dw_plan / dgrad_plan have no tile
    assert _dw_runs(fused, x) == dw, "the dw pass's tiling changed: update NO_DW"
    assert all((k in names) == dw for k in STAGE2_DW) and ("_cru_zsum_kernel" in names) != dw, names
    sh = fused.CRU.shape
    dg = dw and kb.dgrad_plan(x.shape[2], x.shape[3], sh.kernel_size, sh.stride, sh.up_sq, sh.low_sq,
                              sh.out_channels, x.dtype == torch.float32 and not torch.backends.cudnn.allow_tf32)
    assert all((k in names) == bool(dg) for k in STAGE2_DG) and ("_cru_combine_bwd_kernel" in names) != bool(dg), names
    up = torch.empty(x.shape[0], sh.up_sq, *x.shape[2:], device="meta")
    if dw and not dg:  # cuDNN's input gradients: through the module's grouped weights, or the merged one
        grouped = ops_s2.grouped_dgrad_pays(yf, up, fused.CRU.GWC.weight)
        assert ("_cru_weights_kernel" in names) != grouped, names
    if not dw:  # the rebuild path: Y1 by the module's grouped weights, or the merged one
        assert ("_cru_weights_kernel" in names) != ops_s2.grouped_rebuild_pays(yf, up, fused.CRU.GWC.weight), names
    yr, dxr, gr = _run(base, x, g)
    assert yf.shape == yr.shape and yf.dtype == yr.dtype
    assert yf.is_contiguous(memory_format=torch.channels_last) == x.is_contiguous(memory_format=torch.channels_last)
    errs = {"out": rel(yf, yr), "dx": rel(dxf, dxr)}
    for name in gr:
        if gr[name] is None:  # hard gate: no gradient reaches the GroupNorm parameters
            assert gf[name] is None, name
            continue
        assert gf[name] is not None and gf[name].shape == gr[name].shape, name
        errs[name] = rel(gf[name], gr[name])
    bad = {k: v for k, v in errs.items() if not v <= tol}
    assert not bad, bad
    return errs


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fp64_matches_reference(name, device):
    kw, shape, cl = CONFIGS[name]
    fused, base = _pair(kw, device)
    _check(fused, base, _input(kw, shape, cl, device, torch.float64), TOL[torch.float64], dw=name not in NO_DW)


@pytest.mark.parametrize("caps", [dict(_UP_TILE=256), dict(_HELD=0), dict(_UP_TILE=1024, _OUT_TILE=1024)],
                         ids=["chunked", "streamed-weights", "small-tiles"])
def test_fp64_every_conv_tiling_matches_reference(caps, device, monkeypatch):
    # the register caps pick the conv's tiling; tighter caps force the other code paths at a
    # small shape: input channels in chunks (CIGP < CIG), weights loaded per tile (HOLD off),
    # many row / column tiles with their halos
    with _caps(monkeypatch, ks2, ks2.conv_plan, **caps):
        kw = dict(op_channel=128, group_size=2, stride=2, out_channels=40)
        fused, base = _pair(kw, device)
        x = _input(kw, (2, 11, 13), False, device, torch.float64)
        plan = ks2.conv_plan(2, 11, 13, 3, 2, 2, 16, 20, 32, 32, 8, True)  # the module's shape
        assert plan["N_RB"] * plan["N_WB"] > 1, plan
        if caps.get("_UP_TILE") == 256:
            assert plan["CIGP"] < 16, plan
        if "_HELD" in caps:
            assert not plan["HOLD"], plan
        _check(fused, base, x, TOL[torch.float64])


@pytest.mark.parametrize("name", ["alpha0.75-g4-k7-s3-cl", "hard-gbn-pairwise"])
def test_fp64_recompute_matches_reference(name, device):
    # recompute=True: the backward rebuilds up and low with the squeeze kernel (a second launch)
    kw, shape, cl = CONFIGS[name]
    fused, base = _pair(kw, device)
    fused.recompute = True
    x = _input(kw, shape, cl, device, torch.float64)
    _check(fused, base, x, TOL[torch.float64], dw=name not in NO_DW)
    with capture_launches(keep_args=False) as calls:
        _run(fused, x, torch.randn(base(x).shape, dtype=x.dtype, device=device))
    assert [c.name for c in calls].count("_s2_squeeze_kernel") == 2


def test_input_gradient_pass_has_a_tile_in_every_config_but_k7():
    # the configs above exercise _s2_dgrad_kernel (a change of its caps that dropped one would
    # silently test cuDNN's input gradients instead); and where it has none, the report's shapes
    for name, (kw, shape, cl) in CONFIGS.items():
        sh = _pair(kw, "cpu")[0].CRU.shape
        plan = kb.dgrad_plan(shape[1], shape[2], sh.kernel_size, sh.stride, sh.up_sq, sh.low_sq, sh.out_channels)
        assert (plan is not None) == (name not in NO_DW), name
    assert kb.dgrad_plan(56, 56, 3, 1, 16, 16, 64) and kb.dgrad_plan(28, 28, 3, 1, 32, 32, 32)  # R50 layer1, D121
    assert kb.dgrad_plan(28, 28, 3, 1, 32, 32, 128) is None  # R50 layer2: 32 x 9 x 128 held weights


def test_fp64_stride3_many_row_tiles(device):
    # stride 3 (outputs a tap reads: every third input row; the input-gradient pass's tile spans),
    # an image of several row and column tiles of both Triton convolution-backward passes
    kw = dict(op_channel=16, stride=3, group_size=2, out_channels=12)
    fused, base = _pair(kw, device)
    sh = fused.CRU.shape
    plan = kb.dgrad_plan(17, 41, 3, 3, sh.up_sq, sh.low_sq, 12)
    assert plan["N_RB"] > 1 and plan["N_WB"] > 1, plan
    _check(fused, base, _input(kw, (2, 17, 41), True, device, torch.float64), TOL[torch.float64])


def test_fp64_dw_pass_in_many_programs(device, monkeypatch):
    # the dw pass's partials: several programs over the output tiles (N_SP > 1, their per-sample
    # products reduced in a fixed order) and several channel blocks (N_CB > 1: T and L written by
    # block 0 only), forced by a large partial share and a small register cap at a small shape
    with _caps(monkeypatch, kb, kb.dw_plan, _DW_PARTIAL_SHARE=1e3, _DW_HELD=10000):
        # so many product rows move more than the rebuild path (dw_pass_pays): taken anyway
        monkeypatch.setattr(ops_s2, "dw_pass_pays", lambda *a, **k: True)
        kw = dict(op_channel=32, out_channels=72, group_size=2, stride=2, group_kernel_size=5)
        fused, base = _pair(kw, device)
        sh = fused.CRU.shape
        plan = kb.dw_plan(13, 11, 5, 2, 2, sh.up_sq // 2, 36, sh.up_sq, sh.low_sq, True, 8)
        assert plan["N_SP"] > 1 and plan["N_CB"] > 1, plan
        _check(fused, base, _input(kw, (2, 13, 11), True, device, torch.float64), TOL[torch.float64])


def test_fp64_dw_pass_in_channel_chunks(device, monkeypatch):
    # wide groups: the dw pass splits each group's input channels (and the low channels) into
    # chunks, one program each (N_CI > 1), as R50's layer3 and layer4 do; forced here by a small
    # register cap. 12 channels per group in chunks of 8 and 12 low channels per chunk of 16:
    # the last chunk is part masked.
    with _caps(monkeypatch, kb, kb.dw_plan, _DW_HELD=5000):
        kw = dict(op_channel=48, squeeze_radio=1, group_size=2, out_channels=40)
        fused, base = _pair(kw, device)
        sh = fused.CRU.shape
        assert sh.up_sq == 24 and sh.low_sq == 24
        plan = kb.dw_plan(9, 7, 3, 1, 2, 12, 20, 24, 24, True, 8)
        assert plan["N_CI"] == 2 and plan["CIGP"] == 8, plan
        for cl in (False, True):
            _check(fused, base, _input(kw, (2, 9, 7), cl, device, torch.float64), TOL[torch.float64])


def test_fp64_squeeze_backward_in_many_tiles(device, monkeypatch):
    # a small register cap: many pixel tiles per sample (the per-tile weight-gradient and P / Q
    # rows reduced by _s2_sq_wsum_kernel, the P / Q rows by the SRU's reduce) and channel pairs in
    # two blocks of 16 (HALF = 32)
    with _caps(monkeypatch, ks2, ks2._squeeze_tiles, _SQ_PER_THREAD=8, _SQB_PER_THREAD=8):
        kw = dict(op_channel=64, alpha=0.75, stride=2, out_channels=24)
        fused, base = _pair(kw, device)
        sh = fused.CRU.shape
        bp = ks2._bwd_tiles(sh.up_sq, sh.low_sq, 9 * 11, 8)[3]
        assert ks2.cdiv(9 * 11, bp) >= 6, bp
        _check(fused, base, _input(kw, (2, 9, 11), True, device, torch.float64), TOL[torch.float64])


@pytest.mark.parametrize("name", ["hard-gbn-pairwise", "pwc2-zero-s2-cl", "alpha0.25-s2-k5"])
def test_fp64_stage1_squeeze_backward_where_it_moves_less(name, device, monkeypatch):
    # where the fused squeeze backward's per-tile weight gradients would outweigh s and ds
    # (ks2.squeeze_backward_pays False: small images, many channels), stage 2's backward takes
    # stage 1's squeeze + SRU backward; forced here on small configs. alpha0.25-s2-k5: the input
    # gradients through the grouped weights (ops.stage2.grouped_dgrad_pays) and the
    # block-diagonal squeeze weight (u != l) without the merged one
    kw, shape, cl = CONFIGS[name]
    monkeypatch.setattr(ks2, "squeeze_backward_pays", lambda *a: False)
    fused, base = _pair(kw, device)
    x = _input(kw, shape, cl, device, torch.float64)
    g = torch.randn(base(x).shape, dtype=x.dtype, device=device)
    with capture_launches(keep_args=False) as calls:
        yf, dxf, gf = _run(fused, x, g)
    names = [c.name for c in calls]
    assert names[:5] == STAGE2 and "_sru_bwd_dx_kernel" in names and "_s2_sq_bwd_kernel" not in names, names
    # stage 1's squeeze backward takes d_low and the identity's gradient apart: cuDNN's input gradients
    assert "_s2_dw_kernel" in names and "_s2_dgrad_kernel" not in names and "_cru_combine_bwd_kernel" in names
    grouped = ops_s2.grouped_dgrad_pays(yf, torch.empty(x.shape[0], fused.CRU.shape.up_sq, *x.shape[2:]),
                                        fused.CRU.GWC.weight)
    assert grouped == (name == "alpha0.25-s2-k5") and ("_cru_weights_kernel" in names) != grouped, names
    yr, dxr, gr = _run(base, x, g)
    errs = {"out": rel(yf, yr), "dx": rel(dxf, dxr)}
    errs.update({k: rel(gf[k], gr[k]) for k in gr if gr[k] is not None})
    assert all(gf[k] is None for k in gr if gr[k] is None)
    assert all(v <= TOL[torch.float64] for v in errs.values()), errs


def test_fp64_without_input_gradient(device):
    # a network's first layer: x needs no gradient; the weights' gradients alone (the squeeze
    # backward's second pass, dx, is not launched)
    kw, shape, cl = CONFIGS["alpha0.75-g4-k7-s3-cl"]
    fused, base = _pair(kw, device)
    x = _input(kw, shape, cl, device, torch.float64)
    g = torch.randn(base(x).shape, dtype=x.dtype, device=device)
    with capture_launches() as calls:
        fused(x).backward(g)
    names = [c.name for c in calls]
    assert "_s2_sq_bwd_kernel" in names and "_s2_sq_dx_kernel" not in names, names
    # the reference on an NCHW copy: torch's CPU GroupNorm backward segfaults on a channels_last
    # fp64 input that needs no gradient (torch 2.13)
    base(x.contiguous()).backward(g)
    for (name, p), q in zip(fused.named_parameters(), base.parameters()):
        assert rel(p.grad, q.grad) <= TOL[torch.float64], name


def test_grouped_dgrad_pays_by_traffic(monkeypatch):
    # the merged dense Y1 weight is written and read again; the grouped path reads dY1 twice and
    # adds two gradients: R50's layer2 (activations dominate) keeps the merged weight, layer3 and
    # layer4 (weights dominate at 14 x 14 and 7 x 7) take the grouped weights, at batch 1 and 2
    def pays(n, c, h):
        t = lambda *s: torch.empty(*s, device="meta")  # noqa: E731
        return ops_s2.grouped_dgrad_pays(t(n, c, h, h), t(n, c // 4, h, h), t(c, c // 8, 3, 3))
    for n in (1, 2):
        assert not pays(n, 64, 56) and not pays(n, 128, 28) and pays(n, 256, 14) and pays(n, 512, 7)
    assert not pays(64, 256, 14) and not pays(128, 512, 7)
    # counted at batch 1 for a training batch (the benchmarks' per-launch extrapolation): its path
    monkeypatch.setenv("SCCONV_DISPATCH_BATCH", "128")
    assert not pays(1, 256, 14) and not pays(2, 512, 7)


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped", "merged"])
def test_fp64_rebuild_path_matches_reference(grouped, device, monkeypatch):
    # without the dw pass, Y1 and PWC2's output are rebuilt by cuDNN, through the module's grouped
    # weights or the merged dense Y1 weight (stage 1's); both forced, at a config with PWC2
    # channels, stride 2 and alpha != 1/2 (the merged weight block-diagonal)
    monkeypatch.setattr(ops_s2, "dw_pass_pays", lambda *a, **k: False)
    monkeypatch.setattr(ops_s2, "grouped_rebuild_pays", lambda *a, **k: grouped)
    kw = dict(op_channel=32, alpha=0.25, stride=2, out_channels=20)
    fused, base = _pair(kw, device)
    x = _input(kw, (2, 7, 9), True, device, torch.float64)
    with capture_launches(keep_args=False) as calls:
        _run(fused, x, torch.randn(base(x).shape, dtype=x.dtype, device=device))
    names = [c.name for c in calls]
    assert "_s2_dw_kernel" not in names and "_cru_zsum_kernel" in names
    assert ("_cru_weights_kernel" in names) != grouped and ("_cru_wgrad_kernel" in names) != grouped, names
    fused.zero_grad(set_to_none=True)
    _check(fused, base, x, TOL[torch.float64], dw=False)


def test_grouped_rebuild_pays_by_traffic(monkeypatch):
    # the merged dense Y1 weight costs 4 weight sizes per step, the grouped weights about 4 Y1
    # and 3 up per sample: R50's layer4 rebuilds with the grouped weights up to about 20
    # samples, layer1 never
    def pays(n, c, h):
        t = lambda *shape: torch.empty(*shape, device="meta")  # noqa: E731
        return ops_s2.grouped_rebuild_pays(t(n, c, h, h), t(n, c // 4, h, h), t(c, c // 8, 3, 3))
    assert pays(1, 512, 7) and pays(16, 512, 7) and not pays(32, 512, 7) and pays(2, 256, 14)
    assert not pays(1, 64, 56) and not pays(64, 256, 14)
    monkeypatch.setenv("SCCONV_DISPATCH_BATCH", "64")
    assert not pays(1, 512, 7)


def test_dw_pass_pays_by_traffic(monkeypatch):
    # the dw pass's weight-sized product rows are per sample, the rebuild path's weight traffic
    # per step (merged) or small per sample (grouped): at the report's shapes (fp32) R50's layer4
    # never takes the pass, layer3 up to a few samples, the rest always; counted on a training
    # batch's path, the rebuild.
    # DenseNet's 128 -> 32 at 14 x 14 moves a little more with the pass at batch 64 but saves
    # the rebuild path's 4 more launches (with the Triton dgrad after it)
    def pays(n, c, h, s=1, cout=None):
        cout = cout or c
        t = lambda *shape: torch.empty(*shape, device="meta")  # noqa: E731
        ho, u = (h - 1) // s + 1, c // 4
        fuse = ks2.squeeze_backward_pays(n, c, h, h, u, 2 * u, u, 4)
        return ops_s2.dw_pass_pays(t(n, cout, ho, ho), t(n, u, h, h), t(cout, u // 2, 3, 3), t(cout - u, u, 1, 1),
                                   s, 2, True, fuse)
    for n in (1, 2, 64):
        assert pays(n, 64, 56) and pays(n, 128, 28) and pays(n, 128, 56, 2) and pays(n, 128, 14, cout=32)
        assert not pays(n, 512, 7) and not pays(n, 512, 14, 2)  # the grouped rebuild moves less
    assert pays(2, 256, 14) and not pays(64, 256, 14)
    monkeypatch.setattr(ops_s2, "LAUNCH_BYTES", 0)
    assert not pays(64, 128, 14, cout=32)
    monkeypatch.setenv("SCCONV_DISPATCH_BATCH", "64")
    assert not pays(1, 256, 14)


@needs_interpreter("Triton launches are counted under the interpreter")
def test_dw_pass_choice_moves_less_counted(monkeypatch):
    # the rule's bytes (no launch term) against the meter, both paths counted, on each side of
    # it: SCConv(48) at 2 x 2 (weights dominate) rebuilds, SCConv(64) at 6 x 6 and batch 3 takes
    # the pass; each time the one that moves less
    from benchmarks.meter import measure_step

    monkeypatch.setattr(ops_s2, "LAUNCH_BYTES", 0)
    for c, h, n, takes_pass in ((48, 2, 1, False), (64, 6, 3, True)):
        moved = {}
        for force in (True, False):
            torch.manual_seed(0)
            mod, x = scconv_triton.SCConv(c), torch.randn(n, c, h, h)
            with monkeypatch.context() as m:
                m.setattr(ops_s2, "dw_pass_pays", lambda *a, **k: force)
                with capture_launches(keep_args=False) as calls:
                    moved[force] = measure_step(mod, x, keep_meters=True)["bwd_meter"].total_bytes
            assert ("_s2_dw_kernel" in [c.name for c in calls]) == force
        assert _dw_runs(mod, x) == takes_pass
        assert (moved[True] < moved[False]) == takes_pass, moved


def test_squeeze_backward_pays_by_traffic():
    # the rule's two sides at the report's shapes (fp32, batch 2): 64 channels at 56 x 56 fuse;
    # 512 channels at 7 x 7 (per-tile weight gradients of 128 x 256 x 2) do not
    assert ks2.squeeze_backward_pays(2, 64, 56, 56, 16, 32, 16, 4)
    assert ks2.squeeze_backward_pays(2, 128, 28, 28, 32, 64, 32, 4)
    assert not ks2.squeeze_backward_pays(2, 512, 7, 7, 128, 256, 128, 4)


def test_gradcheck_stage2_function(device):
    # torch.autograd.gradcheck of Stage2Function in fp64 (fast mode), every tensor input at once;
    # inputs drawn with every gate value away from tau (the soft gate is discontinuous there)
    from scconv_triton.ops.stage2 import scconv_stage2

    kw = dict(op_channel=16, group_num=4, alpha=0.75, stride=2, out_channels=10)
    fused, _ = _pair(kw, device)
    sru, cru = fused.SRU, fused.CRU
    x = draw_away_from_gate(sru, lambda: _input(kw, (1, 5, 4), False, device, torch.float64), margin=1e-4)
    params = [p.detach().clone().requires_grad_(True) for p in (
        sru.gn.weight, sru.gn.bias, cru.squeeze1.weight, cru.squeeze2.weight, cru.GWC.weight, cru.GWC.bias,
        cru.PWC1.weight, cru.PWC2.weight)]

    def f(x, *ps):
        return scconv_stage2(x, *ps, group_num=sru.group_num, eps=sru.gn.eps, torch_gn=sru.torch_gn,
                             gate_treshold=sru.gate_treshold, mode=sru.math.code, shape=cru.shape,
                             softmax=cru.softmax)

    assert torch.autograd.gradcheck(f, (x.requires_grad_(True), *params), fast_mode=True, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("name", ["default-cl", "alpha0.25-s2-k5", "pwc2-zero-s2-cl"])
def test_fp32_ieee_matches_reference_where_gates_agree(name, device):
    kw, shape, cl = CONFIGS[name]
    fused, base = _pair(kw, device, torch.float32)
    x = draw_away_from_gate(base.SRU, lambda: _input(kw, shape, cl, device, torch.float32), margin=1e-6, tries=20)
    with _ieee():
        _check(fused, base, x, TOL[torch.float32], dw=name not in NO_DW_IEEE)


@pytest.mark.parametrize("name", ["alpha0.75-g4-k7-s3-cl", "default-cl"])  # stage 1's / the Triton conv backward
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precisions_as_good_as_the_reference_in_that_dtype(dtype, name, device):
    kw, shape, cl = CONFIGS[name]
    fused, base = _pair(kw, device)
    x64 = _input(kw, shape, cl, device, torch.float64)
    g64 = torch.randn(base(x64).shape, dtype=torch.float64, device=device)
    truth = _run(base, x64, g64)
    base_lp = ref.SCConv(**kw).to(device, dtype)
    base_lp.load_state_dict(base.state_dict())
    lp = _run(base_lp, x64.to(dtype), g64.to(dtype))
    with capture_launches(keep_args=False) as calls:
        ours = _run(fused.to(dtype), x64.to(dtype), g64.to(dtype))
    names = [c.name for c in calls]
    assert names[:5] == STAGE2 and (("_s2_dgrad_kernel" in names) == (name not in NO_DW)), names
    floor = {torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    assert ours[0].dtype == dtype
    assert rel(ours[0], truth[0]) <= max(2 * rel(lp[0], truth[0]), floor)
    assert rel(ours[1], truth[1]) <= max(2 * rel(lp[1], truth[1]), floor)
    for name in truth[2]:
        assert rel(ours[2][name], truth[2][name]) <= max(2 * rel(lp[2][name], truth[2][name]), 2 * floor), name


@pytest.mark.parametrize("cl", [False, True])
def test_bitwise_deterministic(cl, device):
    kw = dict(op_channel=16, stride=2)
    fused, _ = _pair(kw, device, torch.float32)
    x = _input(kw, (2, 9, 7), cl, device, torch.float32)
    g = torch.randn(fused(x).shape, device=device)
    a, b = _run(fused, x, g), _run(fused, x, g)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    for name in a[2]:
        assert torch.equal(a[2][name], b[2][name]), name


def test_dot_flops_are_grouped_not_densified(device):
    # benchmarks.meter counts 2*M*N*K of every tl.dot the interpreter runs, on whole blocks. One
    # stage-2 forward at C=64, groups 2: the squeeze's FLOPs are SCConv's exactly; the conv's
    # are SCConv's per computed lane (grouped GWC, PWC1, Y2's LSQ columns) times the lanes its
    # tiles compute (a tile also computes the halo lanes it does not own, and pads the taps to
    # pairs: at most 15% over), far below a densified GWC's on the same lanes.
    if device != "cpu":
        pytest.skip("counts the interpreter's dots")
    from benchmarks.meter import Meter

    n, c, h = 2, 64, 16  # 256 pixels: whole squeeze tiles
    model = scconv_triton.SCConv(c, backend="triton").double()
    with torch.no_grad(), Meter() as meter:
        model(torch.randn(n, c, h, h, dtype=torch.float64))
    flops = {r.name: r.flops for r in meter.by_kind("triton")}
    sh = model.CRU.shape
    g, usq, lsq, cout = sh.group_size, sh.up_sq, sh.low_sq, sh.out_channels
    cig = usq // g
    squeeze = 2 * n * h * h * (usq * sh.up + lsq * sh.low)
    assert flops["_s2_squeeze_kernel"] == squeeze
    plan = ks2.conv_plan(n, h, h, 3, 1, g, cig, cout // g, usq, lsq, sh.pwc2_out, True)
    lanes = n * plan["N_RB"] * plan["N_WB"] * plan["BH"] * plan["BW"]
    grouped = 2 * lanes * cout * (cig * 9 + usq + lsq)
    dense = 2 * lanes * cout * (usq * 9 + usq + lsq)
    assert grouped <= flops["_s2_conv_kernel"] <= 1.15 * grouped, (flops, grouped)
    assert flops["_s2_conv_kernel"] < 0.7 * dense


@pytest.mark.parametrize("h, st", [(7, 1), (5, 2), (3, 1), (9, 1), (14, 2)])
def test_conv_lanes_cover_the_outputs_not_the_up_tile(h, st):
    # a small image fits one up tile wider than its outputs (7 x 7 in 16 x 16): the lanes (a
    # power of two per axis) follow the outputs a tile owns, not the up tile's size
    for n, g, cig, cog, usq, lsq in ((2, 2, 8, 32, 16, 16), (2, 2, 64, 256, 128, 128), (1, 4, 4, 16, 16, 16)):
        plan = ks2.conv_plan(n, h, h, 3, st, g, cig, cog, usq, lsq, g * cog - lsq, False)
        assert plan is not None
        ho = (h - 1) // st + 1
        owned = np2(min(plan["OHT"], ho)) * np2(min(plan["OWT"], ho))
        assert plan["BH"] * plan["BW"] <= max(16, owned), plan
        # and all tiles together: at most twice the image's lanes (4 groups at 7 x 7 take two
        # column tiles within their caps; one 16 x 16 tile would be 4x)
        assert plan["N_RB"] * plan["N_WB"] * plan["BH"] * plan["BW"] <= 2 * max(16, np2(ho) ** 2), plan


def test_conv_dot_flops_on_a_small_image(device):
    # 7 x 7 outputs in one 16-row up tile run on 8 rows of lanes: within 64 / 49 of SCConv's
    # FLOPs on the outputs, and the GWC's nine taps padded to ten (pairs of 8-channel blocks).
    # Lanes tied to the up tile's rows took four 8 x 8 tiles here (5.6x, counted). The output is
    # the reference's, as in test_fp64_matches_reference.
    if device != "cpu":
        pytest.skip("counts the interpreter's dots")
    from benchmarks.meter import Meter

    n, c, h = 2, 64, 7
    fused, base = _pair(dict(op_channel=c), device)
    sh = fused.CRU.shape
    g, cig = sh.group_size, sh.up_sq // sh.group_size
    plan = ks2.conv_plan(n, h, h, 3, 1, g, cig, sh.out_channels // g, sh.up_sq, sh.low_sq, sh.pwc2_out, True)
    assert plan["BH"] < plan["RHP"] and plan["N_RB"] == 1, plan  # fewer lanes than the up tile's rows
    x = _input(dict(op_channel=c), (n, h, h), False, device, torch.float64)
    with torch.no_grad(), Meter() as meter:
        y = fused(x)
    assert rel(y, base(x)) <= TOL[torch.float64]
    flops = {r.name: r.flops for r in meter.by_kind("triton")}
    nominal = 2 * n * h * h * sh.out_channels * (cig * 9 + sh.up_sq + sh.low_sq)
    assert nominal <= flops["_s2_conv_kernel"] <= 64 / 49 * 10 / 9 * nominal, (flops, nominal)


def test_stage_keyword(device):
    with pytest.raises(ValueError, match="stage must be 1 or 2"):
        scconv_triton.SCConv(16, stage=3)
    kw = dict(op_channel=16, stride=2)
    fused, _ = _pair(kw, device, torch.float32)
    x = _input(kw, (2, 5, 6), False, device, torch.float32)
    with capture_launches(keep_args=False) as calls:
        fused(x)
    assert [c.name for c in calls] == STAGE2
    fused.stage = 1
    with capture_launches(keep_args=False) as calls:
        fused(x)
    assert "_s2_conv_kernel" not in [c.name for c in calls]
