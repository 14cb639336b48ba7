"""GPU only: the fused SCConv on a second GPU, and a training step captured in a CUDA graph.

Skipped without CUDA (two GPUs for the first). What they prove:
  - every launch runs on its input's device, not the current one: a module on cuda:1 while
    the current device is 0 matches the reference on cuda:1, forward and every gradient, and
    the profiler sees each fused kernel on device 1;
  - a training step (forward, backward, SGD step) has no host synchronisation and no
    allocation that a CUDA graph cannot capture: captured once, replayed on new inputs, it
    gives what eager gives.
"""
import copy

import pytest
import torch

import scconv_triton
from scconv_triton import reference as ref
from _helpers import TOL, gpu, rel, two_gpus


def _fused_and_reference(seed=0, **kw):
    torch.manual_seed(seed)
    fused = scconv_triton.SCConv(16, backend="triton", **kw)
    with torch.no_grad():  # non-trivial values everywhere, so every term can fail
        for p in fused.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
        fused.SRU.gn.weight.add_(1.0)
    base = ref.SCConv(16, **{k: v for k, v in kw.items() if k != "recompute"})
    base.load_state_dict(fused.state_dict())
    return fused, base


def _close(got, want, tol):
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        if b is None:  # hard gate: no gradient reaches the GroupNorm parameters
            assert a is None, i
            continue
        assert a is not None and a.shape == b.shape and a.dtype == b.dtype, i
        assert rel(a, b) <= tol, (i, rel(a, b))


def _step(model, x, g):
    x = x.detach().clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    y = model(x)
    y.backward(g)
    return [y.detach(), x.grad] + [p.grad for p in model.parameters()]


@two_gpus
@pytest.mark.parametrize("kw", [{}, {"stride": 2, "softmax": "pairwise", "recompute": True}],
                         ids=["default", "s2-pairwise-recompute"])
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
def test_module_on_the_second_gpu_while_the_current_device_is_the_first(kw, cl, deterministic):
    from torch.profiler import DeviceType, ProfilerActivity, profile

    fused, base = _fused_and_reference(**kw)
    with torch.cuda.device(0):
        assert torch.cuda.current_device() == 0
        fused, base = fused.to("cuda:1", torch.float64), base.to("cuda:1", torch.float64)
        x = torch.randn(2, 16, 9, 7, dtype=torch.float64, device="cuda:1")
        if cl:
            x = x.to(memory_format=torch.channels_last)
        g = torch.randn(base(x).shape, dtype=torch.float64, device="cuda:1")
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            got = _step(fused, x, g)
            torch.cuda.synchronize("cuda:1")
        assert torch.cuda.current_device() == 0  # the guard restores the caller's device
        want = _step(base, x, g)
    assert all(a.device == torch.device("cuda:1") for a in got)
    _close(got, want, TOL[torch.float64])
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    if not kernels:
        pytest.skip("the profiler recorded no CUDA kernels (no CUPTI): the results matched, the launch "
                    "devices were not checked")
    ours = [e for e in kernels if e.name.startswith(("_sru", "_cru"))]
    assert ours, sorted({e.name for e in kernels})
    assert {e.device_index for e in ours} == {1}, sorted({(e.name, e.device_index) for e in ours})


def _inputs(n, shape, device="cuda"):
    g = torch.Generator(device="cpu").manual_seed(7)
    return [(torch.randn(shape, generator=g).to(device), torch.randn(shape, generator=g).to(device))
            for _ in range(n)]


@gpu
@pytest.mark.parametrize("kw", [{}, {"recompute": True, "gate": "hard"}], ids=["default", "recompute-hard"])
def test_cuda_graph_replays_a_training_step(kw, deterministic):
    """torch.cuda.graph around forward + backward + SGD step; replays on new inputs against eager."""
    fused, _ = _fused_and_reference(**kw)
    model = fused.cuda()
    eager = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.05)
    shape = (2, 16, 8, 8)
    x_static = torch.randn(shape, device="cuda").requires_grad_(True)
    g_static = torch.randn(shape, device="cuda")
    # warm-up on a side stream (compiles the kernels, fills the allocator), as the CUDA-graph docs do
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            model.zero_grad(set_to_none=True)
            x_static.grad = None
            model(x_static).backward(g_static)
    torch.cuda.current_stream().wait_stream(s)
    model.zero_grad(set_to_none=True)
    x_static.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # raises on a host sync (.item(), .cpu(), ...) inside the step
        y_static = model(x_static)
        y_static.backward(g_static)
        opt.step()
    # capture ran nothing: the parameters are still eager's
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), eager.parameters()))
    for x, g in _inputs(3, shape):
        with torch.no_grad():
            x_static.copy_(x)
            g_static.copy_(g)
        graph.replay()
        want = _step(eager, x, g)
        opt_e.step()
        got = [y_static, x_static.grad] + [p.grad for p in model.parameters()]
        # the same kernels on the same values: equal up to cuDNN's algorithm choice
        _close(got, want, 1e-6)
        _close(list(model.parameters()), list(eager.parameters()), 1e-6)


@gpu
def test_make_graphed_callables_matches_eager(deterministic):
    """torch.cuda.make_graphed_callables on the module: graphed forward and backward."""
    fused, _ = _fused_and_reference(stride=2)
    model = fused.cuda()
    eager = copy.deepcopy(model)
    shape = (2, 16, 9, 9)
    sample = torch.randn(shape, device="cuda").requires_grad_(True)
    graphed = torch.cuda.make_graphed_callables(model, (sample,))
    out_shape = eager(sample).shape
    for x, _ in _inputs(3, shape):
        g = torch.randn(out_shape, device="cuda")
        _close(_step(graphed, x, g), _step(eager, x, g), 1e-6)
