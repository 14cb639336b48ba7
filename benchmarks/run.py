"""The main job: memory traffic, launches, saved memory (and on a GPU latency) of SCConv.

    python benchmarks/run.py                 # CPU: counted columns and floors, interpreter (~7 min of CPU)
    python benchmarks/run.py --gpu A100-80GB # the roofline floor priced on another card
    python benchmarks/run.py --batch 2       # DESIGN.md's exact setting (N=2; ~3-6 min on 2 cores)
    python benchmarks/run.py --json out.json --plot out.png
    python benchmarks/run.py --networks      # also whole-network saved bytes (ResNet-50, DenseNet-121)

For every layer shape (the ResNet-50 3x3 layers and DenseNet-121's 128 -> 32
layer) it compares, on one training step (forward + backward):

    reference   scconv_triton.reference.SCConv, eager PyTorch
    compile     torch.compile(reference)                 (GPU only)
    ours        scconv_triton.SCConv(backend="triton")   (same state_dict; stage 2, the default)
    ours-s1     scconv_triton.SCConv(..., stage=1)       (stage 1: the SRU / CRU kernels around cuDNN)
    ours-rc     scconv_triton.SCConv(..., stage=1, recompute=True)
    conv+bn     the Conv2d k x k (+ BatchNorm2d) that SCConv replaces

Counted columns (benchmarks/meter.py; any machine): launches and bytes moved by
the forward and the backward, in bytes and in units of S = N*C*H*W*element_size
of the layer input, and bytes saved for backward besides the input and the
parameters. Triton traffic is counted by the interpreter: on a GPU machine the
counts come from a CPU subprocess under TRITON_INTERPRET=1 at batch 1 and 2,
extrapolated linearly to the timing batch (every tensor is either proportional
to the batch or independent of it).

GPU columns: median forward, backward and forward+backward times
(``triton.testing.do_bench``), achieved GB/s = counted bytes / time and its
fraction of a measured device-to-device copy bandwidth, and peak memory of a
step above what was allocated before it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
import traceback
from unittest import mock

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import torch  # noqa: E402

# TRITON_INTERPRET must be set before any @triton.jit module is imported.
def _wants_cpu(argv) -> bool:
    argv = list(argv)
    if "--device=cpu" in argv or any(a == "--device" and b == "cpu" for a, b in zip(argv, argv[1:])):
        return True
    return not torch.cuda.is_available()


if __name__ == "__main__" and _wants_cpu(sys.argv[1:]):
    os.environ.setdefault("TRITON_INTERPRET", "1")
elif not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

from benchmarks.floor import DEFAULT_GPU, Roofline, detect_gpu, extrapolate_launches, find_gpu  # noqa: E402
from benchmarks.meter import Launch, measure_step, memo_triton_launches, per_sample_from, tensor_bytes  # noqa: E402

IMPLS = ("reference", "compile", "ours", "ours-s1", "ours-rc", "conv+bn")  # ours: stage 2; -s1, -rc: stage 1
COUNT_KEYS = ("fwd_launches", "fwd_bytes", "bwd_launches", "bwd_bytes", "saved_bytes",
              "fwd_triton_launches", "bwd_triton_launches", "fwd_flops", "bwd_flops", "fwd_ew_flops",
              "bwd_ew_flops")
LIST_KEYS = ("fwd_launch_list", "bwd_launch_list")  # per launch, what the floor prices
#: Batch the floor columns are computed at on a CPU (on a GPU: the timing batch).
CPU_FLOOR_BATCH = 64
# One process-wide memo of interpreted Triton launches (meter.memo_triton_launches):
# the CRU weight kernels, the forward of ours-rc and the layers the whole networks
# share with the per-layer rows are interpreted once.
_LAUNCH_MEMO: dict = {}

# ----------------------------------------------------------------------------- shapes
# (name, in channels, out channels, input H=W, stride)
SHAPE_SETS = {
    "resnet": [
        ("R50 layer1 3x3", 64, 64, 56, 1),
        ("R50 layer2 3x3", 128, 128, 28, 1),
        ("R50 layer3 3x3", 256, 256, 14, 1),
        ("R50 layer4 3x3", 512, 512, 7, 1),
    ],
    "resnet-s2": [
        ("R50 layer2.0 3x3/2", 128, 128, 56, 2),
        ("R50 layer3.0 3x3/2", 256, 256, 28, 2),
        ("R50 layer4.0 3x3/2", 512, 512, 14, 2),
    ],
    "densenet": [
        ("D121 block1 128->32", 128, 32, 56, 1),
        ("D121 block2 128->32", 128, 32, 28, 1),
    ],
}
SHAPE_SETS["default"] = SHAPE_SETS["resnet"] + SHAPE_SETS["densenet"][1:]
SHAPE_SETS["all"] = SHAPE_SETS["resnet"] + SHAPE_SETS["resnet-s2"] + SHAPE_SETS["densenet"]


def parse_shapes(spec: str):
    """Comma-separated names of SHAPE_SETS, or custom ``C[:OUT]@H[/STRIDE]`` (e.g. ``16@8``, ``128:32@28/2``)."""
    out = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        if part in SHAPE_SETS:
            out += SHAPE_SETS[part]
            continue
        try:
            ch, rest = part.split("@")
            cin, cout = (ch.split(":") + [None])[:2]
            h, s = (rest.split("/") + ["1"])[:2]
            cin, h, s = int(cin), int(h), int(s)
            cout = int(cout) if cout else cin
        except ValueError:
            raise SystemExit(f"bad shape {part!r}: use one of {sorted(SHAPE_SETS)} or C[:OUT]@H[/STRIDE]")
        out.append((f"{cin}->{cout}@{h}" + (f"/{s}" if s > 1 else ""), cin, cout, h, s))
    return out


# ----------------------------------------------------------------------------- modules
def build(impl: str, cin: int, cout: int, stride: int, seed: int = 0, compile_fn=None):
    """The module of one row; SCConv rows share the reference's state_dict."""
    import scconv_triton
    from scconv_triton import reference

    torch.manual_seed(seed)
    if impl == "conv+bn":
        return torch.nn.Sequential(
            torch.nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), torch.nn.BatchNorm2d(cout)
        )
    ref = reference.SCConv(cin, out_channels=cout, stride=stride)
    if impl == "reference":
        return ref
    if impl == "compile":
        return (compile_fn or torch.compile)(ref)
    mod = scconv_triton.SCConv(cin, out_channels=cout, stride=stride, backend="triton",
                               recompute=(impl == "ours-rc"), stage=1 if impl in ("ours-s1", "ours-rc") else 2)
    mod.load_state_dict(ref.state_dict())
    return mod


def _to(mod, device, dtype, channels_last):
    mod = mod.to(device=device, dtype=dtype)
    if channels_last:
        mod = mod.to(memory_format=torch.channels_last)
    return mod.train()


def _input(n, c, h, device, dtype, channels_last, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, h, generator=g).to(device=device, dtype=dtype)
    return x.to(memory_format=torch.channels_last) if channels_last else x


def _err(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg}"[:160]


# ----------------------------------------------------------------------------- counting
def count_row(impl, cin, cout, h, stride, batch, dtype=torch.float32, channels_last=False, warmup=0, memo=True,
              like=None):
    """Counted columns of one row on the CPU (the interpreter for Triton).

    No warm-up step by default: the interpreter has no compile cache, and an
    eager or interpreted step counts the same the first time (checked by
    tests/test_bench_run.py); a warm-up would double the interpreter's time.
    ``memo``: repeated identical Triton launches are interpreted once per process
    (meter.memo_triton_launches; same counts, checked by tests/test_floor.py).
    ``like``: this row's counts at a batch dividing ``batch``; per-sample Triton
    launches are then inferred from it instead of interpreted (meter.per_sample_from;
    checked against full interpretation by tests/test_floor.py).
    """
    import contextlib
    import warnings

    import numpy as np

    mod = _to(build(impl, cin, cout, stride), "cpu", dtype, channels_last)
    x = _input(batch, cin, h, "cpu", dtype, channels_last)
    ctx = memo_triton_launches(_LAUNCH_MEMO) if memo else contextlib.nullcontext()
    ps = contextlib.nullcontext()
    if like is not None and like.get("triton_ref") is not None and batch % like["batch"] == 0 and warmup == 0:
        ref = [Launch(ln[0], "triton", ln[3], ln[4], ln[5], ln[6], ln[7], ln[8],
                      shape_sig=(tuple(ln[1]), tuple(ln[2])) if ln[1] else ()) for ln in like["triton_ref"]]
        ps = per_sample_from(ref, batch // like["batch"])
    state = None
    # a memoised or inferred launch leaves its outputs unwritten: later kernels may see NaNs
    with ctx, ps as state, np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        r = measure_step(mod, x, warmup=warmup, keep_meters=True)
    out = {k: r[k] for k in COUNT_KEYS + LIST_KEYS + ("S", "out_bytes")}
    out["batch"] = batch
    out["inferred_launches"] = state["inferred"] if state else 0
    out["triton_ref"] = [
        [ln.name, list(ln.shape_sig[0]) if ln.shape_sig else [], list(ln.shape_sig[1]) if ln.shape_sig else [],
         ln.bytes_read, ln.bytes_written, ln.flops, ln.ew_flops, ln.mm_kind, ln.mm_dtype]
        for m in (r["fwd_meter"], r["bwd_meter"]) for ln in m.launches if ln.kind == "triton"]
    if impl != "conv+bn":
        out["layer_repr"] = repr(mod)
    return out


class CountCache:
    """Counts by row across runs (``--count-cache PATH``): counts do not depend on the GPU the
    floor is priced for, so ``--gpu`` variants of a run reuse them. Delete the file when the
    kernels or the meter change."""

    def __init__(self, path=None):
        self.path, self.data = path, {}
        if path and os.path.exists(path):
            with open(path) as f:
                self.data = json.load(f)

    @staticmethod
    def key(impl, cin, cout, h, s, b, dtype, channels_last):
        d = os.environ.get("SCCONV_DISPATCH_BATCH")  # counted on the path of another batch
        return f"{_shape_key(cin, cout, h, s)}|{impl}|{b}|{dtype}|{int(bool(channels_last))}" + (f"|d{d}" if d else "")

    def count(self, impl, cin, cout, h, s, b, dtype, channels_last, like=None):
        k = self.key(impl, cin, cout, h, s, b, dtype, channels_last)
        if k not in self.data:
            c = count_row(impl, cin, cout, h, s, b, dtype, channels_last, like=like)
            if not self.path:
                return c
            self.data[k] = c
            self.save()  # as it goes: a run that stops later keeps what it counted
        return self.data[k]

    def save(self):
        if self.path:
            with open(self.path, "w") as f:
                json.dump(self.data, f)


def extrapolate(c1: dict, c2: dict, n: int, b1: int = 1, b2: int = 2) -> dict:
    """Counts at batches b1 and b2 -> counts at batch n (bytes and FLOPs affine in n, launches constant;
    the per-launch lists extrapolated launch by launch)."""
    out = {}
    for k, v1 in c1.items():
        v2 = c2[k]
        if k in LIST_KEYS:
            out[k] = extrapolate_launches(v1, v2, n, b1, b2)
        elif k.endswith("_bytes") or k.endswith("_flops") or k == "S":
            out[k] = int(round(v1 + (n - b1) * (v2 - v1) / (b2 - b1)))
        else:
            out[k] = v2
    return out


def row_floor(c1: dict, c2: dict | None, n: int, roofline: Roofline, b1: int = 1, b2: int = 2) -> dict:
    """Floor columns of one row at batch n from counts at b1 (and b2; without it, n must be b1)."""
    if c2 is None:
        if n != b1:
            raise ValueError("a floor at another batch than the counted one needs counts at two batches")
        fl, bl = c1["fwd_launch_list"], c1["bwd_launch_list"]
    else:
        fl = extrapolate_launches(c1["fwd_launch_list"], c2["fwd_launch_list"], n, b1, b2)
        bl = extrapolate_launches(c1["bwd_launch_list"], c2["bwd_launch_list"], n, b1, b2)
    out = roofline.step_floor(fl, bl)
    del out["launches"]
    out["floor_batch"] = n
    return out


def count_subprocess(shapes, impls, batches, dtype_name, channels_last, timeout=3600):
    """Count in a fresh CPU process under TRITON_INTERPRET=1 (used on GPU machines)."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "counts.json")
        spec = ",".join(f"{ci}:{co}@{h}/{s}" for _, ci, co, h, s in shapes)
        cmd = [sys.executable, os.path.abspath(__file__), "--count-only", path, "--device", "cpu",
               "--shapes", spec, "--impls", ",".join(impls), "--count-batches", ",".join(map(str, batches)),
               "--dtype", dtype_name, "--quiet"] + (["--channels-last"] if channels_last else [])
        env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
        subprocess.run(cmd, env=env, check=True, timeout=timeout)
        with open(path) as f:
            raw = json.load(f)
    # keys: "ci:co@h/s|impl|batch"
    return raw


# ----------------------------------------------------------------------------- GPU timing
class GpuTools:
    """The timing functions of the GPU path; tests replace them with fakes."""

    def __init__(self, device="cuda"):
        self.device = torch.device(device)

    def do_bench(self, fn, grad_to_none=None) -> float:
        import triton.testing

        return float(triton.testing.do_bench(fn, grad_to_none=grad_to_none, return_mode="median"))

    def synchronize(self):
        torch.cuda.synchronize(self.device)

    def memory_allocated(self) -> int:
        return torch.cuda.memory_allocated(self.device)

    def reset_peak(self):
        torch.cuda.reset_peak_memory_stats(self.device)

    def max_memory_allocated(self) -> int:
        return torch.cuda.max_memory_allocated(self.device)

    def copy_bandwidth(self, nbytes: int = 1 << 28) -> float:
        """Device-to-device copy bandwidth in GB/s (read + write counted)."""
        src = torch.empty(nbytes // 4, dtype=torch.float32, device=self.device).normal_()
        dst = torch.empty_like(src)
        ms = self.do_bench(lambda: dst.copy_(src))
        del src, dst
        return 2 * nbytes / (ms * 1e-3) / 1e9


def time_row(mod, x, tools: GpuTools) -> dict:
    """Median fwd / bwd / fwd+bwd times (ms) and peak memory of one step."""
    params = [p for p in mod.parameters() if p.requires_grad]
    x = x.detach().requires_grad_(True)
    grads = [x] + params
    y = mod(x)
    g = torch.randn_like(y)
    y.backward(g)  # warm-up (compiles / autotunes)
    for t in grads:
        t.grad = None
    res = {}
    res["fwd_ms"] = tools.do_bench(lambda: mod(x), grad_to_none=grads)
    y = mod(x)
    try:
        res["bwd_ms"] = tools.do_bench(lambda: y.backward(g, retain_graph=True), grad_to_none=grads)
    except RuntimeError:  # a backward that cannot be replayed: derive it
        res["bwd_ms"] = None
    del y
    res["fwdbwd_ms"] = tools.do_bench(lambda: mod(x).backward(g), grad_to_none=grads)
    if res["bwd_ms"] is None:
        res["bwd_ms"] = max(res["fwdbwd_ms"] - res["fwd_ms"], 0.0)
    for t in grads:
        t.grad = None
    tools.synchronize()
    base = tools.memory_allocated()
    tools.reset_peak()
    mod(x).backward(g)
    tools.synchronize()
    res["peak_bytes"] = max(tools.max_memory_allocated() - base, 0)
    for t in grads:
        t.grad = None
    return res


# ----------------------------------------------------------------------------- progress and table
class Progress:
    def __init__(self, total: int, quiet: bool = False, stream=None):
        self.total, self.done, self.quiet = max(total, 1), 0, quiet
        self.stream = stream or sys.stderr
        self.t0 = time.perf_counter()

    def step(self, label: str):
        self.done += 1
        if self.quiet:
            return
        w = 24
        fill = int(w * self.done / self.total)
        el = time.perf_counter() - self.t0
        tty = getattr(self.stream, "isatty", lambda: False)()
        end = "\r" if tty and self.done < self.total else "\n"
        self.stream.write(f"[{'#' * fill}{'.' * (w - fill)}] {self.done:3d}/{self.total} {el:6.1f}s  {label:48s}{end}")
        self.stream.flush()


def _f(v, fmt):
    return "-" if v is None else format(v, fmt)


def format_table(rows, show_times: bool) -> str:
    hdr = ["layer", "impl", "fwd L", "fwd S", "fwd MiB", "bwd L", "bwd S", "bwd MiB", "saved S", "saved MiB"]
    show_floor = any(r.get("floor_ms") is not None for r in rows)
    if show_floor:
        hdr += ["GF fwd", "GF bwd", "floor fwd", "floor bwd", "floor f+b"]
    if show_times:
        hdr += ["fwd ms", "bwd ms", "f+b ms", "GB/s", "%copy", "peak MiB"] + (["%floor"] if show_floor else [])
    lines = []
    for r in rows:
        if r.get("error"):
            cells = [r["layer"], r["impl"], f"n/a ({r['error']})"]
            lines.append(cells)
            continue
        S = r.get("S")
        mb = 2**20

        def s(k):
            return None if r.get(k) is None or not S else r[k] / S

        def m(k):
            return None if r.get(k) is None else r[k] / mb

        tl = lambda k: None if r.get(k) is None else (  # noqa: E731
            f"{r[k]}" + (f" ({r[k + '_triton']}T)" if r.get(k + "_triton") else ""))
        cells = [r["layer"], r["impl"],
                 tl("fwd_launches") or "-", _f(s("fwd_bytes"), ".1f"), _f(m("fwd_bytes"), ".1f"),
                 tl("bwd_launches") or "-", _f(s("bwd_bytes"), ".1f"), _f(m("bwd_bytes"), ".1f"),
                 _f(s("saved_bytes"), ".2f"), _f(m("saved_bytes"), ".2f")]
        gf = lambda k: None if r.get(k) is None else r[k] / 1e9  # noqa: E731
        if show_floor:
            cells += [_f(gf("floor_fwd_flops"), ".2f"), _f(gf("floor_bwd_flops"), ".2f"),
                      _f(r.get("floor_fwd_ms"), ".3f"), _f(r.get("floor_bwd_ms"), ".3f"),
                      _f(r.get("floor_ms"), ".3f")]
        if show_times:
            cells += [_f(r.get("fwd_ms"), ".3f"), _f(r.get("bwd_ms"), ".3f"), _f(r.get("fwdbwd_ms"), ".3f"),
                      _f(r.get("gbps"), ".0f"), _f(r.get("copy_frac") and 100 * r["copy_frac"], ".0f"),
                      _f(m("peak_bytes"), ".1f")]
            if show_floor:
                cells += [_f(r.get("pct_floor"), ".0f")]
        lines.append(cells)
    widths = [len(h) for h in hdr]
    for cells in lines:
        if len(cells) == len(hdr):
            widths = [max(w, len(str(c))) for w, c in zip(widths, cells)]
    widths[0] = max([widths[0]] + [len(str(c[0])) for c in lines])
    widths[1] = max([widths[1]] + [len(str(c[1])) for c in lines])

    def fmt(cells):
        if len(cells) != len(hdr):
            return f"{cells[0]:<{widths[0]}}  {cells[1]:<{widths[1]}}  {cells[2]}"
        return "  ".join(f"{c:<{w}}" if i < 2 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(cells, widths)))

    out = [fmt(hdr), "  ".join("-" * w for w in widths)]
    prev = None
    for cells in lines:
        if prev is not None and cells[0] != prev:
            out.append("")
        prev = cells[0]
        out.append(fmt(cells))
    return "\n".join(out)


def plot(rows, path: str):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise SystemExit(f"--plot needs matplotlib (pip install 'scconv-triton[plot]' or pip install matplotlib): {e}")
    ok = [r for r in rows if not r.get("error") and r.get("fwd_bytes") is not None]
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    impls = [i for i in IMPLS if any(r["impl"] == i for r in ok)]
    timed = any(r.get("fwdbwd_ms") is not None for r in ok)
    panels = [("fwd_bytes", "forward traffic (S)", True), ("bwd_bytes", "backward traffic (S)", True),
              ("saved_bytes", "saved for backward (S)", True), ("fwd_launches", "forward launches", False)]
    if timed:
        panels.append(("fwdbwd_ms", "forward+backward (ms)", False))
    floored = any(r.get("floor_ms") is not None for r in ok)
    if floored:
        fb = next(r["floor_batch"] for r in ok if r.get("floor_ms") is not None)
        panels.append(("floor", f"floor f+b at batch {fb} (ms): bytes / FLOP / launch-bound"
                       + ("; x = measured" if timed else ""), False))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2))
    wbar = 0.8 / max(len(impls), 1)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, title, in_s) in zip(axes, panels):
        if key == "floor":
            for j, impl in enumerate(impls):
                xs, parts, meas = [], ([], [], []), []
                for i, layer in enumerate(layers):
                    r = next((r for r in ok if r["layer"] == layer and r["impl"] == impl), None)
                    xs.append(i + j * wbar)
                    for part, k in zip(parts, ("floor_bytes_ms", "floor_flops_ms", "floor_launch_ms")):
                        part.append(float("nan") if r is None or r.get(k) is None else r[k])
                    ok_t = r is not None and r.get("fwdbwd_ms") is not None and r.get("floor_batch") == r["batch"]
                    meas.append(r["fwdbwd_ms"] if ok_t else float("nan"))
                c = colors[j % len(colors)]
                ax.bar(xs, parts[0], wbar, color=c, label=impl if key == panels[0][0] else None)
                ax.bar(xs, parts[1], wbar, bottom=parts[0], color=c, hatch="//", edgecolor="white")
                ax.bar(xs, parts[2], wbar, bottom=[a + b for a, b in zip(*parts[:2])], color=c, alpha=0.4)
                ax.plot(xs, meas, "kx", linestyle="none")
            ax.set_title(title, fontsize=8)
            ax.set_xticks([i + 0.4 - wbar / 2 for i in range(len(layers))])
            ax.set_xticklabels(layers, rotation=45, ha="right", fontsize=7)
            continue
        for j, impl in enumerate(impls):
            vals = []
            for layer in layers:
                r = next((r for r in ok if r["layer"] == layer and r["impl"] == impl), None)
                v = None if r is None or r.get(key) is None else (r[key] / r["S"] if in_s else r[key])
                vals.append(float("nan") if v is None else v)
            ax.bar([i + j * wbar for i in range(len(layers))], vals, wbar, label=impl)
        ax.set_title(title)
        ax.set_xticks([i + 0.4 - wbar / 2 for i in range(len(layers))])
        ax.set_xticklabels(layers, rotation=45, ha="right", fontsize=7)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- main
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="default: cuda if available, else cpu (counted columns only)")
    p.add_argument("--batch", type=int, default=None,
                   help="default: 1 on a CPU (the interpreter's time; traffic in S barely depends on it), "
                        "64 on a GPU")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--shapes", default="default",
                   help=f"comma list of {sorted(SHAPE_SETS)} or C[:OUT]@H[/STRIDE] (default: 'default' = "
                        "resnet + DenseNet at 28; 'all' adds the stride-2 layers and DenseNet at 56)")
    p.add_argument("--impls", default=None,
                   help=f"comma list of {IMPLS} (default: all but compile on a CPU, all on a GPU)")
    p.add_argument("--times", action=argparse.BooleanOptionalAction, default=None,
                   help="timing columns (default: on a GPU only)")
    p.add_argument("--no-count", action="store_true", help="skip the counted columns")
    p.add_argument("--count-batches", default=None,
                   help="batches to count at, comma list (default: the run batch on a CPU; 1,2 extrapolated "
                        "on a GPU)")
    p.add_argument("--json", metavar="PATH", help="write the raw numbers as JSON")
    p.add_argument("--plot", metavar="PATH", help="write a PNG (needs matplotlib)")
    p.add_argument("--networks", action=argparse.BooleanOptionalAction, default=True,
                   help="whole-network saved bytes, reference and fused (benchmarks/networks.py; default on)")
    p.add_argument("--net-batch", type=int, default=2, help="with --networks: batch (default 2)")
    p.add_argument("--net-size", type=int, default=224, help="with --networks: image size (default 224)")
    p.add_argument("--gpu", default=None,
                   help="card the roofline floor is computed for (benchmarks/floor.py GPUS: H100-SXM, H200, "
                        "A100-80GB, A100-40GB, L4, RTX-4090, RTX-3090, H100-PCIe); default: H100-SXM on a CPU, "
                        "the detected card (with the measured copy bandwidth) on a GPU")
    p.add_argument("--floor-batch", type=int, default=None,
                   help=f"batch of the FLOPs and floor columns (default: the timing batch when timing, "
                        f"{CPU_FLOOR_BATCH} on a CPU; counts at two batches are extrapolated per launch)")
    p.add_argument("--net-floor", action=argparse.BooleanOptionalAction, default=None,
                   help="whole-network roofline floor at the study's batch sizes (default: with --networks "
                        "and the counts; its fused layers are counted under the interpreter)")
    p.add_argument("--count-cache", metavar="PATH", default=None,
                   help="keep the CPU counts in a JSON file and reuse them (e.g. to price the same counts "
                        "with another --gpu); delete it when the code changes")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--count-only", metavar="PATH", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _shape_key(cin, cout, h, s):
    return f"{cin}:{cout}@{h}/{s}"


def _floor_gpu(args, device):
    """(GPU of the floor, detected?): --gpu if given; on a GPU the detected card; else the default."""
    if args.gpu:
        return find_gpu(args.gpu), False
    if device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        g = detect_gpu(torch.cuda.get_device_name(0), props.total_memory)
        if g is not None:
            return g, True
        print(f"floor: {torch.cuda.get_device_name(0)} is not in benchmarks/floor.py's table; pricing on "
              f"{DEFAULT_GPU} with the measured copy bandwidth", file=sys.stderr)
        return find_gpu(DEFAULT_GPU), True
    return find_gpu(DEFAULT_GPU), False


def _same_dispatch(cin: int, cout: int, h: int, s: int, batch: int, dtype=torch.float32, counted=(1, 2)) -> bool:
    """Whether ``SCConv(cin, cout, stride=s)`` at h x h takes the same batch-dependent paths
    (ops.stage2.backward_path) at the ``counted`` batches as at ``batch``. The squeeze backward's
    choice (squeeze_backward_pays) does not depend on the batch: both its sides are per sample."""
    from scconv_triton.kernels import stage2 as ks2
    from scconv_triton.ops import stage2 as ops_s2

    usq, ho = cin // 4, (h - 1) // s + 1  # the report's SCConv: alpha 1/2, squeeze_radio 2, group_size 2, 3 x 3
    t = lambda *shape: torch.empty(*shape, device="meta", dtype=dtype)  # noqa: E731
    dout, up, w, w2 = t(1, cout, ho, ho), t(1, usq, h, h), t(cout, usq // 2, 3, 3), t(cout - usq, usq, 1, 1)
    tf32 = torch.backends.cudnn.allow_tf32
    fuse = ks2.squeeze_backward_pays(1, cin, h, h, usq, cin // 2, usq, dout.element_size())
    return len({ops_s2.backward_path(dout, up, w, w2, s, 2, tf32, fuse, batch=n) for n in (*counted, batch)}) == 1


def _path_counts(cs, impl, shape, cbatches, target, args, cache, in_process):
    """Counts at ``cbatches`` of the path batch ``target`` takes, to extrapolate to it: ``cs``,
    or, where stage 2 takes another batch-dependent path at ``target`` than at the counted
    batches (_same_dispatch), that path counted again (SCCONV_DISPATCH_BATCH; the per-launch
    extrapolation needs the same launches at both batches)."""
    name, cin, cout, h, s = shape
    dtype = DTYPES[args.dtype]
    if impl != "ours" or len(cbatches) < 2 or target in cbatches or _same_dispatch(cin, cout, h, s, target, dtype,
                                                                                   cbatches):
        return cs
    with mock.patch.dict(os.environ, SCCONV_DISPATCH_BATCH=str(target)):
        if in_process:
            out, prev = [], None
            for b in cbatches:
                prev = cache.count(impl, cin, cout, h, s, b, dtype, args.channels_last, like=prev)
                out.append(prev)
        else:
            raw = count_subprocess([shape], [impl], cbatches, args.dtype, args.channels_last)
            out = [raw[f"{_shape_key(cin, cout, h, s)}|{impl}|{b}"] for b in cbatches]
    if not args.quiet:
        print(f"[counts] counted {name} {impl} on batch {target}'s path", file=sys.stderr)
    return out


def _layer_counter(counts, args, in_process, cache, batches):
    """layer_counts(keys) for networks.count_networks: fused ("ours") layer counts at batches 1 and 2,
    reusing the per-layer rows' counts and counting the others once (in a CPU subprocess on a GPU machine).
    A batch-dependent choice (ops.stage2.dw_pass_pays, grouped_rebuild_pays, grouped_dgrad_pays) is made as
    for the networks' batch
    (``batches``, one for all: SCCONV_DISPATCH_BATCH), so that the per-launch extrapolation
    extrapolates the path that batch takes; rows counted on another path are counted again."""
    dtype = DTYPES[args.dtype]
    target = max(batches)

    def layer_counts(keys):
        with mock.patch.dict(os.environ, SCCONV_DISPATCH_BATCH=str(target)):  # CPU subprocesses see it too
            return _layer_counts(keys)

    def _layer_counts(keys):
        out, todo = {}, []
        for key in keys:
            cin, cout, h, s = key
            sk = _shape_key(cin, cout, h, s)
            have = {b: counts.get((sk, "ours", b)) for b in (1, 2)}
            if all(v is not None for v in have.values()) and _same_dispatch(cin, cout, h, s, target, dtype):
                out[key] = have
            else:
                todo.append(key)
        if todo and in_process:
            for key in todo:
                cin, cout, h, s = key
                out[key] = {}
                for b in (1, 2):
                    try:
                        out[key][b] = cache.count("ours", cin, cout, h, s, b, dtype, args.channels_last,
                                                  like=out[key].get(1))
                    except Exception as e:
                        out[key][b] = {"error": _err(e)}
                    if not args.quiet:
                        print(f"[network floor] counted layer {_shape_key(*key)} N={b}", file=sys.stderr)
        elif todo:
            shapes = [(_shape_key(*k), *k) for k in todo]
            raw = count_subprocess(shapes, ["ours"], [1, 2], args.dtype, args.channels_last)
            for key in todo:
                out[key] = {b: raw[f"{_shape_key(*key)}|ours|{b}"] for b in (1, 2)}
        return out

    return layer_counts


def run(args, tools=None, compile_fn=None, stream=None) -> dict:
    """Run the benchmark described by ``args``; returns {"meta": ..., "rows": [...], "networks": ...}."""
    stream = stream or sys.stdout
    if args.plot:  # fail now, not after the run
        try:
            import matplotlib  # noqa: F401
        except ImportError as e:
            raise SystemExit(f"--plot needs matplotlib (pip install 'scconv-triton[plot]' or pip install "
                             f"matplotlib): {e}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    times = args.times if args.times is not None else device == "cuda"
    batch = args.batch or (64 if device == "cuda" else 1)
    dtype = DTYPES[args.dtype]
    shapes = parse_shapes(args.shapes)
    impls = args.impls.split(",") if args.impls else [i for i in IMPLS if device == "cuda" or i != "compile"]
    for i in impls:
        if i not in IMPLS:
            raise SystemExit(f"unknown impl {i!r}; choose from {IMPLS}")
    interp = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if args.count_batches:
        cbatches = [int(b) for b in args.count_batches.split(",")]
    else:
        # on a CPU, batch 1 and 2: the floor columns extrapolate per launch from two batches
        cbatches = ([1, 2] if batch <= 2 else [batch]) if (device == "cpu" or interp) else [1, 2]
    count_in_process = device == "cpu" or interp
    countable = [i for i in impls if i != "compile"]
    floor_batch = args.floor_batch or (batch if times else CPU_FLOOR_BATCH)
    if len(cbatches) < 2:
        floor_batch = cbatches[0]  # one counted batch: no per-launch extrapolation
    gpu, detected = _floor_gpu(args, device)

    t_start = time.perf_counter()
    n_steps = (0 if args.no_count else len(shapes) * len(countable) * (len(cbatches) if count_in_process else 0))
    n_steps += len(shapes) * len(impls) if times else 0
    prog = Progress(n_steps + (1 if times else 0), quiet=args.quiet)

    # ---- counts
    cache = CountCache(args.count_cache)
    counts = {}  # (shape key, impl, batch) -> dict or {"error": ...}
    if not args.no_count and countable:
        if count_in_process:
            for name, cin, cout, h, s in shapes:
                for impl in countable:
                    prev = None
                    for b in cbatches:
                        try:
                            c = cache.count(impl, cin, cout, h, s, b, dtype, args.channels_last, like=prev)
                            prev = c
                        except Exception as e:  # the fused path may not exist yet
                            if os.environ.get("SCCONV_BENCH_DEBUG"):
                                traceback.print_exc()
                            c = {"error": _err(e)}
                        counts[(_shape_key(cin, cout, h, s), impl, b)] = c
                        prog.step(f"count {name} {impl} N={b}")
        else:
            if not args.quiet:
                print("counting launches and bytes in a CPU subprocess under the Triton interpreter "
                      f"(batches {cbatches}) ...", file=sys.stderr)
            raw = count_subprocess(shapes, countable, cbatches, args.dtype, args.channels_last)
            for k, v in raw.items():
                sk, impl, b = k.split("|")
                counts[(sk, impl, int(b))] = v

    if args.count_only:
        with open(args.count_only, "w") as f:
            json.dump({f"{sk}|{impl}|{b}": v for (sk, impl, b), v in counts.items()}, f)
        return {"rows": [], "meta": {}}

    # ---- timing
    copy_bw = None
    if times:
        tools = tools or GpuTools(device)
        copy_bw = tools.copy_bandwidth()
        prog.step(f"copy bandwidth {copy_bw:.0f} GB/s")

    roofline = Roofline(gpu, bandwidth_gbps=copy_bw if detected else None, dtype=str(dtype).replace("torch.", ""))
    rows = []
    for name, cin, cout, h, s in shapes:
        sk = _shape_key(cin, cout, h, s)
        for impl in impls:
            row = {"layer": name, "impl": impl, "in_channels": cin, "out_channels": cout, "size": h, "stride": s,
                   "batch": batch, "dtype": args.dtype, "channels_last": args.channels_last}
            if impl != "compile" and not args.no_count:
                cs = [counts.get((sk, impl, b)) for b in cbatches]
                if any(c is None or "error" in c for c in cs):
                    row["error"] = next((c["error"] for c in cs if c and "error" in c), "not counted")
                else:
                    two = len(cbatches) >= 2
                    paths = {}

                    def on_path(n):  # counts of the path batch n takes; once per row (a GPU run's batch
                        if n not in paths:  # is its floor batch: both would count it in a subprocess)
                            paths[n] = _path_counts(cs, impl, (name, cin, cout, h, s), cbatches, n, args, cache,
                                                    count_in_process)
                        return paths[n]
                    try:
                        if batch in cbatches:
                            c = cs[cbatches.index(batch)]
                        elif two:
                            bs = on_path(batch)  # the launches of the path this batch takes
                            c = extrapolate(bs[0], bs[1], batch, cbatches[0], cbatches[1])
                        else:
                            c = cs[0]
                    except Exception as e:
                        row["error"] = _err(e)
                if "error" not in row:
                    row["counted_at_batch"] = cbatches if two else cbatches[0]
                    row.update({k: c[k] for k in COUNT_KEYS})
                    try:
                        fs = on_path(floor_batch)
                        row.update(row_floor(fs[0], fs[1] if two else None, floor_batch, roofline,
                                             cbatches[0], cbatches[1] if two else cbatches[0]))
                    except Exception as e:
                        row["floor_error"] = _err(e)
                    row["S"] = c["S"]
                    row["fwd_launches_triton"] = c["fwd_triton_launches"]
                    row["bwd_launches_triton"] = c["bwd_triton_launches"]
            if "S" not in row:
                row["S"] = batch * cin * h * h * torch.empty((), dtype=dtype).element_size()
            if times and not (row.get("error") and impl != "compile"):
                try:
                    mod = _to(build(impl, cin, cout, s, compile_fn=compile_fn), device, dtype, args.channels_last)
                    x = _input(batch, cin, h, device, dtype, args.channels_last)
                    row.update(time_row(mod, x, tools))
                    if row.get("fwd_bytes") is not None and row.get("fwdbwd_ms"):
                        row["gbps"] = (row["fwd_bytes"] + row["bwd_bytes"]) / (row["fwdbwd_ms"] * 1e-3) / 1e9
                        row["copy_frac"] = row["gbps"] / copy_bw if copy_bw else None
                    if row.get("floor_ms") and row.get("fwdbwd_ms") and row.get("floor_batch") == batch:
                        row["pct_floor"] = 100 * row["fwdbwd_ms"] / row["floor_ms"]
                    row.pop("error", None) if impl == "compile" else None
                    del mod, x
                except Exception as e:
                    if os.environ.get("SCCONV_BENCH_DEBUG"):
                        traceback.print_exc()
                    row["error"] = _err(e)
                prog.step(f"time {name} {impl}")
            elif times:
                prog.step(f"time {name} {impl} (skipped)")
            rows.append(row)

    meta = {
        "device": torch.cuda.get_device_name(0) if device == "cuda" and torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "triton_interpret": interp,
        "batch": batch,
        "count_batches": cbatches,
        "dtype": args.dtype,
        "channels_last": args.channels_last,
        "copy_bandwidth_gbps": copy_bw,
        "unit_S": "bytes of the layer input N*C*H*W*element_size",
        "floor_gpu": roofline.gpu.name,
        "floor_model": roofline.describe(),
        "floor_batch": floor_batch,
    }
    try:
        import triton

        meta["triton"] = triton.__version__
    except Exception:
        pass

    result = {"meta": meta, "rows": rows}
    if args.networks:
        try:
            from benchmarks import networks
        except ImportError:
            import networks  # type: ignore
        result["networks"] = networks.run_networks(
            device=device, batch=args.net_batch, size=args.net_size, fused=True, times=times,
            tools=tools, quiet=args.quiet)
    net_floor = args.net_floor if args.net_floor is not None else (args.networks and not args.no_count)
    if net_floor:
        try:
            from benchmarks import networks
        except ImportError:
            import networks  # type: ignore
        layer_counts = _layer_counter(counts, args, count_in_process, cache, networks.FLOOR_BATCHES.values())
        counted = networks.count_networks(layer_counts, size=args.net_size, quiet=args.quiet)
        result["network_floor"] = networks.price_networks(counted, roofline)
        result["network_floor_by_gpu"] = networks.format_ratios_by_gpu(
            counted, lambda g: Roofline(g, dtype=roofline.dtype))
    cache.save()
    result["meta"]["wall_s"] = time.perf_counter() - t_start

    # ---- report
    print(f"\nSCConv training step: batch {batch}, {args.dtype}{', channels_last' if args.channels_last else ''}, "
          f"device {meta['device']}" + (", Triton interpreter" if interp else ""), file=stream)
    print("S = bytes of the layer input (N*C*H*W*element_size); L = launches (nT = of which Triton); "
          "saved = bytes kept for backward besides the input and the parameters", file=stream)
    if batch not in cbatches and not args.no_count:
        print(f"counts measured at batch {cbatches} and extrapolated to batch {batch}", file=stream)
    if times and copy_bw:
        print(f"copy bandwidth (device-to-device, read+write): {copy_bw:.0f} GB/s", file=stream)
    if not args.no_count:
        print(f"floor (a model, not a measurement; benchmarks/floor.py) at batch {floor_batch} on "
              f"{roofline.describe()}; GF = GFLOP (matrix: torch's FLOP counter, tl.dot) at that batch; "
              "floor columns in ms" + ("; %floor = measured f+b / floor f+b" if times else ""), file=stream)
    print(file=stream)
    print(format_table(rows, times), file=stream)
    if "networks" in result:
        print(file=stream)
        print(networks.format_networks(result["networks"]), file=stream)
    if "network_floor" in result:
        print(file=stream)
        print(networks.format_floor(result["network_floor"], roofline), file=stream)
        print(result["network_floor_by_gpu"], file=stream)
    print(f"\n(wall time {result['meta']['wall_s']:.1f} s)", file=stream)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=str)
    if args.plot:
        plot(rows, args.plot)
    return result


def main(argv=None, tools=None, compile_fn=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available() and tools is None:
        raise SystemExit("--device cuda: no CUDA device")
    run(args, tools=tools, compile_fn=compile_fn)
    return 0


if __name__ == "__main__":
    sys.exit(main())
