"""Test helpers: capture the Triton launches a callable makes; compile them ahead of time.

The Triton interpreter accepts code that a GPU compiler rejects, so every kernel
is also compiled for sm_80 and sm_90 with ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", cap, 32))``. That needs no GPU. cuobjdump (bundled with
Triton) then reports registers, spills (local memory) and shared memory of the cubin.

What is compiled is what runs: :func:`capture_launches` records every launch a
module makes (kernel, arguments, grid, options) and :func:`spec_from_launch` turns
one into an :class:`AotSpec` with the JIT's own specialisation of its arguments
(integers equal to 1 become constexprs, integers and pointers divisible by 16 get
``tt.divisibility``, i32 / i64 by value), so the compiled variant is the one the JIT
would build for that launch on a GPU. :func:`skip_triton_launches` lets a capture
run at real layer shapes in the interpreter without executing the kernels.

The compilation runs in a child process without TRITON_INTERPRET: with the
interpreter on, ``@triton.jit`` yields interpreter objects that cannot be
compiled, and the test process has the interpreter on when there is no GPU.
"""
from __future__ import annotations

import contextlib
import inspect
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field

__all__ = [
    "AotSpec", "AotResult", "aot_compile", "Captured", "capture_launches", "skip_triton_launches",
    "spec_from_launch", "unique_specs", "covering_specs", "aot_table",
]


@dataclass
class AotSpec:
    """One kernel specialisation to compile.

    kernel: the @triton.jit object (or "module:qualname").
    signature: {arg name: Triton type}, e.g. {"x_ptr": "*fp32", "n": "i64", "BLOCK": "constexpr"}.
    constexprs: {name: value} for every "constexpr" entry of the signature.
    num_warps, num_stages, maxnreg: launch options the launcher uses (maxnreg None: unset).
    """

    kernel: object
    signature: dict
    constexprs: dict = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3
    attrs: dict = field(default_factory=dict)  # {arg name: "D"} = divisible by 16 (tt.divisibility)
    maxnreg: int | None = None

    def key(self) -> str:
        return json.dumps([self.target(), self.signature, {k: repr(v) for k, v in self.constexprs.items()},
                           self.attrs, self.num_warps, self.num_stages, self.maxnreg], sort_keys=True)

    def variant(self) -> str:
        """Short text naming the variant: pointer dtypes and the non-block constexprs."""
        ptrs = sorted({t for t in self.signature.values() if t.startswith("*")})
        flags = [f"{k}={v}" for k, v in self.constexprs.items() if k.isupper() and k[:1] != "B"]
        return " ".join([",".join(ptrs)] + flags)

    def target(self) -> str:
        if isinstance(self.kernel, str):
            return self.kernel
        fn = getattr(self.kernel, "fn", self.kernel)
        return f"{fn.__module__}:{fn.__qualname__}"


@dataclass
class AotResult:
    kernel: str
    arch: int
    registers: int
    local: int  # bytes of local memory per thread (register spills land here)
    stack: int
    shared: int
    error: str | None = None
    variant: str = ""

    @property
    def spills(self) -> int:
        """Bytes per thread spilled out of registers (local memory + stack)."""
        return self.local + self.stack


_CHILD = r"""
import importlib, inspect, json, os, re, subprocess, sys, tempfile
import triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget

def cuobjdump_path():
    here = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return here if os.path.exists(here) else "cuobjdump"

def resources(cubin):
    # cuobjdump reads the final SASS resource table: registers, and LOCAL/STACK
    # bytes, which are where ptxas puts spilled registers.
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "k.cubin")
        open(p, "wb").write(cubin)
        r = subprocess.run([cuobjdump_path(), "--dump-resource-usage", p], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(r.stdout + r.stderr)
    def grab(key):
        return max([int(v) for v in re.findall(key + r":(\d+)", r.stdout)] or [0])
    return dict(registers=grab("REG"), local=grab("LOCAL"), stack=grab("STACK"), shared=grab("SHARED"))

specs = json.loads(sys.stdin.read())
out = []
for s in specs:
    mod, name = s["target"].split(":")
    obj = importlib.import_module(mod)
    for part in name.split("."):
        obj = getattr(obj, part)
    for arch in s["archs"]:
        res = dict(kernel=s["target"], arch=arch, registers=0, local=0, stack=0, shared=0, error=None,
                   variant=s["variant"])
        try:
            target = GPUTarget("cuda", arch, 32)
            names = list(inspect.signature(obj.fn).parameters)
            attrs = {}
            if s["attrs"]:
                from triton.compiler import make_backend
                backend = make_backend(target)
                attrs = {(names.index(n),): backend.parse_attr(a) for n, a in s["attrs"].items()}
            src = ASTSource(fn=obj, signature=s["signature"], constexprs=s["constexprs"], attrs=attrs)
            opts = dict(num_warps=s["num_warps"], num_stages=s["num_stages"])
            if s["maxnreg"] is not None:
                opts["maxnreg"] = s["maxnreg"]
            k = triton.compile(src, target=target, options=opts)
            res.update(resources(k.asm["cubin"]))
            res["shared"] = max(res["shared"], int(k.metadata.shared))
        except Exception as e:  # report, the caller decides
            res["error"] = f"{type(e).__name__}: {e}"
        out.append(res)
print("AOT-JSON" + json.dumps(out))
"""


def aot_compile(specs, archs=(80, 90), timeout: float = 600.0) -> list[AotResult]:
    """Compile each spec for each arch in one child process; return one result per pair.

    A kernel that fails to compile gives a result with ``error`` set (never an
    exception), so a test can name every broken kernel at once.
    """
    specs = list(specs)
    payload = [
        dict(
            target=s.target(),
            signature=s.signature,
            constexprs=s.constexprs,
            num_warps=s.num_warps,
            num_stages=s.num_stages,
            maxnreg=s.maxnreg,
            attrs=s.attrs,
            variant=s.variant(),
            archs=list(archs),
        )
        for s in specs
    ]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD],
        input=json.dumps(payload),
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("AOT-JSON")), None)
    if line is None:
        raise RuntimeError(f"AOT compilation process failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return [AotResult(**r) for r in json.loads(line[len("AOT-JSON"):])]


# ----------------------------------------------------------------------------- capturing launches
@dataclass
class Captured:
    """One Triton launch: the JITFunction / InterpretedFunction, its arguments, grid and options."""

    kernel: object
    args: tuple
    kwargs: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        fn = getattr(self.kernel, "fn", None)
        return getattr(fn, "__name__", None) or getattr(self.kernel, "__name__", "kernel")

    def __call__(self):
        return self.kernel.run(*self.args, warmup=False, **self.kwargs)


@contextlib.contextmanager
def capture_launches(keep_args: bool = True):
    """``with capture_launches() as calls: f()`` -> calls is a list of :class:`Captured`.

    Wraps ``JITFunction.run`` and ``InterpretedFunction.run``, so it sees compiled and
    interpreted launches alike (after autotuning picked a config). ``keep_args=False``
    records only the kernels (not replayable): holding the arguments keeps the launch's
    tensors alive, which changes what autograd does with them (AccumulateGrad copies a
    gradient it cannot steal) and so what a launch count sees.
    """
    calls: list[Captured] = []
    classes = []
    try:
        from triton.runtime.jit import JITFunction

        classes.append(JITFunction)
    except Exception:
        pass
    try:
        from triton.runtime.interpreter import InterpretedFunction

        classes.append(InterpretedFunction)
    except Exception:
        pass
    originals = {}
    for cls in classes:
        orig = cls.run
        originals[cls] = orig

        def run(self, *args, grid, warmup, _orig=orig, **kwargs):
            if not warmup:
                calls.append(Captured(self, args, dict(kwargs, grid=grid)) if keep_args else Captured(self, ()))
            return _orig(self, *args, grid=grid, warmup=warmup, **kwargs)

        cls.run = run
    try:
        yield calls
    finally:
        for cls, orig in originals.items():
            cls.run = orig


@contextlib.contextmanager
def skip_triton_launches(level: str = "body"):
    """Inside the block, interpreted Triton launches return at once without running.

    For shape-only work: what a launcher passes to a kernel, and what autograd saves,
    depends on the shapes the launchers allocate, not on the values the kernels write, so
    launches can be captured (and saved bytes measured) at real layer sizes without
    interpreting every program. Outputs hold uninitialised memory: never use this for
    numbers or traffic.

    ``level="body"`` skips the programs (``GridExecutor.__call__``): the launch is still made
    and can be captured. ``level="launch"`` skips the whole interpreted launch
    (``InterpretedFunction.run``), the interpreter's own argument staging included, which a
    GPU does not pay (for host-cost measurements; nothing is captured).
    """
    from triton.runtime import interpreter as interp

    if level not in ("body", "launch"):
        raise ValueError(f"level must be 'body' or 'launch', got {level!r}")
    cls, attr = (interp.GridExecutor, "__call__") if level == "body" else (interp.InterpretedFunction, "run")
    orig = getattr(cls, attr)
    setattr(cls, attr, lambda self, *a, **k: None)
    try:
        yield
    finally:
        setattr(cls, attr, orig)


_TORCH_TO_TRITON = {
    "float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "float64": "fp64",
    "int8": "i8", "int16": "i16", "int32": "i32", "int64": "i64", "uint8": "u8", "bool": "i1",
}


def _arg_type(value):
    """(Triton type, "D" | "" | None, constexpr value or None) as the JIT specialises ``value``.

    Mirrors triton.runtime.jit's specialisation (stable from triton 3.0 to 3.9): an int equal
    to 1 is a constexpr; ints are i32 when they fit, else i64 (u64 past 2**63), "D" when
    divisible by 16; floats are fp32 and bools u1, never specialised; a tensor is a pointer to
    its dtype, "D" when its address is 16-byte aligned; None is a constexpr.
    """
    if value is None:
        return "constexpr", None, None
    if isinstance(value, bool):
        return "u1", None, None
    if isinstance(value, int):
        if value == 1:
            return "constexpr", None, 1
        ty = "i32" if -(2**31) <= value < 2**31 else ("i64" if -(2**63) <= value < 2**63 else "u64")
        return ty, ("D" if value % 16 == 0 else ""), None
    if isinstance(value, float):
        return "fp32", None, None
    if hasattr(value, "data_ptr") and hasattr(value, "dtype"):
        ty = "*" + _TORCH_TO_TRITON[str(value.dtype).replace("torch.", "")]
        return ty, ("D" if value.data_ptr() % 16 == 0 else ""), None
    raise TypeError(f"cannot specialise a kernel argument of type {type(value).__name__}")


def spec_from_launch(call: Captured) -> AotSpec:
    """The AotSpec the JIT would compile for one captured launch."""
    fn = getattr(call.kernel, "fn", call.kernel)
    params = list(inspect.signature(fn).parameters.values())
    kwargs = dict(call.kwargs)
    kwargs.pop("grid", None)
    num_warps = int(kwargs.pop("num_warps", 4))
    num_stages = int(kwargs.pop("num_stages", 3))
    maxnreg = kwargs.pop("maxnreg", None)
    bound = dict(zip([p.name for p in params], call.args))
    signature, constexprs, attrs = {}, {}, {}
    for p in params:
        if p.name in kwargs:
            value = kwargs.pop(p.name)
        elif p.name in bound:
            value = bound[p.name]
        elif p.default is not inspect.Parameter.empty:
            value = p.default
        else:
            raise TypeError(f"{fn.__name__}: no value for argument {p.name}")
        if "constexpr" in str(p.annotation):
            signature[p.name] = "constexpr"
            constexprs[p.name] = value
            continue
        ty, attr, cval = _arg_type(value)
        signature[p.name] = ty
        if ty == "constexpr":
            constexprs[p.name] = cval
        elif attr:
            attrs[p.name] = attr
    return AotSpec(fn_target(fn), signature, constexprs, num_warps, num_stages, attrs, maxnreg)


def fn_target(fn) -> str:
    return f"{fn.__module__}:{fn.__qualname__}"


def unique_specs(calls) -> list[AotSpec]:
    """Distinct specs of captured launches, in first-seen order."""
    seen, out = set(), []
    for c in calls:
        s = spec_from_launch(c)
        k = s.key()
        if k not in seen:
            seen.add(k)
            out.append(s)
    return out


def _features(spec: AotSpec) -> set:
    k = spec.target()
    ptrs = tuple(sorted({t for t in spec.signature.values() if t.startswith("*")}))
    f = {(k, "ptrs", ptrs)}
    for name, v in spec.constexprs.items():
        if isinstance(v, bool) or (name.isupper() and not name.startswith("B")):
            f.add((k, name, v))
    return f


def _tile_size(spec: AotSpec) -> int:
    n = spec.num_warps
    for name, v in spec.constexprs.items():
        if name.startswith("B") and isinstance(v, int) and not isinstance(v, bool):
            n *= v
    return n


def covering_specs(specs) -> list[AotSpec]:
    """A subset of ``specs`` that still has every kernel with every pointer-dtype set and every
    value of each flag constexpr (per dtype), preferring the largest tiles (the most registers).

    Greedy set cover: the full set (every distinct launch of every configuration) is a few
    hundred compilations; the cover is the one a test can afford on every run.
    """
    specs = sorted(specs, key=lambda s: -_tile_size(s))
    need = set().union(*(_features(s) for s in specs)) if specs else set()
    out = []
    while need:
        best = max(specs, key=lambda s: len(_features(s) & need))
        out.append(best)
        need -= _features(best)
    return out


def aot_table(results) -> str:
    """Registers, spills and shared memory per kernel variant and arch, worst first."""
    rows = sorted(results, key=lambda r: (-r.registers, r.kernel, r.arch))
    lines = [f"{'kernel':34s} {'sm':>3s} {'regs':>5s} {'spill B':>7s} {'smem B':>7s}  variant"]
    for r in rows:
        name = r.kernel.split(":")[-1]
        tail = f"ERROR {r.error}" if r.error else r.variant
        lines.append(f"{name:34s} {r.arch:>3d} {r.registers:>5d} {r.spills:>7d} {r.shared:>7d}  {tail}")
    return "\n".join(lines)
