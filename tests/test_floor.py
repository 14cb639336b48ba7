"""FLOPs per launch (benchmarks/meter.py) and the roofline floor (benchmarks/floor.py).

FLOPs are checked against hand-computed values (a convolution, a matmul, a
Triton kernel with one tl.dot) and against torch's own FLOP counter on the
eager rows of the report; the floor's arithmetic against hand-priced launches;
the shortcuts the report takes to stay fast (meta-device counting, stub
composition of the fused networks, the launch memo) against the slow way.
"""
import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from _helpers import needs_interpreter
from benchmarks import floor
from benchmarks.floor import GPUS, Roofline, extrapolate_launches
from benchmarks.meter import Meter, measure_step, memo_triton_launches

needs_interp = needs_interpreter("Triton launches are counted under the interpreter")


# ----------------------------------------------------------------------------- FLOPs, by hand
def test_conv_flops_by_hand():
    conv = torch.nn.Conv2d(3, 4, 3, padding=1, bias=False)
    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    with Meter() as m:
        y = conv(x)
    # 2 FLOPs per MAC: N * Cout * Ho * Wo outputs, Cin * 3 * 3 MACs each
    fwd = 2 * (2 * 4 * 5 * 5) * (3 * 3 * 3)
    assert fwd == 10800
    assert [(r.name, r.flops, r.mm_kind, r.mm_dtype) for r in m.launches] == [
        ("convolution.default", fwd, "conv", "float32")]
    with Meter() as mb:
        y.backward(torch.ones_like(y))
    # one convolution_backward: grad input and grad weight, each as many FLOPs as the forward
    assert mb.flops == 2 * fwd


def test_matmul_flops_by_hand():
    a, b, bias = torch.randn(3, 5), torch.randn(5, 7), torch.zeros(7)
    with Meter() as m:
        torch.mm(a, b)
        torch.addmm(bias, a, b)
        a + 1  # elementwise aten ops count no FLOPs (torch's counter does not either)
    assert [r.flops for r in m.launches] == [2 * 3 * 5 * 7, 2 * 3 * 5 * 7, 0]
    assert [r.mm_kind for r in m.launches] == ["matmul", "matmul", ""]


def _dot_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def _one_dot_kernel(a_ptr, b_ptr, c_ptr, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        m = tl.arange(0, BM)
        n = tl.arange(0, BN)
        k = tl.arange(0, BK)
        a = tl.load(a_ptr + m[:, None] * K + k[None, :], mask=(m[:, None] < M) & (k[None, :] < K), other=0.0)
        b = tl.load(b_ptr + k[:, None] * N + n[None, :], mask=(k[:, None] < K) & (n[None, :] < N), other=0.0)
        c = tl.dot(a, b) * 2.0 + 1.0
        tl.store(c_ptr + m[:, None] * N + n[None, :], c, mask=(m[:, None] < M) & (n[None, :] < N))

    return _one_dot_kernel


@needs_interp
def test_triton_dot_flops_by_hand():
    kernel = _dot_kernel()
    a, b = torch.randn(10, 12), torch.randn(12, 9)
    c = torch.empty(10, 9)
    with Meter() as m:
        kernel[(2,)](a, b, c, 10, 9, 12, BM=16, BN=16, BK=16)
    (r,) = m.launches
    assert torch.allclose(c, 2 * (a @ b) + 1, atol=1e-4)
    # two programs, each a 16x16x16 block product: masked lanes are multiplied too
    assert r.flops == 2 * (2 * 16 * 16 * 16)
    assert (r.mm_kind, r.mm_dtype) == ("dot", "float32")
    # elementwise: the * 2.0 and + 1.0 on the 16x16 block, per program
    assert r.ew_flops == 2 * (2 * 16 * 16)
    # bytes: only the unmasked lanes
    assert r.bytes_read == 2 * (10 * 12 + 12 * 9) * 4 and r.bytes_written == 2 * 10 * 9 * 4


# ----------------------------------------------------------------------------- FLOPs = torch's FLOP counter
def _torch_flops(mod, x):
    x = x.detach().requires_grad_(True)
    with FlopCounterMode(display=False) as f:
        y = mod(x)
    g = torch.randn_like(y)
    with FlopCounterMode(display=False) as b:
        y.backward(g)
    return f.get_total_flops(), b.get_total_flops()


@pytest.mark.parametrize("impl,cin,cout,stride", [
    ("conv+bn", 16, 16, 1), ("reference", 16, 16, 1), ("reference", 16, 8, 2), ("conv+bn", 16, 8, 2)])
def test_step_flops_equal_torch_flop_counter(impl, cin, cout, stride):
    from benchmarks.run import build

    x = torch.randn(2, cin, 9, 9)
    r = measure_step(build(impl, cin, cout, stride), x, warmup=0)
    fwd, bwd = _torch_flops(build(impl, cin, cout, stride), x)
    assert fwd > 0 and bwd > fwd
    assert (r["fwd_flops"], r["bwd_flops"]) == (fwd, bwd)
    assert sum(ln[2] for ln in r["fwd_launch_list"]) == fwd


# ----------------------------------------------------------------------------- the floor's arithmetic
def test_floor_prices_each_launch_by_its_bound():
    g = GPUS["A100-80GB"]
    rl = Roofline(g, allow_tf32_conv=True, allow_tf32_matmul=False)
    bw = 2039e9 * floor.HBM_EFFICIENCY
    # bytes-bound: 1 GB, no FLOPs
    t, bound = rl.launch_time(["relu", 10**9, 0, 0, "", ""])
    assert bound == "bytes" and t == pytest.approx(1e9 / bw)
    # FLOP-bound fp32 convolution on TF32 tensor cores
    t, bound = rl.launch_time(["conv", 1000, 10**12, 0, "conv", "float32"])
    assert bound == "flops" and t == pytest.approx(1e12 / (156e12 * floor.TENSOR_EFFICIENCY))
    # fp32 matmul: TF32 only when torch.backends.cuda.matmul.allow_tf32 (off here)
    t, _ = rl.launch_time(["mm", 1000, 10**12, 0, "matmul", "float32"])
    assert t == pytest.approx(1e12 / (19.5e12 * floor.TENSOR_EFFICIENCY))
    # bf16 at the bf16 tensor peak; elementwise at the CUDA-core peak
    t, _ = rl.launch_time(["mm", 1000, 10**12, 0, "matmul", "bfloat16"])
    assert t == pytest.approx(1e12 / (312e12 * floor.TENSOR_EFFICIENCY))
    t, bound = rl.launch_time(["ew", 1000, 0, 10**12, "", ""])
    assert bound == "flops" and t == pytest.approx(1e12 / (19.5e12 * floor.CUDA_CORE_EFFICIENCY))
    # tiny: the minimum launch time
    t, bound = rl.launch_time(["tiny", 8, 2, 0, "matmul", "float32"])
    assert (t, bound) == (floor.MIN_LAUNCH_S, "launch")
    p = rl.price([["relu", 10**9, 0, 0, "", ""], ["tiny", 8, 0, 0, "", ""]])
    assert p["launches"] == 2 and p["s"] == pytest.approx(1e9 / bw + floor.MIN_LAUNCH_S)
    assert p["bytes_s"] == pytest.approx(1e9 / bw) and p["launch_s"] == floor.MIN_LAUNCH_S
    # a measured copy bandwidth replaces peak x efficiency
    assert Roofline(g, bandwidth_gbps=1500).launch_time(["x", 1.5e9, 0, 0, "", ""])[0] == pytest.approx(1e-3)
    # no TF32: convolutions at the FP32 peak
    assert Roofline(g, allow_tf32_conv=False).precision("conv", "float32") == "fp32"


def test_gpu_table_names_and_detection():
    for name in ("H100-SXM", "A100-80GB", "A100-40GB", "L4", "RTX-4090", "RTX-3090"):
        g = floor.find_gpu(name)
        assert g.hbm_gbps > 0 and g.tf32 > 0 and g.bf16 >= g.tf32 and g.fp16 >= g.tf32 and g.fp32 > 0
    assert floor.find_gpu("rtx 3090") is GPUS["RTX-3090"]
    with pytest.raises(SystemExit, match="unknown GPU"):
        floor.find_gpu("Voodoo 2")
    assert floor.detect_gpu("NVIDIA H100 80GB HBM3") is GPUS["H100-SXM"]
    assert floor.detect_gpu("NVIDIA A100-SXM4-40GB", 40 * 2**30) is GPUS["A100-40GB"]
    assert floor.detect_gpu("NVIDIA A100-SXM4-80GB", 80 * 2**30) is GPUS["A100-80GB"]
    assert floor.detect_gpu("NVIDIA GeForce RTX 3090") is GPUS["RTX-3090"]
    assert floor.detect_gpu("NVIDIA H200") is GPUS["H200"]
    assert floor.detect_gpu("Some Other Card") is None


def test_extrapolate_launches_per_launch():
    l1 = [["conv", 100, 1000, 0, "conv", "float32"], ["w", 50, 0, 3, "", ""]]
    l2 = [["conv", 180, 2000, 0, "conv", "float32"], ["w", 50, 0, 3, "", ""]]
    assert extrapolate_launches(l1, l2, 5) == [["conv", 420, 5000, 0, "conv", "float32"], ["w", 50, 0, 3, "", ""]]
    with pytest.raises(ValueError, match="differ"):
        extrapolate_launches(l1, l2[:1], 5)


# ----------------------------------------------------------------------------- the report's shortcuts
def _small_scconv_densenet():
    """A small DenseNet (two dense layers 128 -> 32, transitions) with reference SCConvs."""
    from scconv_triton import convert, models

    net = models.DenseNet(32, (2, 1, 1, 1), 64, num_classes=10)
    convert(net, kernel_size=3, inplace=True, fused=False, strict=True)
    return net


def test_meta_device_counts_equal_cpu_counts():
    # networks.py counts whole networks on the meta device at the study's batch
    pytest.importorskip("scconv_triton.models")
    from benchmarks import networks

    meta = networks.network_launches(_small_scconv_densenet, 2, size=32, device="meta")
    cpu = networks.network_launches(_small_scconv_densenet, 2, size=32, device="cpu")
    assert meta[0] == cpu[0] and meta[1] == cpu[1]
    assert len(meta[0]) > 100 and sum(ln[2] for ln in meta[0]) > 0


def test_stub_composition_equals_whole_network():
    # the fused networks are priced as (network with SCConv stubs) + (each SCConv call's
    # per-layer counts); on the reference network that must give the whole count
    pytest.importorskip("scconv_triton.models")
    from benchmarks import networks
    from benchmarks.run import build as build_row
    build = _small_scconv_densenet
    whole_f, whole_b, _ = networks.network_launches(build, 2, size=32, device="meta")
    f, b, inst = networks.network_launches(build, 2, size=32, stub=True, device="meta")
    assert inst and all(ln[0] for ln in f)
    for cin, cout, h, s, _ in inst:
        r = measure_step(build_row("reference", cin, cout, s), torch.randn(2, cin, h, h), warmup=0)
        f = f + r["fwd_launch_list"]
        b = b + r["bwd_launch_list"]
    assert sorted(map(tuple, f)) == sorted(map(tuple, whole_f))
    assert sorted(map(tuple, b)) == sorted(map(tuple, whole_b))


@needs_interp
def test_launch_memo_counts_the_same():
    import scconv_triton

    torch.manual_seed(0)
    mod = scconv_triton.SCConv(16, out_channels=8, stride=2, backend="triton")
    x = torch.randn(2, 16, 9, 9)
    plain = measure_step(mod, x, warmup=0)
    cache = {}
    with memo_triton_launches(cache), np.errstate(all="ignore"):  # skipped launches leave garbage
        first = measure_step(mod, x, warmup=0)
        second = measure_step(mod, x, warmup=0)  # every launch from the memo
    assert len(cache) > 0
    for k in ("fwd_launch_list", "bwd_launch_list", "fwd_bytes", "bwd_bytes", "fwd_ew_flops", "saved_bytes"):
        assert first[k] == plain[k] and second[k] == plain[k], k


def test_reference_network_floor_ratios_match_the_hand_check():
    # issue 11's hand check (HBM 90%, convolutions 60% of dense TF32, 2.5 us per launch):
    # reference SCConv-R50 / ResNet-50 at batch 128, 224x224, fp32: 1.66x on an A100 80GB,
    # 1.34x on an RTX 3090, 1.90x on an H100 SXM
    pytest.importorskip("scconv_triton.models")
    from benchmarks import networks

    counted = networks.count_networks(None, which=["ResNet-50", "SCConv-R50 (reference)"], quiet=True)
    for gpu, expected in (("A100-80GB", 1.66), ("RTX-3090", 1.34), ("H100-SXM", 1.90)):
        rows = networks.price_networks(counted, Roofline(gpu, allow_tf32_conv=True, allow_tf32_matmul=False))
        assert rows[0]["batch"] == 128 and "error" not in rows[1]
        assert rows[1]["floor_ratio"] == pytest.approx(expected, rel=0.1), gpu
    text = networks.format_floor(rows, Roofline("H100-SXM"))
    assert "study, measured: 1.51x" in text


@needs_interp
@pytest.mark.parametrize("impl,cin,cout,h,stride", [("ours", 16, 16, 8, 1), ("ours-rc", 16, 8, 9, 2)])
def test_per_sample_inference_equals_interpreting(impl, cin, cout, h, stride):
    # run.py counts batch 2 from batch 1 where a launch is per sample (meter.per_sample_from)
    from benchmarks import run as bench

    c1 = bench.count_row(impl, cin, cout, h, stride, 1, memo=False)
    full = bench.count_row(impl, cin, cout, h, stride, 2, memo=False)
    inferred = bench.count_row(impl, cin, cout, h, stride, 2, memo=False, like=c1)
    assert inferred["inferred_launches"] >= 4 and full["inferred_launches"] == 0
    for k in ("fwd_launch_list", "bwd_launch_list", "fwd_bytes", "bwd_bytes", "fwd_flops", "bwd_ew_flops",
              "saved_bytes"):
        assert inferred[k] == full[k], k


def test_count_networks_composes_fused_networks_from_layer_counts():
    # count_networks prices the fused networks as stubs + per-layer counts at batch 1 and 2
    # extrapolated to the study's batch; fed the reference layers' counts it must give
    # the whole reference network's launches
    pytest.importorskip("scconv_triton.models")
    from benchmarks import networks
    from benchmarks import run as bench

    asked = []

    def layer_counts(keys):
        asked.extend(keys)
        return {k: {b: bench.count_row("reference", k[0], k[1], k[2], k[3], b) for b in (1, 2)} for k in keys}

    # 64x64: the last dense block at 2x2 (at 1x1 autograd reduces a broadcast at batch 2 only,
    # so batch 1 and 2 are not the same launches there)
    counted = networks.count_networks(layer_counts, size=64, which=["SCConv-D121 (reference)", "SCConv-D121 (ours)"],
                                      quiet=True)
    ref, ours = counted
    assert "error" not in ref and "error" not in ours, (ref.get("error"), ours.get("error"))
    assert sorted(asked) == [(128, 32, 2, 1), (128, 32, 4, 1), (128, 32, 8, 1), (128, 32, 16, 1)]
    assert ours["distinct_layers"] == 4 and ours["scconv_calls"] == 6 + 12 + 24 + 16
    assert ref["batch"] == ours["batch"] == 64
    for k in ("fwd", "bwd"):
        assert sorted(map(tuple, ours[k])) == sorted(map(tuple, ref[k])), k
