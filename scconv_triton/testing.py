"""Test helpers: ahead-of-time compilation of Triton kernels for real GPUs.

The Triton interpreter accepts code that a GPU compiler rejects, so every kernel
is also compiled for sm_80 and sm_90 with ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", cap, 32))``. That needs no GPU. cuobjdump (bundled with
Triton) then reports registers, spills (local memory) and shared memory of the cubin.

The compilation runs in a child process without TRITON_INTERPRET: with the
interpreter on, ``@triton.jit`` yields interpreter objects that cannot be
compiled, and the test process has the interpreter on when there is no GPU.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field

__all__ = ["AotSpec", "AotResult", "aot_compile"]


@dataclass
class AotSpec:
    """One kernel specialisation to compile.

    kernel: the @triton.jit object (or "module:qualname").
    signature: {arg name: Triton type}, e.g. {"x_ptr": "*fp32", "n": "i64", "BLOCK": "constexpr"}.
    constexprs: {name: value} for every "constexpr" entry of the signature.
    num_warps, num_stages: launch options the launcher uses.
    """

    kernel: object
    signature: dict
    constexprs: dict = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3

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

    @property
    def spills(self) -> int:
        """Bytes per thread spilled out of registers (local memory + stack)."""
        return self.local + self.stack


_CHILD = r"""
import importlib, json, os, re, subprocess, sys, tempfile
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
        res = dict(kernel=s["target"], arch=arch, registers=0, local=0, stack=0, shared=0, error=None)
        try:
            src = ASTSource(fn=obj, signature=s["signature"], constexprs=s["constexprs"])
            k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                               options=dict(num_warps=s["num_warps"], num_stages=s["num_stages"]))
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
