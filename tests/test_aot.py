"""Every Triton kernel of the package compiles ahead of time for sm_80 and sm_90, without spills.

Each module under scconv_triton.kernels lists the specialisations its launchers
use in ``aot_specs()``; this test compiles all of them in one child process per
run (no GPU needed) and names every kernel that fails or spills.
"""
import importlib
import pkgutil

import pytest

import scconv_triton.kernels as kernels_pkg
from scconv_triton.testing import aot_compile


def _all_specs():
    specs = []
    for info in pkgutil.iter_modules(kernels_pkg.__path__):
        mod = importlib.import_module(f"{kernels_pkg.__name__}.{info.name}")
        if hasattr(mod, "aot_specs"):
            specs.extend(mod.aot_specs())
    return specs


@pytest.fixture(scope="module")
def aot_results():
    specs = _all_specs()
    if not specs:
        pytest.fail("no kernel module exposes aot_specs(): nothing would be compiled")
    return specs, aot_compile(specs, archs=(80, 90))


def test_every_kernel_compiles_for_sm80_and_sm90(aot_results):
    specs, results = aot_results
    assert len(results) == 2 * len(specs)
    errors = [f"{r.kernel} sm_{r.arch}: {r.error}" for r in results if r.error]
    assert not errors, "\n".join(errors)
    assert {r.arch for r in results} == {80, 90}


def test_no_register_spills(aot_results):
    _, results = aot_results
    spilling = [f"{r.kernel} sm_{r.arch}: {r.spills} bytes, {r.registers} regs" for r in results if r.spills]
    assert not spilling, "\n".join(spilling)
    assert all(r.registers > 0 for r in results)


def test_aot_helper_reports_a_broken_kernel():
    # The helper must surface compile errors rather than hide them: a spec
    # whose constexpr is not an integer cannot compile.
    specs = _all_specs()[:1]
    bad = [type(specs[0])(specs[0].kernel, specs[0].signature, {k: "not-a-number" for k in specs[0].constexprs})]
    if not specs[0].constexprs:
        pytest.fail("the first spec has no constexpr to corrupt; pick another kernel for this check")
    (r80,) = aot_compile(bad, archs=(80,))
    assert r80.error is not None
