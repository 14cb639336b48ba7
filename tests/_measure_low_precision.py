"""Measure the fp16 / bf16 errors that tests/_helpers.py LOW_TOL is set from.

    .venv/bin/python tests/_measure_low_precision.py [--seeds 5]

Runs the very functions the low-precision tests assert on (test_sru.half_precision_errors,
test_cru.low_precision_errors and autocast_errors, test_scconv.half_precision_errors,
test_compile_amp.autocast_errors) over seeds 0..N-1 (the tests run seed 0) and prints, per
LOW_TOL entry, the largest error seen, where, 3x it, and the tolerance in force. On a CPU
the kernels run in the interpreter; on a GPU compiled (fp16 autocast only there).
"""
import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

import conftest  # noqa: E402,F401  (turns the interpreter on without CUDA, before any kernel import)
import torch  # noqa: E402

from _helpers import DEVICE, LOW_TOL, ON_GPU, low_precision_kind  # noqa: E402


def _draws(fn):
    """fn() or None when the seed gives no input away from the gate (the tests' draw fails)."""
    try:
        return fn()
    except AssertionError as e:
        if "could not draw" in str(e):
            return None
        raise


def measurements(seed, only=None):
    """{LOW_TOL key: {label: error}} for one seed (an entry whose input draw failed is left out)."""
    import test_compile_amp
    import test_cru
    import test_scconv
    import test_sru

    runs = {}
    for dtype in (torch.float16, torch.bfloat16):
        for cl in (False, True):
            runs[("sru", dtype, "cl" if cl else "nchw")] = lambda d=dtype, c=cl: test_sru.half_precision_errors(d, c)
        for cfg in test_cru.LOW_PRECISION_CONFIGS:
            runs[("cru", dtype, cfg[0])] = lambda d=dtype, c=cfg: dict(test_cru.low_precision_errors(c, d, DEVICE))
        runs[("scconv", dtype, "default")] = lambda d=dtype: test_scconv.half_precision_errors(d, DEVICE)[0]
        if dtype == torch.float16 and not ON_GPU:
            continue  # fp16 autocast is a CUDA feature
        runs[("autocast-scconv", dtype, "")] = lambda d=dtype: test_compile_amp.autocast_errors(d, DEVICE)
        runs[("autocast-cru", dtype, "")] = lambda d=dtype: dict(test_cru.autocast_errors(d, DEVICE))
    out, failed = {}, []
    for (name, dtype, where), fn in runs.items():
        if only and name not in only:
            continue
        torch.manual_seed(seed)
        errs = _draws(fn)
        if errs is None:
            failed.append(f"{name}/{str(dtype)[6:]}/{where}")
            continue
        out.setdefault((name, dtype), {}).update({f"{where}/{k}": e for k, e in errs.items()})
    return out, failed


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--only", default=None, help="comma list of LOW_TOL test names (default: all)")
    args = ap.parse_args()
    worst = {}
    for seed in range(args.seeds):
        res, failed = measurements(seed, args.only and args.only.split(","))
        if failed:
            print(f"seed {seed}: no input away from the gate for {failed} (left out)")
        for key, errs in res.items():
            for label, e in errs.items():
                k = (*key, low_precision_kind(label.split("/")[-1]))
                if k not in worst or e > worst[k][0]:
                    worst[k] = (e, f"seed {seed} {label}")
    print(f"device {DEVICE}, {args.seeds} seeds")
    print(f"{'test':16s} {'dtype':9s} {'kind':6s} {'max error':>10s} {'3x':>9s} {'LOW_TOL':>9s}  where")
    for (name, dtype, k), (e, where) in sorted(worst.items(), key=lambda kv: (kv[0][0], str(kv[0][1]), kv[0][2])):
        tol = LOW_TOL[(name, dtype)].get(k, 0.0)
        print(f"{name:16s} {str(dtype)[6:]:9s} {k:6s} {e:10.2e} {3 * e:9.1e} {tol:9.1e}  {where}"
              + ("  ABOVE TOLERANCE" if e > tol else ""))


if __name__ == "__main__":
    main()
