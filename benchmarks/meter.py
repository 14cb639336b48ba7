"""Count launches, memory traffic and bytes saved for backward of any callable.

Method (DESIGN.md, "Measuring"): every launch is charged the bytes an *ideal*
kernel for it would move, so eager PyTorch, torch.library custom ops and Triton
kernels are compared on the same footing.

Eager aten ops (a ``TorchDispatchMode``)
    * One aten op = one launch. Its bytes = the distinct input tensors it reads
      plus the distinct output tensors it writes, each counted once per op
      (``x * x`` reads x once). A tensor's bytes are ``numel * element_size``
      of its logical shape, also for an ``expand``-ed (stride-0) operand; this
      is how DESIGN.md's table was counted (the reference backward's
      ``mean`` gradient, a (N, 2C, 1, 1) tensor expanded to N x 2C x H x W,
      is charged 2 S). ``Meter(broadcast="memory")`` charges an expanded
      operand the memory it holds instead (reference backward: 75 S, not 77 S).
      Likewise ``ones_like`` / ``zeros_like`` are charged a read of their
      template (it is the op's input): 2 S of the reference's 53 S forward.
    * Free (not a launch, no bytes): view / alias ops (every returned tensor
      aliases an input without writing it: ``view``, ``reshape`` when it is a
      view, ``_unsafe_view``, ``slice``, ``split``, ``select``, ``as_strided``,
      ``t``, ``transpose``, ``permute``, ``expand``, ``unsqueeze``, ``squeeze``,
      ``detach``, ``alias`` ...), pure allocations (``empty``, ``empty_like``,
      ``empty_strided``, ``new_empty``, ``new_empty_strided``), and ops that touch
      no tensor data (``is_same_size``, ``size``, ``stride``, ``sym_*``,
      ``detach_``...) and host reads of a scalar (``item``,
      ``_local_scalar_dense``: no kernel; a one-element copy on a GPU).
      ``scalar_tensor`` (autograd's zero for ``where``) is a launch: it is a
      fill kernel on a GPU, and DESIGN.md's 41 backward launches include two.
    * In-place ops (``add_``) read and write their destination; overwrite ops
      (``copy_``, ``fill_``, ``zero_``, random fills) and ``out=`` arguments are
      written only.
    * Ops of the container namespaces (default ``scconv_triton``, our
      ``torch.library`` custom ops) are not launches themselves: the meter
      re-dispatches them below the Python key with itself re-entered, so the
      aten ops and Triton launches inside are what is counted.

Triton launches under the interpreter (``TRITON_INTERPRET=1``)
    * ``GridExecutor.__call__`` is wrapped: one call = one launch, named by the
      kernel. Its bytes are the real loads and stores of the programs:
      ``InterpreterBuilder.create_masked_load / create_masked_store`` (which the
      unmasked and descriptor loads/stores go through) are hooked to add
      ``active lanes (mask true) * element size``; a re-read counts again,
      masked-out lanes not at all. Atomics count a read and a write per active
      lane.
    * The aten ops the interpreter runs to move arguments to and from its
      host copies are not counted (dispatch counting is suspended while a
      Triton launch runs).
    * On a real GPU, Triton kernels bypass the dispatcher and the meter sees
      only the aten ops: count Triton traffic with the interpreter
      (``benchmarks/run.py`` does it in a CPU subprocess).

FLOPs per launch (``Launch.flops``, ``Launch.ew_flops``)
    * Matrix FLOPs (``flops``): for an aten op, torch's FLOP counter
      (``torch.utils.flop_counter``'s formulas on the op's shapes: convolutions and
      their backward, mm / addmm / bmm / baddbmm, attention; exactly what
      ``FlopCounterMode`` reports, tests/test_floor.py); every other aten op counts
      0, as there. For a Triton launch, ``2 * M * N * K`` for every ``tl.dot`` its
      programs execute (``InterpreterBuilder.create_dot`` is hooked), on the whole
      operand blocks: masked-out lanes are multiplied too, as on the hardware.
      ``mm_kind`` ("conv", "matmul", "dot") and ``mm_dtype`` say which tensor peak
      applies (benchmarks/floor.py).
    * Elementwise FLOPs (``ew_flops``, Triton only): lanes of every float
      arithmetic op the interpreter executes (add, mul, div, fma = 2, exp, sqrt ...;
      masked lanes included) plus one per element reduced; index arithmetic is not
      counted. It is the estimate the floor holds against the CUDA-core peak;
      elementwise aten ops are charged no FLOPs (they are bytes-bound by a factor of
      ten or more on every card of the table).
    * ``memo_triton_launches`` and ``per_sample_from`` are counting shortcuts
      for the report (see their comments); ``Meter`` alone interprets everything.

Bytes saved for backward (``saved_tensors_hooks``)
    Every tensor autograd packs (including ``ctx.save_for_backward`` of custom
    Functions) is recorded by its storage; the sum is over *distinct storages*
    (``untyped_storage().nbytes()``, the memory actually kept alive). Storages
    of parameters and of the input are reported apart (``exclude`` groups).
    Tensors stashed on ``ctx`` as plain attributes escape the hooks.

A training step (``measure_step``), the conventions behind DESIGN.md's numbers
    * Forward and backward are metered separately; the upstream gradient is
      created outside both meters, and ``y.backward(grad)`` is what is metered.
    * The input requires grad (the layer sits inside a network), so the
      backward includes the gradient w.r.t. the input.
    * Parameter gradients start as ``None`` (``zero_grad(set_to_none=True)``,
      PyTorch's default), so AccumulateGrad steals the gradient: no launch.
    * One warm-up step runs unmetered first (lazy init, autotuning, caches).
    * Traffic is also reported in units of S = bytes of the input N x C x H x W.
    With these rules the reference SCConv at C=64, 56x56, N=2, fp32 gives
    DESIGN.md's table: 28 launches / 53.0 S forward, 41 / 76.8 S backward,
    8.0 S saved besides x (tests/test_meter.py checks it).

Run as a script for a per-op listing of the reference SCConv step:
``python benchmarks/meter.py [--channels 64 --size 56 --batch 2]``.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = [
    "Launch",
    "Meter",
    "SavedBytes",
    "measure_step",
    "tensor_bytes",
    "install_triton_hooks",
    "triton_hooks_installed",
    "aten_flops",
    "memo_triton_launches",
    "per_sample_from",
    "skip_triton_launches",
]

aten = torch.ops.aten

# Pure allocations: no kernel runs (the memory is uninitialised).
_ALLOC_OPS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "empty_permuted"}
# Views whose schema carries no alias annotation (a fresh tensor on the same storage).
_VIEW_NOALIAS_OPS = {"_unsafe_view", "lift_fresh", "_reshape_alias"}
# Ops that touch only metadata.
_META_OPS = {
    "is_same_size", "size", "stride", "storage_offset", "sym_size", "sym_stride", "sym_numel",
    "sym_storage_offset", "numel", "dim", "is_contiguous", "is_strides_like_format",
    "is_non_overlapping_and_dense", "_has_compatible_shallow_copy_type", "set_", "resize_",
    "_version", "is_leaf", "requires_grad_", "retains_grad", "output_nr", "_fw_primal", "detach_",
    # host reads of a scalar (``float(t)``, ``t.item()``): no kernel; on a GPU a
    # one-element device-to-host copy, not counted as a launch
    "item", "_local_scalar_dense",
    "_make_dual", "_unpack_dual", "record_stream", "_nested_tensor_size",
}
# In-place ops that overwrite their destination without reading it.
_OVERWRITE_OPS = {
    "copy_", "fill_", "zero_", "normal_", "uniform_", "bernoulli_", "random_", "exponential_",
    "geometric_", "cauchy_", "log_normal_", "index_put_",
}
_OVERWRITE_OPS.discard("index_put_")  # index_put_ reads the untouched part: keep it read+write

CONTAINER_NAMESPACES = ("scconv_triton",)


def tensor_bytes(t: torch.Tensor, broadcast: str = "logical") -> int:
    """Bytes charged for reading or writing ``t`` once.

    ``broadcast="logical"`` (the default, DESIGN.md's convention):
    ``numel * element_size``. ``broadcast="memory"``: only the dimensions that
    are not broadcast (stride 0, as made by ``expand``) count, so an expanded
    tensor costs the memory it holds.
    """
    if broadcast == "logical":
        return t.numel() * t.element_size()
    n = 1
    for s, st in zip(t.shape, t.stride()):
        if st != 0:
            n *= s
        elif s == 0:
            n = 0
    return n * t.element_size()


def _tensor_key(t: torch.Tensor):
    try:
        if t.device.type == "meta":  # no data pointer: the storage object identifies the memory
            ptr = (t.untyped_storage()._cdata, t.storage_offset())
        else:
            ptr = t.data_ptr()
    except Exception:  # tensors without storage (functional wrappers)
        ptr = id(t)
    return (t.device, ptr, tuple(t.shape), tuple(t.stride()), t.dtype)


@dataclass
class Launch:
    """One counted launch: an aten op or a Triton kernel."""

    name: str
    kind: str  # "aten" or "triton"
    bytes_read: int = 0
    bytes_written: int = 0
    flops: int = 0  # matrix FLOPs: torch's FLOP counter (aten) or tl.dot operand shapes (Triton)
    ew_flops: int = 0  # elementwise float ops of interpreted Triton programs (lanes x ops)
    mm_kind: str = ""  # "conv", "matmul" or "dot" when flops > 0: which peak applies (floor.py)
    mm_dtype: str = ""  # dtype of the matrix operands, e.g. "float32"
    shape_sig: tuple = ()  # Triton: (grid, numel of each tensor argument); see per_sample_from

    def as_list(self) -> list:
        """Compact JSON form: [name, bytes, flops, ew_flops, mm_kind, mm_dtype]."""
        return [self.name, self.bytes, self.flops, self.ew_flops, self.mm_kind, self.mm_dtype]

    @property
    def bytes(self) -> int:
        return self.bytes_read + self.bytes_written


# ----------------------------------------------------------------------------- Triton hooks
# Meters currently counting (a global stack, not thread-local: the autograd
# engine may run backward on another thread).
_ACTIVE: list = []
_TRITON_DEPTH = 0  # > 0 while an interpreted Triton launch runs
_HOOKS = {"installed": False, "error": None}


def _elt_bytes(ptrs) -> int:
    try:
        ty = ptrs.get_element_ty()
    except Exception:
        ty = ptrs.dtype.element_ty
    bits = getattr(ty, "primitive_bitwidth", None)
    if bits is None:
        bits = ty.scalar.primitive_bitwidth
    return max(1, bits // 8)


def _active_lanes(ptrs, mask) -> int:
    import numpy as np

    pdata = np.asarray(ptrs.data)
    if mask is None:
        return int(pdata.size)
    mdata = np.asarray(mask.data)
    if mdata.shape != pdata.shape:
        mdata = np.broadcast_to(mdata, pdata.shape)
    return int(np.count_nonzero(mdata))


def _charge(read: int = 0, written: int = 0) -> None:
    for m in _ACTIVE:
        rec = m._current_triton
        if rec is not None:
            rec.bytes_read += read
            rec.bytes_written += written


def _charge_flops(flops: int = 0, ew: int = 0, dtype: str = "") -> None:
    for m in _ACTIVE:
        rec = m._current_triton
        if rec is not None:
            rec.flops += flops
            rec.ew_flops += ew
            if flops and not rec.mm_kind:
                rec.mm_kind, rec.mm_dtype = "dot", dtype


# Interpreter builder methods that do float arithmetic, with the FLOPs one lane
# costs: the elementwise estimate of a Triton launch is the sum over the calls of
# lanes x this weight (masked lanes included, as the hardware computes them).
# Integer ops (index and pointer arithmetic) and comparisons are not counted;
# transcendentals (exp, log, sqrt, ...) count 1 like an add, which is what the
# floor's CUDA-core peak (FP32 FMA rate counted as 2) can hold them to only
# roughly; they never decide a floor here (elementwise work is bytes-bound).
_EW_OPS = {
    "create_fadd": 1, "create_fsub": 1, "create_fmul": 1, "create_fdiv": 1, "create_frem": 1,
    "create_precise_divf": 1, "create_approx_divf": 1, "create_fneg": 1, "create_fma": 2,
    "create_exp": 1, "create_exp2": 1, "create_log": 1, "create_log2": 1, "create_sqrt": 1,
    "create_precise_sqrt": 1, "create_rsqrt": 1, "create_sin": 1, "create_cos": 1, "create_erf": 1,
    "create_minimumf": 1, "create_maximumf": 1, "create_minnumf": 1, "create_maxnumf": 1,
}


def _np_dtype_name(h) -> str:
    try:
        return str(h.data.dtype)
    except Exception:
        return ""


def _is_float_handle(h) -> bool:
    try:
        return h.data.dtype.kind == "f"
    except Exception:
        return False


# ----------------------------------------------------------------------------- launch memo
# Under ``memo_triton_launches(cache)`` an interpreted launch whose kernel, grid,
# tensor shapes / strides / dtypes and scalar arguments were seen before is not
# run again: its counts are copied from the first run. Valid because what a
# kernel of this project loads and stores (its masks, its loop bounds) depends
# on those and not on tensor values; the outputs of a skipped launch are left
# unwritten, so use it for counting only (tests/test_floor.py checks that a
# fused layer's step counts the same with and without it).
_MEMO: list = []  # stack of active caches


class _Unhashable(Exception):
    pass


def _arg_sig(v):
    if isinstance(v, torch.Tensor):
        return ("T", tuple(v.shape), tuple(v.stride()), str(v.dtype))
    if v is None or isinstance(v, (bool, int, float, str)):
        return (type(v).__name__, v)
    if isinstance(v, (tuple, list)):
        return tuple(_arg_sig(a) for a in v)
    if hasattr(v, "dtype") and hasattr(v, "__hash__") and type(v).__module__.startswith("triton"):
        try:
            hash(v)
            return ("tl", repr(v))
        except TypeError:
            pass
    raise _Unhashable(type(v).__name__)


def _launch_key(executor, args, kwargs):
    fn = executor.fn
    grid = executor.grid
    if callable(grid):
        cells = tuple(c.cell_contents for c in (getattr(grid, "__closure__", None) or ()))
        grid = ("callable", getattr(grid, "__code__", id(grid)), _arg_sig(list(cells)))
    try:
        return (getattr(fn, "__module__", ""), getattr(fn, "__qualname__", repr(fn)), _arg_sig(grid),
                _arg_sig(list(args)), tuple(sorted((k, _arg_sig(v)) for k, v in kwargs.items())))
    except _Unhashable:
        return None


# Under ``per_sample_from(launches, k)`` (counting at k times the batch of an
# earlier count whose Triton launches, in order, are ``launches``) a launch is not
# interpreted when it is the same kernel as the earlier one at its position, its
# grid is the earlier grid with exactly one axis multiplied by k, and each tensor
# argument has the earlier numel or k times it: its programs are then the earlier
# programs plus k - 1 copies for the added samples, which load, store and compute
# the same at shifted addresses, so its counts are k times the earlier ones.
# Any other launch (a batch reduction, a grid that re-splits with the batch) is
# interpreted. tests/test_floor.py checks the result against full interpretation.
_PER_SAMPLE: list = []


def _sig_of(executor, args, kwargs):
    grid = executor.grid
    if callable(grid):
        return ()
    grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
    numels = tuple(int(a.numel()) for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor))
    return (grid, numels)


def _scales_by(sig1, sig2, k: int) -> bool:
    if not sig1 or not sig2 or len(sig1[1]) != len(sig2[1]):
        return False
    g1, g2 = sig1[0], sig2[0]
    axes = [i for i in range(3) if g1[i] != g2[i]]
    if len(axes) != 1 or g2[axes[0]] != k * g1[axes[0]]:
        return False
    scaled = [b == k * a and a > 0 for a, b in zip(sig1[1], sig2[1])]
    same = [a == b for a, b in zip(sig1[1], sig2[1])]
    return any(scaled) and all(x or y for x, y in zip(scaled, same))


@contextlib.contextmanager
def per_sample_from(launches, k: int = 2):
    """Infer per-sample Triton launches from an earlier count at 1/k of the batch (see _PER_SAMPLE)."""
    state = {"ref": [ln for ln in launches if ln.kind == "triton"], "i": 0, "k": int(k), "inferred": 0}
    _PER_SAMPLE.append(state)
    try:
        yield state
    finally:
        _PER_SAMPLE.pop()


@contextlib.contextmanager
def memo_triton_launches(cache: dict | None = None):
    """Count repeated identical interpreted launches once (see _MEMO above); yields the cache."""
    cache = {} if cache is None else cache
    _MEMO.append(cache)
    try:
        yield cache
    finally:
        _MEMO.pop()


def install_triton_hooks() -> bool:
    """Wrap the Triton interpreter's launch, loads and stores (idempotent).

    Returns True when the hooks are in place. Works whether or not the
    interpreter is on; the hooks only fire for interpreted launches.
    """
    if _HOOKS["installed"]:
        return True
    try:
        from triton.runtime import interpreter as interp
    except Exception as e:  # triton missing or too different
        _HOOKS["error"] = f"triton interpreter not importable: {e!r}"
        return False
    builder_cls = getattr(interp, "InterpreterBuilder", None)
    executor_cls = getattr(interp, "GridExecutor", None)
    if builder_cls is None or executor_cls is None or not hasattr(builder_cls, "create_masked_load"):
        _HOOKS["error"] = "unknown triton interpreter layout (no InterpreterBuilder.create_masked_load / GridExecutor)"
        return False

    orig_load = builder_cls.create_masked_load
    orig_store = builder_cls.create_masked_store
    orig_call = executor_cls.__call__
    orig_rmw = getattr(builder_cls, "create_atomic_rmw", None)
    orig_cas = getattr(builder_cls, "create_atomic_cas", None)
    orig_dot = getattr(builder_cls, "create_dot", None)
    reduce_cls = getattr(interp, "ReduceOps", None)
    orig_reduce = getattr(reduce_cls, "apply_impl", None) if reduce_cls is not None else None

    def create_masked_load(self, ptrs, mask, *args, **kwargs):
        if _ACTIVE and _TRITON_DEPTH:
            _charge(read=_active_lanes(ptrs, mask) * _elt_bytes(ptrs))
        return orig_load(self, ptrs, mask, *args, **kwargs)

    def create_masked_store(self, ptrs, value, mask, *args, **kwargs):
        if _ACTIVE and _TRITON_DEPTH:
            _charge(written=_active_lanes(ptrs, mask) * _elt_bytes(ptrs))
        return orig_store(self, ptrs, value, mask, *args, **kwargs)

    def create_atomic_rmw(self, rmw_op, ptr, val, mask, *args, **kwargs):
        if _ACTIVE and _TRITON_DEPTH:
            b = _active_lanes(ptr, mask) * _elt_bytes(ptr)
            _charge(read=b, written=b)
        return orig_rmw(self, rmw_op, ptr, val, mask, *args, **kwargs)

    def create_atomic_cas(self, ptr, *args, **kwargs):
        if _ACTIVE and _TRITON_DEPTH:
            b = _active_lanes(ptr, None) * _elt_bytes(ptr)
            _charge(read=b, written=b)
        return orig_cas(self, ptr, *args, **kwargs)

    def create_dot(self, a, b, *args, **kwargs):
        if _ACTIVE and _TRITON_DEPTH:
            # (..., M, K) @ (..., K, N): 2*M*N*K per batch entry, on the whole
            # operand blocks (masked-out lanes are multiplied too)
            ad, bd = a.data, b.data
            _charge_flops(flops=2 * int(ad.size) * int(bd.shape[-1]), dtype=_np_dtype_name(a))
        return orig_dot(self, a, b, *args, **kwargs)

    def ew_hook(orig, weight):
        def hooked(self, *args, **kwargs):
            out = orig(self, *args, **kwargs)
            if _ACTIVE and _TRITON_DEPTH and _is_float_handle(out):
                _charge_flops(ew=weight * int(out.data.size))
            return out

        return hooked

    def reduce_apply(self, input, *args, **kwargs):
        if _ACTIVE and _TRITON_DEPTH:
            h = getattr(input, "handle", None)
            if h is not None and _is_float_handle(h):
                _charge_flops(ew=int(h.data.size))  # one combine per element reduced
        return orig_reduce(self, input, *args, **kwargs)

    def __call__(self, *args, **kwargs):
        global _TRITON_DEPTH
        if not _ACTIVE:
            return orig_call(self, *args, **kwargs)
        name = getattr(self.fn, "__name__", "triton_kernel")
        recs = []
        if _TRITON_DEPTH == 0:
            for m in _ACTIVE:
                if m.count_triton and not m._opaque:
                    rec = Launch(name, "triton")
                    m.launches.append(rec)
                    m._current_triton = rec
                    recs.append(m)
        sig = _sig_of(self, args, kwargs) if recs else ()
        for m in recs:
            m._current_triton.shape_sig = sig
        key = _launch_key(self, args, kwargs) if (_MEMO and recs) else None
        if recs and _PER_SAMPLE and not (key is not None and key in _MEMO[-1]):
            st = _PER_SAMPLE[-1]
            ref = st["ref"][st["i"]] if st["i"] < len(st["ref"]) else None
            st["i"] += 1
            if ref is not None and ref.name == name and _scales_by(ref.shape_sig, sig, st["k"]):
                k = st["k"]
                for m in recs:
                    rec = m._current_triton
                    rec.bytes_read, rec.bytes_written = k * ref.bytes_read, k * ref.bytes_written
                    rec.flops, rec.ew_flops, rec.mm_kind, rec.mm_dtype = (k * ref.flops, k * ref.ew_flops,
                                                                          ref.mm_kind, ref.mm_dtype)
                    m._current_triton = None
                st["inferred"] += 1
                return None
        elif recs and _PER_SAMPLE:
            _PER_SAMPLE[-1]["i"] += 1
        if key is not None and key in _MEMO[-1]:
            for m in recs:
                cached = _MEMO[-1][key]
                rec = m._current_triton
                rec.bytes_read, rec.bytes_written, rec.flops, rec.ew_flops, rec.mm_kind, rec.mm_dtype = cached
                m._current_triton = None
            return None
        _TRITON_DEPTH += 1
        try:
            return orig_call(self, *args, **kwargs)
        finally:
            _TRITON_DEPTH -= 1
            if _TRITON_DEPTH == 0:
                for m in recs:
                    rec = m._current_triton
                    if key is not None and rec is not None:
                        _MEMO[-1][key] = (rec.bytes_read, rec.bytes_written, rec.flops, rec.ew_flops,
                                          rec.mm_kind, rec.mm_dtype)
                    m._current_triton = None

    builder_cls.create_masked_load = create_masked_load
    builder_cls.create_masked_store = create_masked_store
    if orig_dot is not None:
        builder_cls.create_dot = create_dot
    for nm, weight in _EW_OPS.items():
        orig = getattr(builder_cls, nm, None)
        if orig is not None:
            setattr(builder_cls, nm, ew_hook(orig, weight))
    if orig_reduce is not None:
        reduce_cls.apply_impl = reduce_apply
    if orig_rmw is not None:
        builder_cls.create_atomic_rmw = create_atomic_rmw
    if orig_cas is not None:
        builder_cls.create_atomic_cas = create_atomic_cas
    executor_cls.__call__ = __call__
    # The module-level builder instance may have instance attributes shadowing
    # the class (it does not in 3.x); make sure it sees the hooks.
    inst = getattr(interp, "interpreter_builder", None)
    if inst is not None:
        for nm in ("create_masked_load", "create_masked_store", "create_atomic_rmw", "create_atomic_cas",
                   "create_dot", *_EW_OPS):
            if nm in vars(inst):
                delattr(inst, nm)
    _HOOKS["installed"] = True
    return True


def triton_hooks_installed() -> bool:
    return _HOOKS["installed"]


# shape-only runs (kernel bodies skipped): shared with the AOT capture
from scconv_triton.testing import skip_triton_launches  # noqa: E402


# ----------------------------------------------------------------------------- the dispatch mode
class _CountingMode(TorchDispatchMode):
    def __init__(self, meter: "Meter"):
        super().__init__()
        self.meter = meter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        m = self.meter
        if _TRITON_DEPTH or not m.count_aten:
            return func(*args, **kwargs)
        ns = getattr(func, "namespace", "")
        if ns in m.containers:
            return self._run_container(func, args, kwargs)
        m._opaque += 1  # an op is one launch: Triton launches inside it are its own business
        try:
            out = func(*args, **kwargs)
        finally:
            m._opaque -= 1
        m._record_aten(func, args, kwargs, out)
        return out

    def _run_container(self, func, args, kwargs):
        """Run a custom op's implementation with this mode re-entered."""
        devs = [t.device for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        dev = devs[0].type if devs else "cpu"
        key = {"cuda": torch._C.DispatchKey.CUDA, "cpu": torch._C.DispatchKey.CPU}.get(dev)
        if key is not None and hasattr(func, "redispatch"):
            try:
                with self:
                    return func.redispatch(torch._C.DispatchKeySet(key), *args, **kwargs)
            except NotImplementedError:
                pass
        # Could not look inside: count the container as one opaque launch.
        self.meter._opaque += 1
        try:
            out = func(*args, **kwargs)
        finally:
            self.meter._opaque -= 1
        self.meter._record_aten(func, args, kwargs, out)
        return out


def aten_flops(func, args, kwargs, out):
    """(FLOPs, "conv" | "matmul" | "", operand dtype) of one aten op, by torch's FLOP counter.

    The formulas are ``torch.utils.flop_counter``'s registry (convolutions and their
    backward, mm / addmm / bmm / baddbmm, attention), evaluated on the op's shapes
    exactly as ``FlopCounterMode`` does; every other op counts 0 FLOPs there (and
    here): elementwise and reduction ops are charged their bytes only.
    """
    try:
        from torch.utils.flop_counter import flop_registry
    except Exception:  # pragma: no cover - torch without a FLOP counter
        return 0, "", ""
    packet = getattr(func, "_overloadpacket", None)
    f = flop_registry.get(packet)
    if f is None:
        return 0, "", ""
    flops = int(f(*args, **kwargs, out_val=out))
    name = _base_name(func)
    kind = "conv" if "conv" in name else "matmul"
    t = next((a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor) and a.is_floating_point()),
             None)
    return flops, kind, (str(t.dtype).replace("torch.", "") if t is not None else "")


def _base_name(func) -> str:
    try:
        return func._schema.name.split("::")[-1]
    except Exception:
        return str(func).split(".")[-2] if "." in str(func) else str(func)


def _op_class(func):
    """(free, written_args): free -> no launch; written_args -> {arg name: overwrite-only}."""
    name = _base_name(func)
    if name in _ALLOC_OPS or name in _META_OPS or name in _VIEW_NOALIAS_OPS:
        return True, {}
    schema = getattr(func, "_schema", None)
    if schema is None:
        return False, {}
    written = {}
    for a in schema.arguments:
        ai = a.alias_info
        if ai is not None and ai.is_write:
            overwrite = a.kwarg_only or a.name == "out" or name in _OVERWRITE_OPS
            written[a.name] = overwrite
    rets = schema.returns
    if rets and not written:
        if all(r.alias_info is not None and not r.alias_info.is_write for r in rets):
            return True, {}
    return False, written


class Meter:
    """Count launches and bytes of everything run inside ``with meter:``.

    ``launches`` is the list of :class:`Launch` records in order; ``n_launches``,
    ``bytes_read``, ``bytes_written`` and ``total_bytes`` sum them.
    A meter may be entered several times; counts accumulate.
    """

    def __init__(self, *, count_aten: bool = True, count_triton: bool = True, containers=CONTAINER_NAMESPACES,
                 broadcast: str = "logical"):
        if broadcast not in ("logical", "memory"):
            raise ValueError(f"broadcast must be 'logical' or 'memory', got {broadcast!r}")
        self.broadcast = broadcast
        self.count_aten = count_aten
        self.count_triton = count_triton
        self.containers = tuple(containers)
        self.launches: list[Launch] = []
        self._current_triton = None
        self._opaque = 0
        self._mode = None
        self.triton_hooks = install_triton_hooks() if count_triton else False

    # -- context manager
    def __enter__(self):
        self._mode = _CountingMode(self)
        self._mode.__enter__()
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc):
        try:
            _ACTIVE.remove(self)
        finally:
            mode, self._mode = self._mode, None
            mode.__exit__(*exc)
        return False

    # -- recording
    def _record_aten(self, func, args, kwargs, out):
        free, written = _op_class(func)
        if free:
            return
        schema = getattr(func, "_schema", None)
        reads, writes = OrderedDict(), OrderedDict()
        if schema is not None:
            bound = {}
            pos = [a for a in schema.arguments if not a.kwarg_only]
            for a, v in zip(pos, args):
                bound[a.name] = v
            bound.update(kwargs)
            for nm, v in bound.items():
                ts = [t for t in tree_flatten(v)[0] if isinstance(t, torch.Tensor)]
                for t in ts:
                    if nm in written:
                        writes[_tensor_key(t)] = t
                        if not written[nm]:
                            reads[_tensor_key(t)] = t
                    else:
                        reads[_tensor_key(t)] = t
        else:
            for t in tree_flatten((args, kwargs))[0]:
                if isinstance(t, torch.Tensor):
                    reads[_tensor_key(t)] = t
        # Fresh returns are written; returns aliasing a mutated argument were counted above.
        rets = list(schema.returns) if schema is not None else []
        outs = list(out) if isinstance(out, (tuple, list)) and len(rets) == len(out) and len(rets) > 1 else [out]
        if len(rets) != len(outs):
            rets = [None] * len(outs)
        for r, o in zip(rets, outs):
            if r is not None and r.alias_info is not None:
                continue
            for t in tree_flatten(o)[0]:
                if isinstance(t, torch.Tensor):
                    writes[_tensor_key(t)] = t
        if not reads and not writes and not isinstance(out, torch.Tensor):
            return  # touched no tensor (e.g. a scalar query)
        flops, kind, dt = aten_flops(func, args, kwargs, out)
        self.launches.append(
            Launch(
                str(func).replace("aten.", "", 1) if str(func).startswith("aten.") else str(func),
                "aten",
                sum(tensor_bytes(t, self.broadcast) for t in reads.values()),
                sum(tensor_bytes(t, self.broadcast) for t in writes.values()),
                flops=flops, mm_kind=kind, mm_dtype=dt,
            )
        )

    # -- totals
    @property
    def n_launches(self) -> int:
        return len(self.launches)

    @property
    def bytes_read(self) -> int:
        return sum(r.bytes_read for r in self.launches)

    @property
    def bytes_written(self) -> int:
        return sum(r.bytes_written for r in self.launches)

    @property
    def total_bytes(self) -> int:
        return self.bytes_read + self.bytes_written

    @property
    def flops(self) -> int:
        return sum(r.flops for r in self.launches)

    @property
    def ew_flops(self) -> int:
        return sum(r.ew_flops for r in self.launches)

    def by_kind(self, kind: str) -> list[Launch]:
        return [r for r in self.launches if r.kind == kind]

    def table(self, unit: int | None = None, title: str = "") -> str:
        """A per-launch listing; bytes shown in units of ``unit`` bytes (e.g. S) if given."""
        lines = [title] if title else []
        fmt = (lambda b: f"{b / unit:8.3f} S") if unit else (lambda b: f"{b:12d} B")
        for i, r in enumerate(self.launches):
            lines.append(f"{i:3d} {r.kind:6s} {r.name:48s} R {fmt(r.bytes_read)}  W {fmt(r.bytes_written)}"
                         f"  F {r.flops:12d}")
        lines.append(f"    total: {self.n_launches} launches, {fmt(self.total_bytes)}, {self.flops} FLOPs")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- saved bytes
def _storage_key(t: torch.Tensor):
    s = t.untyped_storage()
    return (t.device, s.data_ptr()), s.nbytes()


class SavedBytes:
    """Record what autograd saves for backward inside ``with SavedBytes(...)``.

    ``exclude`` maps a group name to tensors (or an iterable of tensors, e.g.
    ``module.parameters()``) whose storages are reported apart. After the block:
    ``bytes`` (distinct storages not in any group), ``groups[name]`` (bytes per
    group), ``n_tensors`` (packs seen), ``storages`` (key -> nbytes, non-grouped).
    """

    def __init__(self, **exclude):
        self._excl = {}
        for group, ts in exclude.items():
            if isinstance(ts, torch.Tensor):
                ts = [ts]
            for t in ts or ():
                if isinstance(t, torch.Tensor):
                    self._excl[_storage_key(t)[0]] = group
        self.groups = {g: 0 for g in exclude}
        self.storages: dict = {}
        self._group_storages: dict = {}
        self.n_tensors = 0
        self._ctx = None

    def _pack(self, t):
        self.n_tensors += 1
        key, nb = _storage_key(t)
        group = self._excl.get(key)
        if group is not None:
            if key not in self._group_storages:
                self._group_storages[key] = nb
                self.groups[group] += nb
        elif key not in self.storages:
            self.storages[key] = nb
        return t

    @staticmethod
    def _unpack(t):
        return t

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        ctx, self._ctx = self._ctx, None
        ctx.__exit__(*exc)
        return False

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())


# ----------------------------------------------------------------------------- a training step
def _sync(device):
    if isinstance(device, torch.device) and device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_step(module, x: torch.Tensor, *, grad: torch.Tensor | None = None, warmup: int = 1,
                 input_requires_grad: bool = True, keep_meters: bool = False) -> dict:
    """Meter one training step of ``module`` on ``x``: forward, backward, saved bytes.

    Returns a dict with ``S`` (bytes of x), ``fwd_launches``, ``fwd_bytes``,
    ``bwd_launches``, ``bwd_bytes`` (and their ``_S`` versions in units of S),
    ``fwd_triton_launches`` / ``bwd_triton_launches``, ``saved_bytes`` (besides
    the input and the module's parameters and buffers), ``saved_S``,
    ``saved_param_bytes`` (parameters and buffers, e.g. running statistics),
    ``saved_input_bytes``, ``fwd_flops`` / ``bwd_flops`` (matrix FLOPs: torch's FLOP
    counter and tl.dot), ``fwd_ew_flops`` / ``bwd_ew_flops`` (elementwise float ops of
    Triton programs), ``fwd_launch_list`` / ``bwd_launch_list`` (per launch
    ``Launch.as_list()``, what benchmarks/floor.py prices); with ``keep_meters`` also the meters themselves
    (``fwd_meter``, ``bwd_meter``).
    """
    params = list(module.parameters()) + list(module.buffers())  # module state, not activations
    x = x.detach().requires_grad_(input_requires_grad)
    for _ in range(warmup):
        y = module(x)
        y.backward(torch.randn_like(y) if grad is None else grad)
    module.zero_grad(set_to_none=True)
    x.grad = None
    _sync(x.device)

    saved = SavedBytes(input=[x], params=params)
    fwd = Meter()
    with saved, fwd:
        y = module(x)
    g = torch.randn_like(y) if grad is None else grad
    bwd = Meter()
    with bwd:
        y.backward(g)
    _sync(x.device)
    S = tensor_bytes(x)
    res = {
        "S": S,
        "out_bytes": tensor_bytes(y),
        "fwd_launches": fwd.n_launches,
        "fwd_triton_launches": len(fwd.by_kind("triton")),
        "fwd_bytes": fwd.total_bytes,
        "fwd_S": fwd.total_bytes / S,
        "bwd_launches": bwd.n_launches,
        "bwd_triton_launches": len(bwd.by_kind("triton")),
        "bwd_bytes": bwd.total_bytes,
        "bwd_S": bwd.total_bytes / S,
        "saved_bytes": saved.bytes,
        "saved_S": saved.bytes / S,
        "saved_param_bytes": saved.groups["params"],
        "saved_input_bytes": saved.groups["input"],
        "fwd_flops": fwd.flops,
        "bwd_flops": bwd.flops,
        "fwd_ew_flops": fwd.ew_flops,
        "bwd_ew_flops": bwd.ew_flops,
        "fwd_launch_list": [r.as_list() for r in fwd.launches],
        "bwd_launch_list": [r.as_list() for r in bwd.launches],
    }
    if keep_meters:
        res["fwd_meter"] = fwd
        res["bwd_meter"] = bwd
    module.zero_grad(set_to_none=True)
    return res


def _main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="Per-launch listing of one SCConv training step.")
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--size", type=int, default=56)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--impl", choices=["reference", "fused", "conv_bn"], default="reference")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in sys.path:
        sys.path.insert(0, root)
    import scconv_triton
    from scconv_triton import reference

    torch.manual_seed(0)
    if a.impl == "reference":
        mod = reference.SCConv(a.channels)
    elif a.impl == "fused":
        mod = scconv_triton.SCConv(a.channels, backend="triton")
    else:
        mod = torch.nn.Sequential(torch.nn.Conv2d(a.channels, a.channels, 3, padding=1, bias=False),
                                  torch.nn.BatchNorm2d(a.channels))
    x = torch.randn(a.batch, a.channels, a.size, a.size)
    r = measure_step(mod, x, keep_meters=True)
    S = r["S"]
    print(r["fwd_meter"].table(S, "forward"))
    print(r["bwd_meter"].table(S, "backward"))
    print(f"saved for backward besides x and parameters: {r['saved_S']:.3f} S "
          f"(input {r['saved_input_bytes'] / S:.3f} S, params {r['saved_param_bytes']} B)")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
