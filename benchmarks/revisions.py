"""Counted cost of every upstream revision's fused SCConv against the default revision.

    python benchmarks/revisions.py                  # 64@56, batch 1, fp32, interpreter on a CPU
    python benchmarks/revisions.py --shape 16@8     # quick

One training step of ``scconv_triton.SCConv(C, revision=...)`` per revision, metered by
``benchmarks.meter.measure_step``: launches and bytes of forward and backward (S = bytes of
the input), bytes saved for backward. The revisions differ only in constexpr switches of
the same SRU kernels, so each should stay within a launch and 1 S of the default.
"""
from __future__ import annotations

import argparse
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import torch  # noqa: E402

if not torch.cuda.is_available():  # before any @triton.jit module is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


def measure(c: int, hw: int, batch: int, device: str) -> dict:
    from benchmarks.meter import measure_step
    from scconv_triton import REVISIONS, SCConv

    out = {}
    for rev in REVISIONS:
        torch.manual_seed(0)
        layer = SCConv(c, revision=rev, backend="triton").to(device)
        x = torch.randn(batch, c, hw, hw, device=device)
        out[rev] = measure_step(layer, x)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="64@56", help="C@HW (default 64@56)")
    ap.add_argument("--batch", type=int, default=1)
    args = ap.parse_args(argv)
    c, hw = (int(v) for v in args.shape.split("@"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    res = measure(c, hw, args.batch, device)
    base = res["2023-10"]
    print(f"SCConv({c}) at {hw}x{hw}, batch {args.batch}, fp32, {device}; S = {base['S']} bytes")
    print(f"{'revision':<11} {'fwd L':>6} {'fwd S':>7} {'fwd bytes':>11} {'bwd L':>6} {'bwd S':>7} "
          f"{'saved S':>8}  fwd vs default")
    for rev, r in res.items():
        dl, ds = r["fwd_launches"] - base["fwd_launches"], r["fwd_S"] - base["fwd_S"]
        print(f"{rev:<11} {r['fwd_launches']:>6} {r['fwd_S']:>7.3f} {r['fwd_bytes']:>11} {r['bwd_launches']:>6} "
              f"{r['bwd_S']:>7.3f} {r['saved_S']:>8.3f}  {dl:+d} L, {ds:+.3f} S")
    return 0


if __name__ == "__main__":
    sys.exit(main())
