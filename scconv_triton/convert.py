"""Replace the k x k convolutions of an existing model by SCConv.

``convert(model)`` walks the model, selects ``nn.Conv2d`` modules (by kernel
size, by name, by a predicate) and puts an SCConv with the same input and output
channels, kernel size (SCConv's ``group_kernel_size``) and stride in each one's
place, under the same name, on the conv's device and dtype. Convolutions SCConv
cannot stand in for are left untouched and listed in the report with the reason;
nothing is replaced silently wrong.

What transfers and what does not
--------------------------------
SCConv is a different operator, not a reparametrisation of a convolution: the
conv's ``weight`` is discarded and the SCConv starts from its own initialisation
(PyTorch's defaults, or ``init(module)`` if given). Kept from the conv: in/out
channels, kernel size, stride, device, dtype, train/eval mode, and ``requires_grad``
of its weight (a frozen conv gives a frozen SCConv).

The conv's bias (``bias=`` option)
----------------------------------
SCConv has no output bias of its own: its only bias is GWC's, which sits inside
the CRU and is scaled by the softmax attention, so a conv bias cannot be folded
into it exactly. Hence:

- ``bias="keep"`` (default): a conv with a bias is replaced by ``SCConvWithBias``:
  the SCConv (as ``<name>.scconv``) followed by a parameter ``<name>.bias`` of
  shape (out_channels,), initialised with a copy of the conv's bias and added to
  SCConv's output. It is the conv's own per-channel offset, kept exactly.
- ``bias="drop"``: the bias is discarded (right when a normalisation follows,
  which absorbs any per-channel offset); the report marks it "dropped".
- ``bias="skip"``: convs with a bias are not replaced; they are listed as skipped.

Convs without a bias (every conv of ResNet and DenseNet) are unaffected by the option.
"""
from __future__ import annotations

import copy
import fnmatch
import inspect
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.nn as nn

from . import reference as _ref
from ._config import DEFAULT_REVISION, GATES, REVISIONS, SOFTMAXES, check_revision, check_scconv, revision_group_num

__all__ = [
    "convert",
    "scconv_from_conv",
    "incompatibility",
    "ConversionReport",
    "ReplacedConv",
    "SkippedConv",
    "SCConvWithBias",
]

BIAS_OPTIONS = ("keep", "drop", "skip")
# Taken from each conv; passing them to convert() is an error.
_FROM_CONV = ("op_channel", "out_channels", "stride", "group_kernel_size")
# SCConv internals are never converted (its GWC is a k x k conv).
_SCCONV_TYPES = (_ref.SCConv, _ref.SRU, _ref.CRU)  # + SCConvWithBias, below


class SCConvWithBias(nn.Module):
    """An SCConv followed by a per-output-channel bias: what replaces a conv with a bias.

    state_dict keys: ``scconv.*`` (the SCConv's own) and ``bias`` (the conv's, copied).
    A wrapper rather than an SCConv subclass, so the SCConv's own parameters, which
    its fused path reads, stay exactly those of an SCConv.
    """

    def __init__(self, scconv: nn.Module):
        super().__init__()
        self.scconv = scconv
        self.bias = nn.Parameter(torch.zeros(scconv.out_channels))

    @property
    def in_channels(self) -> int:
        return self.scconv.in_channels

    @property
    def out_channels(self) -> int:
        return self.scconv.out_channels

    @property
    def stride(self) -> int:
        return self.scconv.stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scconv(x) + self.bias.view(1, -1, 1, 1)


def _fused_cls():
    from .modules import SCConv

    return SCConv


@dataclass(frozen=True)
class ReplacedConv:
    name: str
    in_channels: int
    out_channels: int
    kernel_size: int
    stride: int
    bias: str  # "none", "kept" or "dropped"
    params_before: int
    params_after: int

    def describe(self) -> str:
        return (
            f"replaced {self.name}: {self.in_channels}->{self.out_channels} k={self.kernel_size} s={self.stride}"
            + ("" if self.bias == "none" else f" bias {self.bias}")
        )


@dataclass(frozen=True)
class SkippedConv:
    name: str
    reason: str

    def describe(self) -> str:
        return f"skipped  {self.name}: {self.reason}"


@dataclass
class ConversionReport:
    """What ``convert`` did. ``model`` is the converted model (the input itself when inplace)."""

    model: nn.Module
    replaced: list = field(default_factory=list)  # [ReplacedConv]
    skipped: list = field(default_factory=list)  # [SkippedConv]: selected but incompatible
    unselected: list = field(default_factory=list)  # names of Conv2d the filters left out
    action: str = "convert"  # which function made the report (convert / from_upstream)

    @property
    def replaced_names(self) -> list:
        return [r.name for r in self.replaced]

    @property
    def skipped_names(self) -> list:
        return [s.name for s in self.skipped]

    @property
    def params_before(self) -> int:
        return sum(r.params_before for r in self.replaced)

    @property
    def params_after(self) -> int:
        return sum(r.params_after for r in self.replaced)

    def __len__(self) -> int:
        return len(self.replaced)

    def __str__(self) -> str:
        what = "module(s)" if any(hasattr(r, "revision") for r in self.replaced) else "conv(s)"
        lines = [
            f"{self.action}: replaced {len(self.replaced)} {what} "
            f"({self.params_before:,} -> {self.params_after:,} parameters), "
            f"skipped {len(self.skipped)}, not selected {len(self.unselected)}"
        ]
        lines += ["  " + r.describe() for r in (*self.replaced, *self.skipped)]
        return "\n".join(lines)


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _scconv_defaults() -> dict:
    sig = inspect.signature(_ref.SCConv.__init__)
    return {
        n: p.default
        for n, p in sig.parameters.items()
        if p.default is not inspect.Parameter.empty and n not in ("self",)
    }


def _check_options(fused: bool, bias: str, kwargs: dict) -> None:
    """Validate the options that do not depend on a conv; raise, never skip, on these."""
    if bias not in BIAS_OPTIONS:
        raise ValueError(f"bias must be one of {BIAS_OPTIONS}, got {bias!r}")
    for name in _FROM_CONV:
        if name in kwargs:
            raise TypeError(f"convert() takes {name!r} from each conv; do not pass it")
    allowed = set(inspect.signature(_ref.SCConv.__init__).parameters) - {"self", *_FROM_CONV}
    if fused:
        allowed |= {"backend", "recompute", "stage"}
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        extra = " (backend/recompute/stage need fused=True)" if not fused and {"backend", "recompute", "stage"} & set(unknown) else ""
        raise TypeError(f"unknown SCConv keyword argument(s) {unknown}{extra}; allowed: {sorted(allowed)}")
    if "revision" in kwargs and kwargs["revision"] not in REVISIONS:
        raise ValueError(f"revision must be one of {tuple(REVISIONS)}, got {kwargs['revision']!r}")
    if "gate" in kwargs and kwargs["gate"] is not None and kwargs["gate"] not in GATES:
        raise ValueError(f"gate must be one of {GATES}, got {kwargs['gate']!r}")
    check_revision(kwargs.get("revision", DEFAULT_REVISION), kwargs.get("gate"), kwargs.get("torch_gn"))
    if "softmax" in kwargs and kwargs["softmax"] not in SOFTMAXES:
        raise ValueError(f"softmax must be one of {SOFTMAXES}, got {kwargs['softmax']!r}")
    if "gate_treshold" in kwargs and not 0.0 < float(kwargs["gate_treshold"]) < 1.0:
        raise ValueError(f"gate_treshold must satisfy 0 < tau < 1, got {kwargs['gate_treshold']}")
    if "alpha" in kwargs and not 0.0 < float(kwargs["alpha"]) < 1.0:
        raise ValueError(f"alpha must satisfy 0 < alpha < 1, got {kwargs['alpha']}")
    for name in ("group_num", "squeeze_radio", "group_size"):
        if name in kwargs:
            v = kwargs[name]
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    if fused and "backend" in kwargs:
        from .backend import _check

        _check(kwargs["backend"])


def incompatibility(conv: nn.Module, *, bias: str = "keep", **scconv_kwargs) -> str | None:
    """Why SCConv (built with ``scconv_kwargs``) cannot replace ``conv``; None if it can."""
    if not isinstance(conv, nn.Conv2d):
        return f"not an nn.Conv2d ({type(conv).__name__})"
    if isinstance(conv, nn.modules.lazy.LazyModuleMixin) and conv.has_uninitialized_params():
        return "lazy conv with uninitialised parameters (run a forward pass first)"
    kh, kw = _pair(conv.kernel_size)
    if kh != kw:
        return f"non-square kernel {(kh, kw)}: SCConv's GWC is k x k"
    k = kh
    if k % 2 == 0:
        return f"even kernel size {k}: SCConv needs an odd kernel (padding k//2 centred)"
    sh, sw = _pair(conv.stride)
    if sh != sw:
        return f"non-square stride {(sh, sw)}"
    if _pair(conv.dilation) != (1, 1):
        return f"dilation {tuple(_pair(conv.dilation))} != 1: SCConv has no dilation"
    if conv.groups != 1:
        return f"groups={conv.groups} != 1: SCConv replaces dense convolutions only"
    pad = conv.padding
    if isinstance(pad, str):
        ok = pad == "same" or (pad == "valid" and k == 1)
        if not ok:
            return f"padding={pad!r} is not k//2 = {k // 2}"
    elif _pair(pad) != (k // 2, k // 2):
        return f"padding {tuple(_pair(pad))} != k//2 = {k // 2}: SCConv pads k//2"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r}: SCConv pads with zeros"
    if conv.bias is not None and bias == "skip":
        return "conv has a bias and bias='skip'"
    cfg = _scconv_defaults()
    cfg.update({k_: v for k_, v in scconv_kwargs.items() if k_ not in ("backend", "recompute", "stage")})
    revision = cfg.pop("revision", DEFAULT_REVISION)
    gate, torch_gn = cfg.pop("gate", None), cfg.pop("torch_gn", None)
    cfg.pop("softmax", None)
    try:
        check_revision(revision, gate, torch_gn)
        check_scconv(
            conv.in_channels,
            revision_group_num(revision, cfg["group_num"]),
            cfg["gate_treshold"],
            cfg["alpha"],
            cfg["squeeze_radio"],
            cfg["group_size"],
            k,
            out_channels=conv.out_channels,
            stride=sh,
        )
    except ValueError as e:
        return f"SCConv({conv.in_channels} -> {conv.out_channels}) rule broken: {e}"
    return None


def scconv_from_conv(
    conv: nn.Conv2d,
    *,
    fused: bool = True,
    bias: str = "keep",
    init: Callable[[nn.Module], None] | None = None,
    **scconv_kwargs,
) -> nn.Module:
    """Build the SCConv that replaces ``conv`` (see the module docstring); ValueError if it cannot."""
    _check_options(fused, bias, scconv_kwargs)
    why = incompatibility(conv, bias=bias, **scconv_kwargs)
    if why is not None:
        raise ValueError(f"cannot replace {type(conv).__name__} by SCConv: {why}")
    return _build(conv, fused, bias, init, scconv_kwargs)


def _build(conv, fused, bias, init, kwargs):
    keep_bias = conv.bias is not None and bias == "keep"
    cls = _fused_cls() if fused else _ref.SCConv
    k = _pair(conv.kernel_size)[0]
    w = conv.weight
    new = cls(
        conv.in_channels,
        out_channels=conv.out_channels,
        stride=_pair(conv.stride)[0],
        group_kernel_size=k,
        **kwargs,
    )
    if init is not None:
        init(new)
    if keep_bias:
        new = SCConvWithBias(new)
    new.to(device=w.device, dtype=w.dtype)
    if keep_bias:
        with torch.no_grad():
            new.bias.copy_(conv.bias)
    new.train(conv.training)
    new.requires_grad_(w.requires_grad)
    return new


def _matcher(patterns):
    if patterns is None:
        return None
    if isinstance(patterns, (str, re.Pattern)):
        patterns = [patterns]
    pats = list(patterns)

    def match(name: str) -> bool:
        for p in pats:
            if isinstance(p, re.Pattern):
                if p.fullmatch(name):
                    return True
            elif fnmatch.fnmatchcase(name, p):
                return True
        return False

    return match


def _kernel_filter(kernel_size):
    if kernel_size is None:
        return lambda ks: True
    sizes = {kernel_size} if isinstance(kernel_size, int) else set(kernel_size)
    for s in sizes:
        if isinstance(s, bool) or not isinstance(s, int) or s < 1:
            raise ValueError(f"kernel_size must be a positive int, an iterable of them, or None; got {kernel_size!r}")
    return lambda ks: ks[0] == ks[1] and ks[0] in sizes


def convert(
    model: nn.Module,
    *,
    kernel_size: int | Iterable[int] | None = 3,
    include=None,
    exclude=None,
    predicate: Callable[[str, nn.Conv2d], bool] | None = None,
    inplace: bool = False,
    fused: bool = True,
    bias: str = "keep",
    strict: bool = False,
    init: Callable[[nn.Module], None] | None = None,
    **scconv_kwargs,
) -> ConversionReport:
    """Replace the selected k x k ``nn.Conv2d`` modules of ``model`` by SCConv.

    Selection (all must hold): the conv is square with size in ``kernel_size``
    (an int, an iterable of ints, or None for any); its dotted name matches one
    of ``include`` (glob patterns such as ``"layer1.*"`` / ``"*.conv2"``, or
    compiled regexes matched in full; None = all) and none of ``exclude``;
    ``predicate(name, conv)`` is true. Convs inside SCConv modules are never
    touched. Selected convs SCConv cannot replace (dilation, groups, padding
    other than k//2, padding_mode, channel counts breaking SCConv's rules for the
    given ``scconv_kwargs``, a bias with ``bias="skip"``) are skipped and listed
    with the reason; with ``strict=True`` any skip raises ValueError instead.

    ``inplace=False`` (default) converts a deep copy; the report's ``model`` is
    the converted model either way. ``fused=True`` builds
    ``scconv_triton.SCConv`` (``backend=``/``recompute=`` accepted), False the
    pure-PyTorch reference. Other keywords (group_num, gate_treshold, alpha,
    squeeze_radio, group_size, gate, softmax, torch_gn) go to every SCConv;
    in/out channels, stride and kernel size come from each conv. ``init``, if
    given, is called on each new SCConv before it is moved to the conv's device.
    A conv module shared under several names is replaced by one shared SCConv.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert expects an nn.Module, got {type(model).__name__}")
    _check_options(fused, bias, scconv_kwargs)
    ks_ok = _kernel_filter(kernel_size)
    inc, exc = _matcher(include), _matcher(exclude)
    if predicate is not None and not callable(predicate):
        raise TypeError("predicate must be callable(name, conv) -> bool")

    target = model if inplace else copy.deepcopy(model)
    report = ConversionReport(model=target)
    if isinstance(target, _SCCONV_TYPES + (SCConvWithBias,)):
        return report
    done: dict[int, bool] = {}  # id(conv) -> replace it?
    plan = []  # (parent, attr, conv, full name)

    def walk(module: nn.Module, prefix: str):
        for attr, child in module._modules.items():
            if child is None:
                continue
            name = prefix + attr
            if isinstance(child, _SCCONV_TYPES + (SCConvWithBias,)):
                continue
            if isinstance(child, nn.Conv2d):
                plan.append((module, attr, child, name))
            else:
                walk(child, name + ".")

    if isinstance(target, nn.Conv2d):
        raise TypeError("convert() replaces convs inside a model; use scconv_from_conv(conv) for a bare conv")
    walk(target, "")

    # Decide everything first, so strict=True raises before the model is touched.
    decisions = []  # (parent, attr, conv, name)
    for parent, attr, conv, name in plan:
        key = id(conv)
        if key in done:  # shared module seen under another name: same decision
            decisions.append((parent, attr, conv, name))
            continue
        selected = (
            ks_ok(_pair(conv.kernel_size))
            and (inc is None or inc(name))
            and not (exc is not None and exc(name))
            and (predicate is None or bool(predicate(name, conv)))
        )
        if not selected:
            report.unselected.append(name)
            done[key] = False
        else:
            why = incompatibility(conv, bias=bias, **scconv_kwargs)
            if why is not None:
                report.skipped.append(SkippedConv(name, why))
            done[key] = why is None
        decisions.append((parent, attr, conv, name))
    if strict and report.skipped:
        raise ValueError("convert(strict=True): some selected convs cannot be replaced:\n" + str(report))

    built: dict[int, nn.Module] = {}
    for parent, attr, conv, name in decisions:
        key = id(conv)
        if not done[key]:
            continue
        if key in built:
            setattr(parent, attr, built[key])
            continue
        new = built[key] = _build(conv, fused, bias, init, scconv_kwargs)
        setattr(parent, attr, new)
        report.replaced.append(
            ReplacedConv(
                name=name,
                in_channels=conv.in_channels,
                out_channels=conv.out_channels,
                kernel_size=_pair(conv.kernel_size)[0],
                stride=_pair(conv.stride)[0],
                bias="none" if conv.bias is None else ("kept" if bias == "keep" else "dropped"),
                params_before=sum(p.numel() for p in conv.parameters()),
                params_after=sum(p.numel() for p in new.parameters()),
            )
        )
    return report
