"""benchmarks/gpu_session.py: the one command for a lent GPU, exercised as a dry run on a CPU.

The dry run goes through every part (the pytest child, run.py's timing and counting paths,
networks.py with and without a compile function) at tiny shapes with CPU timers, writes the
same files a GPU session writes and must leave benchmarks/RESULTS.md alone. It runs in this
process (--in-process): a child per part would import torch once per part. The other tests
(process caps, profiles, RESULTS.md merging, pytest's summary) hold on any device.
"""
import json
import os
import re
import sys

import pytest
import torch

from _helpers import cpu_only
from benchmarks import gpu_session as gs

NETS = "SCConv-R50 (ours),DenseNet-121"  # a fused network and the cheapest eager baseline: both code paths


def _dry(tmp_path, out, *argv):
    tiny = tmp_path / "test_tiny.py"
    tiny.write_text("def test_one():\n    assert 1 + 1 == 2\n")
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    pytest_args = f"-c {tmp_path / 'pytest.ini'} --rootdir {tmp_path} {tiny}"
    return gs.main(["--dry-run", "--in-process", "--out", str(out), "--networks", NETS,
                    "--pytest-args", pytest_args, *argv])


@cpu_only("the dry run needs the Triton interpreter, which this process does not use on CUDA; there the "
          "real session (benchmarks/gpu_session.py) is the check")
def test_dry_run_every_part(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")  # the tiny pytest child starts in ~1 s
    monkeypatch.delenv("OUT", raising=False)
    with open(gs.RESULTS_MD) as f:
        tree_before = f.read()
    out = tmp_path / "out"
    threads = torch.get_num_threads()
    assert _dry(tmp_path, out, "--all", "--budget", "full") == 0
    assert torch.get_num_threads() == threads

    files = sorted(os.listdir(out))
    assert len(files) <= 8 and all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files), files
    (jname,) = [f for f in files if f.endswith(".json")]
    assert {"RESULTS.md", "tests.log", "session.log"} <= set(files)
    data = json.loads((out / jname).read_text())
    parts = data["parts"]
    assert list(parts) == list(gs.PROFILES["full"]["parts"])
    status = {k: p["status"] for k, p in parts.items()}
    assert status == {**{k: "ok" for k in parts}, "compile-r50": "skipped"}, status  # --networks: no ResNet-50
    assert data["env"]["dry_run"] and data["env"]["torch"] == torch.__version__

    t = parts["tests"]["data"]
    assert t["rc"] == 0 and re.fullmatch(r"1 test collected in [\d.]+s", t["summary"]), t
    assert "--collect-only" in t["command"] and "test_one" in (out / "tests.log").read_text()

    units = parts["layers"]["data"]["units"]
    assert [u["config"] for u in units] == ["fp32 NCHW", "bf16 channels_last", "bf16 NCHW", "fp32 channels_last"]
    for u in units:
        impls = [r["impl"] for r in u["rows"]]
        assert impls == gs.PROFILES["full"]["impls"].split(","), impls
        for r in u["rows"]:
            assert "error" not in r and r["fwdbwd_ms"] > 0 and r["batch"] == gs.DRY["layer_batch"], r
        assert "--no-count" in u["command"] and "f+b ms" in u["report"]
    assert units[1]["rows"][0]["channels_last"] and units[1]["rows"][0]["dtype"] == "bf16"

    crow = [r for u in parts["compile-layers"]["data"]["units"] for r in u["rows"]]
    assert {(r["impl"], r["dtype"]) for r in crow} == {("compile", "fp32"), ("compile", "bf16")}
    assert all(r["fwdbwd_ms"] > 0 for r in crow)

    nets = parts["networks"]["data"]["units"]
    assert [n["network"] for n in nets] == NETS.split(",")
    for n in nets:
        assert "error" not in n and n["step_ms"] > 0 and n["saved_bytes"] > 0, n
    comp = parts["compile-d121"]["data"]["units"]
    assert [n["network"] for n in comp] == ["DenseNet-121 + torch.compile"] and comp[0]["step_ms"] > 0
    assert comp[0].get("saved_bytes") is None  # a compiled graph's saved tensors are not eager autograd's
    from benchmarks.networks import format_networks

    assert "DenseNet-121 + torch.compile" in format_networks(comp + nets)
    assert parts["compile-r50"]["data"]["units"] == []  # filtered out by --networks

    md = (out / "RESULTS.md").read_text()
    assert md.count("<!-- gpu-session ") == 1 and "NOT measurements" in md
    for name in parts:
        assert f"<!-- part {name} -->" in md and f"### {name}: {status[name]} in " in md
    assert md.index("## Dry run") < md.index("## CPU")  # newest first
    with open(gs.RESULTS_MD) as f:
        assert f.read() == tree_before  # a dry run never edits the tree's RESULTS.md

    # A second call with another part merges into the same section (as separate device calls do).
    assert _dry(tmp_path, out, "--part", "counts", "--budget", "full") == 0
    md2 = (out / "RESULTS.md").read_text()
    assert md2.count("<!-- gpu-session ") == 1
    for name in list(parts) + ["counts"]:
        assert md2.count(f"<!-- part {name} -->") == 1, name
    (cj,) = [f for f in os.listdir(out) if f.endswith("-counts.json")]
    (cu,) = json.loads((out / cj).read_text())["parts"]["counts"]["data"]["units"]
    ref = next(r for r in cu["rows"] if r["impl"] == "reference")
    assert ref["fwd_launches"] == 28 and ref["bwd_launches"] == 41 and ref["fwdbwd_ms"] > 0  # counted and timed


def test_child_process_is_killed_at_its_cap(tmp_path):
    log = tmp_path / "log"
    r = gs.run_logged([sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"],
                      timeout=2, log_path=str(log), echo=False)
    assert r["timed_out"] and r["wall_s"] < 30 and r["rc"] != 0
    assert "started" in r["tail"] and "started" in log.read_text()
    ok = gs.run_logged([sys.executable, "-c", "print('done')"], timeout=60, echo=False)
    assert ok["rc"] == 0 and not ok["timed_out"] and ok["tail"].strip() == "done"


def test_profiles_fit_the_device_limits():
    for prof in ("full", "quick"):
        p = gs.PROFILES[prof]
        for part in p["parts"]:
            assert p["caps"][part] < 8 * 60, (prof, part)  # one part per 10-minute device call
            est, note = gs.estimate(part, prof)
            assert 0 < est and note
        assert sum(p["caps"][x] for x in p["parts"]) <= p["total"]
    assert gs.PROFILES["full"]["total"] <= 30 * 60
    assert gs.PROFILES["quick"]["total"] <= 8.5 * 60  # + the machine's start: ~12 min of device time
    table = gs.part_table("full", gs.PART_ORDER)
    assert "estimate" in table and all(p in table for p in gs.PART_ORDER)


def test_merge_results_inserts_newest_first_and_replaces_parts():
    text = "# Results\n\nintro\n\n## Older\n\nold body\n"
    m = "<!-- gpu-session d c p -->"
    t1 = gs.merge_results(text, m, f"## New\n\n{m}\n- meta\n", {"a": "<!-- part a -->\nA1\n<!-- /part a -->\n"})
    assert t1.index("## New") < t1.index("## Older") and "A1" in t1 and t1.endswith("old body\n")
    t2 = gs.merge_results(t1, m, "unused", {"a": "<!-- part a -->\nA2\n<!-- /part a -->\n",
                                            "b": "<!-- part b -->\nB\n<!-- /part b -->\n"})
    assert "A1" not in t2 and "A2" in t2 and t2.index("A2") < t2.index("B") < t2.index("## Older")
    assert t2.count("## New") == 1 and "unused" not in t2


def test_parse_pytest_summary_and_failures():
    text = ("..F\n=========================== short test summary info ===========================\n"
            "FAILED tests/test_x.py::test_y - AssertionError: boom\n"
            "========================= 1 failed, 2 passed in 3.21s =========================\n")
    r = gs.parse_pytest(text)
    assert r["summary"] == "1 failed, 2 passed in 3.21s"
    assert r["failures"] == ["FAILED tests/test_x.py::test_y - AssertionError: boom"]
    assert gs.parse_pytest("nothing here")["summary"] is None


def test_pytest_command_on_cuda_runs_compiled_kernels(monkeypatch):
    """On a GPU the tests part drops TRITON_INTERPRET and adds xdist workers and a per-test timeout."""
    import importlib.util
    import time

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name in ("xdist", "pytest_timeout") else real(name, *a))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    a = gs.parse_args(["--part", "tests"])
    ctx = gs.Ctx("quick", False, time.monotonic() + 180, "/tmp", None, a)
    cmd = gs._pytest_cmd(ctx)
    assert cmd[1:5] == ["-m", "pytest", "-x", "-q"] and "--collect-only" not in cmd
    assert cmd[cmd.index("-n") + 1] == "4" and 140 <= int(cmd[cmd.index("--timeout") + 1]) <= 150
    assert "TRITON_INTERPRET" not in gs._pytest_env(ctx)
    serial = gs._pytest_cmd(gs.Ctx("quick", False, time.monotonic() + 180, "/tmp", None,
                                   gs.parse_args(["--part", "tests", "--test-jobs", "1"])))
    assert "-n" not in serial
    dry_ctx = gs.Ctx("quick", True, time.monotonic() + 180, "/tmp", None, a)
    dry = gs._pytest_cmd(dry_ctx)
    assert "--collect-only" in dry and "-n" not in dry and "--timeout" not in dry
    assert gs._pytest_env(dry_ctx)["TRITON_INTERPRET"] == "1"


def test_gpu_timers_and_compile_use_the_profile(monkeypatch):
    """The non-dry tools pass the profile's do_bench windows; compile rows get a fresh static graph."""
    import triton.testing

    seen = {}

    def fake_do_bench(fn, warmup=25, rep=100, grad_to_none=None, quantiles=None, return_mode="mean"):
        seen.update(warmup=warmup, rep=rep, mode=return_mode)
        fn()
        return 1.5

    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    ctx = gs.Ctx("quick", False, 0.0, "/tmp", None, None)
    assert gs.make_tools(ctx).do_bench(lambda: None) == 1.5
    assert seen == {"warmup": gs.PROFILES["quick"]["bench_ms"][0], "rep": gs.PROFILES["quick"]["bench_ms"][1],
                    "mode": "median"}
    calls = []
    monkeypatch.setattr(torch._dynamo, "reset", lambda: calls.append("reset"))
    monkeypatch.setattr(torch, "compile", lambda m, **kw: calls.append(kw) or m)
    m = torch.nn.Linear(2, 2)
    assert gs._compile_fn(ctx)(m) is m and calls == ["reset", {"dynamic": False}]
    assert gs._compile_fn(gs.Ctx("quick", True, 0.0, "/tmp", None, None))(m) is m and len(calls) == 2


def test_results_section_of_a_failed_gpu_session():
    """A GPU session whose parts time out or fail still writes a readable section that says so."""
    env = {"date": "2026-12-02", "started_utc": "2026-12-02 10:00:00", "card": "NVIDIA H100 80GB HBM3",
           "capability": "9.0", "memory_gib": 79.1, "sms": 132, "max_sm_clock": "1980 MHz", "power_limit": "700 W",
           "driver": "580.1", "torch_cuda": "13.0", "cudnn": 91000, "cpu_count": 16, "python": "3.12.3",
           "torch": "2.11.0", "triton": "3.6.0", "numpy": "2.5.2", "commit": "abc1234", "dry_run": False,
           "cudnn_benchmark": False, "cudnn_allow_tf32": True, "matmul_allow_tf32": False}
    marker, header = gs.render_header(env, "quick")
    assert "NVIDIA H100 80GB HBM3" in header and "driver 580.1" in header and "3.6.0" in header
    assert "NOT measurements" not in header and marker == "<!-- gpu-session 2026-12-02 NVIDIA-H100-80GB-HBM3 quick -->"
    tests = {"status": "timeout", "wall_s": 200.0, "cap_s": 180, "killed": True, "note": None,
             "data": {"command": "python -m pytest -x -q", "rc": -15, "timed_out": True, "summary": None}}
    layers = {"status": "partial", "wall_s": 150.0, "cap_s": 150, "data": {"units": [
        {"config": "fp32 NCHW", "command": "python benchmarks/run.py ...", "wall_s": 80.0, "report": "TABLE"},
        {"config": "bf16 channels_last", "command": "python benchmarks/run.py ...", "skipped": "not started"}]}}
    nets = {"status": "partial", "wall_s": 100.0, "cap_s": 130, "data": {"units": [
        {"network": "ResNet-50", "batch": 128, "size": 224, "step_ms": 50.0, "peak_bytes": 10 * 2**30,
         "saved_bytes": 8 * 2**30, "wall_s": 9.0},
        {"network": "SCConv-R50 (reference)", "batch": 128, "size": 224, "step_ms": 100.0, "peak_bytes": 15 * 2**30,
         "saved_bytes": 14 * 2**30, "wall_s": 12.0},
        {"network": "SCConv-R50 (ours)", "batch": 128, "size": 224, "error": "OutOfMemoryError: CUDA out of memory"}]}}
    md = {n: gs.render_part(n, r, "x.json", "python benchmarks/gpu_session.py --all --budget quick")
          for n, r in (("tests", tests), ("layers", layers), ("networks", nets))}
    assert "### tests: timeout in 200 s (cap 180 s, killed at the cap)" in md["tests"]
    assert "no summary line" in md["tests"]
    assert "TABLE" in md["layers"] and "n/a: not started" in md["layers"]
    assert "| SCConv-R50 (reference) | 128 | 224 | 100.00 | 2.00 | 15360 | 1.50 | 14336.0 |" in md["networks"]
    assert "n/a (OutOfMemoryError: CUDA out of memory)" in md["networks"]
    text = gs.merge_results("# Results\n\n## CPU\n", marker, header, md)
    assert text.index("## GPU session: NVIDIA H100") < text.index("## CPU")
