"""convert(): which convs are replaced, what is kept, what is skipped and why."""
import copy

import pytest
import torch
import torch.nn as nn

from scconv_triton import models as M
from scconv_triton import modules as fused_mod
from scconv_triton import reference as ref
from scconv_triton.convert import (
    ConversionReport,
    SCConvWithBias,
    convert,
    incompatibility,
    scconv_from_conv,
)


def small_resnet(**kw):
    """A torchvision-style ResNet (Bottleneck, one block per stage, narrow) for fast tests."""
    return M.ResNet(M.Bottleneck, [1, 1, 1, 1], num_classes=10, width_per_group=16, **kw)


def test_resnet50_replaces_exactly_the_bottleneck_3x3():
    base = M.resnet50(num_classes=100)
    before = copy.deepcopy(base.state_dict())
    rep = convert(base)
    assert isinstance(rep, ConversionReport)
    assert rep.model is not base  # a copy by default ...
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())  # ... the original is untouched
    names = [f"layer{i + 1}.{j}.conv2" for i, n in enumerate([3, 4, 6, 3]) for j in range(n)]
    assert rep.replaced_names == names and rep.skipped == []
    assert len(rep.unselected) == 53 - 16 and "conv1" in rep.unselected
    assert [r.stride for r in rep.replaced if r.stride == 2] == [2, 2, 2]
    assert rep.params_before - rep.params_after == M.count_parameters(base) - M.count_parameters(rep.model)
    assert M.count_parameters(rep.model) == 14_686_180
    # same names/structure as the builder's SCConv-R50
    assert list(rep.model.state_dict()) == list(M.scconv_resnet50(100).state_dict())
    assert "replaced 16 conv(s)" in str(rep)


def test_densenet121_and_inplace():
    base = M.densenet121(num_classes=100)
    rep = convert(base, inplace=True, fused=False)
    assert rep.model is base
    assert len(rep.replaced) == 58 and rep.skipped == []
    assert all(r.name.endswith(".conv2") and (r.in_channels, r.out_channels) == (128, 32) for r in rep.replaced)
    assert type(base.features.denseblock4.denselayer16.conv2) is ref.SCConv
    assert M.count_parameters(base) == 5_499_172


def test_selection_by_kernel_name_predicate():
    m = small_resnet()
    rep = convert(m, kernel_size=1)  # the 1x1 convs; those that shrink 4x break SCConv's out >= l//r rule
    assert rep.replaced_names == [
        "layer1.0.conv1", "layer1.0.conv3", "layer1.0.downsample.0",
        "layer2.0.conv3", "layer2.0.downsample.0",
        "layer3.0.conv3", "layer3.0.downsample.0",
        "layer4.0.conv3", "layer4.0.downsample.0",
    ]
    assert rep.skipped_names == ["layer2.0.conv1", "layer3.0.conv1", "layer4.0.conv1"]
    assert all("out_channels" in s.reason for s in rep.skipped)
    assert rep.model.layer2[0].downsample[0].stride == 2
    assert convert(m, include="layer1.*").replaced_names == ["layer1.0.conv2"]
    assert convert(m, include=["layer1.*", "layer4.*"], exclude="layer4.*").replaced_names == ["layer1.0.conv2"]
    import re

    assert convert(m, include=re.compile(r"layer[23]\.0\.conv2")).replaced_names == ["layer2.0.conv2", "layer3.0.conv2"]
    rep = convert(m, predicate=lambda name, conv: conv.stride == (2, 2))
    assert rep.replaced_names == ["layer2.0.conv2", "layer3.0.conv2", "layer4.0.conv2"]
    assert "layer1.0.conv2" in rep.unselected
    # kernel_size=None: every conv; the 7x7 stem (3 input channels) is skipped with the reason
    rep = convert(m, kernel_size=None)
    assert rep.skipped_names == ["conv1", "layer2.0.conv1", "layer3.0.conv1", "layer4.0.conv1"]
    assert "divisible by group_num" in rep.skipped[0].reason
    assert len(rep.replaced) == 13
    with pytest.raises(ValueError, match="kernel_size"):
        convert(m, kernel_size=0)


class Zoo(nn.Module):
    """One conv of each kind SCConv cannot replace, plus two it can."""

    def __init__(self):
        super().__init__()
        self.ok = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.ok5 = nn.Conv2d(16, 32, 5, stride=2, padding=2, bias=False)
        self.dilated = nn.Conv2d(16, 16, 3, padding=2, dilation=2, bias=False)
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=2, bias=False)
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
        self.nopad = nn.Conv2d(16, 16, 3, padding=0, bias=False)
        self.reflect = nn.Conv2d(16, 16, 3, padding=1, padding_mode="reflect", bias=False)
        self.odd = nn.Conv2d(15, 16, 3, padding=1, bias=False)
        self.six = nn.Conv2d(6, 8, 3, padding=1, bias=False)  # 6 % group_num(4) != 0
        self.even_k = nn.Conv2d(16, 16, 4, padding=2, bias=False)
        self.rect = nn.Conv2d(16, 16, (3, 1), padding=(1, 0), bias=False)
        self.rect_stride = nn.Conv2d(16, 16, 3, stride=(2, 1), padding=1, bias=False)
        self.tiny_out = nn.Conv2d(16, 2, 3, padding=1, bias=False)  # out < low // r = 4
        self.tconv = nn.ConvTranspose2d(16, 16, 3, padding=1)


def test_incompatible_convs_are_skipped_with_reasons():
    rep = convert(Zoo(), kernel_size=None)
    assert rep.replaced_names == ["ok", "ok5"]
    reasons = {s.name: s.reason for s in rep.skipped}
    expect = {
        "dilated": "dilation",
        "grouped": "groups=2",
        "depthwise": "groups=16",
        "nopad": "padding (0, 0) != k//2",
        "reflect": "padding_mode='reflect'",
        "odd": "divisible by group_num",
        "six": "divisible by group_num",
        "even_k": "even kernel",
        "rect": "non-square kernel",
        "rect_stride": "non-square stride",
        "tiny_out": "out_channels (2) must be >= low channels",
    }
    assert set(reasons) == set(expect)
    for name, frag in expect.items():
        assert frag in reasons[name], (name, reasons[name])
    assert "tconv" not in rep.unselected  # not a Conv2d: never considered
    ok5 = rep.model.ok5
    assert (ok5.in_channels, ok5.out_channels, ok5.stride, ok5.CRU.GWC.kernel_size) == (16, 32, 2, (5, 5))
    # the skipped convs are the very same modules, untouched
    assert isinstance(rep.model.dilated, nn.Conv2d)


def test_rules_follow_scconv_kwargs():
    m = nn.Sequential(nn.Conv2d(24, 24, 3, padding=1), nn.Conv2d(32, 32, 3, padding=1))
    rep = convert(m, group_num=8, bias="drop")
    assert rep.replaced_names == ["0", "1"]
    rep = convert(m, group_num=16, bias="drop")
    assert rep.replaced_names == ["1"] and "24" in rep.skipped[0].reason
    assert rep.model[1].SRU.group_num == 16


def test_strict_raises_before_touching_the_model():
    z = Zoo()
    with pytest.raises(ValueError, match="strict"):
        convert(z, kernel_size=None, inplace=True, strict=True)
    assert isinstance(z.ok, nn.Conv2d)


def test_bias_options():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 16, 3, padding=1, bias=True)
    m = nn.Sequential(conv)
    keep = convert(m, fused=False)
    new = keep.model[0]
    assert type(new) is SCConvWithBias and type(new.scconv) is ref.SCConv and keep.replaced[0].bias == "kept"
    assert (new.in_channels, new.out_channels, new.stride) == (16, 16, 1)
    assert torch.equal(new.bias, conv.bias) and new.bias.data_ptr() != conv.bias.data_ptr()
    assert "0.bias" in keep.model.state_dict() and "0.scconv.CRU.GWC.weight" in keep.model.state_dict()
    plain = ref.SCConv(16)
    plain.load_state_dict(new.scconv.state_dict())
    x = torch.randn(2, 16, 6, 6)
    torch.testing.assert_close(new(x), plain(x) + conv.bias.view(1, -1, 1, 1))
    assert type(convert(m).model[0].scconv) is fused_mod.SCConv
    assert convert(convert(m).model).replaced == []  # not converted twice
    drop = convert(m, fused=False, bias="drop")
    assert type(drop.model[0]) is ref.SCConv and drop.replaced[0].bias == "dropped"
    skip = convert(m, bias="skip")
    assert skip.replaced == [] and "bias" in skip.skipped[0].reason
    nob = convert(nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, bias=False)))
    assert nob.replaced[0].bias == "none" and type(nob.model[0]) is fused_mod.SCConv


def test_keeps_device_dtype_mode_and_requires_grad(device):
    m = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.Conv2d(16, 16, 3, padding=1, bias=False))
    m = m.to(device=device, dtype=torch.float64).eval()
    m[1].requires_grad_(False)
    rep = convert(m, fused=False)
    for p in rep.model.parameters():
        assert p.dtype == torch.float64 and p.device.type == torch.device(device).type
    assert not rep.model[0].training and not rep.model[0].SRU.training
    assert all(p.requires_grad for p in rep.model[0].parameters())
    assert not any(p.requires_grad for p in rep.model[1].parameters())
    y = rep.model(torch.randn(1, 16, 5, 5, device=device, dtype=torch.float64))
    assert y.dtype == torch.float64 and y.shape == (1, 16, 5, 5)


def test_kwargs_pass_through_and_validation():
    m = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1, bias=False))
    sc = convert(
        m, group_num=8, gate_treshold=0.4, alpha=0.5, squeeze_radio=4, group_size=4,
        gate="hard", softmax="pairwise", torch_gn=False, backend="reference", recompute=True,
    ).model[0]
    assert (sc.SRU.group_num, sc.SRU.gate_treshold, sc.SRU.gate, sc.SRU.torch_gn) == (8, 0.4, "hard", False)
    assert (sc.CRU.shape.up_sq, sc.CRU.GWC.groups, sc.CRU.softmax) == (4, 4, "pairwise")
    assert (sc.backend, sc.recompute) == ("reference", True)
    with pytest.raises(TypeError, match="out_channels"):
        convert(m, out_channels=8)
    with pytest.raises(TypeError, match="unknown"):
        convert(m, group_numm=8)
    with pytest.raises(TypeError, match="fused=True"):
        convert(m, fused=False, recompute=True)
    with pytest.raises(ValueError, match="gate"):
        convert(m, gate="binary")
    with pytest.raises(ValueError, match="bias"):
        convert(m, bias="fold")
    with pytest.raises(ValueError, match="gate_treshold"):
        convert(m, gate_treshold=1.5)


def test_converted_model_runs_and_is_idempotent():
    torch.manual_seed(0)
    m = small_resnet()
    rep = convert(m, fused=False, init=M._init_resnet)
    assert len(rep.replaced) == 4
    y = rep.model(torch.randn(2, 3, 32, 32))
    assert y.shape == (2, 10)
    again = convert(rep.model)  # the GWC 3x3 inside each SCConv is never a candidate
    assert again.replaced == [] and again.skipped == []
    assert not any(n.startswith("layer1.0.conv2.") for n in again.unselected)


def test_shared_conv_is_replaced_once():
    conv = nn.Conv2d(16, 16, 3, padding=1, bias=False)
    m = nn.Sequential(conv, nn.ReLU(), conv)
    rep = convert(m, inplace=True)
    assert rep.replaced_names == ["0"]
    assert m[0] is m[2] and isinstance(m[0], fused_mod.SCConv)


def test_scconv_from_conv_and_incompatibility():
    assert incompatibility(nn.Conv2d(16, 16, 3, padding=1)) is None
    assert "dilation" in incompatibility(nn.Conv2d(16, 16, 3, padding=2, dilation=2))
    assert "padding='valid'" in incompatibility(nn.Conv2d(16, 16, 3, padding="valid"))
    assert incompatibility(nn.Conv2d(16, 16, 3, padding="same")) is None
    sc = scconv_from_conv(nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), fused=False)
    assert (sc.in_channels, sc.out_channels, sc.stride) == (16, 32, 2)
    with pytest.raises(ValueError, match="groups"):
        scconv_from_conv(nn.Conv2d(16, 16, 3, padding=1, groups=4))
    with pytest.raises(TypeError):
        convert(nn.Conv2d(16, 16, 3, padding=1))


def test_fused_replacement_with_bias_matches_reference(device):
    """The fused SCConv put in by convert (bias kept) computes what the reference one does."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(16, 16, 3, stride=2, padding=1, bias=True))
    fused = convert(m, backend="triton").model[0]
    refm = convert(m, fused=False).model[0]
    refm.load_state_dict(fused.state_dict())
    x = torch.randn(2, 16, 6, 6, dtype=torch.float64, device=device, requires_grad=True)
    fused.to(device, torch.float64), refm.to(device, torch.float64)
    yf, yr = fused(x), refm(x)
    torch.testing.assert_close(yf, yr)
    gf = torch.autograd.grad(yf.square().sum(), [x, fused.bias, fused.scconv.CRU.GWC.weight])
    gr = torch.autograd.grad(yr.square().sum(), [x, refm.bias, refm.scconv.CRU.GWC.weight])
    for a, b in zip(gf, gr):
        torch.testing.assert_close(a, b)
