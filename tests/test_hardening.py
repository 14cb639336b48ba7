"""Hardening: gradcheck of the fused autograd Functions, bad inputs, numerics, determinism,
int64 offsets and (GPU only) tensors past 2**31 elements.

Exceptions policy checked here (fused modules, backend="triton"; all raised before any
kernel launch or any aten op runs):
  - not a torch.Tensor, integer / bool dtype              -> TypeError   (same as reference)
  - wrong rank, wrong channel count, H == 0 or W == 0      -> ValueError  (same as reference)
  - a parameter with another dtype than the input          -> TypeError naming the parameter
    (the reference raises RuntimeError from inside a conv / group_norm)
  - a parameter on another device than the input           -> ValueError naming the parameter
    (the reference raises RuntimeError from inside an op)
  - N == 0 is valid: empty output, empty / zero gradients, like the reference.
"""
import inspect

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import scconv_triton
from scconv_triton import reference as ref
from scconv_triton._config import check_cru
from scconv_triton.kernels import cru as kcru
from scconv_triton.kernels import sru as ksru
from scconv_triton.ops.cru import CRUFunction
from scconv_triton.ops.scconv import scconv as scconv_fn
from scconv_triton.ops.sru import SRUFunction
from _helpers import gate_r, gpu, needs_interpreter, rel, two_gpus

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning",
                                        "ignore:invalid value encountered:RuntimeWarning")


def _tau_in_widest_gap(r, lo=0.25, hi=0.75):
    """tau = middle of the widest gap between sorted r values inside (lo, hi): the gate then
    takes both branches and no r lies near tau. Returns (tau, margin = min |r - tau|)."""
    v = torch.sort(r.flatten())[0]
    v = v[(v > lo) & (v < hi)]
    assert v.numel() >= 2, "no r values in (lo, hi) to put tau between"
    gaps = v[1:] - v[:-1]
    i = int(gaps.argmax())
    tau = float((v[i] + v[i + 1]) / 2)
    return tau, float((r - tau).abs().min())


# ----------------------------------------------------------------------------------------
# gradcheck (float64, interpreter on CPU)
# ----------------------------------------------------------------------------------------
# fast_mode: gradcheck compares J along random directions (one numerical jvp per input instead of
# one per element), which keeps the interpreter runs short; one small SRU case runs in full mode.
GC = dict(eps=1e-6, atol=1e-7, rtol=1e-5, nondet_tol=0.0, fast_mode=True)


def _sru_inputs(device, torch_gn, n=1, c=8, g=2, h=3, w=3):
    x = torch.randn(n, c, h, w, dtype=torch.float64, device=device)
    weight = torch.randn(c, dtype=torch.float64, device=device)
    weight = weight - weight.mean() + 2.0 / c  # sum(weight) = 2: w_gamma = O(1)
    bias = 0.3 * torch.randn(c, dtype=torch.float64, device=device)
    eps = 1e-5 if torch_gn else 1e-10
    r = gate_r(x, weight, bias, g, eps, torch_gn)
    tau, margin = _tau_in_widest_gap(r)
    # a 1e-6 perturbation moves r by far less than 1e-4 here; require 100x that
    assert margin > 1e-3, margin
    assert (r > tau).any() and (r <= tau).any()  # both gate branches are exercised
    return x, weight, bias, eps, tau


@pytest.mark.parametrize(
    "torch_gn,hard,full",
    [(True, False, True), (False, False, False), (True, True, False), (False, True, False)],
    ids=["tgn-soft-full", "gbn-soft", "tgn-hard", "gbn-hard"],
)
def test_gradcheck_sru_function(torch_gn, hard, full, device):
    shape = dict(c=4, h=2, w=3) if full else dict(c=8, h=3, w=3)
    x, weight, bias, eps, tau = _sru_inputs(device, torch_gn, **shape)
    inputs = tuple(t.clone().requires_grad_(True) for t in (x, weight, bias))

    def fn(x, w, b):
        return SRUFunction.apply(x, w, b, 2, eps, torch_gn, tau, hard)

    assert torch.autograd.gradcheck(fn, inputs, **{**GC, "fast_mode": not full})


@pytest.mark.parametrize(
    "kw,recompute",
    [
        (dict(), False),
        (dict(softmax="pairwise", stride=2), True),
        (dict(out_channels=2), False),  # PWC2 has no output channels
        (dict(alpha=0.75, group_size=1), True),  # u != l: block-diagonal squeeze weight
    ],
    ids=["default", "pairwise-s2-recompute", "pwc2-empty", "u!=l-recompute"],
)
def test_gradcheck_cru_function(kw, recompute, device):
    c = 8
    softmax = kw.pop("softmax", "channel")
    stride = kw.pop("stride", 1)
    m = ref.CRU(c, **kw, stride=stride, softmax=softmax).double().to(device)
    shape = check_cru(c, kw.get("alpha", 0.5), 2, kw.get("group_size", 2), 3, kw.get("out_channels"), stride,
                      softmax)
    s = torch.randn(1, c, 3, 3, dtype=torch.float64, device=device)
    params = [p.detach().clone() * 0.5 for p in m.parameters()]
    inputs = [s.requires_grad_(True)]
    for p in params:
        # PWC2 with zero output channels: nothing to check (and no gradient, as in the reference)
        inputs.append(p.requires_grad_(p.numel() > 0))

    def fn(s, *ws):
        return CRUFunction.apply(s, *ws, shape, softmax, recompute)

    assert torch.autograd.gradcheck(fn, tuple(inputs), **GC)


@pytest.mark.parametrize("recompute", [False, True], ids=["saved", "recompute"])
@pytest.mark.parametrize("torch_gn", [True, False], ids=["tgn", "gbn"])
def test_gradcheck_scconv_function(recompute, torch_gn, device):
    c = 8
    m = ref.SCConv(c, group_num=2, torch_gn=torch_gn).double().to(device)
    x, weight, bias, eps, tau = _sru_inputs(device, torch_gn, c=c)
    assert eps == m.SRU.gn.eps
    cru_params = [p.detach().clone() * 0.5 for p in m.CRU.parameters()]
    inputs = tuple(t.clone().requires_grad_(True) for t in (x, weight, bias, *cru_params))

    def fn(x, *ps):
        return scconv_fn(x, *ps, group_num=2, eps=eps, torch_gn=torch_gn, gate_treshold=tau, gate="soft",
                         shape=m.CRU.shape, softmax="channel", recompute=recompute)

    assert torch.autograd.gradcheck(fn, inputs, **GC)


# ----------------------------------------------------------------------------------------
# bad inputs: documented exceptions, raised before anything runs
# ----------------------------------------------------------------------------------------
class _OpLog(TorchDispatchMode):
    """Records every aten op that reaches the dispatcher (kernel launches included)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


LAUNCHERS = [(ksru, n) for n in ("sru_stats", "sru_apply", "sru_backward")] + [
    (kcru, n) for n in ("cru_weights", "cru_pool", "cru_combine", "cru_reduce", "cru_combine_bwd", "cru_dsq",
                        "cru_wgrad")
]


@pytest.fixture
def no_launch(monkeypatch):
    """Every Triton launcher (and the Triton runtime itself) records and refuses to run;
    a TorchDispatchMode records any aten op. The test asserts both stayed empty."""
    calls = []

    def refuse(name):
        def f(*a, **k):
            calls.append(name)
            raise AssertionError(f"{name} launched on a bad input")
        return f

    for mod, name in LAUNCHERS:
        monkeypatch.setattr(mod, name, refuse(name))
    from triton.runtime import interpreter, jit

    monkeypatch.setattr(jit.JITFunction, "run", refuse("JITFunction.run"))
    monkeypatch.setattr(interpreter.GridExecutor, "__call__", refuse("GridExecutor"))
    log = _OpLog()
    return calls, log


def _modules(dtype=torch.float32):
    return {
        "SRU": (scconv_triton.SRU(16, 4, backend="triton"), ref.SRU(16, 4)),
        "CRU": (scconv_triton.CRU(16, backend="triton"), ref.CRU(16)),
        "SCConv": (scconv_triton.SCConv(16, backend="triton"), ref.SCConv(16)),
    }


BAD_INPUTS = [
    ("rank3", lambda d: torch.randn(16, 5, 5, device=d), ValueError, "4-D input"),
    ("rank5", lambda d: torch.randn(1, 16, 5, 5, 1, device=d), ValueError, "4-D input"),
    ("channels", lambda d: torch.randn(1, 8, 5, 5, device=d), ValueError, "expects 16 input channels, got 8"),
    ("int64", lambda d: torch.ones(1, 16, 5, 5, dtype=torch.int64, device=d), TypeError, "floating-point"),
    ("uint8", lambda d: torch.ones(1, 16, 5, 5, dtype=torch.uint8, device=d), TypeError, "floating-point"),
    ("bool", lambda d: torch.ones(1, 16, 5, 5, dtype=torch.bool, device=d), TypeError, "floating-point"),
    ("H0", lambda d: torch.randn(2, 16, 0, 5, device=d), ValueError, "non-empty spatial size"),
    ("W0", lambda d: torch.randn(2, 16, 5, 0, device=d), ValueError, "non-empty spatial size"),
    ("N0-H0", lambda d: torch.randn(0, 16, 0, 0, device=d), ValueError, "non-empty spatial size"),
    ("list", lambda d: [[1.0]], TypeError, "torch.Tensor"),
]


@pytest.mark.parametrize("module", ["SRU", "CRU", "SCConv"])
@pytest.mark.parametrize("case,make,exc,msg", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_raises_before_any_launch(module, case, make, exc, msg, device, no_launch):
    fused, base = _modules()[module]
    fused, base = fused.to(device), base.to(device)
    x = make(device)
    calls, log = no_launch
    with pytest.raises(exc, match=msg), log:
        fused(x)
    assert calls == [] and log.ops == [], (calls, log.ops)
    with pytest.raises(exc, match=msg):  # the reference agrees, type and message
        base(x)


@pytest.mark.parametrize("module", ["SRU", "CRU", "SCConv"])
def test_parameter_dtype_mismatch_is_a_type_error_naming_it(module, device, no_launch):
    fused, base = _modules()[module]
    fused, base = fused.to(device), base.to(device)
    name, p = list(fused.named_parameters())[-1]
    p.data = p.data.double()  # one parameter fp64, the rest and the input fp32
    x = torch.randn(1, 16, 5, 5, device=device)
    calls, log = no_launch
    with pytest.raises(TypeError, match=f"parameter {name} is torch.float64 but the input is torch.float32"), log:
        fused(x)
    assert calls == [] and log.ops == []
    # and the whole module in another dtype than the input
    fused.double()
    with pytest.raises(TypeError, match="but the input is torch.float32"), log:
        fused(x)
    assert calls == [] and log.ops == []


@pytest.mark.parametrize("module", ["SRU", "CRU", "SCConv"])
def test_parameter_on_another_device_is_a_value_error_naming_it(module, device, no_launch):
    # on a CPU-only machine the "meta" device stands in for another device
    fused, _ = _modules()[module]
    fused = fused.to(device)
    name, p = list(fused.named_parameters())[0]
    owner, attr = (fused.get_submodule(name.rsplit(".", 1)[0]), name.rsplit(".", 1)[1])
    owner.register_parameter(attr, torch.nn.Parameter(p.detach().to("meta")))
    x = torch.randn(1, 16, 5, 5, device=device)
    calls, log = no_launch
    with pytest.raises(ValueError, match=f"parameter {name} is on meta but the input is on {x.device}"), log:
        fused(x)
    assert calls == [] and log.ops == []


@two_gpus
@pytest.mark.parametrize("module", ["SRU", "CRU", "SCConv"])
def test_parameters_and_input_on_different_gpus(module):
    fused, _ = _modules()[module]
    fused = fused.to("cuda:1")
    x = torch.randn(1, 16, 5, 5, device="cuda:0")
    with pytest.raises(ValueError, match="is on cuda:1 but the input is on cuda:0"):
        fused(x)
    # one parameter astray
    fused = fused.to("cuda:0")
    name, p = list(fused.named_parameters())[0]
    owner, attr = (fused.get_submodule(name.rsplit(".", 1)[0]), name.rsplit(".", 1)[1])
    owner.register_parameter(attr, torch.nn.Parameter(p.detach().to("cuda:1")))
    with pytest.raises(ValueError, match=f"parameter {name} is on cuda:1"):
        fused(x)


@pytest.mark.parametrize("module", ["SRU", "CRU", "SCConv"])
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
def test_empty_batch_forward_and_backward(module, cl, device):
    fused, base = _modules()[module]
    base.load_state_dict(fused.state_dict())
    fused, base = fused.to(device).double(), base.to(device).double()
    x = torch.randn(0, 16, 5, 6, dtype=torch.float64, device=device)
    if cl:
        x = x.to(memory_format=torch.channels_last)
    xf, xr = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    yf, yr = fused(xf), base(xr)
    assert yf.shape == yr.shape and yf.numel() == 0 and yf.dtype == yr.dtype
    yf.sum().backward()
    yr.sum().backward()
    assert xf.grad.shape == xr.grad.shape == x.shape
    for (n, pf), (_, pr) in zip(fused.named_parameters(), base.named_parameters()):
        gf = pf.grad if pf.grad is not None else torch.zeros_like(pf)
        gr = pr.grad if pr.grad is not None else torch.zeros_like(pr)
        assert gf.shape == gr.shape and torch.equal(gf, gr), n
        assert torch.isfinite(gf).all(), n


# ----------------------------------------------------------------------------------------
# valid but unusual layouts: non-contiguous, channels_last, overlapping (expanded)
# ----------------------------------------------------------------------------------------
def _pair_fp64(module, device, seed=1):
    torch.manual_seed(seed)
    fused, base = _modules()[module]
    with torch.no_grad():
        for p in fused.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
        if module != "CRU":
            gn = fused.gn if module == "SRU" else fused.SRU.gn
            gn.weight.add_(1.0)
    base.load_state_dict(fused.state_dict())
    return fused.to(device).double(), base.to(device).double()


def _layouts(device):
    big = torch.randn(2, 16, 12, 14, dtype=torch.float64, device=device)
    return {
        "strided": big[:, :, ::2, 1::2],
        "channel-slice": torch.randn(2, 20, 6, 7, dtype=torch.float64, device=device)[:, 2:18],
        "transposed-hw": torch.randn(2, 16, 7, 6, dtype=torch.float64, device=device).transpose(2, 3),
        "channels_last": torch.randn(2, 16, 6, 7, dtype=torch.float64, device=device).to(
            memory_format=torch.channels_last),
        "channels_last-strided": big.to(memory_format=torch.channels_last)[:, :, 1::2, ::2],
        "expanded-batch": torch.randn(1, 16, 5, 6, dtype=torch.float64, device=device).expand(3, -1, -1, -1),
        "expanded-spatial": torch.randn(2, 16, 1, 6, dtype=torch.float64, device=device).expand(-1, -1, 5, -1),
    }


@pytest.mark.parametrize("module", ["SRU", "CRU", "SCConv"])
def test_unusual_layouts_match_reference_forward_and_backward(module, device):
    fused, base = _pair_fp64(module, device)
    for name, x in _layouts(device).items():
        g = torch.randn(base(x).shape, dtype=torch.float64, device=device)
        xf, xr = x.detach().clone(), x.detach().clone()  # clone keeps the strides (expanded -> dense)
        xf = x.detach().requires_grad_(True) if x.stride(0) == 0 else xf.requires_grad_(True)
        xr = x.detach().requires_grad_(True) if x.stride(0) == 0 else xr.requires_grad_(True)
        fused.zero_grad()
        base.zero_grad()
        yf, yr = fused(xf), base(xr)
        assert rel(yf, yr) < 1e-10, (name, "out")
        yf.backward(g)
        yr.backward(g)
        assert rel(xf.grad, xr.grad) < 1e-10, (name, "dx")
        for (n, pf), (_, pr) in zip(fused.named_parameters(), base.named_parameters()):
            if pr.grad is not None:
                assert rel(pf.grad, pr.grad) < 1e-10, (name, n)
        if name.startswith("channels_last") and module != "CRU":
            # SRU keeps the memory format of its input
            if module == "SRU":
                assert yf.is_contiguous(memory_format=torch.channels_last), name


# ----------------------------------------------------------------------------------------
# numerics
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("module", ["SRU", "CRU", "SCConv"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_nan_and_inf_propagate_like_the_reference(module, bad, device):
    fused, base = _pair_fp64(module, device)
    x = torch.randn(2, 16, 5, 6, dtype=torch.float64, device=device)
    x[0, 3, 2, 4] = bad  # sample 0 poisoned, sample 1 clean
    with torch.no_grad():
        yf, yr = fused(x), base(x)
    assert torch.equal(torch.isnan(yf), torch.isnan(yr))
    assert torch.equal(torch.isposinf(yf), torch.isposinf(yr))
    assert torch.equal(torch.isneginf(yf), torch.isneginf(yr))
    fin = torch.isfinite(yr)
    assert not fin[0].all()  # no silent clean-up: the poisoned sample is not finite
    assert fin[1].all()  # and the other sample is untouched
    assert rel(yf[fin], yr[fin]) < 1e-10


@pytest.mark.parametrize("torch_gn", [True, False], ids=["tgn", "gbn"])
def test_large_mean_tiny_spread_group_norm_stats(torch_gn, device):
    """x = 1e4 + 1e-2 * noise in fp32: the statistics (mean, rstd) stay exact to fp32 rounding."""
    x = (1e4 + 1e-2 * torch.randn(2, 8, 6, 7, dtype=torch.float64)).float().to(device)
    eps = 1e-5 if torch_gn else 1e-10
    mean, rstd = ksru.sru_stats(x, 2, eps, torch_gn, split=3, tile=16)
    xg = x.double().reshape(2, 2, -1)
    mean64 = xg.mean(-1)
    rstd64 = 1 / (xg.var(-1, unbiased=False) + eps).sqrt() if torch_gn else 1 / (xg.std(-1) + eps)
    assert (mean.double() - mean64).abs().max() <= 0.5 * 1e4 * 2 ** -23 * 1.01  # within half an ulp(1e4)
    assert rel(rstd, rstd64) < 1e-6


def _sru_fp32_large_mean(torch_gn, device):
    torch.manual_seed(3)
    r64 = ref.SRU(8, 2, 0.5, torch_gn=torch_gn).double()
    with torch.no_grad():
        w = torch.randn(8, dtype=torch.float64)
        r64.gn.weight.copy_((w - w.mean() + 0.25).view_as(r64.gn.weight))
        r64.gn.bias.copy_((0.3 * torch.randn(8, dtype=torch.float64)).view_as(r64.gn.bias))
    r32 = ref.SRU(8, 2, 0.5, torch_gn=torch_gn)
    r32.load_state_dict(r64.state_dict())
    f32 = scconv_triton.SRU(8, 2, 0.5, torch_gn=torch_gn, backend="triton")
    f32.load_state_dict(r64.state_dict())
    x = (1e4 + 1e-2 * torch.randn(2, 8, 6, 7, dtype=torch.float64)).float()
    r64, r32, f32, x = r64.to(device), r32.to(device), f32.to(device), x.to(device)
    with torch.no_grad():
        return f32(x), r32(x), r64(x.double())


@pytest.mark.parametrize("torch_gn", [True, False], ids=["tgn", "gbn"])
def test_large_mean_tiny_spread_at_least_as_good_as_fp32_reference(torch_gn, device):
    yf, y32, y64 = _sru_fp32_large_mean(torch_gn, device)
    assert torch.isfinite(yf).all()
    assert rel(yf, y64) <= rel(y32, y64)


@pytest.mark.parametrize("torch_gn", [True], ids=["tgn"])
def test_large_mean_tiny_spread_close_to_fp64(torch_gn, device):
    yf, _, y64 = _sru_fp32_large_mean(torch_gn, device)
    assert rel(yf, y64) < 1e-3


def test_fp16_near_the_top_of_the_range_does_not_overflow(device):
    """x ~ 3e4 in fp16 (x*x overflows fp16, not fp32): statistics are computed in fp32."""
    torch.manual_seed(4)
    c, g = 8, 2
    m32 = ref.SRU(c, g, 0.5)
    with torch.no_grad():
        w = torch.randn(c)
        m32.gn.weight.copy_((w - w.mean() + 2.0 / c).view_as(m32.gn.weight))
    f16 = scconv_triton.SRU(c, g, 0.5, backend="triton")
    f16.load_state_dict(m32.state_dict())
    f16 = f16.half().to(device)
    m32 = m32.to(device)
    x = (3e4 + 1e3 * torch.randn(2, c, 5, 6)).clamp(max=32000).half().to(device)
    assert torch.isinf(x * x).all()  # the premise: squares overflow fp16
    xr = x.float().requires_grad_(True)
    xf = x.clone().requires_grad_(True)
    y16, y32 = f16(xf), m32(xr)
    assert torch.isfinite(y32).all() and torch.isfinite(y16).all()
    # gate-aware comparison (SPEC.md): mismatches only where r sits near tau
    r = gate_r(x, m32.gn.weight.detach().view(-1), m32.gn.bias.detach().view(-1), g, 1e-5, True)
    near = (r - 0.5).abs() < 2e-3
    near = near | torch.cat([near[:, c // 2:], near[:, : c // 2]], dim=1)
    assert rel(y16.float()[~near], y32[~near]) < 2e-3
    ds = torch.randn_like(y32) * 1e-3
    y16.backward(ds.half())
    y32.backward(ds)
    assert torch.isfinite(xf.grad).all() and torch.isfinite(f16.gn.weight.grad).all()


@pytest.mark.parametrize("wsum", [1e-3, 0.0], ids=["sum1e-3", "sum0"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_gn_weight_sum_near_zero_behaves_like_the_reference(wsum, dtype, device):
    c = 8
    base = ref.SRU(c, 2, 0.5)
    with torch.no_grad():
        # sums to 0 exactly; gamma = 0 on channels 6, 7 gives w_gamma = 0/0 there when the sum is 0
        w = torch.tensor([1.0, -1.0, 2.0, -2.0, 0.5, -0.5, 0.0, 0.0], dtype=torch.float64)
        w[0] += wsum
        base.gn.weight.copy_(w.view_as(base.gn.weight))
        base.gn.bias.copy_(0.1 * torch.arange(c, dtype=torch.float64).view_as(base.gn.bias) - 0.3)
    fused = scconv_triton.SRU(c, 2, 0.5, backend="triton")
    fused.load_state_dict(base.state_dict())
    base, fused = base.to(device, dtype), fused.to(device, dtype)
    assert (base.gn.weight.sum().item() == 0.0) == (wsum == 0.0)
    x = torch.randn(2, c, 5, 6, dtype=dtype, device=device)
    with torch.no_grad():
        yf, yr = fused(x), base(x)
    assert torch.equal(torch.isfinite(yf), torch.isfinite(yr))
    assert torch.equal(torch.isnan(yf), torch.isnan(yr))
    fin = torch.isfinite(yr)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    if wsum == 0.0:
        # w_gamma = +-inf (r saturates to exactly 0 or 1) and 0/0 = NaN on channels 6, 7,
        # whose NaN reaches their partners through the cross-reconstruction, as in the reference
        assert not fin.all() and fin.any()
    # elsewhere w_gamma is huge: r saturates to 0 / 1, far from tau; the outputs agree
    assert rel(yf[fin], yr[fin]) < tol


# ----------------------------------------------------------------------------------------
# determinism
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("recompute", [False, True], ids=["saved", "recompute"])
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
def test_forward_backward_bitwise_deterministic(recompute, cl, device, deterministic):
    # our kernels use no atomics; cuDNN's convolution backward needs its deterministic flag
    model = scconv_triton.SCConv(16, stride=1, backend="triton", recompute=recompute).to(device)
    x = torch.randn(2, 16, 9, 7, device=device)
    g = torch.randn(2, 16, 9, 7, device=device)
    if cl:
        x = x.to(memory_format=torch.channels_last)
        g = g.to(memory_format=torch.channels_last)
    runs = []
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        y = model(xi)
        y.backward(g)
        runs.append([y.detach(), xi.grad] + [p.grad for p in model.parameters()])
    for a, b in zip(*runs):
        assert a.dtype == b.dtype and a.stride() == b.stride()
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))  # bitwise, NaN-safe


# ----------------------------------------------------------------------------------------
# int64 offsets
# ----------------------------------------------------------------------------------------
@needs_interpreter("inspects pointer arithmetic through the interpreter's addptr")
def test_activation_offsets_are_int64(monkeypatch):
    """Every pointer offset into an activation-sized tensor is computed in int64.

    The interpreter's addptr is wrapped: each offset is attributed to the kernel argument
    whose storage it points into. Offsets into small tensors (weights, N x G statistics)
    may be int32; offsets into anything activation-sized must be int64, or a tensor past
    2**31 elements would wrap around on a GPU.
    """
    from triton.runtime import interpreter as I

    records = []
    cur = {}
    orig_init = I.GridExecutor._init_args_hst
    orig_add = I.InterpreterBuilder.create_addptr

    def init(self, args_dev, kwargs):
        a, k = orig_init(self, args_dev, kwargs)
        names = inspect.getfullargspec(self.fn).args
        cur["kernel"] = self.fn.__name__
        cur["ranges"] = [
            (n, v.untyped_storage().data_ptr(), v.untyped_storage().data_ptr() + v.untyped_storage().nbytes(),
             v.numel())
            for n, v in list(zip(names, a)) + list(k.items()) if isinstance(v, torch.Tensor)
        ]
        return a, k

    def addptr(self, ptr, off):
        addr = np.asarray(ptr.data).ravel()
        # the argument most lanes point into (masked-off lanes may point outside any tensor)
        best = max(cur["ranges"], key=lambda r: int(((addr >= r[1]) & (addr < r[2])).sum()))
        inside = int(((addr >= best[1]) & (addr < best[2])).sum())
        records.append((cur["kernel"], best[0] if inside else "?", best[3] if inside else -1, off.data.dtype))
        return orig_add(self, ptr, off)

    monkeypatch.setattr(I.GridExecutor, "_init_args_hst", init)
    monkeypatch.setattr(I.InterpreterBuilder, "create_addptr", addptr)
    n, c, h, w = 2, 8, 16, 16
    weights = 0
    every = (dict(), dict(stride=2, softmax="pairwise", torch_gn=False), dict(out_channels=4, gate="hard"))
    runs = [(cl, 1, kw) for cl in (False, True) for kw in every]  # stage 1
    runs += [(False, 2, every[0]), (True, 2, every[1]), (False, 2, every[2])]  # stage 2 (default)
    for cl, stage, kw in runs:
        m = scconv_triton.SCConv(c, group_num=2, backend="triton", stage=stage, **kw)
        weights = max(weights, max(p.numel() for p in m.parameters()), 8 * 4 * 9)  # + merged weight
        x = torch.randn(n, c, h, w)
        if cl:
            x = x.to(memory_format=torch.channels_last)
        m(x.requires_grad_(True)).sum().backward()
    activation = n * h * w  # every activation-sized tensor here has at least this many elements
    assert weights < activation
    kernels = {r[0] for r in records}
    assert {"_sru_apply_kernel", "_sru_bwd_dx_kernel", "_cru_combine_kernel", "_cru_dsq_kernel",
            "_s2_squeeze_kernel", "_s2_conv_kernel"} <= kernels
    bad = sorted({(k, a, numel) for k, a, numel, dt in records if numel >= activation and dt != np.int64})
    assert not bad, f"int32 offsets into activation-sized tensors: {bad}"
    assert not [r for r in records if r[1] == "?" and r[3] != np.int64]
    assert any(dt != np.int64 for *_, dt in records)  # the recorder does see int32 offsets


# ----------------------------------------------------------------------------------------
# GPU only: past 2**31 elements
# ----------------------------------------------------------------------------------------
@gpu
def test_sru_past_2_pow_31_elements_fp16():
    """SRU on an fp16 input of 2**31 + 2**25 elements (4.4 GB) against a per-sample fp32
    reference (the SRU is per sample apart from sum(gn.weight)). Sample 2 starts past 2**31
    elements: int32 offsets would wrap there."""
    free, _ = torch.cuda.mem_get_info()
    if free < 40 * 2 ** 30:
        pytest.skip(f"needs ~40 GB of free GPU memory, {free / 2 ** 30:.1f} GB free")
    torch.manual_seed(0)
    n, c, g, h, w = 3, 16, 4, 6688, 6700  # 3 * 16 * 6688 * 6700 = 2.151e9 > 2**31
    assert n * c * h * w > 2 ** 31
    base = ref.SRU(c, g, 0.5)
    with torch.no_grad():
        wt = torch.randn(c)
        base.gn.weight.copy_((wt - wt.mean() + 2.0 / c).view_as(base.gn.weight))
        base.gn.bias.copy_((0.3 * torch.randn(c)).view_as(base.gn.bias))
    fused = scconv_triton.SRU(c, g, 0.5, backend="triton")
    fused.load_state_dict(base.state_dict())
    base, fused = base.cuda(), fused.cuda().half()
    x = torch.empty(n, c, h, w, dtype=torch.float16, device="cuda")
    for i in range(n):
        x[i].normal_()
    x[n - 1, c - 1, h - 1, w - 1] = 7.0  # the very last element, far past 2**31
    with torch.no_grad():
        y = fused(x)
        assert torch.isfinite(y).all()
        for i in range(n):
            yr = base(x[i : i + 1].float())
            err = ((y[i : i + 1].float() - yr).norm() / yr.norm()).item()
            assert err < 1e-2, (i, err)  # relative norm (SPEC.md: the gate is discontinuous)
            del yr
    del y
    torch.cuda.empty_cache()


@needs_interpreter("records launch grids through the interpreter's GridExecutor")
@pytest.mark.parametrize("cl,side", [(False, 3000), (True, 1500)], ids=["nchw-3000", "cl-1500"])
def test_launch_grids_fit_cuda_limits_on_large_images(cl, side, monkeypatch):
    """CUDA caps grid axes 1 and 2 at 65535 (axis 0 at 2**31 - 1). 3000 x 3000 (NCHW) and
    1500 x 1500 (channels_last) images have more than 65535 spatial blocks (128 / 32 pixels
    each): no launcher may put spatial blocks on axis 1 or 2. The kernels are not run here (only their grids are recorded)."""
    from triton.runtime import interpreter as I

    grids = []

    def record(self, *args, **kwargs):
        grids.append((self.fn.__name__, tuple(self.grid)))

    monkeypatch.setattr(I.GridExecutor, "__call__", record)
    for stage in (1, 2):
        model = scconv_triton.SCConv(4, group_num=2, group_size=1, backend="triton", stage=stage)
        x = torch.zeros(1, 4, side, side)
        if cl:
            x = x.to(memory_format=torch.channels_last)
        model(x.requires_grad_(True)).sum().backward()
    names = {g[0] for g in grids}
    assert {"_cru_combine_kernel", "_cru_combine_bwd_kernel", "_cru_dsq_kernel", "_sru_apply_kernel",
            "_s2_squeeze_kernel", "_s2_means_kernel", "_s2_conv_kernel"} <= names
    for name, grid in grids:
        grid = grid + (1,) * (3 - len(grid))
        assert grid[0] < 2 ** 31 and grid[1] <= 65535 and grid[2] <= 65535, (name, grid)
