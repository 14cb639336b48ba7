"""Drop-in nn.Modules: same names, arguments and state_dict as the reference.

Each module subclasses its reference twin, so parameters, buffers, state_dict keys
and constructor validation are shared by construction; only ``forward`` differs:
it runs the fused Triton path when ``backend.resolve`` says so, else the reference.
"""
from __future__ import annotations

import torch

from . import reference as ref
from .backend import _check as _check_backend
from .backend import resolve

__all__ = ["SRU", "CRU", "SCConv", "ScConv"]


class SRU(ref.SRU):
    """Fused SRU. Extra keyword: ``backend`` ("auto", "triton", "reference")."""

    def __init__(self, *args, backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = _check_backend(backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ref.check_input(x, self.channels, type(self).__name__)
        if resolve(x, self.backend) == "reference":
            return super().forward(x)
        from .ops import sru as _sru

        return _sru.sru_module_forward(self, x)


class CRU(ref.CRU):
    """Fused CRU. Extra keywords: ``backend``, ``recompute`` (see SCConv)."""

    def __init__(self, *args, backend: str = "auto", recompute: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = _check_backend(backend)
        self.recompute = bool(recompute)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ref.check_input(x, self.in_channels, type(self).__name__)
        if resolve(x, self.backend) == "reference":
            return super().forward(x)
        from .ops import cru as _cru

        return _cru.cru_module_forward(self, x)


class SCConv(ref.SCConv):
    """Fused SCConv = CRU(SRU(x)), a drop-in for a k x k convolution.

    Extra keywords beyond the reference: ``backend`` ("auto", "triton",
    "reference") and ``recompute`` (False: backward reuses the saved convolution
    outputs; True: it recomputes them from the saved squeezed tensors, saving
    about 1.75 S of activation memory for two extra convolutions).
    """

    def __init__(self, *args, backend: str = "auto", recompute: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = _check_backend(backend)
        self.recompute = bool(recompute)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ref.check_input(x, self.in_channels, type(self).__name__)
        if resolve(x, self.backend) == "reference":
            return super().forward(x)
        from .ops import scconv as _scconv

        return _scconv.scconv_module_forward(self, x)


ScConv = SCConv
