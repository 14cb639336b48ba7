"""SCConv under DistributedDataParallel: gloo, 2 processes on the CPU.

Each rank trains a small SCConv network (two SCConv layers put in by convert())
for a few SGD steps on its half of every batch. The ranks start from different
random weights (DDP broadcasts rank 0's), must end bit-identical, and must match
a single-process run on the summed batch. The network has no BatchNorm (SCConv
normalises per sample with GroupNorm), so the two runs compute the same function.

The children are started with torch.multiprocessing "spawn"; they run the
fused SCConv through the Triton interpreter, so TRITON_INTERPRET=1 is set in
their environment before anything imports the kernels (this module imports
scconv_triton only inside functions).
"""
import os
import socket
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from _helpers import cpu_only  # noqa: E402

# The SCConv path the ranks run: "triton" = the fused kernels (interpreted on CPU).
SCCONV_BACKEND = "triton"
WORLD = 2
PER_RANK = 2
STEPS = 3
SEED = 1234


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_net(seed: int):
    import torch.nn as nn

    from scconv_triton.convert import convert

    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, bias=False),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, stride=2, padding=1, bias=True),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 4),
    )
    rep = convert(net, inplace=True, fused=True, backend=SCCONV_BACKEND, group_num=4)
    assert rep.replaced_names == ["2", "4"] and rep.skipped_names == ["0"]  # 3 input channels: not SCConv's
    return net


def batches():
    g = torch.Generator().manual_seed(SEED)
    n = WORLD * PER_RANK
    return [(torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g)) for _ in range(STEPS)]


def train(model, data, rank=None):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for x, y in data:
        if rank is not None:
            x, y = x[rank * PER_RANK : (rank + 1) * PER_RANK], y[rank * PER_RANK : (rank + 1) * PER_RANK]
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _worker(rank: int, port: int, out_dir: str):
    os.environ.setdefault("TRITON_INTERPRET", "1")
    if "GLOO_SOCKET_IFNAME" not in os.environ and any(n == "lo" for _, n in socket.if_nameindex()):
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    torch.set_num_threads(1)
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        net = build_net(SEED + rank)  # different init per rank: DDP must broadcast rank 0's
        ddp = DDP(net)
        losses = train(ddp, batches(), rank)
        torch.save({"state": net.state_dict(), "losses": losses}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@cpu_only("the ranks and the single-process run use CPU tensors and the Triton interpreter (gloo on the "
          "CPU); on a GPU machine the parent process has no interpreter to run the fused kernels on CPU tensors")
def test_ddp_gloo_two_ranks_match_single_process(tmp_path):
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this build")
    t0 = time.time()
    ctx = mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.time() + 240
    while not ctx.join(timeout=1):
        if time.time() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail("DDP workers did not finish within 240 s")
    wall = time.time() - t0

    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    assert list(r0["state"]) == list(r1["state"])
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), f"ranks differ at {k}"

    # single process, summed batch, rank 0's initial weights
    single = build_net(SEED)
    assert type(single[2]).__name__ == "SCConv" and single[2].backend == SCCONV_BACKEND
    losses = train(single, batches())
    sd = single.state_dict()
    for k, v in r0["state"].items():
        torch.testing.assert_close(v, sd[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    # the ranks really started apart (so equality above is DDP's doing)
    assert not torch.equal(build_net(SEED + 1)[2].CRU.GWC.weight, build_net(SEED)[2].CRU.GWC.weight)
    # per-rank losses average to the single-process loss of the summed batch
    for a, b, s in zip(r0["losses"], r1["losses"], losses):
        assert abs((a + b) / 2 - s) < 1e-5
    print(f"DDP backend={SCCONV_BACKEND} wall={wall:.1f}s")
