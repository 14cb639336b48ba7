"""Host cost of one SCConv training step: what the Python side costs when the kernels cost nothing.

    python benchmarks/host_cost.py [--channels 16 --size 4 --batch 1 --steps 200]

On a CPU every Triton launch is stubbed at ``InterpretedFunction.run``
(``skip_triton_launches(level="launch")``: the call returns at once; the interpreter's
own argument staging, which a GPU does not pay, is skipped too), so the fused step's time is its host work: argument checks, autograd, launchers
(tiles, strides, allocations) and the few aten ops it runs (the convolutions, at a tiny
shape). A GPU adds Triton's own launch path per kernel (a few us in Triton 3.x). The
reference eager step at the same tiny shape is the yardstick: its ops are launch-bound
there too. Reported: median microseconds per training step (forward + backward) of
each and their ratio (the target is fused / reference <= 0.5). On a GPU the kernels run
for real and the numbers include the device's launch latency; the comparison is then
CPU-side time per step with the device idle between steps (``torch.cuda.synchronize``).
This is not a kernel benchmark: shapes are chosen so that no row does real work.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any @triton.jit module is imported


def _step_time(mod, x, g, steps, device, stub):
    """Median seconds of one forward + backward over ``steps`` runs (after 5 warm-ups)."""
    from scconv_triton.testing import skip_triton_launches

    ctx = skip_triton_launches(level="launch") if stub else contextlib.nullcontext()
    times = []
    with ctx:
        for i in range(steps + 5):
            x.grad = None
            for p in mod.parameters():
                p.grad = None
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            mod(x).backward(g)
            if device == "cuda":
                torch.cuda.synchronize()
            if i >= 5:
                times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(channels=16, size=4, batch=1, steps=200, device=None) -> dict:
    """{"fused_us", "reference_us", "ratio"}: median host microseconds per training step."""
    import scconv_triton
    from scconv_triton import reference

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    # one intra-op thread: at these sizes threads only add synchronisation, and on a loaded
    # machine their spin-waits would dominate what is measured
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _measure(channels, size, batch, steps, device)
    finally:
        torch.set_num_threads(threads)


def _measure(channels, size, batch, steps, device):
    import scconv_triton
    from scconv_triton import reference

    torch.manual_seed(0)
    ref = reference.SCConv(channels).to(device)
    fused = scconv_triton.SCConv(channels, backend="triton").to(device)
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(batch, channels, size, size, device=device, requires_grad=True)
    g = torch.randn(batch, channels, size, size, device=device)
    stub = device == "cpu"
    tf = _step_time(fused, x, g, steps, device, stub)
    tr = _step_time(ref, x, g, steps, device, False)
    return {"fused_us": tf * 1e6, "reference_us": tr * 1e6, "ratio": tf / tr, "device": device,
            "stubbed": stub, "shape": (batch, channels, size, size)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--size", type=int, default=4)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=200)
    a = p.parse_args(argv)
    r = measure(a.channels, a.size, a.batch, a.steps)
    kind = "Triton launches stubbed (interpreter)" if r["stubbed"] else "kernels run on the GPU"
    print(f"host cost of one training step, SCConv({a.channels}) on {tuple(r['shape'])}, {r['device']}, {kind}:")
    print(f"  fused      {r['fused_us']:8.0f} us")
    print(f"  reference  {r['reference_us']:8.0f} us  (eager)")
    print(f"  fused / reference = {r['ratio']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
