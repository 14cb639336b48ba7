"""scconv-triton: fused Triton kernels for SCConv (CVPR 2023).

``scconv_triton.SCConv`` is a drop-in for the reference ``ScConv`` (same
arguments and state_dict); ``scconv_triton.reference`` is the pure-PyTorch
semantics every fused path is tested against.
"""
from . import reference
from .backend import interpreter_enabled, use_backend
from .modules import CRU, SRU, SCConv, ScConv

__all__ = ["SRU", "CRU", "SCConv", "ScConv", "reference", "use_backend", "interpreter_enabled"]
__version__ = "0.1.0"
