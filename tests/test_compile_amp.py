"""torch.compile (fullgraph, forward and backward) and autocast / GradScaler with the fused SCConv."""
import pytest
import torch

import scconv_triton
from scconv_triton import reference as ref


def _pair(c=16, recompute=False):
    fused = scconv_triton.SCConv(c, backend="triton", recompute=recompute)
    base = ref.SCConv(c)
    base.load_state_dict(fused.state_dict())
    return fused, base


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("recompute", [False, True])
def test_fullgraph_compile_forward_backward(recompute, device):
    torch._dynamo.reset()
    fused, base = _pair(recompute=recompute)
    fused, base = fused.double().to(device), base.double().to(device)
    compiled = torch.compile(fused, fullgraph=True)  # raises on any graph break
    x = torch.randn(2, 16, 6, 5, dtype=torch.float64, device=device)
    xc, xr = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    yc, yr = compiled(xc), base(xr)
    g = torch.randn_like(yr)
    yc.backward(g)
    yr.backward(g)
    assert _rel(yc, yr) < 1e-10 and _rel(xc.grad, xr.grad) < 1e-10
    for (n, pf), pr in zip(fused.named_parameters(), base.parameters()):
        assert _rel(pf.grad, pr.grad) < 1e-10, n


def test_compiled_graph_calls_the_fused_custom_ops(device):
    torch._dynamo.reset()
    fused, _ = _pair()
    fused = fused.double().to(device)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(fused, fullgraph=True, backend=backend)
    compiled(torch.randn(1, 16, 4, 4, dtype=torch.float64, device=device))
    (gm,) = graphs  # one graph: no break
    assert "autograd_function_apply" in gm.code
    # the Function is traced through; the kernels stay opaque custom ops in its bodies
    fwd = gm.fwd_body_0.code
    bwd = gm.bwd_body_0.code
    assert "torch.ops.scconv_triton.sru_fwd" in fwd and "torch.ops.scconv_triton.cru_combine" in fwd
    assert "torch.ops.scconv_triton.sru_bwd" in bwd and "torch.ops.scconv_triton.cru_combine_bwd" in bwd


def test_compile_reference_backend_runs(device):
    torch._dynamo.reset()
    m = scconv_triton.SCConv(16, backend="reference").to(device)
    compiled = torch.compile(m, fullgraph=True)
    x = torch.randn(2, 16, 5, 5, device=device, requires_grad=True)
    compiled(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _amp_dtypes(device):
    # CPU autocast is bfloat16 (fp16 autocast of convolutions is a CUDA feature)
    return [torch.bfloat16] if device == "cpu" else [torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", _amp_dtypes(DEVICE))
def test_autocast_runs_fused_and_matches_reference(dtype, device):
    fused, base = _pair()
    fused, base = fused.to(device), base.to(device)
    x = torch.randn(2, 16, 6, 6, device=device)
    truth = base.double()(x.double())
    base.float()
    calls = []
    from scconv_triton.kernels import sru as ksru

    orig = ksru.sru_stats
    ksru.sru_stats = lambda *a, **k: (calls.append(a[0].dtype), orig(*a, **k))[1]
    try:
        with torch.autocast(device, dtype=dtype):
            y = fused(x)
            y_ref = base(x)
    finally:
        ksru.sru_stats = orig
    assert calls == [dtype], "the fused path must run in the autocast dtype"
    assert y.dtype == dtype
    tol = {torch.float16: 5e-3, torch.bfloat16: 4e-2}[dtype]
    assert _rel(y, truth) <= max(2 * _rel(y_ref, truth), tol)
    y.float().sum().backward()
    for n, p in fused.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32, n


def test_grad_scaler_step(device):
    fused, _ = _pair()
    fused = fused.to(device)
    opt = torch.optim.SGD(fused.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler(device)
    x = torch.randn(2, 16, 6, 6, device=device)
    before = [p.detach().clone() for p in fused.parameters()]
    dtype = _amp_dtypes(device)[0]
    with torch.autocast(device, dtype=dtype):
        loss = fused(x).float().pow(2).mean()
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    changed = [not torch.equal(b, p) for b, p in zip(before, fused.parameters())]
    assert all(changed)
    assert all(torch.isfinite(p).all() for p in fused.parameters())
