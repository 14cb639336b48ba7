"""Configuration checks shared by the reference and the fused modules.

Pure Python (no torch, no triton): both layers validate with the same code so a
config is accepted or refused identically, with the same message, whichever
implementation the user picks.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass

GATES = ("soft", "hard")
SOFTMAXES = ("channel", "pairwise")


def _require(cond: bool, rule: str) -> None:
    if not cond:
        raise ValueError(rule)


def _int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(value)


def _real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    return float(value)


def check_sru(channels, group_num, gate_treshold, gate: str = "soft") -> None:
    """Rules of SRU(channels, group_num, gate_treshold, gate)."""
    channels = _int("channels", channels)
    group_num = _int("group_num", group_num)
    tau = _real("gate_treshold", gate_treshold)
    _require(channels >= 1, f"channels must be >= 1, got {channels}")
    _require(group_num >= 1, f"group_num must be >= 1, got {group_num}")
    _require(
        channels % group_num == 0,
        f"channels ({channels}) must be divisible by group_num ({group_num})",
    )
    _require(
        channels % 2 == 0,
        f"channels ({channels}) must be even: the SRU cross-reconstruction pairs channel c with c + C/2",
    )
    _require(0.0 < tau < 1.0, f"gate_treshold must satisfy 0 < tau < 1, got {tau}")
    _require(gate in GATES, f"gate must be one of {GATES}, got {gate!r}")


@dataclass(frozen=True)
class CRUShape:
    """Channel bookkeeping of the CRU, derived once from its arguments."""

    in_channels: int
    out_channels: int
    up: int  # u = int(alpha * C)
    low: int  # l = C - u
    up_sq: int  # u // r
    low_sq: int  # l // r
    pwc2_out: int  # out_channels - l // r (may be 0)
    kernel_size: int
    group_size: int
    stride: int


def check_cru(
    op_channel,
    alpha,
    squeeze_radio,
    group_size,
    group_kernel_size,
    out_channels=None,
    stride=1,
    softmax: str = "channel",
) -> CRUShape:
    """Rules of CRU(...) from SPEC.md; returns the derived channel counts."""
    c = _int("op_channel", op_channel)
    alpha = _real("alpha", alpha)
    r = _int("squeeze_radio", squeeze_radio)
    g = _int("group_size", group_size)
    k = _int("group_kernel_size", group_kernel_size)
    cout = c if out_channels is None else _int("out_channels", out_channels)
    s = _int("stride", stride)
    _require(c >= 1, f"op_channel must be >= 1, got {c}")
    _require(cout >= 1, f"out_channels must be >= 1, got {cout}")
    _require(0.0 < alpha < 1.0, f"alpha must satisfy 0 < alpha < 1, got {alpha}")
    _require(r >= 1, f"squeeze_radio must be >= 1, got {r}")
    _require(g >= 1, f"group_size must be >= 1, got {g}")
    _require(k >= 1 and k % 2 == 1, f"group_kernel_size must be odd, got {k}")
    _require(s >= 1, f"stride must be >= 1, got {s}")
    _require(softmax in SOFTMAXES, f"softmax must be one of {SOFTMAXES}, got {softmax!r}")
    u = int(alpha * c)
    low = c - u
    _require(
        u // r >= 1,
        f"up channels // squeeze_radio must be >= 1 (int(alpha*C) = {u}, squeeze_radio = {r})",
    )
    _require(
        low // r >= 1,
        f"low channels // squeeze_radio must be >= 1 (C - int(alpha*C) = {low}, squeeze_radio = {r})",
    )
    _require(
        (u // r) % g == 0,
        f"up channels // squeeze_radio ({u // r}) must be divisible by group_size ({g})",
    )
    _require(cout % g == 0, f"out_channels ({cout}) must be divisible by group_size ({g})")
    _require(
        cout - low // r >= 0,
        f"out_channels ({cout}) must be >= low channels // squeeze_radio ({low // r}): "
        "PWC2 produces out_channels - l//r channels",
    )
    return CRUShape(c, cout, u, low, u // r, low // r, cout - low // r, k, g, s)


def check_scconv(
    op_channel,
    group_num,
    gate_treshold,
    alpha,
    squeeze_radio,
    group_size,
    group_kernel_size,
    out_channels=None,
    stride=1,
    gate="soft",
    softmax="channel",
) -> CRUShape:
    check_sru(op_channel, group_num, gate_treshold, gate)
    return check_cru(
        op_channel, alpha, squeeze_radio, group_size, group_kernel_size, out_channels, stride, softmax
    )
