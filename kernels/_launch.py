"""What every kernel file of scconv_triton.kernels shares: Triton helpers, then launch helpers.

Triton helpers (imported into the kernels, never copied):
  acc(v, FP64)                cast to the accumulation dtype (fp64 for fp64 tensors, else fp32)
  div(a, b)                   a / b (fp64 without a division instruction)
  pix_off(p, W, s_h, s_w, FLAT)  element offset of a flat pixel index, for any strides

Launch helpers (host side):
  launcher                    decorator: run the launcher on its first tensor's CUDA device,
                              so kernels launch on the input's device and that device's current
                              stream whatever the current device is (a model on cuda:1 while
                              cuda:0 is current works)
  acc_dtype, FLOATS, NUM_WARPS, cdiv, np2, split_float, target_programs
  channels_fastest, memory_format, strides4
  pixel_layout(tensors)       (strides, FLAT): pixel addressing shared by several tensors
  stream_tiles, chw_tiles  tile shapes of the SRU (channel-pair) and the CRU kernels

Launch parameters that depend only on shapes and strides are cached (``functools.lru_cache``):
DenseNet's small layers and inference batches are launch-bound, so host work per launch counts.
"""
from __future__ import annotations

import functools
import struct

import torch
import triton
import triton.language as tl

__all__ = [
    "acc", "div", "pix_off", "launcher", "acc_dtype", "FLOATS", "NUM_WARPS", "cdiv", "np2", "split_float",
    "target_programs", "channels_fastest", "memory_format", "strides4", "pixel_layout",
    "stream_tiles", "chw_tiles",
]


# ----------------------------------------------------------------------------------------
# Triton helpers
# ----------------------------------------------------------------------------------------
@triton.jit
def acc(v, FP64: tl.constexpr):
    """Cast to the accumulation dtype: fp64 when FP64, else fp32."""
    if FP64:
        return tl.cast(v, tl.float64)
    else:
        return tl.cast(v, tl.float32)


@triton.jit
def div(a, b):
    """a / b. In fp64 as a times 1 / b from fp32's reciprocal and two Newton steps (within 2 ulp
    for |b| in fp32's range; b = 0 gives a x inf, as a / 0 does): an fp64 division is a
    subroutine call on the GPU, whose frame ptxas put on the stack (the AOT check). Other
    dtypes: a / b."""
    if b.dtype == tl.float64:
        r0 = (1.0 / b.to(tl.float32)).to(tl.float64)
        r = r0 * (2.0 - b * r0)
        r = r * (2.0 - b * r)
        return a * tl.where(tl.abs(r0) < float("inf"), r, r0)  # Newton turns an infinite r0 into nan
    else:
        return a / b


@triton.jit
def pix_off(p, W, s_h, s_w, FLAT: tl.constexpr):
    """Element offset (int64) of flat pixel index p = h * W + w (int32: p < H W < 2**31). FLAT:
    offset = p * s_w. h and w are divided out in int32: a 64-bit division is a subroutine call
    on the GPU, whose frame ptxas put on the stack."""
    if FLAT:
        return p.to(tl.int64) * s_w
    else:
        return (p // W).to(tl.int64) * s_h + (p % W).to(tl.int64) * s_w


# ----------------------------------------------------------------------------------------
# launch helpers
# ----------------------------------------------------------------------------------------
FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
NUM_WARPS = 4


def launcher(fn):
    """Run launcher ``fn`` on the CUDA device of its first tensor argument.

    Triton launches on the *current* device and its current stream; the guard makes that the
    input's device (and so its current stream). On CPU tensors (the interpreter) and when the
    device is already current it costs one attribute check.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        for a in args:
            if isinstance(a, torch.Tensor):
                if a.is_cuda and a.device.index != torch.cuda.current_device():
                    with torch.cuda.device(a.device):
                        return fn(*args, **kwargs)
                break
        return fn(*args, **kwargs)

    return wrapper


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation / statistics dtype: fp64 for fp64, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints; plain Python (``triton.cdiv`` is a constexpr function costing
    tens of microseconds per host call in recent Triton)."""
    return -(-int(a) // int(b))


def np2(v: int) -> int:
    """Smallest power of two >= max(v, 1), in plain Python (see ``cdiv``)."""
    v = max(int(v), 1)
    return 1 << (v - 1).bit_length()


@functools.lru_cache(maxsize=256)
def split_float(v: float) -> tuple[float, float]:
    """v = hi + lo with hi, lo fp32 (lets fp64 kernels see an fp64 tau / eps through fp32 args)."""
    hi = struct.unpack("f", struct.pack("f", float(v)))[0]  # no torch op: nothing to launch
    lo = struct.unpack("f", struct.pack("f", float(v) - hi))[0]
    return hi, lo


_SM_COUNT: dict = {}


def target_programs(t: torch.Tensor) -> int:
    """Programs wanted to fill the machine: 4 per SM on a GPU, a few in the interpreter."""
    if t.is_cuda:
        idx = t.device.index if t.device.index is not None else torch.cuda.current_device()
        n = _SM_COUNT.get(idx)
        if n is None:
            n = _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
        return 4 * n
    return 8


def channels_fastest(t: torch.Tensor) -> bool:
    """True for channels_last-like storage (channel stride 1, pixels not contiguous)."""
    return t.stride(1) == 1 and t.shape[1] > 1 and t.stride(3) != 1


def memory_format(channels_last: bool):
    return torch.channels_last if channels_last else torch.contiguous_format


def strides4(t: torch.Tensor) -> tuple:
    """Strides of a 4-D tensor; zeros for an empty one (its pointer is never dereferenced)."""
    return tuple(t.stride()) if t.numel() else (0, 0, 0, 0)


@functools.lru_cache(maxsize=1024)
def _pixel_layout(specs: tuple) -> tuple:
    flat = []
    for (sn, sc, sh, sw), (h, w) in specs:
        if h == 1:
            flat.append((sn, sc, 0, sw))
        elif w == 1:
            flat.append((sn, sc, 0, sh))
        elif sh == w * sw:
            flat.append((sn, sc, 0, sw))
        else:
            return tuple(s for s, _ in specs), False
    return tuple(flat), True


def pixel_layout(tensors) -> tuple:
    """(per-tensor (s_n, s_c, s_h, s_w), FLAT) for tensors of the same (N, C, H, W) pixels.

    FLAT when, for every tensor, pixel p = h * W + w sits at p * s_w (the s_w returned; s_h 0):
    one multiply per offset instead of a divide. Otherwise every tensor keeps its own strides
    and the kernels use (p // W, p % W) addressing.
    """
    return _pixel_layout(tuple((tuple(t.stride()), tuple(t.shape[2:])) for t in tensors))


_TILE = 1024  # elements per [channels x pixels] tile of the streaming kernels


@functools.lru_cache(maxsize=1024)
def _stream_tiles(cfast: bool, fp64: bool, rows: int, hw: int, tile: int | None, scale: int):
    if tile is None:
        # channels_last: longer pixel runs per program amortise the per-channel vector loads;
        # fp64 halves the tile (register pressure)
        tile = 2 * _TILE if cfast else _TILE
        tile = scale * (tile // 2 if fp64 else tile)
    if cfast:
        bc = min(np2(rows), 32, tile)
        bp = min(np2(hw), max(1, tile // bc))
    else:
        bp = min(np2(hw), tile)
        bc = min(np2(rows), max(1, tile // bp))
    return bc, bp, (8 if bc * bp >= 2048 else 4)


def stream_tiles(x: torch.Tensor, rows: int, hw: int, tile: int | None = None, scale: int = 1):
    """(BC, BP, num_warps) of a [channels x pixels] tile over ``rows`` channels and ``hw`` pixels
    of x: pixels fastest for NCHW, channels fastest for channels_last; ``tile`` elements (default
    ``scale`` x 1024 NCHW, x 2048 channels_last, halved for fp64)."""
    return _stream_tiles(channels_fastest(x), x.dtype == torch.float64, int(rows), int(hw), tile, int(scale))


# (channels_last, reducing over H*W) -> (BLOCK_C, BLOCK_HW): sizes that keep the CRU kernels
# under ~100 registers in the JIT's specialisation
_CHW_TILES = {
    (False, False): (8, 128),
    (True, False): (32, 32),
    (False, True): (4, 256),
    (True, True): (16, 32),
}


@functools.lru_cache(maxsize=1024)
def _chw_tiles(cl: bool, loop: bool, channels: int, hw: int):
    bc, bhw = _CHW_TILES[(cl, loop)]
    return min(bc, np2(channels)), min(bhw, np2(hw))


def chw_tiles(t: torch.Tensor, channels: int, hw: int, loop: bool = False):
    """(BLOCK_C, BLOCK_HW) of the CRU kernels for an (N, C, H, W) activation: spatial-major when
    H*W is contiguous (NCHW), channel-major for channels_last; ``loop``: the tile of kernels that
    loop over H*W (pool, reduce)."""
    cl = t.dim() == 4 and t.stride(1) == 1 and channels > 1
    return _chw_tiles(cl, bool(loop), int(channels), int(hw))
