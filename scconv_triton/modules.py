"""Drop-in nn.Modules: same names, arguments and state_dict as the reference.

Each module subclasses its reference twin, so parameters, buffers, state_dict keys
and constructor validation are shared by construction; only ``forward`` differs:
it runs the fused Triton path when ``backend.resolve`` says so, else the reference.
"""
from __future__ import annotations

import contextlib

import torch

from . import reference as ref
from .backend import _check as _check_backend
from .backend import resolve

__all__ = ["SRU", "CRU", "SCConv", "ScConv"]

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_params(module: torch.nn.Module, x: torch.Tensor, params=None) -> None:
    """Parameters must share the input's device and (outside autocast) dtype.

    ``params``: the tensors to check (default: every parameter of ``module``); the fused
    forwards pass the ones they hand to the kernels, which skips a walk over the module tree
    on every call. A mismatch raises here, before any kernel launches, with the parameter's
    name; the reference would fail later inside a convolution with a less direct message.
    """
    autocast = torch.is_autocast_enabled(x.device.type)
    if not autocast and x.dtype not in _KERNEL_DTYPES:
        raise TypeError(f"{type(module).__name__}: supported input dtypes are {_KERNEL_DTYPES}, got {x.dtype}")
    dev, dt = x.device, x.dtype
    if params is not None and all(p.device == dev and (autocast or p.dtype == dt) for p in params):
        return
    for name, p in module.named_parameters():
        if p.device != x.device:
            raise ValueError(
                f"{type(module).__name__}: parameter {name} is on {p.device} but the input is on {x.device}; "
                "move the module with .to(device)"
            )
        if not autocast and p.dtype != x.dtype:
            raise TypeError(
                f"{type(module).__name__}: parameter {name} is {p.dtype} but the input is {x.dtype}; "
                "cast the module with .to(dtype) or run under torch.autocast"
            )


def fused_inputs(module: torch.nn.Module, x: torch.Tensor, *params: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Check ``params`` against x (:func:`check_params`), then return x and ``params`` in the
    dtype the kernels run in.

    Under torch.autocast the layer runs in the autocast dtype, like a convolution:
    x and the (small) parameters are cast, and gradients flow back to the fp32
    parameters through the casts. Otherwise they are returned as they are.
    """
    check_params(module, x, params)
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        return tuple(t.to(dtype) for t in (x, *params))
    return (x, *params)


def _no_autocast(x: torch.Tensor):
    """The kernels run in the dtype fused_inputs chose; autocast must not re-cast inside.
    Outside autocast nothing to switch off (entering torch.autocast costs host time)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.autocast(x.device.type, enabled=False)
    return contextlib.nullcontext()


class _Fused:
    """What the three fused modules share: the backend choice and the checks before it."""

    backend: str

    def _takes_reference(self, x: torch.Tensor, channels: int) -> bool:
        """Validate x against the module, then say whether the reference path runs (its
        parameters are checked here; the fused path checks them in :func:`fused_inputs`)."""
        ref.check_input(x, channels, type(self).__name__)
        if resolve(x, self.backend) == "reference":
            check_params(self, x)
            return True
        return False


class SRU(_Fused, ref.SRU):
    """Fused SRU. Extra keyword: ``backend`` ("auto", "triton", "reference")."""

    def __init__(self, *args, backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = _check_backend(backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._takes_reference(x, self.channels):
            return super().forward(x)
        from .ops.sru import sru

        x, w, b = fused_inputs(self, x, *self.affine())
        with _no_autocast(x):
            return sru(
                x, w, b, group_num=self.group_num, eps=self.gn.eps, torch_gn=self.torch_gn,
                gate_treshold=self.gate_treshold, mode=self.math.code,
            )


class CRU(_Fused, ref.CRU):
    """Fused CRU. Extra keywords: ``backend``, ``recompute`` (see SCConv)."""

    def __init__(self, *args, backend: str = "auto", recompute: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = _check_backend(backend)
        self.recompute = bool(recompute)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._takes_reference(x, self.in_channels):
            return super().forward(x)
        from .ops.cru import cru

        x, *weights = fused_inputs(
            self, x, self.squeeze1.weight, self.squeeze2.weight, self.GWC.weight, self.GWC.bias,
            self.PWC1.weight, self.PWC2.weight,
        )
        with _no_autocast(x):
            return cru(x, *weights, self.shape, self.softmax, self.recompute)


class SCConv(_Fused, ref.SCConv):
    """Fused SCConv = CRU(SRU(x)), a drop-in for a k x k convolution.

    Extra keywords beyond the reference: ``backend`` ("auto", "triton",
    "reference"), ``stage`` and ``recompute``.

    ``stage=2`` (the default): the convolutions run in Triton too, with the SRU as the
    squeeze's prologue and the CRU fusion as the conv's epilogue, so s, Y1 and Y2 are never
    stored (kernels/stage2.py). Its backward forms dA and the convolution weights' gradients in
    one Triton pass over dout and the saved squeezed tensors, the convolutions' input gradients
    in another (dY formed in registers; kernels/stage2_bwd.py), each where its tile fits (else
    cuDNN, with Y1 / dY in memory), and the squeezes' and the SRU's
    backward in two Triton passes that rebuild s and ds in registers. It falls back to stage 1 where it does not run: more
    than 256 squeezed channels (up or low), an empty batch, fp64 on a GPU, or a layer whose
    conv tile does not fit (``scconv_triton.kernels.stage2.supports``).
    ``stage=1``: the SRU and CRU kernels around cuDNN convolutions.
    ``recompute``: stage 2 saves only x, the statistics and A (C-sized) and rebuilds up and low
    in backward (one more squeeze launch; about 0.5 S less activation memory); stage 1 rebuilds
    the convolution outputs from the saved squeezed tensors (about 1.75 S less, two extra
    convolutions). False: backward reuses what the forward stored.
    """

    def __init__(self, *args, backend: str = "auto", recompute: bool = False, stage: int = 2, **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = _check_backend(backend)
        self.recompute = bool(recompute)
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {stage!r}")
        self.stage = stage

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._takes_reference(x, self.in_channels):
            return super().forward(x)
        from .ops import stage2 as _stage2
        from .ops.scconv import scconv

        sru, cru = self.SRU, self.CRU
        x, *weights = fused_inputs(
            self, x, *sru.affine(), cru.squeeze1.weight, cru.squeeze2.weight, cru.GWC.weight,
            cru.GWC.bias, cru.PWC1.weight, cru.PWC2.weight,
        )
        with _no_autocast(x):
            if self.stage == 2 and _stage2.supports(cru.shape, x.shape, x.dtype, x.device):
                return _stage2.scconv_stage2(
                    x, *weights, group_num=sru.group_num, eps=sru.gn.eps, torch_gn=sru.torch_gn,
                    gate_treshold=sru.gate_treshold, mode=sru.math.code, shape=cru.shape, softmax=cru.softmax,
                    recompute=self.recompute,
                )
            return scconv(
                x, *weights, group_num=sru.group_num, eps=sru.gn.eps, torch_gn=sru.torch_gn,
                gate_treshold=sru.gate_treshold, mode=sru.math.code, shape=cru.shape, softmax=cru.softmax,
                recompute=self.recompute,
            )


ScConv = SCConv
