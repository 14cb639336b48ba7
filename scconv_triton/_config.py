"""Configuration checks shared by the reference and the fused modules.

Pure Python (no torch, no triton): both layers validate with the same code so a
config is accepted or refused identically, with the same message, whichever
implementation the user picks.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, field

GATES = ("soft", "hard")
SOFTMAXES = ("channel", "pairwise")

# The SRU's math, as three orthogonal switches (SPEC.md, "Upstream revisions"):
WEIGHTINGS = ("sum", "softmax")  # w = gamma / sum(gamma) | softmax(gamma) over the C channels
# soft: W1 = where(r > tau, 1, r), W2 = where(r > tau, 0, r); the others are binary masks
# M1 and M2 = 1 - M1 with M1 = [r > tau] (gt), [r >= tau] (ge) or, per channel, [w > tau] (channel)
MASKS = ("soft", "gt", "ge", "channel")
OPERANDS = ("x", "gn", "rx")  # what the binary masks multiply: x, gn(x) or r * x


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


def check_sru(channels, group_num, gate_treshold, gate: str | None = "soft") -> None:
    """Rules of SRU(channels, group_num, gate_treshold, gate); gate None = the revision's rule."""
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
    _require(gate is None or gate in GATES, f"gate must be one of {GATES}, got {gate!r}")


_BY_CODE: dict = {}


@dataclass(frozen=True)
class SRUMath:
    """One point of the SRU's switch space; ``code`` is the int the fused path carries.

    code = mask + 4 * operand + 16 * weighting (indices into MASKS, OPERANDS, WEIGHTINGS),
    so the current form (soft, x, sum) is 0 and its hard gate (gt, x, sum) is 1: a legacy
    ``hard`` bool means the same thing as a code.
    """

    weighting: str = "sum"
    mask: str = "soft"
    operand: str = "x"
    code: int = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        _require(self.weighting in WEIGHTINGS, f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        _require(self.mask in MASKS, f"mask must be one of {MASKS}, got {self.mask!r}")
        _require(self.operand in OPERANDS, f"operand must be one of {OPERANDS}, got {self.operand!r}")
        # the soft rule's weights already contain r; it is defined on x only
        _require(self.mask != "soft" or self.operand == "x", "the soft mask rule multiplies x (operand='x')")
        # a plain attribute, computed once: the fused forward reads it on every call (and
        # torch.compile traces through a plain attribute, not a cached_property's lock)
        code = MASKS.index(self.mask) + 4 * OPERANDS.index(self.operand) + 16 * WEIGHTINGS.index(self.weighting)
        object.__setattr__(self, "code", code)


    @classmethod
    def from_code(cls, code) -> "SRUMath":
        m = _BY_CODE.get(int(code))  # a lookup in a table filled at import (nothing mutates under tracing)
        _require(m is not None, f"not an SRU math code: {code!r}")
        return m

    @property
    def binary(self) -> bool:
        """Binary masks (no gradient through them)."""
        return self.mask != "soft"

    @property
    def param_grad(self) -> bool:
        """Whether the SRU passes gradient to gamma and beta (not for binary masks on x)."""
        return not (self.binary and self.operand == "x")


_BY_CODE.update(
    {m.code: m for m in (SRUMath(w, k, o) for w in WEIGHTINGS for k in MASKS for o in OPERANDS if k != "soft" or o == "x")}
)


@dataclass(frozen=True)
class Revision:
    """An upstream ``ScConv.py`` revision: its SRU math and what its modules look like."""

    name: str
    math: SRUMath
    torch_gn: bool  # the SRU's GroupNorm: nn.GroupNorm (True) or GroupBatchnorm2d
    affine: tuple  # names of the GroupNorm's parameters
    group_num: int  # ScConv's default group_num
    cru_names: tuple  # attribute names the CRU had (state_dict prefixes that load)


REVISIONS = {
    r.name: r
    for r in (
        Revision("2023-10", SRUMath("sum", "soft", "x"), True, ("weight", "bias"), 4, ("CRU",)),
        Revision("2023-09", SRUMath("sum", "ge", "gn"), False, ("weight", "bias"), 4, ("CRU",)),
        Revision("2023-07-27", SRUMath("sum", "ge", "x"), False, ("gamma", "beta"), 16, ("CRU",)),
        Revision("2023-07-22", SRUMath("softmax", "channel", "rx"), False, ("gamma", "beta"), 16, ("CRU", "GRU")),
    )
}
DEFAULT_REVISION = "2023-10"


def check_revision(revision, gate=None, torch_gn=None):
    """Resolve (Revision, SRUMath, torch_gn, gate) of a revision name and the overrides.

    ``gate`` ("soft" / "hard") selects the mask rule of the 2023-10 form only; the other
    revisions fix theirs. ``torch_gn`` may switch the GroupNorm of the forms whose
    parameters are ``weight``/``bias`` (2023-10, 2023-09); the 2023-07 forms' GroupBatchnorm2d
    has ``gamma``/``beta``, which nn.GroupNorm cannot hold.
    """
    _require(revision in REVISIONS, f"revision must be one of {tuple(REVISIONS)}, got {revision!r}")
    rev = REVISIONS[revision]
    if revision == DEFAULT_REVISION:
        gate = "soft" if gate is None else gate
        _require(gate in GATES, f"gate must be one of {GATES}, got {gate!r}")
        math = rev.math if gate == "soft" else SRUMath("sum", "gt", "x")
    else:
        _require(
            gate is None,
            f"gate applies to revision {DEFAULT_REVISION} only; revision {revision} fixes its mask rule "
            f"({rev.math.mask} on {rev.math.operand}), got gate={gate!r}",
        )
        math = rev.math
    if torch_gn is None:
        torch_gn = rev.torch_gn
    _require(isinstance(torch_gn, (bool, int)), f"torch_gn must be a bool, got {torch_gn!r}")
    torch_gn = bool(torch_gn)
    _require(
        not torch_gn or rev.affine == ("weight", "bias"),
        f"revision {revision} normalises with GroupBatchnorm2d (gamma, beta); torch_gn=True is not available",
    )
    return rev, math, torch_gn, gate


def revision_group_num(revision, group_num):
    """ScConv's group_num: the given one, or the revision's default when None."""
    if group_num is not None:
        return group_num
    _require(revision in REVISIONS, f"revision must be one of {tuple(REVISIONS)}, got {revision!r}")
    return REVISIONS[revision].group_num


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
    gate=None,
    softmax="channel",
) -> CRUShape:
    check_sru(op_channel, group_num, gate_treshold, gate)
    return check_cru(
        op_channel, alpha, squeeze_radio, group_size, group_kernel_size, out_channels, stride, softmax
    )
