"""The study's networks: parameter counts, structure, torchvision parity, fused == reference."""
import importlib.util

import pytest
import torch
import torch.nn as nn

from scconv_triton import models as M
from scconv_triton import modules as fused_mod
from scconv_triton import reference as ref
from scconv_triton.convert import convert
from _helpers import DEVICE, gate_margin, rel

# Exact counts at num_classes=100 (the study's CIFAR-100 setting).
RESNET50_PARAMS = 23_712_932
DENSENET121_PARAMS = 7_056_356
SCCONV_RESNET50_PARAMS = 14_686_180  # study: 14.7M
SCCONV_DENSENET121_PARAMS = 5_499_172  # study: 5.51M

RESNET50_CONV2 = [f"layer{i + 1}.{j}.conv2" for i, n in enumerate([3, 4, 6, 3]) for j in range(n)]
DENSENET121_CONV2 = [
    f"features.denseblock{b + 1}.denselayer{j + 1}.conv2" for b, n in enumerate([6, 12, 24, 16]) for j in range(n)
]


def _scconvs(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, ref.SCConv)}


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    return {
        "resnet50": M.resnet50(num_classes=100),
        "scconv_resnet50": M.scconv_resnet50(num_classes=100),
        "densenet121": M.densenet121(num_classes=100),
        "scconv_densenet121": M.scconv_densenet121(num_classes=100),
    }


def test_parameter_counts(nets):
    assert M.count_parameters(nets["resnet50"]) == RESNET50_PARAMS
    assert M.count_parameters(nets["densenet121"]) == DENSENET121_PARAMS
    assert M.count_parameters(nets["scconv_resnet50"]) == SCCONV_RESNET50_PARAMS
    assert M.count_parameters(nets["scconv_densenet121"]) == SCCONV_DENSENET121_PARAMS
    assert abs(SCCONV_RESNET50_PARAMS / 14.7e6 - 1) < 0.005
    assert abs(SCCONV_DENSENET121_PARAMS / 5.51e6 - 1) < 0.005
    # fused and reference builds have the same parameters
    assert M.count_parameters(M.scconv_densenet121(100, fused=False)) == SCCONV_DENSENET121_PARAMS


def test_parameter_counts_1000_classes():
    # torchvision's published counts for the baselines
    assert M.count_parameters(M.resnet50()) == 25_557_032
    assert M.count_parameters(M.densenet121()) == 7_978_856


def test_scconv_resnet50_structure(nets):
    base, sc = nets["resnet50"], nets["scconv_resnet50"]
    convs = _scconvs(sc)
    assert list(convs) == RESNET50_CONV2
    for name, m in convs.items():
        assert type(m) is fused_mod.SCConv
        conv = base.get_submodule(name)
        assert conv.kernel_size == (3, 3)
        assert (m.in_channels, m.out_channels, m.stride) == (conv.in_channels, conv.out_channels, conv.stride[0])
    assert [n for n, m in convs.items() if m.stride == 2] == ["layer2.0.conv2", "layer3.0.conv2", "layer4.0.conv2"]
    # nothing else changed: every other module name and parameter shape is the baseline's
    sd_b, sd_s = base.state_dict(), sc.state_dict()
    kept = {k for k in sd_b if not any(k.startswith(n + ".") for n in RESNET50_CONV2)}
    assert kept <= set(sd_s) and all(sd_b[k].shape == sd_s[k].shape for k in kept)
    assert set(sd_s) - kept == {f"{n}.{k}" for n in RESNET50_CONV2 for k in ref.SCConv(64).state_dict()}
    assert [n for n, m in sc.named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)
            and not any(n.startswith(c + ".") for c in RESNET50_CONV2)] == []


def test_scconv_densenet121_structure(nets):
    convs = _scconvs(nets["scconv_densenet121"])
    assert list(convs) == DENSENET121_CONV2
    for m in convs.values():
        assert (m.in_channels, m.out_channels, m.stride) == (128, 32, 1)
        assert m.CRU.shape.pwc2_out == 0  # Y2 = low alone: 32 = 128/2/2


def test_torchvision_style_init(nets):
    sc = nets["scconv_resnet50"]
    m = sc.get_submodule("layer3.1.conv2")
    assert torch.all(m.SRU.gn.weight == 1) and torch.all(m.SRU.gn.bias == 0)
    w = m.CRU.squeeze1.weight  # kaiming normal, fan_out = 64 -> std sqrt(2/64)
    assert abs(w.std().item() / (2 / 64) ** 0.5 - 1) < 0.1
    for n, p in sc.named_parameters():
        if n.endswith("bn1.weight") or n.endswith("bn3.weight"):
            assert torch.all(p == 1), n


def test_builders_pass_keywords():
    m = M.scconv_resnet50(10, fused=False, group_num=8, gate="hard", softmax="pairwise", zero_init_residual=True)
    convs = _scconvs(m)
    assert all(type(c) is ref.SCConv for c in convs.values())
    c = convs["layer1.0.conv2"]
    assert (c.SRU.group_num, c.SRU.gate, c.CRU.softmax) == (8, "hard", "pairwise")
    assert torch.all(m.layer1[0].bn3.weight == 0)  # zero_init_residual reached the network
    m = M.scconv_densenet121(10, recompute=True, backend="reference", memory_efficient=True)
    c = m.features.denseblock1.denselayer1.conv2
    assert (c.recompute, c.backend) == (True, "reference") and m.features.denseblock1.denselayer1.memory_efficient
    with pytest.raises(ValueError, match="dilation"):
        M.scconv_resnet50(replace_stride_with_dilation=[False, False, True])


def test_forward_shapes_reference():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    for build in (M.resnet50, M.densenet121):
        assert build(num_classes=7)(x).shape == (2, 7)
    for build in (M.scconv_resnet50, M.scconv_densenet121):
        assert build(num_classes=7, fused=False)(x).shape == (2, 7)


def test_densenet_memory_efficient_same_output():
    torch.manual_seed(0)
    a = M.densenet121(num_classes=5)
    b = M.densenet121(num_classes=5, memory_efficient=True)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    ya, yb = a(x), b(x)
    torch.testing.assert_close(ya, yb)
    ga = torch.autograd.grad(ya.sum(), a.features.conv0.weight)[0]
    gb = torch.autograd.grad(yb.sum(), b.features.conv0.weight)[0]
    torch.testing.assert_close(ga, gb)


@pytest.mark.skipif(
    importlib.util.find_spec("torchvision") is None,
    reason="torchvision is not installed (it is not a dependency); parity with torchvision's models is checked only where it is",
)
def test_same_as_torchvision():
    """Our baselines are torchvision's: parameter count, state_dict keys and shapes, outputs."""
    import torchvision

    for name in ("resnet50", "densenet121"):
        torch.manual_seed(0)
        tv = getattr(torchvision.models, name)(weights=None, num_classes=100).eval()
        ours = getattr(M, name)(num_classes=100).eval()
        assert M.count_parameters(ours) == M.count_parameters(tv), name
        sd_tv, sd_ours = tv.state_dict(), ours.state_dict()
        assert list(sd_ours) == list(sd_tv), name
        assert all(sd_ours[k].shape == sd_tv[k].shape for k in sd_tv), name
        ours.load_state_dict(sd_tv)  # torchvision checkpoints load unchanged
        x = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            y_tv, y = tv(x), ours(x)
        assert y.shape == y_tv.shape == (2, 100)
        torch.testing.assert_close(y, y_tv)
        # convert() finds the same 3x3 convs in torchvision's model as the SCConv builders replace
        rep = convert(tv, fused=False)
        want = RESNET50_CONV2 if name == "resnet50" else DENSENET121_CONV2
        assert rep.replaced_names == want and rep.skipped == []
        built = getattr(M, "scconv_" + name)(num_classes=100, fused=False)
        assert M.count_parameters(rep.model) == M.count_parameters(built)
        assert list(rep.model.state_dict()) == list(built.state_dict())


def _spread_gates(model, seed=1):
    """Move SRU gate values away from tau, the same way in every model given the same weights.

    At the default init (GroupNorm weight 1) every r = sigmoid(gn(x) / C) sits within
    ~1/(4C) of tau = 0.5, so fp32 rounding differences between two correct implementations
    flip the discontinuous gate at a few positions (SPEC.md, "the gate is discontinuous").
    Random GroupNorm biases of order C spread r over (0.05, 0.95).
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, ref.SRU):
                c = m.gn.bias.numel()
                m.gn.bias.copy_((torch.rand(c, generator=g) * 6 - 3) * c)


def _gate_margin(model, x):
    """min |r - tau| over every SRU of ``model`` on input ``x`` (reference math)."""
    margins = []
    hs = [m.register_forward_hook(lambda mod, inp, out: margins.append(gate_margin(mod, inp[0])))
          for m in model.modules() if isinstance(m, ref.SRU)]
    with torch.no_grad():
        model(x)
    for h in hs:
        h.remove()
    return min(margins)


def test_fused_resnet50_matches_reference():
    """Same weights: the fused-built and the reference-built SCConv-R50 give the same logits and gradients.

    fp32, batch 1, 32x32, one forward + backward. BatchNorm runs in eval mode: in training
    mode at this size layer4's BN normalises 1-2 values per channel, which makes the network
    so ill-conditioned that the reference in fp32 and in fp64 already differ by ~20% in the
    logits. In eval mode a 1e-6 change of the input moves the logits by ~1e-6, so a tight
    tolerance is meaningful. SCConv itself (GroupNorm, gate, softmax) has no train/eval
    difference, and gradients flow through every SCConv parameter either way.
    """
    torch.manual_seed(0)
    r = M.scconv_resnet50(num_classes=10, fused=False).eval()
    _spread_gates(r, seed=4)
    f = M.scconv_resnet50(num_classes=10, fused=True, backend="triton").eval()  # no silent fallback
    f.load_state_dict(r.state_dict())
    r, f = r.to(DEVICE), f.to(DEVICE)
    x = torch.randn(1, 3, 32, 32).to(DEVICE)
    margin = _gate_margin(r, x)
    assert margin > 5e-6, f"test input puts a gate value within {margin:.2e} of tau; pick another seed"

    xr = x.clone().requires_grad_()
    xf = x.clone().requires_grad_()
    yr, yf = r(xr), f(xf)
    print(f"logits rel diff {rel(yf, yr):.2e}, gate margin {margin:.2e}")
    assert rel(yf, yr) < 1e-5, rel(yf, yr)
    t = torch.randn_like(yr)
    (yr * t).sum().backward()
    (yf * t).sum().backward()
    assert rel(xf.grad, xr.grad) < 1e-4, rel(xf.grad, xr.grad)
    pr, pf = dict(r.named_parameters()), dict(f.named_parameters())
    assert list(pr) == list(pf)
    worst = max((rel(pf[n].grad, pr[n].grad), n) for n in pr if pr[n].grad.norm() > 0)
    print(f"input grad rel diff {rel(xf.grad, xr.grad):.2e}, worst parameter grad {worst}")
    assert worst[0] < 1e-4, worst
    assert all((pf[n].grad is None) == (pr[n].grad is None) for n in pr)
