"""Capture the Triton launches a callable makes, to replay (and time) each kernel alone.

The microbenchmarks (benchmarks/test_micro.py) need no knowledge of the
launchers' signatures: they run the fused module once, record every
``JITFunction.run`` / ``InterpretedFunction.run`` call (the kernel, its
arguments, grid and launch options, after autotuning picked a config), and
replay each one with the same tensors. The capture itself lives in
``scconv_triton.testing`` (the ahead-of-time compile check uses it too).
"""
from __future__ import annotations

from scconv_triton.testing import Captured, capture_launches

__all__ = ["Captured", "capture_launches"]
