"""scconv-triton: fused Triton kernels for SCConv (CVPR 2023).

``scconv_triton.SCConv`` is a drop-in for the reference ``ScConv`` (same
arguments and state_dict); ``scconv_triton.reference`` is the pure-PyTorch
semantics every fused path is tested against; ``scconv_triton.models`` builds the
study's networks and ``scconv_triton.convert`` swaps the k x k convs of a model.
``scconv_triton.from_upstream`` replaces the upstream ``ScConv`` modules of a model
(any 2023 revision, found by structure and identified by running them).
"""
from . import reference
from .backend import interpreter_enabled, use_backend
from .modules import CRU, SRU, SCConv, ScConv

# models imports convert; the function `convert` then shadows the submodule of the
# same name as an attribute (``from scconv_triton.convert import ...`` still works).
from . import models  # noqa: E402  isort: skip
from .convert import ConversionReport, SCConvWithBias, convert, scconv_from_conv  # noqa: E402
from .upstream import from_upstream, identify_revision  # noqa: E402
from ._config import REVISIONS  # noqa: E402

__all__ = [
    "SRU", "CRU", "SCConv", "ScConv", "reference", "models", "convert", "scconv_from_conv",
    "ConversionReport", "SCConvWithBias", "use_backend", "interpreter_enabled", "from_upstream",
    "identify_revision", "REVISIONS",
]
__version__ = "0.1.0"
