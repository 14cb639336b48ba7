"""benchmarks/run.py and benchmarks/networks.py, including the GPU path with fake timers.

The GPU path (do_bench timings, CUDA memory statistics, the device-to-device copy
bandwidth, torch.compile) also runs without a GPU: on CPU tensors with those functions
replaced by fakes, so the code that only a GPU machine runs for real cannot rot. On a
GPU machine the same tests run on CUDA tensors (counts come from the CPU subprocess
under the interpreter, as in a real run), and test_gpu_report times the fused rows for
real. Shapes are tiny. Every row of ours must be counted (and timed where times are
on): an "error" row for the fused path fails.
"""
import io
import json
import os

import pytest
import torch

from _helpers import DEVICE, ON_GPU, cpu_only, gpu
from benchmarks import run as bench

SHAPE = "16@8"  # SCConv(16) on 8x8


def _args(*argv):
    # whole networks have their own tests below; keep the layer-level runs small
    return bench.parse_args(["--quiet", "--no-networks", "--no-net-floor", "--shapes", SHAPE, *argv])


def _row(res, impl):
    (r,) = [r for r in res["rows"] if r["impl"] == impl]
    return r


class FakeTimer:
    """triton.testing.do_bench stand-in: runs fn a few times, returns a fixed 'median'."""

    def __init__(self, ms=2.0, reps=2):
        self.ms, self.reps, self.calls = ms, reps, 0

    def __call__(self, fn, warmup=25, rep=100, grad_to_none=None, quantiles=None, return_mode="mean"):
        assert return_mode == "median"
        for _ in range(self.reps):
            for t in grad_to_none or ():
                t.grad = None
            fn()
        self.calls += 1
        return self.ms


@pytest.fixture
def fake_gpu(monkeypatch):
    """Replace do_bench and the CUDA memory / sync functions; return the fake state."""
    import triton.testing

    state = {"alloc": 1000, "peak": 5000, "resets": 0, "syncs": 0}
    timer = FakeTimer()
    monkeypatch.setattr(triton.testing, "do_bench", timer)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: state.__setitem__("syncs", state["syncs"] + 1))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: state["alloc"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: state["peak"])

    def reset(device=None):
        state["resets"] += 1

    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset)
    state["timer"] = timer
    return state


def _assert_ours_counted(res, timed):
    for impl in ("ours", "ours-s1", "ours-rc"):
        for r in [r for r in res["rows"] if r["impl"] == impl]:
            assert "error" not in r, r  # the fused path must run, not be reported as n/a
            assert r["fwd_launches"] > 0 and r["fwd_bytes"] > 0 and r["bwd_bytes"] > 0, r
            assert r["fwd_launches_triton"] > 0 and r["bwd_launches_triton"] > 0, r
            if timed:
                assert r["fwd_ms"] > 0 and r["bwd_ms"] >= 0 and r["fwdbwd_ms"] > 0 and r["gbps"] > 0, r


def test_default_path_counts_and_prints(tmp_path):
    """`python benchmarks/run.py` as it runs by default on this machine: on a CPU the counted
    columns at batch 1; on a GPU also the timed ones at batch 64 (counts extrapolated from
    batch 1 and 2, counted in a CPU subprocess). torch.compile is left out on a GPU (its
    compile time; test_gpu_path_with_fake_timers covers that row)."""
    impls = ["reference", "ours", "ours-s1", "ours-rc", "conv+bn"]
    out = io.StringIO()
    jpath = tmp_path / "r.json"
    res = bench.run(_args("--json", str(jpath), *(["--impls", ",".join(impls)] if ON_GPU else [])), stream=out)
    text = out.getvalue()
    batch = 64 if ON_GPU else 1
    assert [r["impl"] for r in res["rows"]] == impls
    ref = _row(res, "reference")
    assert ref["fwd_launches"] == 28 and ref["bwd_launches"] == 41
    assert ref["S"] == batch * 16 * 8 * 8 * 4
    assert ref["saved_bytes"] > 0 and "error" not in ref
    cb = _row(res, "conv+bn")
    assert (cb["fwd_launches"], cb["bwd_launches"]) == (3, 2)
    _assert_ours_counted(res, timed=ON_GPU)
    # ours moves less than the reference (DESIGN.md's claim, counted by the meter)
    assert _row(res, "ours")["fwd_bytes"] < ref["fwd_bytes"]
    assert "reference" in text and "conv+bn" in text and "fwd S" in text and "n/a" not in text
    assert ("%copy" in text) == ON_GPU and ("f+b ms" in text) == ON_GPU  # timing columns on a GPU only
    # floor columns at the floor batch (64 on a CPU, the run's batch on a GPU), from counts at
    # batch 1 and 2 extrapolated per launch
    assert "floor f+b" in text and (ON_GPU or "H100 SXM" in text)
    assert ref["floor_batch"] == (batch if ON_GPU else bench.CPU_FLOOR_BATCH)
    assert ref["floor_ms"] == pytest.approx(ref["floor_fwd_ms"] + ref["floor_bwd_ms"])
    assert cb["floor_fwd_flops"] == ref["floor_batch"] * cb["fwd_flops"]  # conv FLOPs scale with N
    assert ref["floor_fwd_flops"] == ref["floor_batch"] * ref["fwd_flops"]
    data = json.loads(jpath.read_text())
    assert data["rows"][0]["fwd_launches"] == 28
    assert data["meta"]["batch"] == batch


@cpu_only("the layer counts run in process")
def test_floor_counts_the_floor_batchs_path(monkeypatch):
    # where stage 2's batch-dependent choice (ops.stage2.dw_pass_pays) differs between the
    # counted batches and the floor's, the floor extrapolates counts of the floor batch's path:
    # the same floor as counting at that batch. By bytes alone SCConv(64) at 6 x 6 takes the dw
    # pass up to batch 3.
    from scconv_triton.ops import stage2 as ops_s2

    monkeypatch.setattr(ops_s2, "LAUNCH_BYTES", 0)
    assert not bench._same_dispatch(64, 64, 6, 1, 8)
    res = bench.run(bench.parse_args(["--quiet", "--no-networks", "--no-net-floor", "--shapes", "64@6", "--impls",
                                      "ours", "--floor-batch", "8"]), stream=io.StringIO())
    row = _row(res, "ours")
    assert "floor_error" not in row and row["floor_batch"] == 8, row
    c8 = bench.count_row("ours", 64, 64, 6, 1, 8)
    want = bench.row_floor(c8, None, 8, bench.Roofline(bench.find_gpu(bench.DEFAULT_GPU), dtype="float32"), 8)
    for k in ("floor_fwd_ms", "floor_bwd_ms", "floor_bwd_flops", "floor_bytes_ms", "floor_launch_ms"):
        assert row[k] == pytest.approx(want[k], rel=1e-9), k
    # a row at a batch that is not counted (a GPU run's 64, from counts at 1 and 2): its counted
    # columns too are that batch's path, extrapolated; the path is counted once for both uses
    recounts = []
    count_row = bench.count_row

    def spy(*a, **kw):
        if os.environ.get("SCCONV_DISPATCH_BATCH"):
            recounts.append(a[5])
        return count_row(*a, **kw)

    monkeypatch.setattr(bench, "count_row", spy)
    res = bench.run(bench.parse_args(["--quiet", "--no-networks", "--no-net-floor", "--shapes", "64@6", "--impls",
                                      "ours", "--batch", "8", "--count-batches", "1,2", "--floor-batch", "8"]),
                    stream=io.StringIO())
    row = _row(res, "ours")
    assert "error" not in row and "floor_error" not in row, row
    for k in ("fwd_bytes", "bwd_bytes", "bwd_launches", "saved_bytes"):
        assert row[k] == c8[k], k
    assert recounts == [1, 2], recounts


def test_extrapolation_is_exact_for_eager_ops():
    c1 = bench.count_row("reference", 16, 16, 8, 1, 1)
    c2 = bench.count_row("reference", 16, 16, 8, 1, 2)
    c4 = bench.count_row("reference", 16, 16, 8, 1, 4)
    e4 = bench.extrapolate(c1, c2, 4)
    for k in ("fwd_bytes", "bwd_bytes", "saved_bytes", "S", "fwd_launches", "bwd_launches"):
        assert e4[k] == c4[k], k


def test_gpu_path_with_fake_timers(fake_gpu, tmp_path):
    tools = bench.GpuTools(DEVICE)  # the real GpuTools with faked timer and CUDA functions
    compiled = []

    def fake_compile(m):
        compiled.append(m)
        return m

    out = io.StringIO()
    args = _args("--device", DEVICE, "--times", "--batch", "4", "--count-batches", "1,2",
                 "--impls", "reference,compile,ours,conv+bn", "--json", str(tmp_path / "g.json"))
    res = bench.run(args, tools=tools, compile_fn=fake_compile, stream=out)
    text = out.getvalue()
    # copy bandwidth: 2 * 256 MiB moved in the fake 2 ms
    bw = 2 * (1 << 28) / 2e-3 / 1e9
    assert res["meta"]["copy_bandwidth_gbps"] == pytest.approx(bw)
    assert len(compiled) == 1
    ref = _row(res, "reference")
    for k in ("fwd_ms", "bwd_ms", "fwdbwd_ms"):
        assert ref[k] == 2.0
    assert ref["peak_bytes"] == 4000
    # counts at batch 1 and 2 extrapolated to the timing batch 4 equal a direct count at 4
    direct = bench.count_row("reference", 16, 16, 8, 1, 4)
    assert ref["fwd_bytes"] == direct["fwd_bytes"] and ref["bwd_bytes"] == direct["bwd_bytes"]
    assert ref["S"] == 4 * 16 * 64 * 4
    assert ref["gbps"] == pytest.approx((ref["fwd_bytes"] + ref["bwd_bytes"]) / 2e-3 / 1e9)
    assert ref["copy_frac"] == pytest.approx(ref["gbps"] / bw)
    # the floor is at the timing batch; measured time as % of it
    assert ref["floor_batch"] == 4
    assert ref["pct_floor"] == pytest.approx(100 * 2.0 / ref["floor_ms"])
    assert ref["floor_fwd_flops"] == direct["fwd_flops"] and ref["floor_bwd_flops"] == direct["bwd_flops"]
    comp = _row(res, "compile")
    assert comp["fwdbwd_ms"] == 2.0 and comp.get("fwd_launches") is None and "error" not in comp
    ours = _row(res, "ours")
    assert "error" not in ours, ours
    assert ours["fwdbwd_ms"] == 2.0 and ours["fwd_bytes"] > 0 and ours["gbps"] > 0
    assert fake_gpu["resets"] >= 3 and fake_gpu["syncs"] > 0
    for col in ("fwd ms", "bwd ms", "f+b ms", "GB/s", "%copy", "peak MiB", "%floor", "floor f+b"):
        assert col in text
    assert "copy bandwidth" in text
    json.loads((tmp_path / "g.json").read_text())


def test_time_row_bwd_falls_back_when_graph_cannot_be_replayed(fake_gpu):
    class OneShot(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, g):
            raise RuntimeError("cannot backward twice")

    calls = {"n": 0}

    class Mod(torch.nn.Module):
        def forward(self, x):
            calls["n"] += 1
            # call 1: warm-up, then `reps` forward-benchmark calls, then the graph the
            # backward-only benchmark replays: make that one fail
            return OneShot.apply(x) if calls["n"] == 2 + fake_gpu["timer"].reps else x * 2

    fake_gpu["timer"].ms = 3.0
    r = bench.time_row(Mod(), torch.randn(4), bench.GpuTools("cpu"))
    assert r["fwd_ms"] == 3.0 and r["fwdbwd_ms"] == 3.0 and r["bwd_ms"] == 0.0


def test_count_subprocess_matches_in_process():
    shapes = bench.parse_shapes(SHAPE)
    raw = bench.count_subprocess(shapes, ["reference", "conv+bn"], [1], "fp32", False, timeout=300)
    c = raw["16:16@8/1|reference|1"]
    assert c == bench.count_row("reference", 16, 16, 8, 1, 1)
    assert raw["16:16@8/1|conv+bn|1"]["fwd_launches"] == 3


def test_parse_shapes():
    assert bench.parse_shapes("128:32@28/2") == [("128->32@28/2", 128, 32, 28, 2)]
    assert len(bench.parse_shapes("resnet,densenet")) == 6
    with pytest.raises(SystemExit):
        bench.parse_shapes("foo")


def test_plot(tmp_path):
    rows = bench.run(_args("--device", "cpu", "--impls", "reference,conv+bn"), stream=io.StringIO())["rows"]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.raises(SystemExit, match="matplotlib"):
            bench.plot(rows, str(tmp_path / "p.png"))
        return
    bench.plot(rows, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 0


def test_networks_gpu_path_with_fakes(fake_gpu):
    pytest.importorskip("scconv_triton.models")
    from benchmarks import networks

    rows = networks.run_networks(device="cpu", batch=2, size=32, times=True, tools=bench.GpuTools("cpu"),
                                 quiet=True, num_classes=10, which=["ResNet-50", "SCConv-R50 (reference)"])
    assert [r["network"] for r in rows] == ["ResNet-50", "SCConv-R50 (reference)"]
    for r in rows:
        assert "error" not in r, r
        assert r["saved_bytes"] > 0 and r["peak_bytes"] == 4000 and r["step_ms"] == 2.0
    assert rows[1]["saved_bytes"] > rows[0]["saved_bytes"]  # SCConv saves more (DESIGN.md: 1.66x)
    text = networks.format_networks(rows)
    assert "ResNet-50" in text and "x)" in text


def test_networks_saved_bytes_match_design():
    """DESIGN.md (MiB): ResNet-50 163 vs SCConv-R50 272 at batch 2, 224x224."""
    pytest.importorskip("scconv_triton.models")
    from benchmarks import networks

    rows = networks.run_networks(device="cpu", batch=2, size=224, times=False, quiet=True,
                                 which=["ResNet-50", "SCConv-R50 (reference)"])
    got = {r["network"]: r["saved_bytes"] / 2**20 for r in rows}
    assert got["ResNet-50"] == pytest.approx(163, rel=0.05)
    assert got["SCConv-R50 (reference)"] == pytest.approx(272, rel=0.05)


def test_capture_and_replay_a_kernel():
    import triton
    import triton.language as tl

    from benchmarks.replay import capture_launches

    @triton.jit
    def _double_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        off = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(y_ptr + off, tl.load(x_ptr + off, mask=off < n) * 2, mask=off < n)

    x = torch.randn(300, device=DEVICE)
    y = torch.empty_like(x)
    with capture_launches() as calls:
        _double_kernel[(triton.cdiv(300, 128),)](x, y, 300, BLOCK=128)
    assert [c.name for c in calls] == ["_double_kernel"]
    y.zero_()
    calls[0]()  # the replay writes the same output again
    assert torch.equal(y, x * 2)


@pytest.mark.parametrize("impl", ["reference", pytest.param("ours", marks=cpu_only(
    "run.py counts Triton traffic in-process only under the interpreter (a GPU run counts in a CPU "
    "subprocess, test_count_subprocess_matches_in_process)")), "conv+bn"])
def test_count_needs_no_warmup(impl):
    """run.py counts without a warm-up step; the counts must not depend on it."""
    c0 = bench.count_row(impl, 16, 16, 8, 1, 1, warmup=0)
    c1 = bench.count_row(impl, 16, 16, 8, 1, 1, warmup=1)
    assert c0 == c1
    assert c0["fwd_launches"] > 0 and c0["fwd_bytes"] > 0


@cpu_only("meter.skip_triton_launches skips interpreted launches; compiled GPU kernels always run")
def test_shapes_only_saved_bytes_equal_a_full_run():
    # networks.py measures the fused networks on a CPU with the kernel bodies
    # skipped; that is only valid if the saved storages are the same.
    import torch

    import scconv_triton
    from benchmarks.networks import saved_bytes

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        scconv_triton.SCConv(16, backend="triton"),
        torch.nn.ReLU(),
        scconv_triton.SCConv(16, out_channels=8, stride=2, backend="triton"),
        scconv_triton.SCConv(8, group_num=2, backend="triton", recompute=True),
    )
    x = torch.randn(2, 16, 10, 9)
    full = saved_bytes(net, x)
    dry = saved_bytes(net, x, shapes_only=True)
    assert full["saved_bytes"] > 0
    assert dry == full


@gpu
def test_gpu_report(tmp_path):
    """The timed report on the GPU for real: bf16, channels_last, reference and ours, every
    row timed and counted, the card's name in the metadata (torch.compile's row is left to
    the GPU session: its compile time is not a test's)."""
    impls = ["reference", "ours", "ours-s1", "ours-rc", "conv+bn"]
    out = io.StringIO()
    res = bench.run(_args("--device", "cuda", "--times", "--batch", "8", "--dtype", "bf16", "--channels-last",
                          "--impls", ",".join(impls), "--json", str(tmp_path / "g.json")), stream=out)
    text = out.getvalue()
    assert [r["impl"] for r in res["rows"]] == impls
    assert res["meta"]["device"] == torch.cuda.get_device_name(0)
    assert res["meta"]["copy_bandwidth_gbps"] > 0
    for r in res["rows"]:
        assert "error" not in r, r
        assert r["fwd_ms"] > 0 and r["fwdbwd_ms"] > 0 and r["peak_bytes"] > 0, r
        assert r["dtype"] == "bf16" and r["channels_last"]
    _assert_ours_counted(res, timed=True)
    assert "GB/s" in text and "n/a" not in text
    json.loads((tmp_path / "g.json").read_text())
