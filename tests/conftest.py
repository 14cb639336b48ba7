"""Test harness: the same tests run compiled kernels on a GPU or interpreted ones on a CPU.

TRITON_INTERPRET must be set before any module defining @triton.jit kernels is
imported, so it is decided here, before the tests import the package. What the tests
share (DEVICE, tolerances, the error and gate-margin measures, the GPU / CPU-only
markers) lives in tests/_helpers.py.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The 3.9 FP-fusion warning is noise for the tests; keep the current default.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402

# pytest-xdist (the README's command runs one worker per core): one intra-op thread per worker,
# so the workers do not oversubscribe the cores
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _WORKERS))

from _helpers import DEVICE  # noqa: E402

# fp32 comparisons at 1e-5 need true fp32 convolutions and matmuls: on Ampere and later
# cuDNN / cuBLAS would otherwise round them to TF32 (10-bit mantissa), differently in the
# fused and the reference path. No effect on a CPU.
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture
def deterministic(monkeypatch):
    """Bitwise-reproducible cuDNN for the test (our kernels use no atomics; cuDNN's
    convolution backward picks nondeterministic algorithms unless told not to)."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_report_header(config):
    return f"scconv-triton: device={DEVICE}, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}"
