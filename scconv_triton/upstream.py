"""Replace the upstream ``ScConv`` modules of a model by ``scconv_triton.SCConv`` of the same revision.

``from_upstream(model)`` finds every module that is an upstream ScConv of any revision
(SPEC.md, "Upstream revisions") by its structure, not by its class name: a child with a
``gn`` (the SRU) and a child with ``squeeze1``, ``squeeze2``, ``GWC``, ``PWC1`` and ``PWC2``
convolutions (the CRU, ``GRU`` in the 2023-07-22 form). Which revision a module computes
is decided by running it: a float64 copy on the CPU and each candidate revision built
with the copied weights see the same probe input; a candidate matches when its SRU
output (so every gate decision) and its final output equal the module's to rounding,
on a probe where no r lies within rounding of the threshold. The module is then
replaced by an SCConv of that revision with its weights (same dtype, device, mode and
``requires_grad``). A module whose behaviour matches no revision, or more than one, is
left as it is and listed in the report with the reason.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn

from . import reference as _ref
from ._config import REVISIONS
from .convert import ConversionReport, SkippedConv

__all__ = ["from_upstream", "identify_revision", "ReplacedScConv"]

_CONVS = ("squeeze1", "squeeze2", "GWC", "PWC1", "PWC2")
_TOL = 1e-10  # relative to the output's largest magnitude: float64 rounding, far below any revision gap
_MARGIN = 1e-9  # |r - tau| below this makes a probe ambiguous (rounding may flip the gate)


@dataclass(frozen=True)
class ReplacedScConv:
    name: str
    upstream_class: str
    revision: str
    in_channels: int
    out_channels: int
    kernel_size: int
    stride: int
    params_before: int
    params_after: int

    def describe(self) -> str:
        return (
            f"replaced {self.name}: {self.upstream_class} -> SCConv(revision={self.revision!r}) "
            f"{self.in_channels}->{self.out_channels} k={self.kernel_size} s={self.stride}"
        )


class _Refused(Exception):
    pass


def _parts(module: nn.Module):
    """(sru attr, cru attr) of an upstream-ScConv-shaped module, or None."""
    children = module._modules
    sru = [a for a, m in children.items() if m is not None and isinstance(getattr(m, "gn", None), nn.Module)]
    cru = [
        a for a, m in children.items()
        if m is not None and all(isinstance(getattr(m, c, None), nn.Conv2d) for c in _CONVS)
    ]
    if not sru or not cru:
        return None
    pick = lambda names, pref: next((n for n in pref if n in names), names[0])  # noqa: E731
    return pick(sru, ("SRU",)), pick(cru, ("CRU", "GRU"))


def _describe(module: nn.Module):
    """Constructor arguments of an SCConv with the same shapes as ``module``, and its weights."""
    sru_attr, cru_attr = _parts(module)
    sru, cru = getattr(module, sru_attr), getattr(module, cru_attr)
    gn = sru.gn
    if isinstance(gn, nn.GroupNorm):
        if not gn.affine:
            raise _Refused("its nn.GroupNorm has no affine parameters (the SRU's w needs gamma)")
        affine, torch_gn, groups = ("weight", "bias"), True, gn.num_groups
    else:
        names = [n for n in (("weight", "bias"), ("gamma", "beta"))
                 if all(isinstance(getattr(gn, p, None), nn.Parameter) for p in n)]
        if not names:
            raise _Refused(f"its gn ({type(gn).__name__}) has neither weight/bias nor gamma/beta parameters")
        affine, torch_gn, groups = names[0], False, getattr(gn, "group_num", None)
    if not isinstance(groups, int):
        raise _Refused(f"cannot read the group count of its gn ({type(gn).__name__})")
    tau = getattr(sru, "gate_treshold", getattr(sru, "gate_threshold", None))
    if not isinstance(tau, (int, float)):
        raise _Refused("its SRU has no gate_treshold")
    gamma = getattr(gn, affine[0])
    c = gamma.numel()
    sq1, sq2, gwc, pwc1, pwc2 = (getattr(cru, n) for n in _CONVS)
    up, low = sq1.in_channels, sq2.in_channels
    if up + low != c or sq1.out_channels < 1:
        raise _Refused(f"squeeze1/squeeze2 take {up} + {low} channels, the SRU has {c}")
    r = up // sq1.out_channels
    alpha = up / c if int(up / c * c) == up else (up + 0.5) / c
    if gwc.bias is None or any(m.bias is not None for m in (sq1, sq2, pwc1, pwc2)):
        raise _Refused("its convolutions' biases differ from ScConv's (GWC only has one)")
    cfg = dict(
        op_channel=c, group_num=groups, gate_treshold=float(tau), alpha=alpha, squeeze_radio=r,
        group_size=gwc.groups, group_kernel_size=gwc.kernel_size[0], out_channels=gwc.out_channels,
        stride=gwc.stride[0], torch_gn=torch_gn,
    )
    state = {f"SRU.gn.{affine[0]}": gamma, f"SRU.gn.{affine[1]}": getattr(gn, affine[1])}
    for n in _CONVS:
        conv = getattr(cru, n)
        state[f"CRU.{n}.weight"] = conv.weight
        if conv.bias is not None:
            state[f"CRU.{n}.bias"] = conv.bias
    return cfg, affine, float(gn.eps), state


def _build(cls, revision, cfg, eps, state, **extra):
    with torch.random.fork_rng(devices=[]):  # constructing initialises weights: keep the caller's RNG
        new = cls(**cfg, revision=revision, **extra)
    new.SRU.gn.eps = eps
    new.to(next(iter(state.values())).dtype)
    with torch.no_grad():
        new.load_state_dict(state)
    return new


def _candidates(affine, torch_gn):
    return [n for n, rev in REVISIONS.items() if rev.affine == affine and (not torch_gn or rev.affine == ("weight", "bias"))]


def _probe(c, stride, seed):
    g = torch.Generator().manual_seed(seed)
    h = w = 5 * stride + 3
    return torch.randn(2, c, h, w, generator=g, dtype=torch.float64) * 1.5 + 0.3


def identify_revision(module: nn.Module) -> str:
    """The upstream revision ``module`` (an upstream-ScConv-shaped module) computes.

    Raises ValueError naming why when it matches no revision or more than one. The module
    itself is not touched: a float64 CPU copy runs the probes.
    """
    return _identify(module)[0]


def _identify(module: nn.Module):
    if _parts(module) is None:
        raise ValueError(f"{type(module).__name__} does not have an upstream ScConv's structure")
    try:
        cfg, affine, eps, _ = _describe(module)
    except _Refused as e:
        raise ValueError(str(e)) from None
    theirs = copy.deepcopy(module).to(device="cpu", dtype=torch.float64).eval()
    _, _, _, state = _describe(theirs)
    sru_attr = _parts(theirs)[0]
    seen = {}
    theirs_sru = getattr(theirs, sru_attr)
    hook = theirs_sru.register_forward_hook(lambda m, i, o: seen.__setitem__("sru", o))
    errors, matched = {}, []
    try:
        for rev in _candidates(affine, cfg["torch_gn"]):
            try:
                ours = _build(_ref.SCConv, rev, cfg, eps, state).eval()
            except ValueError as e:
                errors[rev] = f"not constructible ({e})"
                continue
            ok = True
            for seed in range(4):  # a probe is used when no gate decision is within rounding
                x = _probe(cfg["op_channel"], cfg["stride"], seed)
                if _gate_margin(ours.SRU, x) > _MARGIN:
                    break
            with torch.no_grad():
                try:
                    want = theirs(x)
                except Exception as e:  # noqa: BLE001 - any failure means "not this revision"
                    raise ValueError(f"running a float64 CPU copy failed: {type(e).__name__}: {e}") from None
                want_s = seen.get("sru")
                got_s = ours.SRU(x)
                got = ours.CRU(got_s)
            for a, b in ((got_s, want_s), (got, want)):
                if not isinstance(b, torch.Tensor) or a.shape != b.shape:
                    ok = False
                    errors[rev] = "different output shape"
                    break
                err = ((a - b).abs().max() / b.abs().max().clamp_min(1.0)).item() if b.numel() else 0.0
                if not err <= _TOL:
                    ok = False
                    errors[rev] = f"max relative difference {err:.1e}"
                    break
            if ok:
                matched.append(rev)
    finally:
        hook.remove()
    if len(matched) != 1:
        if matched:
            raise ValueError(f"ambiguous: matches revisions {matched} on the probes")
        tried = "; ".join(f"{k}: {v}" for k, v in errors.items()) or "no candidate revision for its parameters"
        raise ValueError(f"matches no known upstream revision ({tried})")
    return matched[0], cfg, eps


def _gate_margin(sru, x) -> float:
    """Smallest |r - tau| (and |w - tau| for per-channel masks) on ``x``: how far every gate is from flipping."""
    with torch.no_grad():
        w = sru.channel_weights()
        r = torch.sigmoid(sru.gn(x) * w)
        tau = sru.gate_treshold
        m = (r - tau).abs().min().item()
        if sru.math.mask == "channel":
            m = min(m, (w - tau).abs().min().item())
    return m


def from_upstream(
    model: nn.Module,
    *,
    inplace: bool = False,
    fused: bool = True,
    backend: str = "auto",
    recompute: bool = False,
) -> ConversionReport:
    """Replace every upstream ScConv in ``model`` by ``scconv_triton.SCConv`` of its revision.

    Modules are found by structure (see the module docstring) and their revision is decided
    by running them (``identify_revision``). ``inplace=False`` converts a deep copy; the
    report's ``model`` is the converted model (the replacement itself when ``model`` is one
    upstream ScConv). ``fused=True`` builds ``scconv_triton.SCConv`` (with ``backend`` and
    ``recompute``), False the pure-PyTorch reference. The report lists each replacement with
    its revision (``report.replaced[i].revision``) and each refused module with the reason.
    Modules that already are this library's SCConv are left alone (``report.unselected``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"from_upstream expects an nn.Module, got {type(model).__name__}")
    extra = {}
    if fused:
        from .backend import _check
        from .modules import SCConv as cls

        extra = dict(backend=_check(backend), recompute=bool(recompute))
    else:
        cls = _ref.SCConv
        if backend != "auto" or recompute:
            raise TypeError("backend/recompute need fused=True")
    target = model if inplace else copy.deepcopy(model)
    report = ConversionReport(model=target, action="from_upstream")
    built: dict[int, nn.Module | None] = {}

    def convert_one(module: nn.Module, name: str):
        key = id(module)
        if key in built:
            return built[key]
        try:
            revision, cfg, eps = _identify(module)
        except ValueError as e:
            report.skipped.append(SkippedConv(name or "(model)", str(e)))
            built[key] = None
            return None
        _, _, _, state = _describe(module)
        new = _build(cls, revision, cfg, eps, {k: v.detach() for k, v in state.items()}, **extra)
        ref_param = next(iter(state.values()))
        new.to(device=ref_param.device)
        for (k, p) in new.named_parameters():
            src = state.get(k)
            p.requires_grad_(src.requires_grad if src is not None else ref_param.requires_grad)
        new.train(module.training)
        built[key] = new
        report.replaced.append(ReplacedScConv(
            name=name or "(model)", upstream_class=type(module).__name__, revision=revision,
            in_channels=new.in_channels, out_channels=new.out_channels,
            kernel_size=cfg["group_kernel_size"], stride=cfg["stride"],
            params_before=sum(p.numel() for p in module.parameters()),
            params_after=sum(p.numel() for p in new.parameters()),
        ))
        return new

    def walk(module: nn.Module, prefix: str):
        for attr, child in list(module._modules.items()):
            if child is None:
                continue
            name = prefix + attr
            if isinstance(child, _ref.SCConv):
                report.unselected.append(name)
            elif _parts(child) is not None:
                new = convert_one(child, name)
                if new is not None:
                    setattr(module, attr, new)
            else:
                walk(child, name + ".")

    if isinstance(target, _ref.SCConv):
        report.unselected.append("(model)")
    elif _parts(target) is not None:
        new = convert_one(target, "")
        if new is not None:
            report.model = new
    else:
        walk(target, "")
    return report
