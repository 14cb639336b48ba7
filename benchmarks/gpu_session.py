"""One command for a lent GPU: the suite on CUDA, layer and network timings, a RESULTS.md section.

    python benchmarks/gpu_session.py --list                  # the parts, their caps and estimated times
    python benchmarks/gpu_session.py --all --budget quick    # tests, layers, networks in ~8 min (one 10-min call)
    python benchmarks/gpu_session.py --part tests            # one part (each part is capped under 8 min)
    python benchmarks/gpu_session.py --all                   # every part in order, under 30 min on one H100
    python benchmarks/gpu_session.py --dry-run --all         # CPU: every part at tiny shapes, CPU timers

Parts (``--part a,b``; ``--all`` = the profile's list, in this order; ``--list`` shows all):

    tests           python -m pytest -x -q on CUDA (compiled kernels), a per-test and a per-part timeout
    layers          benchmarks/run.py timings: fp32 and bf16, NCHW and channels_last, batch 64 (--no-count)
    networks        ResNet-50 vs SCConv-R50 (batch 128) and DenseNet-121 vs SCConv-D121 (batch 64), 224x224,
                    reference and ours: step time and peak memory (benchmarks/networks.py)
    compile-layers  torch.compile(reference) per layer, fp32 NCHW (and bf16 channels_last in full)
    compile-r50     torch.compile of ResNet-50 and SCConv-R50 (reference), batch 128
    compile-d121    torch.compile of DenseNet-121 and SCConv-D121 (reference), batch 64
    counts          run.py fp32 NCHW with the launch/byte counts (a CPU subprocess under the interpreter
                    at batch 1 and 2), for the GB/s and %copy columns; only with --part

    quick --all: tests, layers, networks.  full --all: all but counts.

Every part runs in a child process of its own with a hard time cap (killed, with what it had
saved kept, when it overruns) and writes its results as it goes. After each part the session
writes into ``--out`` (default ``$OUT`` when set, else ``results/gpu-session``):

    RESULTS.md                       benchmarks/RESULTS.md with this session's dated section merged in
    gpu-session-DATE-PROFILE-PARTS.json   every raw number, the environment, each part's wall time
    tests.log, session.log           the pytest output; everything the session printed

A real run also updates benchmarks/RESULTS.md in the working tree; on the lent device machine
that tree is a copy, so copy ``RESULTS.md`` back from the returned files. Sections are keyed by
date, card and profile: a later call with other parts on the same day merges into the same
section (copy RESULTS.md back before the next call).

Without CUDA (or with ``--dry-run``) the same parts run at tiny shapes with CPU timers, Triton
kernel bodies skipped and torch.compile replaced by the identity: a check of the plumbing, not a
measurement (tests/test_gpu_session.py runs it). A dry run never writes benchmarks/RESULTS.md.

Why --no-count for the timing parts: on a GPU machine run.py counts in a CPU subprocess under the
Triton interpreter at batch 1 and 2, which takes minutes per configuration. Traffic in units of S
barely depends on dtype or batch, and the CPU counts are in RESULTS.md; ``--part counts`` counts
once (fp32 NCHW) for achieved GB/s, when the lease has the ~4 minutes to spare.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import io
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

RESULTS_MD = os.path.join(_ROOT, "benchmarks", "RESULTS.md")
PART_ORDER = ("tests", "layers", "networks", "counts", "compile-layers", "compile-r50", "compile-d121")
CONFIGS = (("fp32", False), ("bf16", True), ("bf16", False), ("fp32", True))  # most wanted first
R50 = ("ResNet-50", "SCConv-R50 (reference)", "SCConv-R50 (ours)")
D121 = ("DenseNet-121", "SCConv-D121 (reference)", "SCConv-D121 (ours)")

# Caps in seconds. full: each under 8 min and 30 min in all; quick: ~8 min in all, so that one
# 10-minute device call (plus the machine's start) fits a 12-15 minute device budget.
PROFILES = {
    "full": {
        "parts": tuple(p for p in PART_ORDER if p != "counts"),
        "caps": {"tests": 300, "layers": 270, "networks": 210, "counts": 270, "compile-layers": 240,
                 "compile-r50": 300, "compile-d121": 420},
        "total": 1800,
        "bench_ms": (25, 100),  # do_bench warm-up and repetition windows (triton's defaults)
        "impls": "reference,ours,ours-s1,ours-rc,conv+bn",
        "configs": CONFIGS,
        "compile_configs": (("fp32", False), ("bf16", True)),
        "test_jobs": 4,
    },
    "quick": {
        "parts": ("tests", "layers", "networks"),
        "caps": {"tests": 180, "layers": 150, "networks": 130, "counts": 270, "compile-layers": 150,
                 "compile-r50": 300, "compile-d121": 420},
        "total": 480,
        "bench_ms": (10, 40),
        "impls": "reference,ours,conv+bn",
        "configs": CONFIGS,
        "compile_configs": (("fp32", False),),
        "test_jobs": 4,
    },
}
# The study's settings (README): batch 128 for ResNet-50, 64 for DenseNet-121, 224x224; layers at 64.
REAL = {"layer_batch": 64, "layer_shapes": "default", "net_batch": {"R50": 128, "D121": 64}, "net_size": 224}
DRY = {"layer_batch": 2, "layer_shapes": "16@8", "net_batch": {"R50": 2, "D121": 2}, "net_size": 32}


# ----------------------------------------------------------------------------- estimates
# Leads for one H100 SXM (datasheet: 3.35 TB/s, 495 TFLOP/s dense TF32, 990 bf16) at an assumed
# achieved fraction; the per-step bytes are the CPU counts of RESULTS.md (in S, ResNet-50 layer1),
# the FLOPs those of the convolutions. Compile and JIT times are guesses, not derived.
H100 = {"bw": 0.8 * 3.35e12, "fp32": 0.4 * 495e12, "bf16": 0.4 * 990e12, "launch_s": 6e-6}
STEP_S = {"reference": 130, "ours": 27, "ours-s1": 32, "ours-rc": 34, "conv+bn": 10, "compile": 40}
LAUNCHES = {"reference": 69, "ours": 20, "ours-s1": 23, "ours-rc": 25, "conv+bn": 5, "compile": 15}
JIT_S = 0.6                # one Triton kernel specialisation compiled and loaded
JIT_PER_SHAPE = {"ours": 12, "ours-s1": 10, "ours-rc": 2}   # new specialisations per (layer shape, dtype, layout)
INDUCTOR_LAYER_S = 20.0    # torch.compile of one SCConv layer's forward + backward
INDUCTOR_NET_S = {"ResNet-50": 45, "SCConv-R50 (reference)": 120, "DenseNet-121": 90,
                  "SCConv-D121 (reference)": 240}
# per image: (G multiply-adds of the forward, the study's; MiB saved for backward, RESULTS.md / 2)
NET_COST = {"ResNet-50": (4.13, 81.5), "SCConv-R50 (reference)": (2.66, 135.7), "SCConv-R50 (ours)": (2.66, 94.4),
            "DenseNet-121": (2.90, 123.9), "SCConv-D121 (reference)": (1.98, 226.8),
            "SCConv-D121 (ours)": (1.98, 136.3)}
NET_JIT_SHAPES = {"SCConv-R50 (ours)": 4, "SCConv-D121 (ours)": 3}  # new layer shapes beyond the layers part
COUNT_CPU_S = 240.0        # run.py's CPU counts of the default shapes at batch 1 and 2 (2-core box: ~370 s)
TESTS_S = (40.0, 160.0, 60.0)  # (collection and start, JIT of the suite's variants / jobs, the rest)


def _layer_step_s(impl, cin, cout, h, s, batch, dtype):
    es = 4 if dtype == "fp32" else 2
    S = batch * cin * h * h * es
    flops = 6 * batch * cout * (h // s) ** 2 * cin * 9 * (1.0 if impl == "conv+bn" else 0.25)
    return max(STEP_S[impl] * S / H100["bw"], flops / H100[dtype]) + LAUNCHES[impl] * H100["launch_s"]


def _bench_s(t, bench_ms):
    """Wall time of one triton.testing.do_bench call on a t-second function (5 estimate runs)."""
    w, r = bench_ms[0] / 1e3, bench_ms[1] / 1e3
    return 6 * t + max(w, t) + max(r, t)


def _time_row_s(t, bench_ms):
    """run.time_row: warm-up and peak steps, then do_bench of fwd, bwd and fwd+bwd."""
    return 2 * t + _bench_s(t / 3, bench_ms) + _bench_s(2 * t / 3, bench_ms) + _bench_s(t, bench_ms) + 0.05


def _net_step_s(name, batch):
    macs, saved = NET_COST[name]
    flops = 6 * macs * 1e9 * batch
    return flops / H100["fp32"] + 5 * saved * 2**20 * batch / H100["bw"]


def estimate(part: str, profile: str) -> tuple[float, str]:
    """Expected seconds of a part on one H100 and how they split (an estimate, see the constants)."""
    from benchmarks.run import parse_shapes

    p = PROFILES[profile]
    bms = p["bench_ms"]
    if part == "tests":
        jobs = max(1, p["test_jobs"])
        return TESTS_S[0] + TESTS_S[1] / jobs + TESTS_S[2], "guess: JIT of the suite's kernel variants dominates"
    if part in ("layers", "counts", "compile-layers"):
        shapes = parse_shapes(REAL["layer_shapes"])
        if part == "layers":
            configs, impls = p["configs"], p["impls"].split(",")
        elif part == "counts":
            configs, impls = (("fp32", False),), PROFILES["full"]["impls"].split(",")
        else:
            configs, impls = p["compile_configs"], ["compile"]
        gpu = sum(_layer_step_s(i, ci, co, h, s, REAL["layer_batch"], dt) * 9
                  for dt, _ in configs for _, ci, co, h, s in shapes for i in impls)
        rows = sum(_time_row_s(_layer_step_s(i, ci, co, h, s, REAL["layer_batch"], dt), bms)
                   for dt, _ in configs for _, ci, co, h, s in shapes for i in impls)
        jit = sum(JIT_PER_SHAPE.get(i, 0) * JIT_S for _ in configs for _ in shapes for i in impls)
        if part == "counts":
            jit = 0.0  # the layers part compiled them
        comp = INDUCTOR_LAYER_S * len(configs) * len(shapes) if part == "compile-layers" else 0.0
        cnt = COUNT_CPU_S if part == "counts" else 0.0
        total = rows + jit + comp + cnt + 5
        note = f"GPU work {gpu:.1f} s from bytes/FLOPs, do_bench windows {rows - gpu:.0f} s"
        note += f", Triton JIT {jit:.0f} s" if jit else ""
        note += f", inductor {comp:.0f} s" if comp else ""
        note += f", CPU counting {cnt:.0f} s" if cnt else ""
        return total, note
    if part in ("networks", "compile-r50", "compile-d121"):
        names = {"networks": R50 + D121, "compile-r50": R50[:2], "compile-d121": D121[:2]}[part]
        total = gpu = comp = jit = 0.0
        for n in names:
            t = _net_step_s(n, REAL["net_batch"]["R50" if n in R50 else "D121"])
            steps = 3 + 6 + max(1, bms[0] / 1e3 / t) + max(1, bms[1] / 1e3 / t)  # saved/warm-up/peak + do_bench
            gpu += t * steps
            jit += NET_JIT_SHAPES.get(n, 0) * JIT_PER_SHAPE["ours"] * JIT_S if part == "networks" else 0
            comp += INDUCTOR_NET_S.get(n, 0) if part != "networks" else 0
            total += 4  # build, move to the GPU, cuDNN's first calls
        total += gpu + jit + comp
        note = f"GPU steps {gpu:.1f} s from FLOPs/bytes" + (f", Triton JIT {jit:.0f} s" if jit else "")
        note += f", inductor {comp:.0f} s (guess)" if comp else ""
        return total, note
    raise KeyError(part)


def part_table(profile: str, parts) -> str:
    p = PROFILES[profile]
    lines = [f"parts of the {profile} profile (estimated time on one H100: an estimate from FLOPs/bytes "
             "plus guessed compile times, not a measurement)",
             f"  {'part':15s} {'cap':>6s} {'estimate':>9s}  breakdown"]
    tot_e = tot_c = 0.0
    for name in parts:
        e, note = estimate(name, profile)
        cap = p["caps"][name]
        extra = name not in p["parts"]
        if not extra:
            tot_e, tot_c = tot_e + e, tot_c + cap
        tag = "  [only with --part]" if extra else ""
        lines.append(f"  {name:15s} {cap / 60:5.1f}m {e / 60:8.1f}m  {note}{tag}")
    lines.append(f"  {'total':15s} {tot_c / 60:5.1f}m {tot_e / 60:8.1f}m  (session limit {p['total'] / 60:.1f} min "
                 "with --all)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- processes
def run_logged(cmd, timeout, log_path=None, env=None, echo=True, cwd=_ROOT) -> dict:
    """Run ``cmd`` in a new process group, tee its output, kill the group after ``timeout`` s."""
    t0 = time.monotonic()
    log = open(log_path, "a") if log_path else None
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1, start_new_session=True, errors="replace")
    tail: list[str] = []

    def pump():
        for line in proc.stdout:
            tail.append(line)
            del tail[:-200]
            if log:
                log.write(line)
                log.flush()
            if echo:
                sys.stdout.write(line)
                sys.stdout.flush()

    th = threading.Thread(target=pump, daemon=True)
    th.start()
    timed_out = False
    try:
        rc = proc.wait(timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        timed_out = True
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 30)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)  # the group this call created: the child and its children
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        rc = proc.returncode
    th.join(10)
    if log:
        log.close()
    return {"rc": rc, "timed_out": timed_out, "wall_s": round(time.monotonic() - t0, 1), "tail": "".join(tail)}


class Ctx:
    """What a part needs: the profile, the mode, its deadline and a place to save results as it goes."""

    def __init__(self, profile, dry, deadline, out, save_path=None, opts=None):
        self.profile, self.p, self.dry, self.deadline, self.out = profile, PROFILES[profile], dry, deadline, out
        self.save_path, self.opts = save_path, opts
        self.sizes = DRY if dry else REAL
        self.data: dict = {"units": []}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def save(self):
        if self.save_path:
            tmp = self.save_path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(self.data, f, default=str)
            os.replace(tmp, self.save_path)


# ----------------------------------------------------------------------------- timers
class CpuTools:
    """run.GpuTools' interface with host timers and no device memory (dry runs)."""

    def __init__(self, reps=1):
        self.reps = reps

    def do_bench(self, fn, grad_to_none=None) -> float:
        ts = []
        for _ in range(self.reps):
            for t in grad_to_none or ():
                t.grad = None
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return sorted(ts)[len(ts) // 2] * 1e3

    def synchronize(self):
        pass

    def memory_allocated(self) -> int:
        return 0

    def reset_peak(self):
        pass

    def max_memory_allocated(self) -> int:
        return 0

    def copy_bandwidth(self, nbytes: int = 1 << 22) -> float:
        import torch

        src = torch.randn(min(nbytes, 1 << 22) // 4)
        dst = torch.empty_like(src)
        ms = self.do_bench(lambda: dst.copy_(src))
        return 2 * src.numel() * 4 / max(ms * 1e-3, 1e-9) / 1e9


def make_tools(ctx: Ctx):
    if ctx.dry:
        return CpuTools()
    from benchmarks.run import GpuTools

    warmup, rep = ctx.p["bench_ms"]

    class Tools(GpuTools):
        def do_bench(self, fn, grad_to_none=None) -> float:
            import triton.testing

            return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none,
                                                 return_mode="median"))

    return Tools("cuda")


@contextlib.contextmanager
def _dry_kernels(ctx: Ctx):
    """Dry runs skip the interpreted Triton kernel bodies (seconds per step on a CPU)."""
    if not ctx.dry:
        yield
        return
    from benchmarks import meter

    meter.install_triton_hooks()  # first, so that skipping wraps (and restores) the counting hook
    with meter.skip_triton_launches():
        yield


def _compile_fn(ctx: Ctx):
    if ctx.dry:
        return lambda m: m

    def compile_fn(m):
        import torch

        torch._dynamo.reset()  # a fresh static-shape graph per module, no recompile limit across rows
        return torch.compile(m, dynamic=False)

    return compile_fn


def _free():
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- parts
def _pytest_cmd(ctx: Ctx) -> list:
    import importlib.util

    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider"]
    jobs = ctx.opts.test_jobs if ctx.opts and ctx.opts.test_jobs is not None else ctx.p["test_jobs"]
    if not ctx.dry and jobs > 1 and importlib.util.find_spec("xdist"):
        cmd += ["-n", str(jobs), "--dist", "loadfile"]
    if not ctx.dry and importlib.util.find_spec("pytest_timeout"):
        # a hung test dumps its stack 30 s before the part's cap kills pytest without one
        cmd += ["--timeout", str(int(max(30, ctx.left() - 30)))]
    if ctx.dry:
        cmd += ["--collect-only"]
    if ctx.opts and ctx.opts.pytest_args:
        cmd += shlex.split(ctx.opts.pytest_args)
    return cmd


_SUMMARY = re.compile(r"\b\d+ (passed|failed|errors?|skipped|deselected|xfailed|xpassed|tests? collected)\b"
                      r"|no tests ran")


def parse_pytest(text: str) -> dict:
    lines = [ln.strip().strip("=").strip() for ln in text.splitlines()]
    summary = next((ln for ln in reversed(lines) if _SUMMARY.search(ln)), None)
    failures = [ln for ln in lines if ln.startswith(("FAILED ", "ERROR "))][:20]
    return {"summary": summary, "failures": failures}


def _pytest_env(ctx: Ctx) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if not ctx.dry:
        env.pop("TRITON_INTERPRET", None)  # the point of this part: compiled kernels on CUDA
    return env


def part_tests(ctx: Ctx):
    env = _pytest_env(ctx)
    cmd = _pytest_cmd(ctx)
    log = os.path.join(ctx.out, "tests.log")
    with open(log, "w") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
    ctx.data.update(command=shlex.join(["python"] + cmd[1:]), log="tests.log")
    ctx.save()
    r = run_logged(cmd, timeout=ctx.left() - 5, log_path=log, env=env)
    with open(log, errors="replace") as f:
        ctx.data.update(rc=r["rc"], timed_out=r["timed_out"], wall_s=r["wall_s"], **parse_pytest(f.read()))
    ok = r["rc"] == 0 and not r["timed_out"]
    ctx.data["status"] = "ok" if ok else ("timeout" if r["timed_out"] else "failed")
    ctx.save()


def _run_py(ctx: Ctx, argv, compile_fn=None):
    """benchmarks/run.py through its public run(); returns (result, printed report)."""
    from benchmarks import run as bench

    buf = io.StringIO()
    with _dry_kernels(ctx):
        res = bench.run(bench.parse_args(argv), tools=make_tools(ctx), compile_fn=compile_fn, stream=buf)
    return res, buf.getvalue()


def _layer_argv(ctx: Ctx, dtype, cl, impls, shapes, count=False):
    argv = ["--device", "cpu" if ctx.dry else "cuda", "--batch", str(ctx.sizes["layer_batch"]), "--dtype", dtype,
            "--shapes", shapes, "--impls", impls, "--times", "--no-networks", "--quiet"]
    argv += ["--channels-last"] if cl else []
    argv += [] if count else ["--no-count"]
    return argv


def _run_unit(ctx: Ctx, unit: dict, label: str, est: float, work):
    """Run one unit (``work(unit)`` fills it in) unless less than half its estimate is left; save it."""
    if not ctx.dry and ctx.left() < 0.5 * est:
        unit["skipped"] = f"not started: {ctx.left():.0f} s left in the part's cap, ~{est:.0f} s needed"
    else:
        t0 = time.monotonic()
        try:
            work(unit)
        except Exception as e:  # one unit's failure must not lose the others
            unit["error"] = f"{type(e).__name__}: {e}"[:300]
        unit["wall_s"] = round(time.monotonic() - t0, 1)
        _free()
    ctx.data["units"].append(unit)
    ctx.save()
    why = unit.get("error") or unit.get("skipped")
    print(f"[{ctx.data.get('part')}] {label}: {unit.get('wall_s', 0)} s" + (f" ({why})" if why else ""), flush=True)


def _layer_units(ctx: Ctx, units, compile_fn=None):
    """units: (label, run.py argv, estimated seconds)."""
    for label, argv, est in units:
        def work(unit, argv=argv):
            res, text = _run_py(ctx, argv, compile_fn)
            unit.update(rows=res["rows"], meta=res["meta"], report=text)

        _run_unit(ctx, {"config": label, "command": "python benchmarks/run.py " + shlex.join(argv)}, label, est, work)


def _cfg_label(dtype, cl):
    return f"{dtype} {'channels_last' if cl else 'NCHW'}"


def part_layers(ctx: Ctx):
    units = []
    for dt, cl in ctx.p["configs"]:
        est = 30.0
        units.append((_cfg_label(dt, cl), _layer_argv(ctx, dt, cl, ctx.p["impls"], ctx.sizes["layer_shapes"]), est))
    _layer_units(ctx, units)


def part_counts(ctx: Ctx):
    argv = _layer_argv(ctx, "fp32", False, PROFILES["full"]["impls"], ctx.sizes["layer_shapes"], count=True)
    _layer_units(ctx, [("fp32 NCHW, counted", argv, 0.0)])


def part_compile_layers(ctx: Ctx):
    from benchmarks.run import parse_shapes

    units = []
    for dt, cl in ctx.p["compile_configs"]:
        for name, ci, co, h, s in parse_shapes(ctx.sizes["layer_shapes"]):
            spec = f"{ci}:{co}@{h}/{s}"
            units.append((f"{_cfg_label(dt, cl)} {name}", _layer_argv(ctx, dt, cl, "compile", spec),
                          INDUCTOR_LAYER_S))
    _layer_units(ctx, units, compile_fn=_compile_fn(ctx))
    names = {f"{ci}->{co}@{h}" + (f"/{s}" if s > 1 else ""): n for n, ci, co, h, s in parse_shapes("all")}
    for u in ctx.data["units"]:  # custom shape specs print as C->OUT@H: give them their layer names back
        for r in u.get("rows", ()):
            r["layer"] = names.get(r["layer"], r["layer"])
    ctx.save()


def _network_units(ctx: Ctx, names, compile_fn=None):
    from benchmarks import networks

    if ctx.opts is not None and ctx.opts.networks:
        names = [n for n in names if n in ctx.opts.networks]
        if not names:
            ctx.data["status"] = "skipped"
            ctx.data["note"] = "no network of this part selected by --networks"
    for name in names:
        batch = ctx.sizes["net_batch"]["R50" if name in R50 else "D121"]

        def work(unit, name=name, batch=batch):
            with _dry_kernels(ctx) if "(ours)" in name else contextlib.nullcontext():
                rows = networks.run_networks(device="cpu" if ctx.dry else "cuda", batch=batch,
                                             size=ctx.sizes["net_size"], fused=True, times=True,
                                             tools=make_tools(ctx), quiet=True, which=[name], compile_fn=compile_fn)
            unit.update(rows[0] if rows else {"error": "no row"})

        unit = {"network": name, "batch": batch, "size": ctx.sizes["net_size"]}
        est = 20.0 + (INDUCTOR_NET_S.get(name, 0) if compile_fn else 0)
        _run_unit(ctx, unit, unit["network"] + (" + torch.compile" if compile_fn else ""), est, work)


def part_networks(ctx: Ctx):
    _network_units(ctx, R50 + D121)


def part_compile_r50(ctx: Ctx):
    _network_units(ctx, R50[:2], compile_fn=_compile_fn(ctx))


def part_compile_d121(ctx: Ctx):
    _network_units(ctx, D121[:2], compile_fn=_compile_fn(ctx))


PARTS = {"tests": part_tests, "layers": part_layers, "networks": part_networks, "counts": part_counts,
         "compile-layers": part_compile_layers, "compile-r50": part_compile_r50, "compile-d121": part_compile_d121}


def _part_status(data: dict) -> str:
    if data.get("status"):
        return data["status"]
    units = data.get("units", [])
    bad = [u for u in units if u.get("error") or u.get("skipped")]
    bad += [r for u in units for r in u.get("rows", ()) if r.get("error")]
    return "ok" if units and not bad else ("partial" if units else "no result")


# ----------------------------------------------------------------------------- environment
def _cmd_out(cmd, timeout=20) -> str | None:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=_ROOT)
        return r.stdout.strip() if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def env_info(dry: bool) -> dict:
    import torch

    now = _dt.datetime.now(_dt.timezone.utc)
    info = {"date": now.strftime("%Y-%m-%d"), "started_utc": now.strftime("%Y-%m-%d %H:%M:%S"),
            "python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "cpu_count": os.cpu_count(), "dry_run": dry, "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32}
    for mod in ("triton", "numpy"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:
            info[mod] = None
    head = _cmd_out(["git", "rev-parse", "--short", "HEAD"], 10)
    info["commit"] = head and head + (" + local changes" if _cmd_out(["git", "status", "--porcelain",
                                                                      "--untracked-files=no"], 10) else "")
    if torch.cuda.is_available() and not dry:
        pr = torch.cuda.get_device_properties(0)
        info.update(card=pr.name, capability=f"{pr.major}.{pr.minor}", memory_gib=round(pr.total_memory / 2**30, 1),
                    sms=pr.multi_processor_count, gpus=torch.cuda.device_count())
        smi = _cmd_out(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,power.limit",
                        "--format=csv,noheader"])
        if smi:
            f = [x.strip() for x in smi.splitlines()[0].split(",")]
            info.update(driver=f[1] if len(f) > 1 else None, max_sm_clock=f[2] if len(f) > 2 else None,
                        power_limit=f[3] if len(f) > 3 else None)
    else:
        info.update(card=f"CPU ({platform.machine()}, {os.cpu_count()} cores), dry run", driver=None)
    return info


def ensure_importable() -> str:
    """The package must import with its kernels subpackage; install it in place if not (no network)."""
    probe = [sys.executable, "-c", "import scconv_triton.kernels"]
    if subprocess.run(probe, cwd=_ROOT, capture_output=True, timeout=300).returncode == 0:
        return "importable"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index", "-e", _ROOT]
    r = subprocess.run(pip, cwd=_ROOT, capture_output=True, text=True, timeout=300)
    if r.returncode == 0 and subprocess.run(probe, cwd=_ROOT, capture_output=True, timeout=300).returncode == 0:
        return "installed with pip -e (no deps, no index)"
    # Without pip's mapping of kernels/ to scconv_triton.kernels, a link in the source tree does the
    # same (git ignores it); the tests import the package from the repository root either way.
    link = os.path.join(_ROOT, "scconv_triton", "kernels")
    if not os.path.lexists(link):
        os.symlink(os.path.join("..", "kernels"), link)
    if subprocess.run(probe, cwd=_ROOT, capture_output=True, timeout=300).returncode == 0:
        return "pip install -e failed; linked scconv_triton/kernels -> ../kernels"
    raise SystemExit(f"scconv_triton.kernels does not import and `{shlex.join(pip)}` failed:\n{r.stderr[-2000:]}")


# ----------------------------------------------------------------------------- report
def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", s).strip("-")


def _md_layers(data: dict) -> list:
    out = []
    for u in data.get("units", []):
        out.append(f"#### {u['config']}" + (f" ({u['wall_s']} s)" if "wall_s" in u else ""))
        out.append("")
        out.append(f"`{u['command']}`")
        if u.get("skipped") or u.get("error"):
            out += ["", f"n/a: {u.get('skipped') or u.get('error')}"]
        elif u.get("report"):
            out += ["", "```", u["report"].strip("\n"), "```"]
        out.append("")
    return out


def _md_compile_layers(data: dict) -> list:
    out = ["| layer | config | fwd ms | bwd ms | f+b ms | peak MiB | wall s |", "|---|---|---:|---:|---:|---:|---:|"]
    f = lambda v, p: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
    for u in data.get("units", []):
        for r in u.get("rows") or [{"layer": u["config"], "error": u.get("skipped") or u.get("error")}]:
            if r.get("error"):
                out.append(f"| {r['layer']} | {u['config']} | n/a ({r['error']}) | | | | {u.get('wall_s', '-')} |")
                continue
            cfg = _cfg_label(r["dtype"], r["channels_last"])
            pk = r.get("peak_bytes")
            out.append(f"| {r['layer']} | {cfg} | {f(r.get('fwd_ms'), 3)} | {f(r.get('bwd_ms'), 3)} | "
                       f"{f(r.get('fwdbwd_ms'), 3)} | {f(pk and pk / 2**20, 1)} | {u.get('wall_s', '-')} |")
    cmd = next((u["command"] for u in data.get("units", [])), "")
    return [f"One row per compiled layer (`torch._dynamo.reset()`, `torch.compile(dynamic=False)`), e.g. `{cmd}`.",
            ""] + out + [""]


def _md_networks(data: dict) -> list:
    out = ["| network | batch | size | step ms | x base | peak MiB | x base | saved MiB | wall s |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    base = {}
    f = lambda v, p: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
    for u in data.get("units", []):
        name = u.get("network", "?")
        if u.get("error") or u.get("skipped"):
            out.append(f"| {name} | {u.get('batch')} | {u.get('size')} | n/a ({u.get('error') or u.get('skipped')}) "
                       "| | | | | |")
            continue
        fam = "R" if any(name.startswith(n) for n in R50) else "D"
        if name.startswith(("ResNet-50", "DenseNet-121")):
            base[fam] = u
        b = base.get(fam)
        ratio = lambda k: (f"{u[k] / b[k]:.2f}" if b and u.get(k) and b.get(k) else "-")  # noqa: E731
        pk, sv = u.get("peak_bytes"), u.get("saved_bytes")
        out.append(f"| {name} | {u['batch']} | {u['size']} | {f(u.get('step_ms'), 2)} | {ratio('step_ms')} | "
                   f"{f(pk and pk / 2**20, 0)} | {ratio('peak_bytes')} | {f(sv and sv / 2**20, 1)} | "
                   f"{u.get('wall_s', '-')} |")
    return ["One training step (forward, `.sum().backward()`), fp32 NCHW, 1000 classes; step = median of "
            "`triton.testing.do_bench`; peak = `max_memory_allocated` during a step above what was allocated "
            "before it; saved = bytes autograd keeps for backward besides input and parameters; x base = "
            "against ResNet-50 / DenseNet-121 of the same table.", ""] + out + [""]


def _md_tests(data: dict) -> list:
    out = [f"`{data.get('command', '')}`: **{data.get('summary') or 'no summary line'}** "
           f"(exit code {data.get('rc')}{', stopped at the cap' if data.get('timed_out') else ''}; "
           f"log `{data.get('log', 'tests.log')}`)"]
    if data.get("failures"):
        out += ["", "```"] + data["failures"] + ["```"]
    return out + [""]


def render_part(name: str, res: dict, json_name: str, session_cmd: str) -> str:
    data = res.get("data", {})
    head = (f"### {name}: {res['status']} in {res['wall_s']:.0f} s (cap {res['cap_s']:.0f} s"
            + (", killed at the cap" if res.get("killed") else "") + ")")
    body = {"tests": _md_tests, "layers": _md_layers, "counts": _md_layers, "compile-layers": _md_compile_layers,
            "networks": _md_networks, "compile-r50": _md_networks, "compile-d121": _md_networks}[name](data)
    lines = [f"<!-- part {name} -->", head, "", f"Session command `{session_cmd}`; raw numbers `{json_name}`.", ""]
    for note in (res.get("note"), data.get("note")):
        if note:
            lines += [note, ""]
    return "\n".join(lines + body + [f"<!-- /part {name} -->", ""])


def render_header(env: dict, profile: str) -> tuple[str, str]:
    dry = env["dry_run"]
    marker = f"<!-- gpu-session {env['date']} {_slug(env['card'])} {profile}{' dry-run' if dry else ''} -->"
    if dry:
        title = (f"## Dry run of the GPU session on a CPU, {env['date']} ({profile} profile): NOT measurements")
        card = (f"- {env['card']}: tiny shapes, CPU timers, Triton kernel bodies skipped, torch.compile replaced "
                "by the identity; it checks the plumbing only.")
    else:
        title = f"## GPU session: {env['card']}, {env['date']} ({profile} profile)"
        card = (f"- Card: {env['card']} (compute capability {env.get('capability')}, {env.get('memory_gib')} GiB, "
                f"{env.get('sms')} SMs, max SM clock {env.get('max_sm_clock')}, power limit {env.get('power_limit')}); "
                f"driver {env.get('driver')}; CUDA {env.get('torch_cuda')} (torch build), cuDNN {env.get('cudnn')}; "
                f"{env.get('cpu_count')} CPU cores")
    lines = [title, "", marker, card,
             f"- Versions: Python {env['python']}, torch {env['torch']}, triton {env['triton']}, numpy {env['numpy']}; "
             f"commit {env.get('commit') or 'n/a'}; started {env['started_utc']} UTC",
             f"- Settings: cudnn.benchmark={env['cudnn_benchmark']}, cudnn.allow_tf32={env['cudnn_allow_tf32']}, "
             f"matmul.allow_tf32={env['matmul_allow_tf32']} (torch's defaults unless stated)",
             "- Written by `benchmarks/gpu_session.py`; each part below gives its command, wall time and cap.", ""]
    return marker, "\n".join(lines)


def merge_results(text: str, marker: str, header: str, parts_md: dict) -> str:
    """Insert or update this session's section of RESULTS.md (newest first; one subsection per part)."""
    i = text.find(marker)
    if i < 0:
        sec = header + "\n" + "\n".join(parts_md[p] for p in parts_md)
        j = text.find("\n## ")
        j = len(text) if j < 0 else j + 1
        return text[:j] + sec.rstrip("\n") + "\n\n" + text[j:]
    start = text.rfind("\n## ", 0, i) + 1
    end = text.find("\n## ", i)
    end = len(text) if end < 0 else end + 1
    sec = text[start:end]
    for name, md in parts_md.items():
        b, e = f"<!-- part {name} -->", f"<!-- /part {name} -->"
        if b in sec and e in sec:
            sec = sec[:sec.index(b)] + md.rstrip("\n") + sec[sec.index(e) + len(e):]
        else:
            sec = sec.rstrip("\n") + "\n\n" + md.rstrip("\n") + "\n\n"
    return text[:start] + sec.rstrip("\n") + "\n\n" + text[end:]


# ----------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--all", action="store_true", help="every part of the profile, in order")
    g.add_argument("--part", help=f"comma list of {', '.join(PART_ORDER)}")
    g.add_argument("--list", action="store_true", help="print the parts with caps and estimated times, then exit")
    p.add_argument("--budget", choices=sorted(PROFILES), default="full", help="profile (default full)")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes and CPU timers (automatic without CUDA)")
    p.add_argument("--out", help="output folder (default $OUT when set, else results/gpu-session)")
    p.add_argument("--time-limit", type=float, default=None,
                   help="seconds for the whole session (default: the profile's total with --all, else the sum "
                        "of the parts' caps; at most 570 when $OUT is set, one 10-minute device call)")
    p.add_argument("--test-jobs", type=int, default=None, help="pytest-xdist workers on CUDA (default 4; 1: serial)")
    p.add_argument("--pytest-args", default=None, help="extra arguments for pytest (e.g. a test file)")
    p.add_argument("--networks", default=None, type=lambda v: [x.strip() for x in v.split(",") if x.strip()],
                   help=f"only these networks in the network parts (comma list of {', '.join(R50 + D121)})")
    p.add_argument("--in-process", action="store_true", help="run parts in this process (no hard cap; for tests)")
    p.add_argument("--no-write-tree", action="store_true", help="do not update benchmarks/RESULTS.md in place")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--child-json", help=argparse.SUPPRESS)
    p.add_argument("--child-deadline", type=float, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


@contextlib.contextmanager
def _cpu_threads(dry: bool):
    """Dry runs use one intra-op thread: on a shared few-core machine more threads run ~10x slower."""
    import torch

    n = torch.get_num_threads()
    if dry:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _child(a) -> int:
    # the wall-clock deadline the parent set (it kills this process 20 s after it)
    ctx = Ctx(a.budget, a.dry_run, time.monotonic() + (a.child_deadline - time.time()) - 5, a.out, a.child_json, a)
    ctx.data["part"] = a.child
    with _cpu_threads(a.dry_run):
        PARTS[a.child](ctx)
    return 0


class _Tee:
    def __init__(self, *streams):
        self.streams = streams

    def write(self, s):
        for st in self.streams:
            st.write(s)
        return len(s)

    def flush(self):
        for st in self.streams:
            st.flush()

    def isatty(self):
        return False

    def __getattr__(self, name):
        return getattr(self.streams[0], name)


def main(argv=None) -> int:
    a = parse_args(argv)
    import torch

    if not torch.cuda.is_available() and not a.dry_run:
        print("no CUDA device: running as a dry run (--dry-run)", flush=True)
        a.dry_run = True
    if a.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if a.child:
        return _child(a)
    prof = PROFILES[a.budget]
    parts = list(prof["parts"]) if a.all or not a.part else [x.strip() for x in a.part.split(",") if x.strip()]
    for x in parts:
        if x not in PARTS:
            raise SystemExit(f"unknown part {x!r}; choose from {', '.join(PART_ORDER)}")
    for x in a.networks or ():
        if x not in R50 + D121:
            raise SystemExit(f"unknown network {x!r}; choose from {', '.join(R50 + D121)}")
    if a.list or not (a.all or a.part):
        print(part_table(a.budget, PART_ORDER if a.list and not a.part else parts))
        if not a.list:
            print("\nnothing to run: pass --all or --part NAME (see --help)")
        return 0

    out = a.out or os.environ.get("OUT") or os.path.join(_ROOT, "results", "gpu-session")
    os.makedirs(out, exist_ok=True)
    a.out = out
    session_log = open(os.path.join(out, "session.log"), "a")
    stdout = sys.stdout
    sys.stdout = _Tee(stdout, session_log)
    try:
        return _session(a, parts, prof, out)
    finally:
        sys.stdout = stdout
        session_log.close()


def _session(a, parts, prof, out) -> int:
    t_session = time.monotonic()
    limit = a.time_limit or (prof["total"] if a.all else sum(prof["caps"][x] for x in parts))
    if os.environ.get("OUT") and a.time_limit is None:
        limit = min(limit, 570)
    deadline = t_session + limit
    env = env_info(a.dry_run)
    env["install"] = "dry run: not checked" if a.dry_run else ensure_importable()
    print(f"GPU session, {a.budget} profile{' (DRY RUN)' if a.dry_run else ''}: {env['card']}; python "
          f"{env['python']}, torch {env['torch']}, triton {env['triton']}; out {out}; limit {limit:.0f} s", flush=True)
    print(part_table(a.budget, parts), flush=True)
    session_cmd = "python benchmarks/gpu_session.py " + shlex.join(
        (["--dry-run"] if a.dry_run else []) + ["--budget", a.budget]
        + (["--all"] if a.all else ["--part", ",".join(parts)])
        + (["--networks", ",".join(a.networks)] if a.networks else []))
    json_name = f"{'dry-run-' if a.dry_run else ''}gpu-session-{env['date']}-{a.budget}-{'_'.join(parts)}.json"
    marker, header = render_header(env, a.budget)
    results: dict = {}
    for name in parts:
        cap = min(prof["caps"][name], deadline - time.monotonic())
        print(f"\n=== part {name} (cap {cap:.0f} s) ===", flush=True)
        if cap < 30:
            results[name] = {"status": "not run", "wall_s": 0.0, "cap_s": max(cap, 0), "data": {},
                             "note": "not run: the session's time limit was reached"}
        else:
            results[name] = _run_part(a, name, cap, out)
        _write(a, env, results, json_name, marker, header, session_cmd, out, time.monotonic() - t_session)
    print("\n" + _summary(results), flush=True)
    print(f"session {time.monotonic() - t_session:.0f} s; files in {out}", flush=True)
    return 0 if all(r["status"] in ("ok", "skipped") for r in results.values()) else 1


def _run_part(a, name, cap, out) -> dict:
    t0 = time.monotonic()
    if a.in_process:
        ctx = Ctx(a.budget, a.dry_run, t0 + cap, out, None, a)
        ctx.data["part"] = name
        note = None
        try:
            with _cpu_threads(a.dry_run):
                PARTS[name](ctx)
        except Exception as e:
            note = f"error: {type(e).__name__}: {e}"[:300]
        data, killed = ctx.data, False
    else:
        path = os.path.join(tempfile.gettempdir(), f"gpu-session-part-{name}-{os.getpid()}.json")
        if os.path.exists(path):
            os.remove(path)
        cmd = [sys.executable, os.path.abspath(__file__), "--child", name, "--child-json", path, "--budget",
               a.budget, "--child-deadline", repr(time.time() + cap), "--out", out]
        cmd += ["--dry-run"] if a.dry_run else []
        cmd += (["--test-jobs", str(a.test_jobs)] if a.test_jobs is not None else [])
        cmd += (["--pytest-args", a.pytest_args] if a.pytest_args else [])
        cmd += (["--networks", ",".join(a.networks)] if a.networks else [])
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        r = run_logged(cmd, timeout=cap + 20, env=env)
        data = {}
        if os.path.exists(path):
            with open(path) as f:
                data = json.load(f)
            os.remove(path)
        killed = r["timed_out"]
        note = None
        if r["rc"] not in (0, None) and not killed:
            note = f"the part's process exited with {r['rc']}: " + r["tail"].strip().splitlines()[-1][:300] \
                if r["tail"].strip() else f"the part's process exited with {r['rc']}"
    status = _part_status(data)
    if killed:
        status = "timeout"
    elif note:
        status = "error"
    return {"status": status, "wall_s": round(time.monotonic() - t0, 1), "cap_s": round(cap), "killed": killed,
            "note": note, "data": data}


def _write(a, env, results, json_name, marker, header, session_cmd, out, wall):
    with open(os.path.join(out, json_name), "w") as f:
        json.dump({"env": env, "profile": a.budget, "command": session_cmd, "session_wall_s": round(wall, 1),
                   "parts": results}, f, indent=1, default=str)
    src = os.path.join(out, "RESULTS.md")
    # A real run merges into the tree's file (on the device machine: the copy that was sent, so copy
    # RESULTS.md back between calls); a dry run never touches it and merges into its own earlier output.
    base = RESULTS_MD
    if a.dry_run and os.path.exists(src):
        with open(src) as f:
            if marker in f.read():
                base = src
    with open(base) as f:
        text = f.read()
    parts_md = {n: render_part(n, r, json_name, session_cmd) for n, r in results.items()}
    text = merge_results(text, marker, header, parts_md)
    with open(src, "w") as f:
        f.write(text)
    if not a.dry_run and not a.no_write_tree and os.path.abspath(src) != os.path.abspath(RESULTS_MD):
        with open(RESULTS_MD, "w") as f:
            f.write(text)


def _summary(results) -> str:
    lines = [f"{'part':15s} {'status':10s} {'wall s':>7s} {'cap s':>6s}"]
    for n, r in results.items():
        lines.append(f"{n:15s} {r['status']:10s} {r['wall_s']:7.0f} {r['cap_s']:6.0f}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
