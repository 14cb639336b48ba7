"""Pure-PyTorch SCConv: the semantics every fused path is checked against.

This reproduces the widely copied unofficial ``ScConv.py`` (``GroupBatchnorm2d``,
``SRU``, ``CRU``, ``ScConv``) operation for operation, plus the generalisations
of SPEC.md (``out_channels``, ``stride``, ``gate``, ``softmax``, ``torch_gn``),
whose defaults give the original behaviour. No Triton is imported here.

``revision=`` selects the upstream revision (SPEC.md, "Upstream revisions"):
"2023-10" (the current form, default), "2023-09", "2023-07-27", "2023-07-22". Each
is a point of three orthogonal switches (``_config.SRUMath``: weighting, mask rule,
what the masks multiply), with the revision's parameter names and defaults, so its
checkpoints load unchanged.

One deliberate detail: ``w_gamma = weight / weight.sum()`` uses ``torch.sum``
where the original calls Python's builtin ``sum`` (a left fold over channels).
The two differ only in rounding, and ``torch.sum`` is a single launch.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._config import DEFAULT_REVISION, REVISIONS, check_cru, check_revision, check_sru, revision_group_num

__all__ = ["GroupBatchnorm2d", "SRU", "CRU", "SCConv", "ScConv", "check_input"]


def check_input(x, channels: int, who: str) -> None:
    """Validate a module input: a 4-D floating tensor with ``channels`` channels.

    Raises TypeError for a non-tensor or non-floating dtype and ValueError for a
    wrong rank, channel count or an empty spatial size, before any work is done.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{who} expects a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{who} expects a 4-D input (N, C, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{who} expects a floating-point input, got dtype {x.dtype}")
    if x.shape[1] != channels:
        raise ValueError(
            f"{who} expects {channels} input channels, got {x.shape[1]} (input shape {tuple(x.shape)})"
        )
    if x.shape[2] == 0 or x.shape[3] == 0:
        raise ValueError(f"{who} expects a non-empty spatial size, got H={x.shape[2]}, W={x.shape[3]}")


class GroupBatchnorm2d(nn.Module):
    """y = (x_g - mean_g) / (std_g + eps) * weight + bias, std unbiased (n - 1).

    ``affine`` names the two (C, 1, 1) parameters: ("weight", "bias") since 2023-09,
    ("gamma", "beta") in the 2023-07 revisions.
    """

    def __init__(self, c_num: int, group_num: int = 16, eps: float = 1e-10, *, affine=("weight", "bias")):
        super().__init__()
        if c_num < group_num:
            raise ValueError(f"c_num ({c_num}) must be >= group_num ({group_num})")
        if c_num % group_num != 0:
            raise ValueError(f"c_num ({c_num}) must be divisible by group_num ({group_num})")
        self.group_num = group_num
        self.affine_names = tuple(affine)
        setattr(self, self.affine_names[0], nn.Parameter(torch.randn(c_num, 1, 1)))
        setattr(self, self.affine_names[1], nn.Parameter(torch.zeros(c_num, 1, 1)))
        self.eps = eps

    def affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(gamma, beta) whatever their names."""
        return getattr(self, self.affine_names[0]), getattr(self, self.affine_names[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        xg = x.reshape(n, self.group_num, -1)
        mean = xg.mean(dim=2, keepdim=True)
        std = xg.std(dim=2, keepdim=True)
        xg = (xg - mean) / (std + self.eps)
        gamma, beta = self.affine()
        return xg.reshape(n, c, h, w) * gamma + beta


class SRU(nn.Module):
    """Spatial Reconstruction Unit of the chosen upstream ``revision``.

    The math is ``self.math`` (``_config.SRUMath``); with the default revision:
    ``gate="soft"`` (the reference): W1 = where(r > tau, 1, r), W2 = where(r > tau, 0, r).
    ``gate="hard"``: W1 = [r > tau], W2 = 1 - W1, no gradient through the masks.
    ``torch_gn=None`` means the revision's GroupNorm (nn.GroupNorm for 2023-10,
    GroupBatchnorm2d for the others).
    """

    def __init__(
        self,
        oup_channels: int,
        group_num: int = 16,
        gate_treshold: float = 0.5,
        torch_gn: bool | None = None,
        *,
        gate: str | None = None,
        revision: str = DEFAULT_REVISION,
    ):
        super().__init__()
        check_sru(oup_channels, group_num, gate_treshold, gate)
        rev, math, torch_gn, gate = check_revision(revision, gate, torch_gn)
        self.channels = oup_channels
        self.group_num = group_num
        self.gn = (
            nn.GroupNorm(num_channels=oup_channels, num_groups=group_num)
            if torch_gn
            else GroupBatchnorm2d(c_num=oup_channels, group_num=group_num, affine=rev.affine)
        )
        self.gate_treshold = gate_treshold
        self.torch_gn = torch_gn
        self.gate = gate
        self.revision = revision
        self.math = math
        self.sigomid = nn.Sigmoid()

    def affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The GroupNorm's (gamma, beta), named weight/bias or gamma/beta by revision."""
        gn = self.gn
        return gn.affine() if isinstance(gn, GroupBatchnorm2d) else (gn.weight, gn.bias)

    def channel_weights(self) -> torch.Tensor:
        """w of SPEC.md, shape (1, C, 1, 1): gamma / sum(gamma) or softmax(gamma) over channels."""
        gamma = self.affine()[0].reshape(-1)
        w = F.softmax(gamma, dim=0) if self.math.weighting == "softmax" else gamma / gamma.sum()
        return w.view(1, -1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.channels, type(self).__name__)
        gn_x = self.gn(x)
        w_gamma = self.channel_weights()
        reweigts = self.sigomid(gn_x * w_gamma)
        tau, m = self.gate_treshold, self.math
        if m.mask == "soft":
            w1 = torch.where(reweigts > tau, torch.ones_like(reweigts), reweigts)
            w2 = torch.where(reweigts > tau, torch.zeros_like(reweigts), reweigts)
        else:
            if m.mask == "gt":
                above = reweigts > tau
            elif m.mask == "ge":
                above = reweigts >= tau
            else:  # "channel": per-channel masks from w itself
                above = w_gamma > tau
            w1 = above.to(x.dtype)
            w2 = 1 - w1
        operand = {"x": x, "gn": gn_x, "rx": reweigts * x}[m.operand] if m.binary else x
        x_1 = w1 * operand
        x_2 = w2 * operand
        return self.reconstruct(x_1, x_2)

    @staticmethod
    def reconstruct(x_1: torch.Tensor, x_2: torch.Tensor) -> torch.Tensor:
        x_11, x_12 = torch.split(x_1, x_1.size(1) // 2, dim=1)
        x_21, x_22 = torch.split(x_2, x_2.size(1) // 2, dim=1)
        return torch.cat([x_11 + x_22, x_12 + x_21], dim=1)

    def extra_repr(self) -> str:
        return (
            f"{self.channels}, group_num={self.group_num}, gate_treshold={self.gate_treshold}, "
            f"gate={self.gate!r}, revision={self.revision!r}"
        )


class CRU(nn.Module):
    """Channel Reconstruction Unit.

    ``softmax="channel"`` (the reference): softmax of the pooled Z = [Y1, Y2] over all
    2*out_channels channels. ``softmax="pairwise"``: per channel c, a softmax of
    (mean Y1_c, mean Y2_c) (the paper's Eq. 8).
    """

    def __init__(
        self,
        op_channel: int,
        alpha: float = 1 / 2,
        squeeze_radio: int = 2,
        group_size: int = 2,
        group_kernel_size: int = 3,
        *,
        out_channels: int | None = None,
        stride: int = 1,
        softmax: str = "channel",
    ):
        super().__init__()
        shp = check_cru(op_channel, alpha, squeeze_radio, group_size, group_kernel_size, out_channels, stride, softmax)
        self.shape = shp
        self.in_channels = op_channel
        self.out_channels = shp.out_channels
        self.up_channel = shp.up
        self.low_channel = shp.low
        self.stride = stride
        self.softmax = softmax
        k = group_kernel_size
        self.squeeze1 = nn.Conv2d(shp.up, shp.up_sq, kernel_size=1, bias=False)
        self.squeeze2 = nn.Conv2d(shp.low, shp.low_sq, kernel_size=1, bias=False)
        self.GWC = nn.Conv2d(shp.up_sq, shp.out_channels, kernel_size=k, stride=stride, padding=k // 2, groups=group_size)
        self.PWC1 = nn.Conv2d(shp.up_sq, shp.out_channels, kernel_size=1, stride=stride, bias=False)
        with warnings.catch_warnings():
            # out_channels == l//r leaves PWC2 with no output channels (DenseNet's
            # 128 -> 32); torch warns that initialising an empty weight is a no-op.
            warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
            self.PWC2 = nn.Conv2d(shp.low_sq, shp.pwc2_out, kernel_size=1, stride=stride, bias=False)
        self.advavg = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.in_channels, type(self).__name__)
        up, low = torch.split(x, [self.up_channel, self.low_channel], dim=1)
        up, low = self.squeeze1(up), self.squeeze2(low)
        y1 = self.GWC(up) + self.PWC1(up)
        ident = low if self.stride == 1 else low[:, :, :: self.stride, :: self.stride]
        y2 = ident if self.shape.pwc2_out == 0 else torch.cat([self.PWC2(low), ident], dim=1)
        if self.softmax == "channel":
            out = torch.cat([y1, y2], dim=1)
            out = F.softmax(self.advavg(out), dim=1) * out
            out1, out2 = torch.split(out, out.size(1) // 2, dim=1)
            return out1 + out2
        s = torch.stack([self.advavg(y1), self.advavg(y2)], dim=0)
        beta = F.softmax(s, dim=0)
        return beta[0] * y1 + beta[1] * y2


class SCConv(nn.Module):
    """SCConv = CRU(SRU(x)); a drop-in for a k x k convolution.

    Positional arguments are the reference ``ScConv``'s; the generalisations of
    SPEC.md are keyword-only and default to the reference's behaviour.
    ``revision`` picks the upstream revision (default the current "2023-10");
    ``group_num=None`` is that revision's default (4, or 16 for the 2023-07 forms).
    The 2023-07-22 form named its CRU ``GRU``: its ``GRU.*`` keys load as ``CRU.*``.
    """

    def __init__(
        self,
        op_channel: int,
        group_num: int | None = None,
        gate_treshold: float = 0.5,
        alpha: float = 1 / 2,
        squeeze_radio: int = 2,
        group_size: int = 2,
        group_kernel_size: int = 3,
        *,
        out_channels: int | None = None,
        stride: int = 1,
        gate: str | None = None,
        softmax: str = "channel",
        torch_gn: bool | None = None,
        revision: str = DEFAULT_REVISION,
    ):
        super().__init__()
        # SRU rules first, then CRU rules, so the first broken rule is the one reported.
        group_num = revision_group_num(revision, group_num)
        check_sru(op_channel, group_num, gate_treshold, gate)
        check_revision(revision, gate, torch_gn)
        self.SRU = SRU(
            op_channel, group_num=group_num, gate_treshold=gate_treshold, torch_gn=torch_gn, gate=gate,
            revision=revision,
        )
        self.CRU = CRU(
            op_channel,
            alpha=alpha,
            squeeze_radio=squeeze_radio,
            group_size=group_size,
            group_kernel_size=group_kernel_size,
            out_channels=out_channels,
            stride=stride,
            softmax=softmax,
        )
        self.in_channels = op_channel
        self.out_channels = self.CRU.out_channels
        self.stride = stride
        self.revision = revision
        if "GRU" in REVISIONS[revision].cru_names:
            self._register_load_state_dict_pre_hook(_gru_keys_as_cru)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.in_channels, type(self).__name__)
        return self.CRU(self.SRU(x))


def _gru_keys_as_cru(state_dict, prefix, *args):
    """2023-07-22 checkpoints name the CRU ``GRU``: rename ``<prefix>GRU.*`` to ``<prefix>CRU.*``."""
    for key in [k for k in state_dict if k.startswith(prefix + "GRU.")]:
        state_dict[prefix + "CRU." + key[len(prefix) + 4:]] = state_dict.pop(key)


ScConv = SCConv
