"""Capture the Triton launches a callable makes, to replay (and time) each kernel alone.

The microbenchmarks (benchmarks/test_micro.py) need no knowledge of the
launchers' signatures: they run the fused module once, record every
``JITFunction.run`` / ``InterpretedFunction.run`` call (the kernel, its
arguments, grid and launch options, after autotuning picked a config), and
replay each one with the same tensors.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field


@dataclass
class Captured:
    kernel: object  # the JITFunction / InterpretedFunction
    args: tuple
    kwargs: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        fn = getattr(self.kernel, "fn", None)
        return getattr(fn, "__name__", None) or getattr(self.kernel, "__name__", "kernel")

    def __call__(self):
        return self.kernel.run(*self.args, warmup=False, **self.kwargs)


@contextlib.contextmanager
def capture_launches():
    """``with capture_launches() as calls: f()`` -> calls is a list of :class:`Captured`."""
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
                calls.append(Captured(self, args, dict(kwargs, grid=grid)))
            return _orig(self, *args, grid=grid, warmup=warmup, **kwargs)

        cls.run = run
    try:
        yield calls
    finally:
        for cls, orig in originals.items():
            cls.run = orig
