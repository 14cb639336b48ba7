"""The fused SCConv against scconv_triton.reference.SCConv, forward and every gradient.

float64: 1e-10 relative (both paths compute in fp64, so the gate decisions agree).
float32: 1e-5 relative norm, on inputs whose gate values r are all farther than
1e-6 from tau (fp32 rounding moves r by ~1e-7; SPEC.md: the gate is discontinuous; the check is a precondition
of the comparison, not a filter on its result).
float16 / bfloat16: against the float64 reference on the same rounded values, within
~3x the error the implementation was measured to have (tests/_helpers.py LOW_TOL), and
never much worse than the reference computed in that dtype.
"""
import pytest
import torch

import scconv_triton
from benchmarks.meter import SavedBytes
from scconv_triton import reference as ref
from _helpers import TOL, draw_away_from_gate, low_tol, rel

CONFIGS = {
    "default": dict(op_channel=16),
    "gbn-pairwise": dict(op_channel=16, torch_gn=False, softmax="pairwise"),
    "hard-gate": dict(op_channel=16, gate="hard", gate_treshold=0.45),
    "stride2-odd": dict(op_channel=16, stride=2, h=7, w=5),
    "densenet-like": dict(op_channel=16, out_channels=4),  # PWC2 has no channels
    "wider-out": dict(op_channel=12, group_num=3, out_channels=20, alpha=0.5, squeeze_radio=3, group_size=2),
    "alpha-k5-g4": dict(op_channel=24, group_num=6, alpha=0.75, group_size=3, group_kernel_size=5),
    "k1-g1-tau": dict(op_channel=20, group_num=5, group_size=1, group_kernel_size=1, gate_treshold=0.3),
    "recompute": dict(op_channel=16, recompute=True, stride=2),
    "batch1": dict(op_channel=16, n=1, h=5, w=9),
}


def _split(cfg):
    cfg = dict(cfg)
    shape = (cfg.pop("n", 2), cfg["op_channel"], cfg.pop("h", 6), cfg.pop("w", 7))
    recompute = cfg.pop("recompute", False)
    return shape, cfg, recompute


def _pair(cfg, device, dtype=torch.float64):
    shape, kw, recompute = _split(cfg)
    fused = scconv_triton.SCConv(**kw, recompute=recompute, backend="triton", stage=1 if recompute else 2)
    with torch.no_grad():  # non-trivial values everywhere, so every term can fail
        for p in fused.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
        fused.SRU.gn.weight.add_(1.0)
    base = ref.SCConv(**kw)
    base.load_state_dict(fused.state_dict())
    return fused.to(device, dtype), base.to(device, dtype), shape


def _run(model, x, g):
    x = x.detach().clone().requires_grad_(True)
    y = model(x)
    y.backward(g)
    grads = {n: p.grad for n, p in model.named_parameters()}
    return y, x.grad, grads


def _check(fused, base, x, tol):
    g = torch.randn(base(x).shape, dtype=x.dtype, device=x.device)
    yf, dxf, gf = _run(fused, x, g)
    yr, dxr, gr = _run(base, x, g)
    assert yf.shape == yr.shape
    assert yf.dtype == yr.dtype
    assert rel(yf, yr) <= tol, ("out", rel(yf, yr))
    assert rel(dxf, dxr) <= tol, ("dx", rel(dxf, dxr))
    for name in gr:
        if gr[name] is None:  # hard gate: no gradient reaches the GroupNorm parameters
            assert gf[name] is None, name
            continue
        assert gf[name] is not None, name
        assert gf[name].shape == gr[name].shape, name
        assert rel(gf[name], gr[name]) <= tol, (name, rel(gf[name], gr[name]))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fp64_matches_reference(name, device):
    fused, base, shape = _pair(CONFIGS[name], device)
    x = torch.randn(shape, dtype=torch.float64, device=device)
    _check(fused, base, x, TOL[torch.float64])


@pytest.mark.parametrize("name", ["default", "gbn-pairwise", "stride2-odd", "densenet-like", "alpha-k5-g4"])
def test_fp32_matches_reference_where_gates_agree(name, device):
    fused, base, shape = _pair(CONFIGS[name], device, torch.float32)
    x = draw_away_from_gate(base.SRU, lambda: torch.randn(shape, device=device), margin=1e-6, tries=20)
    _check(fused, base, x, TOL[torch.float32])


@pytest.mark.parametrize("name", ["default", "stride2-odd"])
def test_channels_last_matches_and_stays_channels_last(name, device):
    fused, base, shape = _pair(CONFIGS[name], device)
    x = torch.randn(shape, dtype=torch.float64, device=device).to(memory_format=torch.channels_last)
    _check(fused, base, x, TOL[torch.float64])
    assert fused(x).is_contiguous(memory_format=torch.channels_last)


def half_precision_errors(dtype, device):
    """16-bit fused SCConv against the fp64 reference on the same (rounded) parameters and
    input, and the reference itself run in that dtype: ({name: fused error}, {name: reference
    error}) over the output, dx and every parameter gradient."""
    fused, base, shape = _pair(CONFIGS["default"], device)
    with torch.no_grad():  # gamma in (0.5, 1.5): a channel with gamma ~ 0 holds all its r at tau
        base.SRU.gn.weight.uniform_(0.5, 1.5)
    base_lp = ref.SCConv(16).to(device, dtype)
    base_lp.load_state_dict(base.state_dict())
    base.load_state_dict(base_lp.state_dict())  # fp64 truth on the rounded parameters
    fused.load_state_dict(base_lp.state_dict())
    # no gate value within 1e-5 of tau: the fused path computes r in fp32 (error ~1e-6) from
    # the rounded x, so it takes the fp64 truth's decisions (SPEC.md: the gate is discontinuous)
    x = draw_away_from_gate(base.SRU, lambda: torch.randn(shape, device=device).to(dtype), margin=1e-5)
    g = torch.randn(shape[0], 16, shape[2], shape[3], dtype=torch.float64, device=device).to(dtype)
    truth_y, truth_dx, truth_g = _run(base, x.double(), g.double())
    ry, rdx, rg = _run(base_lp, x, g)
    fy, fdx, fg = _run(fused.to(dtype), x, g)
    assert fy.dtype == dtype and fdx.dtype == dtype
    assert all(fg[n].dtype == dtype for n in truth_g)
    ours = {"out": rel(fy, truth_y), "dx": rel(fdx, truth_dx), **{n: rel(fg[n], truth_g[n]) for n in truth_g}}
    theirs = {"out": rel(ry, truth_y), "dx": rel(rdx, truth_dx), **{n: rel(rg[n], truth_g[n]) for n in truth_g}}
    return ours, theirs


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precisions_as_good_as_the_reference_in_that_dtype(dtype, device):
    # each quantity within ~3x its measured error (tests/_helpers.py LOW_TOL) ...
    ours, theirs = half_precision_errors(dtype, device)
    tol = {k: low_tol("scconv", dtype, k) for k in ours}
    bad = {k: (f"{e:.2e}", tol[k]) for k, e in ours.items() if not e <= tol[k]}
    assert not bad, f"(error, tolerance) above tolerance: {bad}"
    # ... and never much worse than the reference computed in the same dtype
    worse = {k: (f"{e:.2e}", f"{theirs[k]:.2e}") for k, e in ours.items() if not e <= max(2 * theirs[k], tol[k] / 3)}
    assert not worse, worse


def test_reference_checkpoint_loads_unchanged(device):
    base = ref.ScConv(32).double()
    fused = scconv_triton.ScConv(32).double()
    missing = fused.load_state_dict(base.state_dict())
    assert not missing.missing_keys and not missing.unexpected_keys
    x = torch.randn(2, 32, 5, 6, dtype=torch.float64, device=device)
    assert rel(fused.to(device)(x), base.to(device)(x)) < 1e-10


def test_batch_zero_gives_empty_output(device):
    fused, base, _ = _pair(CONFIGS["default"], device)
    x = torch.randn(0, 16, 5, 5, dtype=torch.float64, device=device)
    assert fused(x).shape == base(x).shape == (0, 16, 5, 5)


def test_backward_of_a_sum_with_expanded_grad(device):
    # y.sum().backward() hands the Function an expanded (stride 0) gradient
    fused, base, shape = _pair(CONFIGS["default"], device)
    x = torch.randn(shape, dtype=torch.float64, device=device)
    xf, xr = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    fused(xf).sum().backward()
    base(xr).sum().backward()
    assert rel(xf.grad, xr.grad) < 1e-10


def test_non_contiguous_and_expanded_inputs(device):
    fused, base, _ = _pair(CONFIGS["default"], device)
    big = torch.randn(2, 16, 12, 14, dtype=torch.float64, device=device)
    sliced = big[:, :, ::2, 1::2]  # strided view
    expanded = torch.randn(1, 16, 5, 5, dtype=torch.float64, device=device).expand(3, -1, -1, -1)
    for x in (sliced, expanded):
        assert rel(fused(x), base(x)) < 1e-10


def test_recompute_gives_identical_results_and_saves_less(device, deterministic):
    # bitwise (deterministic: cuDNN's backward algorithms may otherwise differ run to run on a GPU)
    kw = dict(op_channel=16)
    # stage 1's keyword (stage 2, the default, always saves what stage 1 with recompute saves)
    a = scconv_triton.SCConv(**kw, backend="triton", stage=1).double().to(device)
    b = scconv_triton.SCConv(**kw, backend="triton", recompute=True, stage=1).double().to(device)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 16, 6, 6, dtype=torch.float64, device=device)
    ya, dxa, ga = _run(a, x, torch.ones(2, 16, 6, 6, dtype=torch.float64, device=device))
    yb, dxb, gb = _run(b, x, torch.ones(2, 16, 6, 6, dtype=torch.float64, device=device))
    assert torch.equal(ya, yb) and torch.equal(dxa, dxb)
    assert all(torch.equal(ga[k], gb[k]) for k in ga)
    assert _saved_bytes(b, x) < _saved_bytes(a, x)


def _saved_bytes(model, x):
    """Bytes of distinct storages saved for backward, the input and parameters apart."""
    xr = x.detach().requires_grad_(True)
    with SavedBytes(input=[xr], params=model.parameters()) as saved:
        model(xr)
    return saved.bytes


@pytest.mark.parametrize("stage,recompute,low,budget", [(1, False, 0.25, 2.5), (1, True, 0.25, 0.6),
                                                         (2, False, 0.25, 0.6), (2, True, 0.0, 0.05)])
def test_saved_for_backward_within_budget(stage, recompute, low, budget, device):
    # the budgets at C=64, 56x56, S = one input-sized tensor, besides x: stage 1 <= 2.5 S (<= 0.6
    # with recompute), stage 2 <= 0.6 S (the squeezed tensors, C/2 channels) and <= 0.05 S with
    # recompute (the statistics and A only); weight-sized tensors count too: the real shape
    model = scconv_triton.SCConv(64, backend="triton", stage=stage, recompute=recompute).to(device)
    x = torch.randn(1, 64, 56, 56, device=device)
    s_bytes = x.numel() * x.element_size()
    saved = _saved_bytes(model, x) / s_bytes
    assert low < saved <= budget, saved


def test_fused_path_actually_runs_triton(device):
    # guard against a silent fallback to the reference: the triton path must launch the kernels
    from scconv_triton.testing import capture_launches

    fused, _, shape = _pair(CONFIGS["default"], device)
    x = torch.randn(shape, dtype=torch.float64, device=device)
    with capture_launches(keep_args=False) as calls:
        fused(x)
    names = [c.name for c in calls]
    assert names == ["_sru_stats_partial_kernel", "_sru_stats_merge_kernel", "_s2_squeeze_kernel",
                     "_s2_means_kernel", "_s2_conv_kernel"], names  # stage 2, the default
    fused.stage = 1
    with capture_launches(keep_args=False) as calls:
        fused(x)
    names = [c.name for c in calls]
    assert names == ["_sru_stats_partial_kernel", "_sru_stats_merge_kernel", "_sru_apply_kernel",
                     "_cru_weights_kernel", "_cru_zsum_kernel", "_cru_combine_kernel"], names
