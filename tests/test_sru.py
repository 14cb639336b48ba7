"""Fused SRU (kernels/sru.py, scconv_triton/ops/sru.py) against scconv_triton.reference.SRU.

Forward, dx, d gn.weight and d gn.bias on fresh random inputs: float64 to 1e-10, fp32 to
1e-5 relative norm where both paths take the same gate decisions, fp16 / bf16 at ~3x the
measured error (tests/_helpers.py LOW_TOL) plus gate-aware mismatch confinement (SPEC.md,
"the gate is discontinuous"). Every tensor lives on tests/_helpers.DEVICE.
"""
import pytest
import torch

import scconv_triton
from scconv_triton import reference as ref
from scconv_triton.kernels import sru as K
from scconv_triton.ops import sru as ops
from _helpers import DEVICE, TOL, draw_away_from_gate, low_tol, rel, sru_gate_r

# tl.sigmoid's exp overflows harmlessly (to 1 / inf = 0) in the numpy-backed interpreter
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")

# (N, C, groups, H, W, tau, gate, torch_gn, channels_last)
CONFIGS = [
    (2, 8, 2, 5, 7, 0.5, "soft", True, False),
    (1, 12, 2, 3, 5, 0.3, "soft", False, True),  # C/groups = 6, batch 1
    (2, 16, 4, 7, 9, 0.6, "hard", True, True),
    (3, 20, 5, 1, 11, 0.5, "soft", False, False),  # H = 1
    (2, 6, 3, 9, 3, 0.45, "hard", False, False),
    (1, 24, 4, 6, 6, 0.55, "soft", True, True),  # C/groups = 6, H*W = 36
    (2, 36, 3, 5, 5, 0.5, "soft", True, False),  # C/groups = 12
    (2, 10, 5, 3, 3, 0.4, "hard", True, True),
]
IDS = [f"N{n}C{c}G{g}_{h}x{w}_tau{t}_{gate}_{'tgn' if tgn else 'gbn'}_{'cl' if cl else 'nchw'}"
       for n, c, g, h, w, t, gate, tgn, cl in CONFIGS]


def make_ref(C, G, tau, gate, torch_gn, dtype=torch.float64):
    """Reference SRU with random gn.weight (sum 2, so w_gamma ~ O(1)) and a nonzero bias."""
    m = ref.SRU(C, G, tau, torch_gn=torch_gn, gate=gate)
    with torch.no_grad():
        w = torch.randn(C, dtype=torch.float64)
        w = w - w.mean() + 2.0 / C
        m.gn.weight.copy_(w.view_as(m.gn.weight))
        m.gn.bias.copy_((0.3 * torch.randn(C, dtype=torch.float64)).view_as(m.gn.bias))
    return m.to(DEVICE, dtype)


def fused_twin(m):
    f = scconv_triton.SRU(m.channels, m.group_num, m.gate_treshold, torch_gn=m.torch_gn, gate=m.gate,
                          backend="triton")
    f = f.to(m.gn.weight.device, m.gn.weight.dtype)
    f.load_state_dict(m.state_dict())
    return f


def draw_x(m, shape, dtype, channels_last, margin, mean=0.0):
    """Fresh random x (in dtype) with no r within ``margin`` of tau, so both paths gate alike."""
    def make():
        x = (mean + torch.randn(shape, dtype=torch.float64)).to(DEVICE, dtype)
        return x.to(memory_format=torch.channels_last) if channels_last else x
    return draw_away_from_gate(m, make, margin)


def run(module, x, ds):
    x = x.detach().clone().requires_grad_()
    for p in module.parameters():
        p.grad = None
    y = module(x)
    y.backward(ds)
    return y.detach(), x.grad, module.gn.weight.grad, module.gn.bias.grad


def check_all(got, want, tol, hard):
    names = ("out", "dx", "dweight", "dbias")
    for name, a, b in zip(names, got, want):
        if hard and name in ("dweight", "dbias"):
            assert a is None and b is None, name
            continue
        assert a.shape == b.shape and a.dtype == b.dtype, name
        e = rel(a, b)
        assert e <= tol, f"{name}: relative error {e:.3e} > {tol:.1e}"


class LaunchLog:
    """Wraps the module's kernels to record launches and the tensors handed to them."""

    NAMES = ("_sru_stats_partial_kernel", "_sru_stats_merge_kernel", "_sru_apply_kernel",
             "_sru_bwd_partial_kernel", "_sru_bwd_reduce_kernel", "_sru_bwd_finalize_kernel",
             "_sru_bwd_dx_kernel")

    def __init__(self, monkeypatch):
        self.calls = []
        for name in self.NAMES:
            monkeypatch.setattr(K, name, self._wrap(name, getattr(K, name)))

    def _wrap(self, name, kernel):
        log = self

        class Wrapped:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    log.calls.append((name, args))
                    return kernel[grid](*args, **kwargs)
                return launch
        return Wrapped()

    def names(self):
        return [c[0] for c in self.calls]


# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_matches_reference(cfg, dtype):
    N, C, G, H, W, tau, gate, tgn, cl = cfg
    m = make_ref(C, G, tau, gate, tgn, dtype)
    f = fused_twin(m)
    x = draw_x(m, (N, C, H, W), dtype, cl, margin=1e-9 if dtype == torch.float64 else 1e-5)
    ds = torch.randn(N, C, H, W, dtype=dtype, device=DEVICE)
    if cl:
        ds = ds.to(memory_format=torch.channels_last)
    got, want = run(f, x, ds), run(m, x, ds)
    check_all(got, want, TOL[dtype], gate == "hard")
    # memory format kept: the output and dx have x's strides
    assert got[0].stride() == x.stride() and got[1].stride() == x.stride()


@pytest.mark.parametrize("torch_gn", [True, False], ids=["tgn", "gbn"])
def test_large_mean(torch_gn):
    """mean 1e3, std 1 in fp32: statistics without E[x^2] - E[x]^2 cancellation."""
    N, C, G, H, W = 2, 8, 2, 9, 11
    m64 = make_ref(C, G, 0.5, "soft", torch_gn)
    m32 = make_ref(C, G, 0.5, "soft", torch_gn, torch.float32)
    m32.load_state_dict(m64.state_dict())
    x = draw_x(m64, (N, C, H, W), torch.float32, False, margin=1e-5, mean=1e3)
    eps = m64.gn.eps
    mean, rstd = K.sru_stats(x, G, eps, torch_gn, split=3, tile=16)
    xg = x.double().reshape(N, G, -1)
    mean64 = xg.mean(-1)
    rstd64 = 1 / (xg.var(-1, unbiased=False) + eps).sqrt() if torch_gn else 1 / (xg.std(-1) + eps)
    assert mean.dtype == torch.float64 and rstd.dtype == torch.float32  # mean: fp32 hi/lo in kernels
    assert rel(mean, mean64) < 1e-7
    assert rel(rstd, rstd64) < 2e-6
    # the naive one-pass formula in fp32 would be off by far more than this tolerance
    naive = (xg.float() ** 2).mean(-1) - xg.float().mean(-1) ** 2
    assert rel(naive, xg.var(-1, unbiased=False)) > 1e-3
    # Outputs and gradients against float64 on the same fp32 values. With |x| ~ 1e3 even the
    # fp32 reference is ~1e-5 off (x - mean rounds at ulp(1e3) ~ 6e-5), so the bound is: no
    # worse than twice the fp32 reference's own error, and 5e-5 at most.
    ds = torch.randn(N, C, H, W, device=DEVICE)
    got = run(fused_twin(m32), x, ds)
    ref32 = run(m32, x, ds)
    want = run(m64, x.double(), ds.double())
    for name, a, r32, b in zip(("out", "dx", "dweight", "dbias"), got, ref32, want):
        e = rel(a, b)
        assert e < 5e-5 and e <= max(2 * rel(r32, b), 1e-6), f"{name}: {e:.2e} vs reference fp32 {rel(r32, b):.2e}"


def half_precision_errors(dtype, cl):
    """16-bit x and parameters (loaded, computed in fp32, stored back) against fp64 on the same
    values: {name: relative error}. Also checks what holds at any precision: dtypes, strides,
    and that forward mismatches on a plain random x sit only where r is within a hair of tau."""
    N, C, G, H, W = 2, 12, 3, 7, 5
    m = make_ref(C, G, 0.5, "soft", not cl, dtype)
    m64 = make_ref(C, G, 0.5, "soft", not cl)
    m64.load_state_dict({k: v.double() for k, v in m.state_dict().items()})
    f = fused_twin(m)
    errs = {}
    # forward on a plain random x: elementwise mismatches only where r is within a hair of tau
    x = torch.randn(N, C, H, W, device=DEVICE).to(dtype)
    if cl:
        x = x.to(memory_format=torch.channels_last)
    with torch.no_grad():
        y = f(x)
        y64 = m64(x.double())
    assert y.dtype == dtype and y.stride() == x.stride()
    near = (sru_gate_r(m, x) - m.gate_treshold).abs() < 1e-5
    h = C // 2
    near_pair = near | torch.cat([near[:, h:], near[:, :h]], dim=1)
    keep = ~near_pair
    # elementwise |y - y64| / (1 + |y64|) away from the threshold: no single position may be
    # wrong, which a norm would average out (measured as its own entry, same tolerance table)
    errs["out-max-elementwise"] = ((y.double() - y64).abs() / (1 + y64.abs()))[keep].max().item()
    errs["out-any-x"] = rel(y.double()[keep], y64[keep])
    # gradients on an input with no r near tau (the gate takes the same branches)
    x = draw_x(m, (N, C, H, W), dtype, cl, margin=1e-5)
    ds = torch.randn(N, C, H, W, device=DEVICE).to(dtype)
    got = run(f, x, ds)
    want = run(m64, x.double(), ds.double())
    for name, a, b in zip(("out", "dx", "dweight", "dbias"), got, want):
        assert a.dtype == dtype, name
        errs[name] = rel(a, b)
    return errs


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
def test_half_precisions(dtype, cl):
    # each quantity within ~3x its measured error (tests/_helpers.py LOW_TOL)
    errs = half_precision_errors(dtype, cl)
    bad = {k: (f"{e:.2e}", low_tol("sru", dtype, k)) for k, e in errs.items() if not e <= low_tol("sru", dtype, k)}
    assert not bad, f"(error, tolerance) above tolerance: {bad}"


@pytest.mark.parametrize("torch_gn", [True, False], ids=["tgn", "gbn"])
def test_many_tiles_and_splits(torch_gn):
    """Small tiles and forced splits exercise the Chan merges and the two-stage reductions."""
    N, C, G, H, W, tau = 2, 18, 3, 7, 9, 0.5
    m = make_ref(C, G, tau, "soft", torch_gn)
    x = draw_x(m, (N, C, H, W), torch.float64, False, margin=1e-9)
    ds = torch.randn(N, C, H, W, dtype=torch.float64, device=DEVICE)
    w, b = m.gn.weight.detach().view(-1), m.gn.bias.detach().view(-1)
    eps = m.gn.eps
    mean, rstd = K.sru_stats(x, G, eps, torch_gn, split=4, tile=16)
    s = K.sru_apply(x, mean, rstd, w, b, tau, False, tile=32)
    dx, dw, db = K.sru_backward(ds, x, mean, rstd, w, b, tau, False, torch_gn, eps, True, split=3, tile=16)
    want = run(m, x, ds)
    for name, a, bb in zip(("out", "dx", "dweight", "dbias"), (s, dx, dw, db), want):
        assert rel(a, bb.reshape(a.shape)) < 1e-10, name


def test_deterministic():
    N, C, G, H, W = 2, 16, 4, 9, 7
    m = make_ref(C, G, 0.5, "soft", True, torch.float32)
    x = torch.randn(N, C, H, W, device=DEVICE)
    ds = torch.randn(N, C, H, W, device=DEVICE)
    w, b = m.gn.weight.detach(), m.gn.bias.detach()
    outs = []
    for _ in range(2):
        mean, rstd = K.sru_stats(x, G, 1e-5, True, split=3, tile=32)
        s = K.sru_apply(x, mean, rstd, w, b, 0.5, False, tile=32)
        grads = K.sru_backward(ds, x, mean, rstd, w, b, 0.5, False, True, 1e-5, True, split=2, tile=32)
        outs.append((mean, rstd, s, *grads))
    for a, b2 in zip(*outs):
        assert torch.equal(a, b2)


def test_launches_and_no_copy(monkeypatch):
    """3 launches forward, 4 backward (soft), 1 backward (hard); kernels get x itself (no copy)."""
    log = LaunchLog(monkeypatch)
    N, C, G, H, W = 2, 8, 2, 5, 3
    for gate, n_bwd in (("soft", 4), ("hard", 1)):
        m = make_ref(C, G, 0.5, gate, True, torch.float32)
        f = fused_twin(m)
        x = torch.randn(N, C, H, W, device=DEVICE).to(memory_format=torch.channels_last).requires_grad_()
        log.calls.clear()
        y = f(x)
        assert log.names() == ["_sru_stats_partial_kernel", "_sru_stats_merge_kernel", "_sru_apply_kernel"]
        for name, args in log.calls:
            if name != "_sru_stats_merge_kernel":
                assert args[0] is x or (args[0].data_ptr() == x.data_ptr() and args[0].stride() == x.stride())
        assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
        log.calls.clear()
        y.backward(torch.randn_like(y))
        assert len(log.calls) == n_bwd, log.names()
        assert log.names()[-1] == "_sru_bwd_dx_kernel"
        for _, args in log.calls:
            if _ in ("_sru_bwd_partial_kernel", "_sru_bwd_dx_kernel"):
                assert args[0].data_ptr() == x.data_ptr() and args[0].stride() == x.stride()
        assert x.grad.stride() == x.stride()


def test_saved_tensors_are_x_stats_and_params():
    N, C, G, H, W = 2, 8, 2, 5, 5
    m = make_ref(C, G, 0.5, "soft", False, torch.float32)
    f = fused_twin(m)
    x = torch.randn(N, C, H, W, device=DEVICE, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        f(x)
    big = [t for t in saved if t.numel() >= x.numel()]
    assert len(big) == 1 and big[0].data_ptr() == x.data_ptr()
    small = sum(t.numel() * t.element_size() for t in saved if t.numel() < x.numel())
    assert small == N * G * 8 + N * G * 4 + 2 * C * 4  # mean (fp64), rstd (fp32) + weight, bias


def test_expanded_grad_and_partial_needs():
    """A stride-0 output gradient (from .sum()), and gradients for a subset of the inputs."""
    N, C, G, H, W = 2, 8, 4, 3, 5
    m = make_ref(C, G, 0.5, "soft", True)
    x = draw_x(m, (N, C, H, W), torch.float64, False, margin=1e-9).requires_grad_()
    w = m.gn.weight.detach().clone().requires_grad_()
    b = m.gn.bias.detach().clone()
    y = ops.sru(x, w, b, group_num=G, eps=m.gn.eps, torch_gn=True, gate_treshold=0.5)
    gx, gw = torch.autograd.grad(y.sum(), [x, w])
    rx, rw = torch.autograd.grad(m(x).sum(), [x, m.gn.weight])
    assert rel(gx, rx) < 1e-10 and rel(gw, rw) < 1e-10
    # parameters only (no dx)
    x2 = x.detach()
    (gw2,) = torch.autograd.grad(ops.sru(x2, w, b, group_num=G, eps=m.gn.eps, torch_gn=True,
                                         gate_treshold=0.5).sum(), [w])
    assert rel(gw2, rw) < 1e-10


def test_custom_ops_opcheck_and_compile():
    N, C, G, H, W = 1, 8, 2, 3, 5
    x = torch.randn(N, C, H, W, device=DEVICE)
    w = torch.randn(C, device=DEVICE) + 0.5
    b = torch.randn(C, device=DEVICE)
    torch.library.opcheck(torch.ops.scconv_triton.sru_fwd.default, (x, w, b, G, 1e-5, True, 0.5, False),
                          test_utils=("test_schema", "test_faketensor"))
    s, mean, rstd = ops.sru_forward_op(x, w, b, G, 1e-5, True, 0.5, False)
    torch.library.opcheck(torch.ops.scconv_triton.sru_bwd.default,
                          (torch.randn_like(x), x, mean, rstd, w, b, 0.5, False, True, 1e-5, True, True),
                          test_utils=("test_schema", "test_faketensor"))

    def fn(x, w, b):
        return ops.sru(x, w, b, group_num=G, eps=1e-5, torch_gn=True, gate_treshold=0.5).square().sum()

    xs = x.clone().requires_grad_()
    ws = w.clone().requires_grad_()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    compiled(xs, ws, b).backward()
    xe = x.clone().requires_grad_()
    we = w.clone().requires_grad_()
    fn(xe, we, b).backward()
    assert torch.allclose(xs.grad, xe.grad) and torch.allclose(ws.grad, we.grad)


def test_module_groupbatchnorm_weight_shape():
    """GroupBatchnorm2d keeps weight (C, 1, 1): gradients come back in that shape."""
    m = make_ref(8, 2, 0.5, "soft", False)
    f = fused_twin(m)
    x = draw_x(m, (2, 8, 4, 4), torch.float64, False, margin=1e-9)
    got = run(f, x, torch.ones(2, 8, 4, 4, dtype=torch.float64, device=DEVICE))
    assert got[2].shape == (8, 1, 1) and got[3].shape == (8, 1, 1)


@pytest.mark.parametrize("gate", ["soft", "hard"])
def test_mixed_layouts(gate):
    """x channels_last, output gradient NCHW (and the reverse): each tensor keeps its own strides."""
    N, C, G, H, W = 2, 12, 3, 5, 7
    m = make_ref(C, G, 0.5, gate, False)
    f = fused_twin(m)
    for x_cl in (True, False):
        x = draw_x(m, (N, C, H, W), torch.float64, x_cl, margin=1e-9)
        ds = torch.randn(N, C, H, W, dtype=torch.float64, device=DEVICE)
        ds = ds if x_cl else ds.to(memory_format=torch.channels_last)
        check_all(run(f, x, ds), run(m, x, ds), 1e-10, gate == "hard")
