"""Triton kernels and their launchers (installed as ``scconv_triton.kernels``).

Only @triton.jit kernels and thin launchers (allocate, grid, launch) live here:
no autograd, no modules. Each module exposes ``aot_specs()``, the
specialisations that tests compile ahead of time for sm_80 and sm_90.
"""
