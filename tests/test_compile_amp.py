"""torch.compile (fullgraph, forward and backward) and autocast / GradScaler with the fused SCConv."""
import pytest
import torch

import scconv_triton
from scconv_triton import reference as ref
from _helpers import GPU, draw_away_from_gate, low_tol, rel


def _pair(c=16, recompute=False):
    fused = scconv_triton.SCConv(c, backend="triton", recompute=recompute)
    base = ref.SCConv(c)
    base.load_state_dict(fused.state_dict())
    return fused, base


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
    assert rel(yc, yr) < 1e-10 and rel(xc.grad, xr.grad) < 1e-10
    for (n, pf), pr in zip(fused.named_parameters(), base.parameters()):
        assert rel(pf.grad, pr.grad) < 1e-10, n


def test_compiled_graph_calls_the_fused_custom_ops(device):
    torch._dynamo.reset()
    fused, _ = _pair()
    fused = fused.double().to(device)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    x = torch.randn(1, 16, 4, 4, dtype=torch.float64, device=device)
    for stage, rc, fwd_ops, bwd_ops in ((2, False, ["stage2_fwd"], ["stage2_dw", "stage2_dgrad", "stage2_sq_bwd"]),
                                        (2, True, ["stage2_fwd"], ["stage2_squeeze", "stage2_dw", "stage2_dgrad",
                                                                   "stage2_sq_bwd"]),
                                        (1, False, ["sru_fwd", "cru_combine"], ["sru_bwd", "cru_combine_bwd"])):
        torch._dynamo.reset()
        graphs.clear()
        fused.stage, fused.recompute = stage, rc
        torch.compile(fused, fullgraph=True, backend=backend)(x)
        (gm,) = graphs  # one graph: no break
        assert "autograd_function_apply" in gm.code
        # the Function is traced through; the kernels stay opaque custom ops in its bodies
        fwd = gm.fwd_body_0.code
        bwd = gm.bwd_body_0.code
        assert all(f"torch.ops.scconv_triton.{op}" in fwd for op in fwd_ops), (stage, fwd)
        # stage 2's backward: the dA + weight-gradient pass, the input-gradient pass and the fused
        # squeeze + SRU backward;
        # stage 1's: its SRU backward
        assert all(f"torch.ops.scconv_triton.{op}" in bwd for op in bwd_ops), (stage, bwd)


def test_compile_reference_backend_runs(device):
    torch._dynamo.reset()
    m = scconv_triton.SCConv(16, backend="reference").to(device)
    compiled = torch.compile(m, fullgraph=True)
    x = torch.randn(2, 16, 5, 5, device=device, requires_grad=True)
    compiled(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def _amp_dtypes(device):
    # CPU autocast is bfloat16 (fp16 autocast of convolutions is a CUDA feature)
    return [torch.bfloat16] if device == "cpu" else [torch.float16, torch.bfloat16]


def autocast_errors(dtype, device):
    """fp32 fused SCConv under autocast(dtype) against the fp64 reference on the same values
    rounded to dtype (what the kernels see): {name: relative error} over the output, dx and
    every parameter gradient. Checks on the way that the kernels ran in the autocast dtype
    and that the fp32 parameters got fp32 gradients."""
    fused, base = _pair()
    with torch.no_grad():  # non-trivial values everywhere, so every term can fail
        for p in fused.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
        # gamma in (0.5, 1.5): a channel with gamma ~ 0 would hold every r of it at tau
        fused.SRU.gn.weight.uniform_(0.5, 1.5)
    fused = fused.to(device)
    base.load_state_dict(fused.state_dict())
    base = base.to(device, dtype).double()  # the parameters rounded to dtype, then fp64
    # no gate value within 1e-5 of tau on the rounded x: the kernels compute r in fp32 from
    # those values, so they take the fp64 truth's decisions (SPEC.md: the gate is discontinuous)
    x = draw_away_from_gate(base.SRU, lambda: torch.randn(2, 16, 6, 6, device=device).to(dtype).float(),
                            margin=1e-5)
    calls = []
    from scconv_triton.kernels import sru as ksru

    orig = ksru.sru_stats
    ksru.sru_stats = lambda *a, **k: (calls.append(a[0].dtype), orig(*a, **k))[1]
    xf = x.clone().requires_grad_(True)
    try:
        with torch.autocast(device, dtype=dtype):
            y = fused(xf)
    finally:
        ksru.sru_stats = orig
    assert calls == [dtype], "the fused path must run in the autocast dtype"
    assert y.dtype == dtype
    g = torch.randn(y.shape, device=device)
    y.float().backward(g)
    xr = x.double().requires_grad_(True)
    yr = base(xr)
    yr.backward(g.to(dtype).double())
    errs = {"out": rel(y, yr), "dx": rel(xf.grad, xr.grad)}
    for (n, p), pr in zip(fused.named_parameters(), base.parameters()):
        assert p.grad is not None and p.grad.dtype == torch.float32, n
        errs[n] = rel(p.grad, pr.grad)
    return errs


@pytest.mark.parametrize("dtype", [pytest.param(torch.float16, id="fp16", marks=GPU),  # CUDA-only autocast
                                   pytest.param(torch.bfloat16, id="bf16")])
def test_autocast_runs_fused_and_matches_reference(dtype, device):
    # each quantity within ~3x its measured error (tests/_helpers.py LOW_TOL)
    errs = autocast_errors(dtype, device)
    bad = {k: (f"{e:.2e}", low_tol("autocast-scconv", dtype, k)) for k, e in errs.items()
           if not e <= low_tol("autocast-scconv", dtype, k)}
    assert not bad, f"(error, tolerance) above tolerance: {bad}"


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
