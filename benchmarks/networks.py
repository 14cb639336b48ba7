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
    ("SCConv-R50 (ours, recompute)", "scconv_resnet50", {"fused": True, "backend": "triton", "recompute": True}),
    ("DenseNet-121", "densenet121", {}),
    ("SCConv-D121 (reference)", "scconv_densenet121", {"fused": False}),
    ("SCConv-D121 (ours)", "scconv_densenet121", {"fused": True, "backend": "triton"}),
    ("SCConv-D121 (ours, recompute)", "scconv_densenet121",
     {"fused": True, "backend": "triton", "recompute": True}),
]


def _err_text(e: BaseException) -> str:
    msg = str(e).strip()
    return f"{type(e).__name__}: {msg.splitlines()[0] if msg else ''}"[:160]


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
            row["error"] = _err_text(e)
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
            out.append(f"  {r['network']:30s} n/a ({r['error']})")
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
                ratio = f"  ({r['saved_bytes'] / base[key]:.3f}x)"
            saved = f"saved {r['saved_bytes'] / 2**20:8.1f} MiB"
        line = f"  {r['network']:30s} batch {r['batch']} @{r['size']}: {saved}{ratio}"
        if r.get("peak_bytes") is not None:
            line += f"  peak {r['peak_bytes'] / 2**20:8.1f} MiB"
        if r.get("step_ms") is not None:
            line += f"  step {r['step_ms']:8.2f} ms"
        out.append(line)
    return "\n".join(out)


# ----------------------------------------------------------------------------- roofline floor
#: The study's batch sizes (224x224): ResNet-50 family 128, DenseNet-121 family 64.
FLOOR_BATCHES = {"R": 128, "D": 64}
FLOOR_NETWORKS = [n for n in NETWORKS if not n[2].get("recompute")]  # recompute: the saved-bytes table only


def _family(label: str) -> str:
    return "D" if "121" in label else "R"


class _Stub(torch.autograd.Function):
    """Stands in for an SCConv: an output of the right shape, no launch, no bytes, no FLOPs."""

    @staticmethod
    def forward(ctx, x, out_shape):
        ctx.in_shape = x.shape
        return x.new_empty(out_shape)

    @staticmethod
    def backward(ctx, g):
        return g.new_empty(ctx.in_shape), None


class _StubSCConv(torch.nn.Module):
    def __init__(self, layer, instances: list):
        super().__init__()
        self.cin, self.cout, self.stride = layer.in_channels, layer.out_channels, layer.stride
        gwc = layer.CRU.GWC
        self.k, self.pad = gwc.kernel_size[0], gwc.padding[0]
        self.layer_repr = repr(layer)
        self.instances = instances

    def forward(self, x):
        n, _, h, w = x.shape
        ho = (h + 2 * self.pad - self.k) // self.stride + 1
        wo = (w + 2 * self.pad - self.k) // self.stride + 1
        if h != w:
            raise ValueError("floor_networks: square inputs only (the layer counts are keyed by one size)")
        self.instances.append((self.cin, self.cout, h, self.stride, self.layer_repr))
        return _Stub.apply(x, (n, self.cout, ho, wo))


def stub_scconv(model: torch.nn.Module) -> list:
    """Replace every SCConv module of ``model`` (in place) by a stub; returns the list the stubs
    append (in_channels, out_channels, input size, stride, repr of the layer) to on every call."""
    from scconv_triton import reference

    instances: list = []

    def walk(mod):
        for name, child in mod.named_children():
            if isinstance(child, reference.SCConv):  # the fused SCConv subclasses the reference
                setattr(mod, name, _StubSCConv(child, instances))
            else:
                walk(child)

    walk(model)
    return instances


def step_launches(model: torch.nn.Module, x: torch.Tensor) -> tuple[list, list]:
    """Per-launch counts (Launch.as_list()) of one training forward and backward of ``model``.

    As meter.measure_step: the input does not require grad here (it is the image),
    the upstream gradient is made outside the meters, parameter grads start as None.
    """
    from benchmarks.meter import Meter

    model.train()
    model.zero_grad(set_to_none=True)
    fwd = Meter()
    with fwd:
        y = model(x)
    g = torch.randn_like(y)
    bwd = Meter()
    with bwd:
        y.backward(g)
    model.zero_grad(set_to_none=True)
    return [r.as_list() for r in fwd.launches], [r.as_list() for r in bwd.launches]


def network_launches(build, batch: int, size=224, stub=False, device="meta"):
    """(fwd launches, bwd launches, SCConv instances) of one training step of ``build()`` at ``batch``.

    Counted on the meta device by default: no arithmetic runs, the meter sees the
    same aten ops with the same shapes (tests/test_floor.py checks it against a
    CPU count), so a network is counted at its true batch in seconds.
    ``stub``: SCConv layers are replaced by stubs (their launches are priced from
    per-layer counts instead, see count_networks) and listed as instances.
    """
    torch.manual_seed(0)
    with torch.device(device):
        model = build()
    instances = stub_scconv(model) if stub else []
    x = torch.randn(batch, 3, size, size, device=device)
    f, bw = step_launches(model, x)
    return f, bw, list(instances)


def count_networks(layer_counts=None, size=224, batches=None, count_batches=(1, 2), num_classes=1000,
                   which=None, quiet=False, device="meta") -> list:
    """Per-launch counts of one training step of each network of NETWORKS at the study's batch sizes.

    Eager networks (ResNet-50, DenseNet-121 and the reference SCConv networks) are
    counted whole by the meter, on the meta device, at the study's batch. The fused SCConv networks are counted with every SCConv replaced by a stub
    (the rest of the network, exactly) plus, for every SCConv call, the per-layer
    launches of that layer (``layer_counts(keys)`` -> {key: {batch: count_row dict}},
    keys ``(in, out, size, stride)``; each distinct layer is counted once, under the
    interpreter at ``count_batches``, extrapolated per launch to the batch, and reused). ``tests/test_floor.py`` checks the stub composition
    against a whole-network count. Returns rows with ``fwd`` / ``bwd`` launch lists;
    price them with price_networks.
    """
    from benchmarks.floor import extrapolate_launches

    models = _models()
    batches = dict(FLOOR_BATCHES, **(batches or {}))
    b1, b2 = count_batches
    rows = []
    todo = [n for n in FLOOR_NETWORKS if which is None or n[0] in which]
    for label, fn, kw in todo:
        t0 = time.perf_counter()
        fam = _family(label)
        n = batches[fam]
        row = {"network": label, "batch": n, "size": size, "family": fam}
        try:
            fused = bool(kw.get("fused"))
            build = lambda fn=fn, kw=kw: getattr(models, fn)(num_classes=num_classes, **kw)  # noqa: E731
            fwd, bwd, inst = network_launches(build, n, size, stub=fused, device=device)
            if inst:
                if layer_counts is None:
                    raise RuntimeError("the fused networks need per-layer counts (layer_counts)")
                keys = sorted({i[:4] for i in inst})
                per = layer_counts(keys)
                layers = {}
                for key in keys:
                    c1, c2 = per[key][b1], per[key][b2]
                    if "error" in c1 or "error" in c2:
                        raise RuntimeError(f"layer {key}: {c1.get('error') or c2.get('error')}")
                    if c1.get("layer_repr") and c1["layer_repr"] != next(i[4] for i in inst if i[:4] == key):
                        raise RuntimeError(f"layer {key}: the network's SCConv is not the counted one")
                    layers[key] = (extrapolate_launches(c1["fwd_launch_list"], c2["fwd_launch_list"], n, b1, b2),
                                   extrapolate_launches(c1["bwd_launch_list"], c2["bwd_launch_list"], n, b1, b2))
                for i in inst:
                    lf, lb = layers[i[:4]]
                    fwd = fwd + lf
                    bwd = bwd + lb
                row["distinct_layers"] = len(keys)
                row["scconv_calls"] = len(inst)
            row["fwd"], row["bwd"] = fwd, bwd
        except Exception as e:
            if os.environ.get("SCCONV_BENCH_DEBUG"):
                import traceback

                traceback.print_exc()
            row["error"] = _err_text(e)
        row["wall_s"] = time.perf_counter() - t0
        rows.append(row)
        if not quiet:
            print(f"[network counts] {label}: {row['wall_s']:.1f}s", file=sys.stderr)
    return rows


def price_networks(counted, roofline) -> list:
    """Floor of every counted network on ``roofline`` (rows without the launch lists)."""
    rows = []
    for c in counted:
        row = {k: v for k, v in c.items() if k not in ("fwd", "bwd")}
        if "error" not in c:
            fwd, bwd = c["fwd"], c["bwd"]
            row.update(roofline.step_floor(fwd, bwd))
            row.update({"gpu": roofline.gpu.name, "flops": sum(ln[2] for ln in fwd + bwd),
                        "bytes": sum(ln[1] for ln in fwd + bwd)})
        rows.append(row)
    base = {}
    for r in rows:
        if "error" in r:
            continue
        if r["network"] in ("ResNet-50", "DenseNet-121"):
            base[r["family"]] = r["floor_ms"]
        elif r["family"] in base:
            r["floor_ratio"] = r["floor_ms"] / base[r["family"]]
    return rows


def format_floor(rows, roofline) -> str:
    from benchmarks.floor import STUDY_RATIOS

    out = [f"whole networks, one training step (forward + backward), 224x224, roofline floor (a model, not a "
           f"measurement) on {roofline.describe()}",
           f"  {'network':26s} {'batch':>5s} {'launches':>8s} {'GFLOP':>7s} {'GB':>6s} {'floor ms':>9s}"
           f" {'bytes-b':>8s} {'flop-b':>8s} {'launch-b':>8s}  ratio"]
    for r in rows:
        if r.get("error"):
            out.append(f"  {r['network']:30s} n/a ({r['error']})")
            continue
        ratio = ""
        if r.get("floor_ratio") is not None:
            ratio = f"{r['floor_ratio']:.2f}x"
            if "reference" in r["network"]:
                ratio += f"  (study, measured: {STUDY_RATIOS[r['family']]:.2f}x)"
        out.append(f"  {r['network']:26s} {r['batch']:5d} {r['launches']:8d} {r['flops'] / 1e9:7.0f} "
                   f"{r['bytes'] / 1e9:6.1f} {r['floor_ms']:9.1f} {r['floor_bytes_ms']:8.1f} "
                   f"{r['floor_flops_ms']:8.1f} {r['floor_launch_ms']:8.1f}  {ratio}")
    out.append("  (ms of the launches bound by bytes / FLOPs / the launch time; ratio = floor / the baseline's)")
    return "\n".join(out)


def format_ratios_by_gpu(counted, roofline_factory) -> str:
    """One line per card of floor.GPUS: the floor ratios (R50 / D121 families), priced from the same counts."""
    from benchmarks.floor import GPUS, STUDY_RATIOS

    out = [f"floor ratios by card (SCConv network / its baseline; the study measured "
           f"{STUDY_RATIOS['R']:.2f}x / {STUDY_RATIOS['D']:.2f}x for the reference):"]
    for key in GPUS:
        rows = price_networks(counted, roofline_factory(key))
        cells = [f"{r['network']} {r['floor_ratio']:.2f}x" for r in rows if r.get("floor_ratio") is not None]
        out.append(f"  {GPUS[key].name:10s} " + ", ".join(cells))
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
