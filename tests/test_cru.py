"""Fused CRU (scconv_triton.ops.cru + kernels/cru.py) against the reference CRU.

Every test builds scconv_triton.reference.CRU with random parameters (GWC.bias
included), loads the same state_dict into the fused module and compares the
output, the input gradient and every parameter gradient, with fresh random
inputs and a random upstream gradient. On a CPU the kernels run in the Triton
interpreter (tests/conftest.py).
"""
import pytest
import torch

from benchmarks.meter import SavedBytes
from scconv_triton import reference as ref
from scconv_triton.modules import CRU
from scconv_triton.ops import cru as cru_ops
from _helpers import GPU, TOL, low_tol, rel

# (id, op_channel, batch, H, W, CRU kwargs, channels_last, recompute)
CONFIGS = [
    ("default", 8, 2, 6, 6, {}, False, False),
    ("alpha0.75_u!=l", 16, 2, 5, 5, {"alpha": 0.75}, False, False),
    ("densenet_16to4_pwc2_0", 16, 2, 6, 6, {"out_channels": 4}, False, False),
    ("out>in_8to12", 8, 2, 5, 6, {"out_channels": 12}, False, False),
    ("stride2_odd_cl", 8, 2, 7, 9, {"stride": 2}, True, False),
    ("pairwise_k5_g4", 16, 2, 6, 5, {"softmax": "pairwise", "group_kernel_size": 5, "group_size": 4}, False, False),
    ("k1_g1_batch1", 8, 1, 5, 7, {"group_kernel_size": 1, "group_size": 1}, False, False),
    ("recompute_s2_pairwise_cl_pwc2_0", 16, 2, 7, 5, {"out_channels": 4, "stride": 2, "softmax": "pairwise"}, True, True),
    ("alpha0.25_cl_recompute", 16, 2, 6, 6, {"alpha": 0.25}, True, True),
    ("radio4_s2_out>in_odd", 16, 2, 9, 7, {"squeeze_radio": 4, "out_channels": 24, "stride": 2}, False, False),
    ("batch1_cl_k5_alpha0.75_s2", 16, 1, 5, 5, {"alpha": 0.75, "group_kernel_size": 5, "stride": 2}, True, False),
]


def _pair(c, kw, dtype, device, recompute=False):
    r = ref.CRU(c, **kw)
    with torch.no_grad():
        for p in r.parameters():
            p.copy_(torch.randn_like(p) * 0.4)  # GWC.bias too: a missing bias gradient must fail
    f = CRU(c, backend="triton", recompute=recompute, **kw)
    f.load_state_dict(r.state_dict())
    return r.to(device=device, dtype=dtype), f.to(device=device, dtype=dtype)


def _grads(module, x, g):
    x = x.clone().requires_grad_(True)
    y = module(x)
    y.backward(g)
    grads = {"input": x.grad}
    for name, p in module.named_parameters():
        if p.numel():  # PWC2 with zero output channels has no gradient in the reference
            grads[name] = p.grad
    return y, grads


def _compare(c, n, h, w, kw, cl, recompute, dtype, device, ref_dtype=None):
    """Run both; return the list of (name, relative error)."""
    ref_dtype = ref_dtype or dtype
    r, f = _pair(c, kw, dtype, device, recompute)
    r = r.to(ref_dtype)
    x = torch.randn(n, c, h, w, device=device, dtype=dtype)
    if cl:
        x = x.to(memory_format=torch.channels_last)
    with torch.no_grad():
        out_shape = r(x.to(ref_dtype)).shape
    g = torch.randn(out_shape, device=device, dtype=dtype)
    y_f, g_f = _grads(f, x, g)
    y_r, g_r = _grads(r, x.to(ref_dtype), g.to(ref_dtype))
    assert y_f.dtype == dtype and y_f.shape == y_r.shape
    if cl:
        assert y_f.is_contiguous(memory_format=torch.channels_last)
        assert g_f["input"].is_contiguous(memory_format=torch.channels_last)
    errs = [("out", rel(y_f, y_r))]
    assert set(g_f) == set(g_r)
    for k in g_r:
        assert g_f[k].shape == g_r[k].shape, k
        assert g_f[k].dtype == dtype, k
        errs.append((k, rel(g_f[k], g_r[k])))
    return errs


@pytest.mark.parametrize("cfg", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_matches_reference_fp64(cfg, device):
    _, c, n, h, w, kw, cl, recompute = cfg
    errs = _compare(c, n, h, w, kw, cl, recompute, torch.float64, device)
    bad = [(k, e) for k, e in errs if not e <= TOL[torch.float64]]
    assert not bad, bad


@pytest.mark.parametrize("cfg", [CONFIGS[0], CONFIGS[4], CONFIGS[5], CONFIGS[7]], ids=lambda c: c[0])
def test_matches_reference_fp32(cfg, device):
    _, c, n, h, w, kw, cl, recompute = cfg
    errs = _compare(c, n, h, w, kw, cl, recompute, torch.float32, device)
    bad = [(k, e) for k, e in errs if not e <= TOL[torch.float32]]
    assert not bad, bad


LOW_PRECISION_CONFIGS = [CONFIGS[0], CONFIGS[4]]


def low_precision_errors(cfg, dtype, device):
    """The 16-bit fused path (fp32 math inside the kernels) against the fp64 reference run
    on the same (rounded) parameters and inputs: [(name, relative error)]."""
    _, c, n, h, w, kw, cl, recompute = cfg
    return _compare(c, n, h, w, kw, cl, recompute, dtype, device, ref_dtype=torch.float64)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("cfg", LOW_PRECISION_CONFIGS, ids=lambda c: c[0])
def test_low_precision_against_fp64_reference(cfg, dtype, device):
    # each quantity within ~3x its measured error (tests/_helpers.py LOW_TOL)
    errs = low_precision_errors(cfg, dtype, device)
    bad = [(k, f"{e:.2e}", low_tol("cru", dtype, k)) for k, e in errs if not e <= low_tol("cru", dtype, k)]
    assert not bad, bad


def _run_fused(c, kw, x, g, recompute, state):
    f = CRU(c, backend="triton", recompute=recompute, **kw).to(x.device, x.dtype)
    f.load_state_dict(state)
    xx = x.clone().requires_grad_(True)
    y = f(xx)
    y.backward(g)
    return [y.detach(), xx.grad] + [p.grad for p in f.parameters() if p.numel()]


@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "channels_last"])
def test_recompute_gives_identical_results(cl, device, deterministic):
    # bitwise: recompute re-runs the same kernels and convolutions on the same values
    # (deterministic: cuDNN's backward algorithms may otherwise differ run to run on a GPU)
    kw = {"stride": 2}
    r, _ = _pair(8, kw, torch.float32, device)
    x = torch.randn(2, 8, 7, 6, device=device)
    if cl:
        x = x.to(memory_format=torch.channels_last)
    g = torch.randn(2, 8, 4, 3, device=device)
    a = _run_fused(8, kw, x, g, False, r.state_dict())
    b = _run_fused(8, kw, x, g, True, r.state_dict())
    for u, v in zip(a, b):
        assert torch.equal(u, v)


def test_scalar_loss_expanded_grad_and_strided_input(device):
    # y.sum() gives a stride-0 upstream gradient; a non-contiguous input
    # (neither NCHW nor channels_last) takes the explicit copy in _layout.
    r, f = _pair(8, {}, torch.float64, device)
    base = torch.randn(2, 8, 6, 12, device=device, dtype=torch.float64)
    x = base[:, :, :, ::2]
    xr = x.clone().requires_grad_(True)
    xf = x.clone().requires_grad_(True)
    r(xr).sum().backward()
    f(xf).sum().backward()
    assert rel(xf.grad, xr.grad) <= 1e-10
    for (nr, pr), (nf, pf) in zip(r.named_parameters(), f.named_parameters()):
        if pr.numel():
            assert rel(pf.grad, pr.grad) <= 1e-10, nr


def _saved_bytes(c, n, h, w, recompute, device):
    """Bytes autograd keeps for the fused CRU's backward (distinct storages),
    parameters and the input excluded (benchmarks.meter.SavedBytes)."""
    r, f = _pair(c, {}, torch.float32, device, recompute)
    x = torch.randn(n, c, h, w, device=device).requires_grad_(True)
    with SavedBytes(input=[x], params=f.parameters()) as saved:
        y = f(x)
    y.sum().backward()
    return saved.bytes


def test_saved_bytes_budget(device):
    # S = bytes of one N x C x H x W tensor at C = 64. Besides its input s, the CRU
    # Function saves up (S/4), low (S/4), Y1 (S), P2 (3S/4) and A: 2.25 S of activations
    # (the merged weights are rebuilt in backward, not saved); recompute=True drops Y1
    # and P2: 0.5 S. Activations are measured per sample (batch 2 minus batch 1, so
    # anything not proportional to the batch cancels), the rest apart.
    c, h, w = 64, 16, 16
    s1 = c * h * w * 4
    out = {}
    for rc in (False, True):
        b1 = _saved_bytes(c, 1, h, w, rc, device)
        b2 = _saved_bytes(c, 2, h, w, rc, device)
        out[rc] = ((b2 - b1) / s1, (2 * b1 - b2) / (c * 56 * 56 * 4 * 2))
    print(
        f"\nCRU saved besides its input: default {out[False][0]:.3f} S, recompute {out[True][0]:.3f} S "
        f"(activations), + not batch-proportional {out[False][1]:.3f} S at batch 2, 56x56"
    )
    assert out[True][0] < out[False][0]
    assert out[False][0] + out[False][1] <= 2.5
    assert out[True][0] + out[True][1] <= 0.6
    assert abs(out[False][0] - 2.25) < 0.01 and abs(out[True][0] - 0.5) < 0.01


def test_launch_counts(device):
    # Forward: weights, 2 squeeze GEMMs, Y1 conv, PWC2 conv, pool, combine = 7.
    # Backward: weights (rebuilt, not saved), reduce, combine_bwd, 3 convolution_backward,
    # dsq, wgrad = 8 (+2 convolutions with recompute=True).
    # Triton launches are captured at JITFunction / InterpretedFunction.run (both devices); aten
    # ops by the meter, which ignores the interpreter's own staging ops.
    from benchmarks.meter import Meter
    from benchmarks.replay import capture_launches

    def count(fn):
        with capture_launches(keep_args=False) as calls, Meter() as m:
            out = fn()
        aten = [r.name for r in m.by_kind("aten") if not r.name.startswith("t.")]
        return out, aten + [c.name for c in calls]

    for recompute, n_bwd in ((False, 8), (True, 10)):
        r, f = _pair(8, {}, torch.float32, device, recompute)
        x = torch.randn(2, 8, 6, 6, device=device, requires_grad=True)
        y, fwd = count(lambda: f(x))
        g = torch.randn_like(y)
        _, bwd = count(lambda: y.backward(g))
        assert len(fwd) == 7, fwd
        assert len(bwd) == n_bwd, (recompute, bwd)


def test_custom_ops_registered_with_fakes():
    for name in ("cru_weights", "cru_pool", "cru_combine", "cru_reduce", "cru_combine_bwd", "cru_dsq", "cru_wgrad"):
        op = getattr(torch.ops.scconv_triton, name)
        assert op.default is not None


def test_torch_compile_fullgraph_no_graph_break(device):
    # aot_eager traces the autograd Function (forward and backward) through the
    # custom ops' fake implementations; fullgraph=True fails on any graph break.
    kw = {"stride": 2, "softmax": "pairwise"}
    r, f = _pair(8, kw, torch.float64, device)
    x = torch.randn(2, 8, 7, 6, device=device, dtype=torch.float64)
    g = torch.randn(2, 8, 4, 3, device=device, dtype=torch.float64)
    # (CRUFunction directly: on a CPU, backend.resolve reads a Triton knob dynamo
    # cannot trace; on CUDA tensors it short-circuits before that.)
    ws = [f.squeeze1.weight, f.squeeze2.weight, f.GWC.weight, f.GWC.bias, f.PWC1.weight, f.PWC2.weight]
    fn = torch.compile(lambda t: cru_ops.cru(t, *ws, f.shape, f.softmax, f.recompute), backend="aot_eager",
                       fullgraph=True)
    xc = x.clone().requires_grad_(True)
    fn(xc).backward(g)
    xr = x.clone().requires_grad_(True)
    r(xr).backward(g)
    assert rel(xc.grad, xr.grad) <= 1e-10
    assert rel(f.GWC.weight.grad, r.GWC.weight.grad) <= 1e-10


def test_functional_api_and_cores(device):
    # cru_forward_core / cru_backward_core as the SCConv Function uses them.
    r, f = _pair(16, {"alpha": 0.75}, torch.float64, device)
    x = torch.randn(2, 16, 5, 5, device=device, dtype=torch.float64)
    ws = [f.squeeze1.weight, f.squeeze2.weight, f.GWC.weight, f.GWC.bias, f.PWC1.weight, f.PWC2.weight]
    with torch.no_grad():
        out, saved = cru_ops.cru_forward_core(x, *ws, f.shape, "channel", False)
        assert all(isinstance(t, torch.Tensor) for t in saved)
        g = torch.randn_like(out)
        grads = cru_ops.cru_backward_core(g, x, saved, *ws, f.shape, "channel", False, need_ds=False)
    assert grads[0] is None
    xr = x.clone().requires_grad_(True)
    yr = r(xr)
    yr.backward(g)
    assert rel(out, yr) <= 1e-10
    for got, p in zip(grads[1:], r.parameters()):
        assert rel(got, p.grad) <= 1e-10


def autocast_errors(dtype, device):
    """fp32 CRU under autocast(dtype) against the fp64 reference on the same values rounded to
    dtype: [(name, relative error)]. Like a convolution: the layer computes in the autocast
    dtype and the fp32 parameters receive fp32 gradients through the casts."""
    r, f = _pair(8, {}, torch.float32, device)
    x = torch.randn(2, 8, 6, 6, device=device, requires_grad=True)
    with torch.autocast(device_type=device, dtype=dtype):
        y = f(x)
    assert y.dtype == dtype
    g = torch.randn(y.shape, device=device)
    y.float().backward(g)
    assert x.grad.dtype == torch.float32 and f.GWC.weight.grad.dtype == torch.float32
    r = r.to(dtype).double()  # what the kernels saw: parameters, x and the gradient in dtype
    yr, gr = _grads(r, x.detach().to(dtype).double(), g.to(dtype).double())
    errs = [("out", rel(y, yr)), ("input", rel(x.grad, gr["input"]))]
    for name, p in f.named_parameters():
        if p.numel():
            errs.append((name, rel(p.grad, gr[name])))
    return errs


AUTOCAST_DTYPES = [pytest.param(torch.float16, id="fp16", marks=GPU),  # fp16 autocast is a CUDA feature
                   pytest.param(torch.bfloat16, id="bf16")]


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES)
def test_autocast_runs_in_the_autocast_dtype(dtype, device):
    # each quantity within ~3x its measured error (tests/_helpers.py LOW_TOL)
    errs = autocast_errors(dtype, device)
    bad = [(k, f"{e:.2e}", low_tol("autocast-cru", dtype, k)) for k, e in errs
           if not e <= low_tol("autocast-cru", dtype, k)]
    assert not bad, bad
