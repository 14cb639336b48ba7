"""Microbenchmarks (pytest-benchmark) of every fused kernel and of the modules.

    pytest benchmarks/                                  # interpreter on a CPU: tiny shape
    SCCONV_BENCH_SHAPE=64,64,56 pytest benchmarks/      # on a GPU
    pytest benchmarks/ --benchmark-autosave; ...; pytest benchmarks/ --benchmark-compare

Kernels are found, not listed: a fused SCConv forward + backward runs once with
its Triton launches captured (benchmarks/replay.py), and each captured launch
is replayed alone. Under the interpreter the times measure the interpreter, not
a GPU; they are for comparing runs of the same machine only.
"""
import pytest
import torch

from benchmarks import run as bench
from benchmarks.conftest import DEVICE, bench_shape, sync
from benchmarks.replay import capture_launches

IMPLS = ["reference", "ours", "ours-s1", "ours-rc", "conv+bn"]
_CAPTURED = {}


def _module(impl, c, device):
    return bench.build(impl, c, c, 1).to(device).train()


def _capture():
    """Run the fused module once and capture its Triton launches: {id: Captured} or an error string."""
    if "calls" in _CAPTURED or "error" in _CAPTURED:
        return _CAPTURED
    n, c, h = bench_shape()
    try:
        mod = _module("ours", c, DEVICE)
        x = torch.randn(n, c, h, h, device=DEVICE, requires_grad=True)
        y = mod(x)  # warm-up: compile / autotune outside the capture
        g = torch.randn_like(y)
        y.backward(g)
        with capture_launches() as fwd:
            y = mod(x)
        with capture_launches() as bwd:
            y.backward(g)
        sync()
        calls = {}
        for phase, lst in (("fwd", fwd), ("bwd", bwd)):
            for i, call in enumerate(lst):
                calls[f"{phase}{i}-{call.name}"] = call
        if not calls:
            _CAPTURED["error"] = "the fused SCConv made no Triton launch"
        else:
            _CAPTURED["calls"] = calls
            _CAPTURED["keep"] = (mod, x, y, g)  # keep every captured tensor alive
    except Exception as e:  # fused path not there yet
        _CAPTURED["error"] = f"fused SCConv unavailable: {type(e).__name__}: {e}"[:200]
    return _CAPTURED


def pytest_generate_tests(metafunc):
    if "kernel_id" in metafunc.fixturenames:
        cap = _capture()
        ids = sorted(cap.get("calls", {}), key=lambda k: (k[:3] != "fwd", int(k[3:].split("-")[0])))
        if not ids:
            metafunc.parametrize("kernel_id", [pytest.param(None, marks=pytest.mark.skip(reason=cap["error"]))],
                                 ids=["no-kernels"])
        else:
            metafunc.parametrize("kernel_id", ids)


def test_kernel(benchmark, kernel_id):
    """One captured Triton launch, replayed alone with the same tensors."""
    call = _CAPTURED["calls"][kernel_id]

    def once():
        call()
        sync()

    benchmark.group = "kernels"
    benchmark.extra_info["kernel"] = call.name
    benchmark(once)


@pytest.mark.parametrize("impl", IMPLS)
def test_module_forward(benchmark, impl, shape):
    n, c, h = shape
    try:
        mod = _module(impl, c, DEVICE)
        x = torch.randn(n, c, h, h, device=DEVICE, requires_grad=True)
        mod(x).sum().backward()
    except Exception as e:
        pytest.skip(f"{impl} unavailable: {type(e).__name__}: {e}"[:200])

    def fwd():
        mod(x)
        sync()

    benchmark.group = "module forward"
    benchmark(fwd)


@pytest.mark.parametrize("impl", IMPLS)
def test_module_forward_backward(benchmark, impl, shape):
    n, c, h = shape
    try:
        mod = _module(impl, c, DEVICE)
        x = torch.randn(n, c, h, h, device=DEVICE, requires_grad=True)
        y = mod(x)
        g = torch.randn_like(y)
        y.backward(g)
    except Exception as e:
        pytest.skip(f"{impl} unavailable: {type(e).__name__}: {e}"[:200])
    params = [x] + list(mod.parameters())

    def step():
        for p in params:
            p.grad = None
        mod(x).backward(g)
        sync()

    benchmark.group = "module forward+backward"
    benchmark(step)
