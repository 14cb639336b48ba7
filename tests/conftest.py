"""Test harness: the same tests run compiled kernels on a GPU or interpreted ones on a CPU.

TRITON_INTERPRET must be set before any module defining @triton.jit kernels is
imported, so it is decided here, before the tests import the package.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The 3.9 FP-fusion warning is noise for the tests; keep the current default.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_report_header(config):
    return f"scconv-triton: device={DEVICE}, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}"
