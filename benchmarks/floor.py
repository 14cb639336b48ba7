"""Speed of light: the roofline floor of counted launches on a named GPU.

The model (DESIGN.md, "Measuring"): every launch the meter counted
(benchmarks/meter.py: bytes, matrix FLOPs, elementwise FLOPs) takes at least

    max(bytes / (HBM bandwidth * HBM_EFFICIENCY),
        matrix FLOPs / (tensor peak of its dtype * TENSOR_EFFICIENCY),
        elementwise FLOPs / (FP32 CUDA-core peak * CUDA_CORE_EFFICIENCY),
        MIN_LAUNCH_S)

and a step takes at least the sum over its launches (launches run one after
another on one stream). Each term is one resource's ceiling; the largest says
what bounds the launch ("bytes", "flops" or "launch"). It is a model, not a
measurement: it assumes every launch moves only the bytes an ideal kernel for it
would (the meter's count), perfect overlap of memory and math inside a launch,
and no overlap between launches.

Which peak: convolutions (aten ``convolution*``) in fp32 run on TF32 tensor
cores when ``torch.backends.cudnn.allow_tf32`` (PyTorch's default: True), else
at the FP32 peak; aten matmuls (``mm``, ``addmm``, ``bmm``) in fp32 use TF32 when
``torch.backends.cuda.matmul.allow_tf32`` (default: False); Triton ``tl.dot`` in
fp32 follows the cuDNN flag (this library's rule, DESIGN.md "Precision"). bf16 and
fp16 use their dense tensor peaks with fp32 accumulation (what PyTorch asks
cuBLAS / cuDNN for; GeForce cards run that at half their fp16-accumulate rate),
fp64 the FP64 tensor peak where there is one.

Check against the study (README.md): with the parameters below, the reference
SCConv-R50 / ResNet-50 step at batch 128 (224x224, fp32) comes out at 1.34x on
an RTX 3090 and 1.66x on an A100 80GB around the study's measured 1.51x, and
SCConv-D121 / DenseNet-121 at batch 64 at 1.88x / 2.26x around 2.04x (the issue
that introduced this model checked those by hand; ``python benchmarks/run.py
--gpu A100-80GB`` and ``--gpu RTX-3090`` print what this code computes).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = [
    "GPU", "GPUS", "HBM_EFFICIENCY", "TENSOR_EFFICIENCY", "CUDA_CORE_EFFICIENCY", "MIN_LAUNCH_S",
    "Roofline", "find_gpu", "detect_gpu", "extrapolate_launches", "STUDY_RATIOS",
]

# ----------------------------------------------------------------------------- parameters
#: Fraction of the HBM (or GDDR) peak a streaming kernel reaches (a device-to-device
#: copy reaches ~90% on A100 / H100). On a real GPU the measured copy bandwidth is
#: used instead of peak x this factor.
HBM_EFFICIENCY = 0.90
#: Fraction of the dense tensor peak a cuDNN convolution or a GEMM reaches at these
#: shapes (ResNet-50's convolutions run at ~50-70% of TF32 peak in practice).
TENSOR_EFFICIENCY = 0.60
#: Fraction of the FP32 CUDA-core peak elementwise math reaches (it never bounds a
#: launch here: elementwise kernels are bytes-bound by a wide margin).
CUDA_CORE_EFFICIENCY = 0.60
#: Shortest time one launch takes: launch latency plus a minimal kernel (a few
#: microseconds on current drivers; the hand check used 2.5 us).
MIN_LAUNCH_S = 2.5e-6

#: The study's measured training-time ratios (Food-101 train time, README.md):
#: SCConv-R50 / ResNet-50 = 7:32:43 / 4:59:50, SCConv-D121 / DenseNet-121 = 13:47:32 / 6:45:46.
STUDY_RATIOS = {"R": 27163 / 17990, "D": 49652 / 24346}


@dataclass(frozen=True)
class GPU:
    """Peak rates of one card. Bandwidth in GB/s (1e9 B/s); compute in TFLOP/s, dense (no sparsity)."""

    name: str
    hbm_gbps: float
    tf32: float  # tensor cores, TF32 inputs, fp32 accumulate
    bf16: float  # tensor cores, bf16 inputs, fp32 accumulate
    fp16: float  # tensor cores, fp16 inputs, fp32 accumulate
    fp32: float  # CUDA cores, FMA counted as 2 FLOPs
    fp64: float  # CUDA cores
    fp64_tensor: float = 0.0  # tensor cores (A100 / H100 only)
    patterns: tuple = field(default=(), compare=False)  # regexes on torch.cuda.get_device_name()

    def matrix_peak(self, prec: str) -> float:
        """TFLOP/s for a precision name: tf32, bf16, fp16, fp32, fp64."""
        if prec == "fp64":
            return self.fp64_tensor or self.fp64
        return getattr(self, prec)


# Sources (vendor datasheets and architecture whitepapers; sparsity figures halved):
GPUS = {
    # NVIDIA H100 Tensor Core GPU datasheet, "H100 SXM" column: HBM3 3.35 TB/s; FP64 34,
    # FP64 Tensor 67, FP32 67, TF32 Tensor 989*, BF16 / FP16 Tensor 1,979* TFLOPS (* with sparsity).
    "H100-SXM": GPU("H100 SXM", 3350, 494.7, 989.4, 989.4, 66.9, 33.5, 66.9,
                    patterns=(r"H100.*(SXM|HBM3)", r"H100$")),
    # Same datasheet, "H100 PCIe": HBM2e 2.0 TB/s; FP64 26, FP64 Tensor 51, FP32 51, TF32 756*,
    # BF16 / FP16 1,513* TFLOPS.
    "H100-PCIe": GPU("H100 PCIe", 2000, 378.0, 756.5, 756.5, 51.2, 25.6, 51.2, patterns=(r"H100.*PCIe",)),
    # NVIDIA H200 Tensor Core GPU datasheet, "H200 SXM": HBM3e 4.8 TB/s; compute as H100 SXM.
    "H200": GPU("H200 SXM", 4800, 494.7, 989.4, 989.4, 66.9, 33.5, 66.9, patterns=(r"H200",)),
    # NVIDIA A100 Tensor Core GPU datasheet, "A100 80GB SXM": HBM2e 2,039 GB/s; FP64 9.7, FP64
    # Tensor 19.5, FP32 19.5, TF32 156 (312*), BF16 / FP16 312 (624*) TFLOPS.
    "A100-80GB": GPU("A100 80GB", 2039, 156.0, 312.0, 312.0, 19.5, 9.7, 19.5, patterns=(r"A100.*80G",)),
    # Same datasheet, "A100 40GB" (SXM): HBM2 1,555 GB/s; compute as above.
    "A100-40GB": GPU("A100 40GB", 1555, 156.0, 312.0, 312.0, 19.5, 9.7, 19.5, patterns=(r"A100",)),
    # NVIDIA L4 Tensor Core GPU datasheet: GDDR6 300 GB/s; FP32 30.3, TF32 120*, BF16 / FP16 242*
    # TFLOPS; FP64 not listed: Ada's 1/64 of FP32.
    "L4": GPU("L4", 300, 60.0, 121.0, 121.0, 30.3, 0.47, patterns=(r"\bL4\b",)),
    # NVIDIA Ada GPU Architecture whitepaper (v2.1), appendix, GeForce RTX 4090: GDDR6X 1,008 GB/s;
    # FP32 82.6, TF32 Tensor 82.6 (165.2*), FP16 / BF16 Tensor with FP32 accumulate 165.2 (330.4*),
    # FP64 1.3 TFLOPS.
    "RTX-4090": GPU("RTX 4090", 1008, 82.6, 165.2, 165.2, 82.6, 1.29, patterns=(r"RTX 4090",)),
    # NVIDIA Ampere GA102 GPU Architecture whitepaper, GeForce RTX 3090: GDDR6X 936 GB/s; FP32 35.6,
    # TF32 Tensor 35.6 (71*), FP16 / BF16 Tensor with FP32 accumulate 71 (142*), FP64 0.556 TFLOPS.
    "RTX-3090": GPU("RTX 3090", 936, 35.6, 71.0, 71.0, 35.6, 0.556, patterns=(r"RTX 3090",)),
}
DEFAULT_GPU = "H100-SXM"


def _norm(s: str) -> str:
    return re.sub(r"[^a-z0-9]", "", s.lower())


def find_gpu(name: str) -> GPU:
    """The table entry for ``name`` (key or display name, case, spaces, dashes ignored)."""
    n = _norm(name)
    for key, g in GPUS.items():
        if n in (_norm(key), _norm(g.name)):
            return g
    raise SystemExit(f"unknown GPU {name!r}; choose from {', '.join(GPUS)}")


def detect_gpu(device_name: str, total_memory: int | None = None) -> GPU | None:
    """The table entry for a ``torch.cuda.get_device_name()`` string, or None."""
    if "A100" in device_name and total_memory is not None:
        return GPUS["A100-80GB" if total_memory > 60 * 2**30 else "A100-40GB"]
    for g in GPUS.values():
        if any(re.search(p, device_name) for p in g.patterns):
            return g
    return None


# ----------------------------------------------------------------------------- launches
# A launch is benchmarks.meter.Launch.as_list(): [name, bytes, flops, ew_flops, mm_kind, mm_dtype].
_NUM = (1, 2, 3)


def extrapolate_launches(l1: list, l2: list, n: int, b1: int = 1, b2: int = 2) -> list:
    """Per-launch linear extrapolation of counts at batches b1 and b2 to batch n.

    Every tensor a launch touches is either proportional to the batch or
    independent of it, so each launch's bytes and FLOPs are affine in the batch.
    The two lists must be the same launches in the same order.
    """
    if len(l1) != len(l2) or any(a[0] != b[0] for a, b in zip(l1, l2)):
        raise ValueError(f"launch lists at batch {b1} and {b2} differ ({len(l1)} vs {len(l2)} launches); "
                         "cannot extrapolate per launch")
    out = []
    for a, b in zip(l1, l2):
        row = list(a)
        for i in _NUM:
            v = a[i] + (n - b1) * (b[i] - a[i]) / (b2 - b1)
            row[i] = max(int(round(v)), 0)
        out.append(row)
    return out


class Roofline:
    """Prices launches on one GPU (see the module docstring for the model)."""

    def __init__(self, gpu: GPU | str = DEFAULT_GPU, *, bandwidth_gbps: float | None = None, dtype: str = "float32",
                 allow_tf32_conv: bool | None = None, allow_tf32_matmul: bool | None = None,
                 hbm_efficiency: float = HBM_EFFICIENCY, tensor_efficiency: float = TENSOR_EFFICIENCY,
                 cuda_core_efficiency: float = CUDA_CORE_EFFICIENCY, min_launch_s: float = MIN_LAUNCH_S):
        import torch

        self.gpu = find_gpu(gpu) if isinstance(gpu, str) else gpu
        if bandwidth_gbps:  # measured (a device-to-device copy): already what a kernel can reach
            self.bandwidth = bandwidth_gbps * 1e9
            self.bandwidth_source = f"measured copy {bandwidth_gbps:.0f} GB/s"
        else:
            self.bandwidth = self.gpu.hbm_gbps * 1e9 * hbm_efficiency
            self.bandwidth_source = f"{self.gpu.hbm_gbps:.0f} GB/s x {hbm_efficiency:.2f}"
        self.dtype = dtype
        self.allow_tf32_conv = torch.backends.cudnn.allow_tf32 if allow_tf32_conv is None else allow_tf32_conv
        self.allow_tf32_matmul = (torch.backends.cuda.matmul.allow_tf32 if allow_tf32_matmul is None
                                  else allow_tf32_matmul)
        self.tensor_efficiency = tensor_efficiency
        self.cuda_core_efficiency = cuda_core_efficiency
        self.min_launch_s = min_launch_s

    # -- peaks
    def precision(self, kind: str, dtype: str) -> str:
        """Which peak a matrix launch of ``kind`` on ``dtype`` operands runs at."""
        dtype = dtype or self.dtype
        if dtype in ("bfloat16", "bf16"):
            return "bf16"
        if dtype in ("float16", "fp16", "half"):
            return "fp16"
        if dtype in ("float64", "fp64", "double"):
            return "fp64"
        tf32 = self.allow_tf32_matmul if kind == "matmul" else self.allow_tf32_conv
        return "tf32" if tf32 else "fp32"

    def matrix_rate(self, kind: str, dtype: str) -> float:
        """Reachable FLOP/s of a matrix launch."""
        return self.gpu.matrix_peak(self.precision(kind, dtype)) * 1e12 * self.tensor_efficiency

    @property
    def core_rate(self) -> float:
        peak = self.gpu.fp64 if self.dtype in ("float64", "fp64") else self.gpu.fp32
        return peak * 1e12 * self.cuda_core_efficiency

    def describe(self) -> str:
        conv = self.precision("conv", self.dtype)
        return (f"{self.gpu.name}: memory {self.bandwidth_source}, convolutions {conv.upper()} "
                f"{self.gpu.matrix_peak(conv):.0f} TFLOP/s x {self.tensor_efficiency:.2f}, "
                f"{self.min_launch_s * 1e6:.1f} us per launch")

    # -- pricing
    def launch_time(self, launch) -> tuple[float, str]:
        """(seconds, bound) of one launch (a Launch.as_list() row)."""
        _, nbytes, flops, ew, kind, dt = launch[:6]
        t_bytes = nbytes / self.bandwidth
        t_mm = flops / self.matrix_rate(kind or "matmul", dt) if flops else 0.0
        t_ew = ew / self.core_rate if ew else 0.0
        t_flops = max(t_mm, t_ew)
        t = max(t_bytes, t_flops, self.min_launch_s)
        bound = "launch" if t == self.min_launch_s and t > max(t_bytes, t_flops) else (
            "flops" if t_flops > t_bytes else "bytes")
        return t, bound

    def price(self, launches) -> dict:
        """Floor of a sequence of launches: total seconds and the seconds of each bound's launches."""
        out = {"s": 0.0, "bytes_s": 0.0, "flops_s": 0.0, "launch_s": 0.0, "launches": 0}
        for ln in launches:
            t, bound = self.launch_time(ln)
            out["s"] += t
            out[bound + "_s"] += t
            out["launches"] += 1
        return out

    def step_floor(self, fwd, bwd) -> dict:
        """Floor columns of a training step from its forward and backward launch lists (ms, FLOPs)."""
        pf, pb = self.price(fwd), self.price(bwd)
        return {
            "launches": pf["launches"] + pb["launches"],
            "floor_fwd_flops": sum(ln[2] for ln in fwd), "floor_bwd_flops": sum(ln[2] for ln in bwd),
            "floor_fwd_ms": pf["s"] * 1e3, "floor_bwd_ms": pb["s"] * 1e3, "floor_ms": (pf["s"] + pb["s"]) * 1e3,
            "floor_bytes_ms": (pf["bytes_s"] + pb["bytes_s"]) * 1e3,
            "floor_flops_ms": (pf["flops_s"] + pb["flops_s"]) * 1e3,
            "floor_launch_ms": (pf["launch_s"] + pb["launch_s"]) * 1e3,
        }
