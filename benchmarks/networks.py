"""Whole-network memory: bytes saved for backward by ResNet-50 / DenseNet-121 and their SCConv versions.

    python benchmarks/networks.py              # CPU: reference networks, batch 2, 224x224
    python benchmarks/networks.py --fused      # also the fused SCConv networks

Saved bytes = distinct storages autograd keeps for backward after one training
forward, besides the input and the parameters / buffers (benchmarks/meter.py).
On a CPU the fused networks run with their Triton kernel bodies skipped (the
saved tensors depend only on shapes; see meter.skip_triton_launches).
On a GPU also the peak memory of a forward+backward step above what was
allocated before it, and its median time (triton.testing.do_bench).
DESIGN.md, batch 2 at 224x224: ResNet-50 163 MB vs SCConv-R50 272 MB;
DenseNet-121 248 MB vs SCConv-D121 454 MB (those "MB" are MiB, 2**20 bytes, the
unit printed here).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from benchmarks.meter import SavedBytes, skip_triton_launches  # noqa: E402

# (label, builder name in scconv_triton.models, kwargs)
NETWORKS = [
    ("ResNet-50", "resnet50", {}),
    ("SCConv-R50 (reference)", "scconv_resnet50", {"fused": False}),
    ("SCConv-R50 (ours)", "scconv_resnet50", {"fused": True, "backend": "triton"}),
    ("DenseNet-121", "densenet121", {}),
    ("SCConv-D121 (reference)", "scconv_densenet121", {"fused": False}),
    ("SCConv-D121 (ours)", "scconv_densenet121", {"fused": True, "backend": "triton"}),
]


def _models():
    try:
        from scconv_triton import models
    except ImportError as e:
        raise RuntimeError(f"scconv_triton.models is not available yet ({e}); whole-network numbers need it") from e
    return models


def saved_bytes(model: torch.nn.Module, x: torch.Tensor, shapes_only: bool = False) -> dict:
    """Bytes saved for backward by one training forward of ``model`` on ``x``.

    ``shapes_only``: interpreted Triton kernels are skipped (meter.skip_triton_launches);
    the saved storages and their sizes are the same, the values are not computed.
    """
    model.train()
    state = list(model.parameters()) + list(model.buffers())
    x = x.detach().requires_grad_(False)
    skip = skip_triton_launches() if shapes_only else contextlib.nullcontext()
    with skip, SavedBytes(input=[x], params=state) as s:
        y = model(x)
    del y
    return {"saved_bytes": s.bytes, "saved_param_bytes": s.groups["params"], "saved_tensors": s.n_tensors}


def run_networks(device="cpu", batch=None, size=224, fused=False, times=None, tools=None, quiet=False,
                 num_classes=1000, which=None, compile_fn=None) -> list:
    """Measure every network of NETWORKS (fused ones only if ``fused``); returns a list of dicts.

    ``compile_fn`` (e.g. ``torch.compile``): time and measure the peak of ``compile_fn(model)``
    instead; such rows are labelled ``... + torch.compile`` and carry no saved bytes (the
    compiled graph's saved tensors are not what eager autograd keeps).
    """
    times = (device == "cuda") if times is None else times
    batch = batch or 2
    rows = []
    try:
        models = _models()
    except RuntimeError as e:
        return [{"network": "all", "error": str(e)}]
    todo = [n for n in NETWORKS if (fused or not n[2].get("fused")) and (which is None or n[0] in which)]
    for i, (label, fn, kw) in enumerate(todo):
        t0 = time.perf_counter()
        row = {"network": label + (" + torch.compile" if compile_fn else ""), "batch": batch, "size": size}
        try:
            build = getattr(models, fn)
            torch.manual_seed(0)
            model = build(num_classes=num_classes, **kw).to(device)
            x = torch.randn(batch, 3, size, size, device=device)
            # On a CPU the fused networks' kernels would run in the interpreter for
            # many minutes; saved bytes depend only on shapes, so skip their bodies.
            shapes_only = device == "cpu" and bool(kw.get("fused"))
            if compile_fn is None:
                row.update(saved_bytes(model, x, shapes_only=shapes_only))
                row["shapes_only"] = shapes_only
            else:
                model = compile_fn(model.train())
            if times:
                if tools is None:
                    from benchmarks.run import GpuTools

                    tools = GpuTools(device)
                params = [p for p in model.parameters()]
                xx = x.detach()

                def step():
                    model(xx).sum().backward()

                step()
                for p in params:
                    p.grad = None
                tools.synchronize()
                base = tools.memory_allocated()
                tools.reset_peak()
                step()
                tools.synchronize()
                row["peak_bytes"] = max(tools.max_memory_allocated() - base, 0)
                row["step_ms"] = tools.do_bench(step, grad_to_none=params)
            del model, x
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:160]
        row["wall_s"] = time.perf_counter() - t0
        rows.append(row)
        if not quiet:
            print(f"[networks {i + 1}/{len(todo)}] {label}: {row['wall_s']:.1f}s", file=sys.stderr)
    return rows


def format_networks(rows) -> str:
    out = ["whole networks, one training step, bytes saved for backward (besides input and parameters)"]
    base = {}
    for r in rows:
        if r.get("error"):
            out.append(f"  {r['network']:26s} n/a ({r['error']})")
            continue
        fam = r["network"].split("-")[-1].split(" ")[0]  # 50 / R50 / 121 / D121
        key = "R" if fam in ("50", "R50") else "D"
        ratio = ""
        if r.get("saved_bytes") is None:
            saved = "saved        - MiB"
        else:
            if r["network"] in ("ResNet-50", "DenseNet-121"):
                base[key] = r["saved_bytes"]
            elif key in base:
                ratio = f"  ({r['saved_bytes'] / base[key]:.2f}x)"
            saved = f"saved {r['saved_bytes'] / 2**20:8.1f} MiB"
        line = f"  {r['network']:26s} batch {r['batch']} @{r['size']}: {saved}{ratio}"
        if r.get("peak_bytes") is not None:
            line += f"  peak {r['peak_bytes'] / 2**20:8.1f} MiB"
        if r.get("step_ms") is not None:
            line += f"  step {r['step_ms']:8.2f} ms"
        out.append(line)
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default=None)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--fused", action="store_true", help="include the fused SCConv networks")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rows = run_networks(device=device, batch=a.batch, size=a.size, fused=a.fused, quiet=a.quiet)
    print(format_networks(rows))
    if a.json:
        import json

        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
