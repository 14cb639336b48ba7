"""Every Triton kernel compiles ahead of time for sm_80 and sm_90, as the JIT would build it, without spills.

The specs are not written by hand: fused SCConv training steps at real layer shapes run with
their launches captured (``scconv_triton.testing.capture_launches``; in the interpreter the
kernel bodies are skipped, since a launch's arguments depend only on shapes), and every
distinct launch becomes an AotSpec with the JIT's specialisation (constexpr 1s, divisibility
by 16, i32/i64). The configurations cover every constexpr variant and dtype a user config can
reach: fp32 / fp16 / bf16 / fp64, NCHW / channels_last, soft / hard gate, every upstream
revision, channel / pairwise softmax, nn.GroupNorm / GroupBatchnorm2d, stride 1 / 2, PWC2 with and without channels, large
and small spatial sizes. One child process compiles them all (no GPU needed).

``python tests/test_aot.py [--all]`` prints the report (registers, spills, shared memory per
variant) of the cover, or with ``--all`` of every distinct launch.
"""
import contextlib
import os
import sys

import pytest
import torch

if __name__ == "__main__" and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any @triton.jit module is imported

import scconv_triton  # noqa: E402
from scconv_triton.backend import interpreter_enabled  # noqa: E402
from scconv_triton.testing import (  # noqa: E402
    aot_compile, aot_table, capture_launches, covering_specs, skip_triton_launches, unique_specs,
)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}
# (in channels, out channels, H=W, stride, dtype, channels_last (or "strided"), SCConv keywords)
DEFAULT = {}
VARIANT = {"gate": "hard", "softmax": "pairwise", "torch_gn": False}
STAGE1 = {"stage": 1}
CONFIGS = (
    [(64, 64, 56, 1, dt, cl, DEFAULT) for dt in DTYPES for cl in (False, True)]  # R50 layer1, every dtype
    + [(64, 64, 56, 1, dt, cl, VARIANT) for dt in ("fp32", "bf16", "fp64") for cl in (False, True)]
    + [(256, 256, 28, 2, "fp32", cl, DEFAULT) for cl in (False, True)]  # R50 layer3.0, stride 2
    + [(256, 256, 28, 2, "bf16", True, VARIANT)]
    + [(512, 512, 7, 1, dt, cl, DEFAULT) for dt in ("fp32", "bf16") for cl in (False, True)]  # 7x7 tiles
    + [(128, 32, 28, 1, dt, cl, DEFAULT) for dt in ("fp32", "bf16") for cl in (False, True)]  # no PWC2
    # no PWC2 and no Triton convolution backward (k = 7): the squeeze backward without d_low (HAS_DL off)
    + [(128, 32, 28, 1, "fp32", True, {"group_kernel_size": 7})]
    # an input that is neither NCHW- nor channels_last-contiguous: (p // W, p % W) addressing
    + [(64, 64, 56, 1, dt, "strided", DEFAULT) for dt in ("fp32", "bf16")]
    # the other upstream revisions: their SRU switches (MASK, ON, SOFTMAX) in every kernel
    + [(64, 64, 56, 1, dt, cl, {"revision": rev}) for rev in ("2023-09", "2023-07-27", "2023-07-22")
       for dt, cl in (("fp32", False), ("fp64", False), ("bf16", True), ("fp16", True))]
    # stage 2's other variants: alpha != 1/2 (four squeeze dots), kernel sizes 1 / 5 / 7, four
    # groups, fp32 without TF32 (torch.backends.cudnn.allow_tf32 off)
    + [(64, 64, 56, 1, "fp32", False, {"alpha": 0.75, "group_size": 4, "group_kernel_size": 5})]
    + [(64, 64, 28, 2, "bf16", True, {"alpha": 0.25, "group_kernel_size": 7, "squeeze_radio": 4})]
    + [(64, 64, 14, 1, "fp16", False, {"group_kernel_size": 1, "gate": "hard"})]
    + [(64, 64, 56, 1, "fp32", cl, {"tf32": False}) for cl in (False, True)]
    # the dw pass at k = 5 (two tap blocks of 8), and on an image of one row tile (CARRY off; at
    # k = 3: at k = 5 an image that small takes the rebuild path, ops.stage2.dw_pass_pays)
    + [(64, 64, 14, 1, "fp32", False, {"group_kernel_size": 5}), (64, 64, 5, 2, "fp32", True, {})]
    # the first layer of a network: no input gradient (the squeeze backward without dx)
    + [(64, 64, 56, 1, "bf16", True, {"no_dx": True}), (64, 64, 56, 1, "fp32", False, {"no_dx": True})]
    # stage 1 (selectable, and the fallback): its forward kernels run only there
    + [(64, 64, 56, 1, dt, cl, STAGE1) for dt in ("fp32", "bf16", "fp64") for cl in (False, True)]
    + [(64, 64, 56, 1, "fp32", False, {**VARIANT, **STAGE1}), (256, 256, 28, 2, "fp32", True, STAGE1)]
    + [(128, 32, 28, 1, "bf16", True, STAGE1)]
)


def _step(cin, cout, h, stride, dtype, cl, kw, device):
    kw = dict(kw)
    tf32 = kw.pop("tf32", True)
    dx = not kw.pop("no_dx", False)
    with _allow_tf32(tf32):
        _run_step(cin, cout, h, stride, dtype, cl, kw, device, dx)


@contextlib.contextmanager
def _allow_tf32(on: bool):
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = old


def _run_step(cin, cout, h, stride, dtype, cl, kw, device, dx=True):
    m = scconv_triton.SCConv(cin, out_channels=cout, stride=stride, backend="triton", **kw)
    m = m.to(device=device, dtype=DTYPES[dtype])
    x = torch.randn(2, cin, h, h, device=device, dtype=DTYPES[dtype])
    if cl == "strided":
        x = torch.randn(2, cin, h, h + 8, device=device, dtype=DTYPES[dtype])[..., :h].detach()
    elif cl:
        m, x = m.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(dx)
    y = m(x)
    y.backward(torch.randn_like(y))


def captured_specs(device):
    """AotSpecs of every distinct launch the CONFIGS' training steps make."""
    from scconv_triton.kernels import stage2

    calls = []
    stage2.AS_GPU = True  # dispatch as on a GPU (no fp64 stage 2 there)
    try:
        for cfg in CONFIGS:
            skip = skip_triton_launches() if interpreter_enabled() else contextlib.nullcontext()
            with capture_launches() as got, skip:
                _step(*cfg, device=device)
            calls += got
    finally:
        stage2.AS_GPU = False
    return unique_specs(calls)


FULL = os.environ.get("SCCONV_AOT_FULL", "0") == "1"


@pytest.fixture(scope="module")
def aot_results():
    """(every captured spec, compile results). The suite compiles a cover of the specs (every
    kernel x pointer dtypes x flag values, largest tiles first: ~50 specs); SCCONV_AOT_FULL=1
    compiles every distinct launch (~270 specs, tens of minutes on 2 cores)."""
    specs = captured_specs("cuda" if torch.cuda.is_available() else "cpu")
    if not specs:
        pytest.fail("no Triton launch was captured: nothing would be compiled")
    return specs, aot_compile(specs if FULL else covering_specs(specs), archs=(80, 90), timeout=5400 if FULL else 600)


def test_every_launched_kernel_compiles_for_sm80_and_sm90(aot_results):
    specs, results = aot_results
    assert {r.kernel for r in results} == {s.target() for s in specs}
    errors = [f"{r.kernel} sm_{r.arch} [{r.variant}]: {r.error}" for r in results if r.error]
    assert not errors, "\n".join(errors)
    assert {r.arch for r in results} == {80, 90}


def test_no_register_spills(aot_results):
    _, results = aot_results
    spilling = [f"{r.kernel} sm_{r.arch} [{r.variant}]: {r.spills} B, {r.registers} regs"
                for r in results if r.spills]
    assert not spilling, "\n".join(spilling)
    assert all(r.registers > 0 for r in results)


def test_every_kernel_and_variant_is_covered(aot_results):
    # Every @triton.jit kernel of the package is launched by some config, in every dtype its
    # launchers can pass, with both values of each boolean constexpr that a config reaches.
    import importlib
    import pkgutil

    import scconv_triton.kernels as kernels_pkg

    specs, _ = aot_results
    launched = {s.target().split(":")[1] for s in specs}
    defined = set()
    for info in pkgutil.iter_modules(kernels_pkg.__path__):
        mod = importlib.import_module(f"{kernels_pkg.__name__}.{info.name}")
        defined |= {n for n, v in vars(mod).items() if n.endswith("_kernel") and hasattr(v, "fn")}
    assert defined <= launched, f"kernels never launched by the AOT configs: {sorted(defined - launched)}"
    ptr_types = {t for s in specs for t in s.signature.values() if t.startswith("*")}
    assert {"*fp32", "*fp16", "*bf16", "*fp64"} <= ptr_types
    flags = {}
    for s in specs:
        for k, v in s.constexprs.items():
            if isinstance(v, bool):
                flags.setdefault((s.target(), k), set()).add(v)
    for name in ("SOFTMAX", "FLAT", "FP64", "TORCH_GN", "PAIRWISE", "HAS_LOW", "HAS_P", "EVEN", "TF32", "HOLD",
                 "GN_GRAD", "HAS_DL", "HAS_ID", "CARRY"):
        seen = {v for (t, k), vals in flags.items() if k == name for v in vals}
        assert seen == {True, False}, f"constexpr {name} only compiled as {seen}"
    # the SRU's mask rule and operand (every upstream revision, and the 2023-10 hard gate)
    for name, values in (("MASK", {0, 1, 2, 3}), ("ON", {0, 1, 2})):
        seen = {s.constexprs[name] for s in specs if name in s.constexprs}
        assert seen == values, f"constexpr {name} only compiled as {seen}"


def test_specialisation_matches_the_jit():
    # The spec of a launch carries the JIT's attributes: 1 -> constexpr, multiples of 16 ->
    # divisibility, i64 past 2**31, 16-byte-aligned pointers -> divisibility.
    from scconv_triton.testing import Captured, spec_from_launch
    from scconv_triton.kernels import cru as kcru

    fn = kcru._cru_wgrad_kernel
    t = torch.empty(64, dtype=torch.float32)
    odd = torch.empty(65, dtype=torch.float32)[1:]  # 4-byte aligned only
    args = (t, odd, t, 16, 1, 7, 3, 2**33, 48, 9, 1, 3, 1)
    spec = spec_from_launch(Captured(fn, args, {"BLOCK": 256, "num_warps": 4, "grid": (1,)}))
    assert spec.signature["CIN"] == "i32" and spec.attrs.get("CIN") == "D"
    assert spec.signature["CIG"] == "constexpr" and spec.constexprs["CIG"] == 1
    assert spec.signature["COG"] == "i32" and "COG" not in spec.attrs
    assert spec.signature["TOTAL1"] == "i64" and spec.attrs.get("TOTAL1") == "D"
    assert spec.attrs.get("dwm_ptr") == "D" and "dg_ptr" not in spec.attrs
    assert spec.constexprs["BLOCK"] == 256 and spec.num_warps == 4
    try:  # the JIT's own rule, where this triton exposes it
        from triton.backends.compiler import BaseBackend
        from triton.runtime.jit import native_specialize_impl
    except ImportError:
        return
    for v in (1, 16, 7, 2**33, 48, odd, t):
        ty, attr = native_specialize_impl(BaseBackend, v, False, True, True)
        name = [k for k, a in zip(["dwm_ptr", "dg_ptr", "d1_ptr", "CIN", "CIG", "COG", "KS", "TOTAL1", "TOTAL2"],
                                  args) if a is v][0]
        assert spec.signature[name] == ty
        if ty != "constexpr":
            assert (spec.attrs.get(name) == "D") == (attr == "D"), name


def test_aot_helper_reports_a_broken_kernel(aot_results):
    # The helper must surface compile errors rather than hide them: a constexpr that is not
    # an integer cannot compile.
    specs, _ = aot_results
    spec = next(s for s in specs if any(isinstance(v, int) and not isinstance(v, bool)
                                        for v in s.constexprs.values()))
    bad = type(spec)(spec.kernel, spec.signature, {k: "not-a-number" for k in spec.constexprs},
                     spec.num_warps, spec.num_stages, spec.attrs)
    (r80,) = aot_compile([bad], archs=(80,))
    assert r80.error is not None


if __name__ == "__main__":
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    specs = captured_specs(dev)
    res = aot_compile(specs if "--all" in sys.argv else covering_specs(specs), archs=(80, 90))
    print(aot_table(res))
    sys.exit(1 if any(r.error or r.spills for r in res) else 0)
