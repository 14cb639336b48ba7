"""Triton kernels and their launchers (installed as ``scconv_triton.kernels``).

Only @triton.jit kernels and thin launchers (allocate, grid, launch) live here:
no autograd, no modules. ``_launch`` holds what every kernel file shares (Triton
helpers, the device guard, layouts, tiles). tests/test_aot.py compiles every launch
the fused modules make, ahead of time for sm_80 and sm_90.
"""
