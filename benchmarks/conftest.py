"""pytest-benchmark microbenchmarks: ``pytest benchmarks/`` (not part of the default ``pytest``).

TRITON_INTERPRET is set here, before any @triton.jit module is imported, when no
CUDA device is present. Shape: SCCONV_BENCH_SHAPE="N,C,H" (default 1,16,8 under
the interpreter, 32,64,56 on a GPU). Compare runs with pytest-benchmark's own
options, e.g. ``pytest benchmarks/ --benchmark-autosave`` then
``pytest benchmarks/ --benchmark-compare``.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def bench_shape():
    spec = os.environ.get("SCCONV_BENCH_SHAPE")
    if spec:
        n, c, h = (int(v) for v in spec.split(","))
        return n, c, h
    return (32, 64, 56) if DEVICE == "cuda" else (1, 16, 8)


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture
def shape():
    return bench_shape()


def pytest_report_header(config):
    return f"scconv-triton benchmarks: device={DEVICE}, shape(N,C,H)={bench_shape()}, " \
           f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}"
