"""What every kernel test shares: the device, the tolerances, the error and gate-margin measures.

One place, so that a GPU machine and a CPU run the same tests: ``DEVICE`` is "cuda" when
a GPU is present (kernels compiled) and "cpu" otherwise (tests/conftest.py turned the
Triton interpreter on before anything imported a kernel). Tests build every tensor and
module on ``DEVICE``; the markers below say which tests exist on one kind of machine only,
and why.

Import as ``from _helpers import ...`` (pytest puts tests/ on sys.path; no package).
"""
import os

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"
# set by tests/conftest.py without CUDA, before the kernel modules are imported
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# ------------------------------------------------------------------------------- markers
# GPU-only: the feature does not exist on a CPU (fp16 autocast, CUDA graphs, device guards,
# tensors past 2**31 elements, timed reports).
# ``@gpu`` on a test, ``pytest.param(..., marks=GPU)`` on one parameter; `pytest -m gpu` runs them all.
GPU = (pytest.mark.gpu, pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device"))
TWO_GPUS = (pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices"))


def _marked(marks):
    def apply(fn):
        for m in marks:
            fn = m(fn)
        return fn
    return apply


gpu = _marked(GPU)
two_gpus = _marked(TWO_GPUS)


def cpu_only(why: str):
    """A test of something only the CPU path has (the interpreter's hooks, the CPU counting
    path of the report); on a GPU machine it is skipped with ``why``."""
    return pytest.mark.skipif(ON_GPU, reason=f"CPU only: {why}")


def needs_interpreter(why: str):
    return pytest.mark.skipif(not INTERPRET, reason=f"needs the Triton interpreter (CPU): {why}")


# ------------------------------------------------------------------------------- tolerances
# Relative-norm tolerance of the fused path against the reference run in the same dtype.
# fp64: both paths compute in fp64 (the interpreter and a GPU alike); fp32: where the gate
# takes the same decisions (see gate_margin). TF32 is off for the whole suite (conftest.py),
# or cuDNN / cuBLAS would round fp32 convolutions to 10 mantissa bits on a GPU.
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}

# 16-bit inputs against the fp64 reference on the same (rounded) values, LOW_TOL[(test, dtype)]
# = {kind: tolerance} (kinds: low_precision_kind below): about 3x the largest
# error the implementation showed over seeds 0-4 (the comments), measured with
# `python tests/_measure_low_precision.py` (CPU, interpreter). Parameter gradients are sums
# over the batch and the image of products of rounded values, hence larger.
LOW_TOL = {
    # test_sru.py::test_half_precisions (NCHW and channels_last). Measured max:
    #   fp16 out 1.83e-4, out-max 3.03e-4, dx 2.18e-4, param 2.82e-4
    #   bf16 out 2.94e-3, out-max 4.83e-3, dx 3.60e-3, param 5.55e-3
    ("sru", torch.float16): {"out": 5.5e-4, "out-max": 9e-4, "dx": 6.5e-4, "param": 8.5e-4},
    ("sru", torch.bfloat16): {"out": 9e-3, "out-max": 1.5e-2, "dx": 1.1e-2, "param": 1.7e-2},
    # test_cru.py::test_low_precision_against_fp64_reference (default, stride2_odd_cl). Measured max:
    #   fp16 out 4.11e-4, dx 6.00e-4, param 1.13e-3
    #   bf16 out 6.41e-3, dx 7.40e-3, param 1.06e-2
    ("cru", torch.float16): {"out": 1.2e-3, "dx": 1.8e-3, "param": 3.4e-3},
    ("cru", torch.bfloat16): {"out": 1.9e-2, "dx": 2.2e-2, "param": 3.2e-2},
    # test_scconv.py::test_half_precisions_as_good_as_the_reference_in_that_dtype. Measured max:
    #   fp16 out 4.48e-4, dx 8.05e-4, param 8.85e-4
    #   bf16 out 6.81e-3, dx 9.47e-3, param 1.19e-2
    ("scconv", torch.float16): {"out": 1.35e-3, "dx": 2.4e-3, "param": 2.7e-3},
    ("scconv", torch.bfloat16): {"out": 2e-2, "dx": 2.8e-2, "param": 3.6e-2},
    # test_compile_amp.py::test_autocast_runs_fused_and_matches_reference: fp32 SCConv and input
    # computed in the autocast dtype. Measured max (bf16): out 8.17e-3, dx 1.15e-2, param 1.16e-2.
    # fp16 autocast exists on CUDA only and has not been measured yet: the 16-bit-input
    # SCConv's fp16 tolerances (the kernels see the same rounded values).
    ("autocast-scconv", torch.float16): {"out": 1.35e-3, "dx": 2.4e-3, "param": 2.7e-3},
    ("autocast-scconv", torch.bfloat16): {"out": 2.5e-2, "dx": 3.5e-2, "param": 3.5e-2},
    # test_cru.py::test_autocast_runs_in_the_autocast_dtype. Measured max (bf16): out 6.41e-3,
    # dx 7.40e-3, param 1.06e-2; fp16 (CUDA only, not measured yet): the 16-bit-input CRU's.
    ("autocast-cru", torch.float16): {"out": 1.2e-3, "dx": 1.8e-3, "param": 3.4e-3},
    ("autocast-cru", torch.bfloat16): {"out": 1.9e-2, "dx": 2.2e-2, "param": 3.2e-2},
}


def low_precision_kind(label: str) -> str:
    """Which LOW_TOL entry a measured quantity takes: "out" (the output's relative-norm error,
    also "out-..." variants), "out-max" (the largest elementwise |y - y64| / (1 + |y64|)),
    "dx" (the input gradient, also named "input"), or "param" (any parameter's gradient)."""
    if label == "out-max-elementwise":
        return "out-max"
    if label == "out" or label.startswith("out-"):
        return "out"
    return "dx" if label in ("dx", "input") else "param"


def low_tol(test: str, dtype: torch.dtype, label: str) -> float:
    return LOW_TOL[(test, dtype)][low_precision_kind(label)]


# ------------------------------------------------------------------------------- measures
def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error ||a - b|| / ||b|| in float64 (an all-zero b divides by 1)."""
    a, b = a.detach().double(), b.detach().double()
    den = b.norm()
    return ((a - b).norm() / torch.where(den > 0, den, torch.ones_like(den))).item()


def gate_r(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, group_num: int, eps: float,
           torch_gn: bool) -> torch.Tensor:
    """r = sigmoid(gn(x) * w_gamma) in float64 from x's exact values, with the reference's
    own GroupNorm (torch.nn.GroupNorm or reference.GroupBatchnorm2d)."""
    from scconv_triton import reference as ref

    c = x.shape[1]
    gn = torch.nn.GroupNorm(group_num, c, eps=eps) if torch_gn else ref.GroupBatchnorm2d(c, group_num, eps)
    gn = gn.double().to(x.device)
    with torch.no_grad():
        w = weight.detach().double().reshape(-1)
        gn.weight.copy_(w.view_as(gn.weight))
        gn.bias.copy_(bias.detach().double().reshape(-1).view_as(gn.bias))
        g = gn(x.detach().double())
        return torch.sigmoid(g * (w / w.sum()).view(1, -1, 1, 1))


def sru_gate_r(sru: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """gate_r for an SRU module (reference or fused: they share the attributes)."""
    return gate_r(x, sru.gn.weight, sru.gn.bias, sru.group_num, sru.gn.eps, sru.torch_gn)


def gate_margin(sru: torch.nn.Module, x: torch.Tensor) -> float:
    """min |r - tau| over x: how far the input keeps every gate value from the threshold.

    The gate r > tau is discontinuous (SPEC.md): two correct implementations may flip a
    decision where r lies within rounding of tau, so comparisons in fp32 and lower need a
    margin above that rounding as a precondition (never a filter on the result)."""
    return (sru_gate_r(sru, x) - sru.gate_treshold).abs().min().item()


def draw_away_from_gate(sru: torch.nn.Module, make, margin: float, tries: int = 50) -> torch.Tensor:
    """Call ``make()`` until its tensor keeps every gate value ``margin`` away from tau."""
    for _ in range(tries):
        x = make()
        if gate_margin(sru, x) > margin:
            return x
    raise AssertionError(f"could not draw an input whose gate values stay {margin:g} away from tau")
