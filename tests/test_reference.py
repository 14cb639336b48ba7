"""The reference against SPEC.md's formulas (not against its own code).

The independent implementation below is written from SPEC.md with different
primitives (explicit group loops, einsum for the 1x1 convs, manual padding for
the k x k conv); the reference loaded with its weights must agree to 1e-12 in
float64.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from scconv_triton import reference as ref

# ---------------------------------------------------------------------------
# An independent functional SCConv written from SPEC.md
# ---------------------------------------------------------------------------


def spec_groupnorm(x, weight, bias, groups, eps, torch_gn):
    n, c, h, w = x.shape
    out = torch.empty_like(x)
    cg = c // groups
    for i in range(n):
        for g in range(groups):
            blk = x[i, g * cg : (g + 1) * cg]
            m = blk.sum() / blk.numel()
            d = blk - m
            if torch_gn:
                var = (d * d).sum() / blk.numel()
                y = d / torch.sqrt(var + eps)
            else:
                std = torch.sqrt((d * d).sum() / (blk.numel() - 1))
                y = d / (std + eps)
            out[i, g * cg : (g + 1) * cg] = y
    return out * weight.reshape(1, c, 1, 1) + bias.reshape(1, c, 1, 1)


def spec_sru(x, p, groups, tau, torch_gn, gate):
    gw, gb = p["SRU.gn.weight"], p["SRU.gn.bias"]
    eps = 1e-5 if torch_gn else 1e-10
    g = spec_groupnorm(x, gw, gb, groups, eps, torch_gn)
    w = (gw / gw.sum()).reshape(1, -1, 1, 1)
    r = 1 / (1 + torch.exp(-(g * w)))
    above = r > tau
    if gate == "soft":
        w1 = torch.where(above, torch.ones_like(r), r)
        w2 = torch.where(above, torch.zeros_like(r), r)
    else:
        w1 = above.to(x.dtype)
        w2 = 1 - w1
    h = x.shape[1] // 2
    x1, x2 = w1 * x, w2 * x
    return torch.cat([x1[:, :h] + x2[:, h:], x1[:, h:] + x2[:, :h]], dim=1)


def spec_conv(x, weight, bias, stride, groups):
    # k x k conv with zero padding k//2, written as explicit shifted einsums.
    k = weight.shape[-1]
    pad = k // 2
    n, cin, hh, ww = x.shape
    cout = weight.shape[0]
    ho, wo = (hh + 2 * pad - k) // stride + 1, (ww + 2 * pad - k) // stride + 1
    xp = F.pad(x, (pad, pad, pad, pad))
    out = x.new_zeros(n, cout, ho, wo)
    cin_g, cout_g = cin // groups, cout // groups
    for gi in range(groups):
        xs = xp[:, gi * cin_g : (gi + 1) * cin_g]
        ws = weight[gi * cout_g : (gi + 1) * cout_g]
        for a in range(k):
            for b in range(k):
                patch = xs[:, :, a : a + stride * (ho - 1) + 1 : stride, b : b + stride * (wo - 1) + 1 : stride]
                out[:, gi * cout_g : (gi + 1) * cout_g] += torch.einsum("nchw,oc->nohw", patch, ws[:, :, a, b])
    if bias is not None:
        out += bias.reshape(1, -1, 1, 1)
    return out


def spec_cru(x, p, alpha, gsize, stride, softmax):
    c = x.shape[1]
    u = int(alpha * c)
    up, low = x[:, :u], x[:, u:]
    up = torch.einsum("nchw,oc->nohw", up, p["CRU.squeeze1.weight"][:, :, 0, 0])
    low = torch.einsum("nchw,oc->nohw", low, p["CRU.squeeze2.weight"][:, :, 0, 0])
    y1 = spec_conv(up, p["CRU.GWC.weight"], p["CRU.GWC.bias"], stride, gsize)
    y1 = y1 + spec_conv(up, p["CRU.PWC1.weight"], None, stride, 1)
    ident = low[:, :, ::stride, ::stride]
    if p["CRU.PWC2.weight"].shape[0] > 0:
        y2 = torch.cat([spec_conv(low, p["CRU.PWC2.weight"], None, stride, 1), ident], dim=1)
    else:
        y2 = ident
    m1, m2 = y1.mean(dim=(2, 3), keepdim=True), y2.mean(dim=(2, 3), keepdim=True)
    if softmax == "channel":
        e = torch.exp(torch.cat([m1, m2], dim=1))
        a = e / e.sum(dim=1, keepdim=True)
        cout = y1.shape[1]
        return a[:, :cout] * y1 + a[:, cout:] * y2
    e1, e2 = torch.exp(m1), torch.exp(m2)
    return e1 / (e1 + e2) * y1 + e2 / (e1 + e2) * y2


def random_params(c, cout, groups_gn, alpha, r, gsize, k, torch_gn, dtype=torch.float64):
    u = int(alpha * c)
    low = c - u
    shape_w = (c,) if torch_gn else (c, 1, 1)
    return {
        "SRU.gn.weight": torch.rand(shape_w, dtype=dtype) + 0.5,
        "SRU.gn.bias": torch.randn(shape_w, dtype=dtype) * 0.1,
        "CRU.squeeze1.weight": torch.randn(u // r, u, 1, 1, dtype=dtype) * 0.3,
        "CRU.squeeze2.weight": torch.randn(low // r, low, 1, 1, dtype=dtype) * 0.3,
        "CRU.GWC.weight": torch.randn(cout, (u // r) // gsize, k, k, dtype=dtype) * 0.3,
        "CRU.GWC.bias": torch.randn(cout, dtype=dtype) * 0.1,
        "CRU.PWC1.weight": torch.randn(cout, u // r, 1, 1, dtype=dtype) * 0.3,
        "CRU.PWC2.weight": torch.randn(cout - low // r, low // r, 1, 1, dtype=dtype) * 0.3,
    }


CONFIGS = [
    # c, cout, group_num, tau, alpha, r, gsize, k, stride, gate, softmax, torch_gn, H, W
    (16, None, 4, 0.5, 0.5, 2, 2, 3, 1, "soft", "channel", True, 6, 5),
    (16, None, 4, 0.5, 0.5, 2, 2, 3, 1, "soft", "channel", False, 6, 5),
    (24, 12, 6, 0.4, 0.5, 2, 2, 3, 2, "soft", "channel", True, 7, 5),
    (16, 4, 2, 0.6, 0.5, 2, 2, 3, 1, "soft", "channel", False, 5, 5),
    (40, 32, 2, 0.5, 0.6, 2, 4, 5, 1, "hard", "pairwise", True, 6, 6),
    (12, None, 3, 0.55, 0.5, 3, 1, 1, 3, "soft", "pairwise", False, 7, 8),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(map(str, c)))
def test_reference_matches_independent_spec_implementation(cfg):
    c, cout, gn, tau, alpha, r, gsize, k, stride, gate, softmax, torch_gn, h, w = cfg
    model = ref.SCConv(
        c, gn, tau, alpha, r, gsize, k,
        out_channels=cout, stride=stride, gate=gate, softmax=softmax, torch_gn=torch_gn,
    ).double()
    p = random_params(c, cout or c, gn, alpha, r, gsize, k, torch_gn)
    model.load_state_dict(p)  # a checkpoint produced by the independent implementation
    x = torch.randn(2, c, h, w, dtype=torch.float64)
    expected = spec_cru(spec_sru(x, p, gn, tau, torch_gn, gate), p, alpha, gsize, stride, softmax)
    got = model(x)
    assert got.shape == expected.shape == (2, cout or c, math.ceil(h / stride), math.ceil(w / stride))
    err = ((got - expected).norm() / expected.norm()).item()
    assert err < 1e-12, err


def test_reference_loads_checkpoint_into_fresh_model_and_agrees():
    a = ref.ScConv(32).double()
    b = ref.ScConv(32).double()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 32, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


# ---------------------------------------------------------------------------
# Hand-computed cases
# ---------------------------------------------------------------------------


def test_sru_by_hand_1x2x2x2():
    # C=2 (h=1), one group per channel, nn.GroupNorm with weight 1 and bias 0,
    # so w_gamma = 1/2 and r = sigmoid(xhat / 2). Checked on paper:
    # channel 0 = [1, 2, 3, 4]: mean 2.5, biased var 1.25, xhat = (x-2.5)/sqrt(1.25+1e-5)
    # channel 1 = [0, 0, 0, 8]: mean 2, biased var 12, xhat = (x-2)/sqrt(12+1e-5)
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [0.0, 8.0]]]], dtype=torch.float64)
    sru = ref.SRU(2, group_num=2, gate_treshold=0.5).double()
    out = sru(x)

    def xhat(v, m, var):
        return (v - m) / math.sqrt(var + 1e-5)

    def sig(z):
        return 1 / (1 + math.exp(-z))

    x0, x1 = [1, 2, 3, 4], [0, 0, 0, 8]
    r0 = [sig(xhat(v, 2.5, 1.25) / 2) for v in x0]  # 0.3383, 0.4443, 0.5557, 0.6617
    r1 = [sig(xhat(v, 2.0, 12.0) / 2) for v in x1]  # 0.4283 x3, 0.7039
    assert r0[0] == pytest.approx(0.33831, abs=1e-5) and r1[3] == pytest.approx(0.70392, abs=1e-5)
    w1 = lambda r: 1.0 if r > 0.5 else r  # noqa: E731
    w2 = lambda r: 0.0 if r > 0.5 else r  # noqa: E731
    out0 = [w1(r0[i]) * x0[i] + w2(r1[i]) * x1[i] for i in range(4)]
    out1 = [w1(r1[i]) * x1[i] + w2(r0[i]) * x0[i] for i in range(4)]
    # e.g. first pixel: r0=0.338 keeps 0.338*1; channel 1 adds r1*0 = 0
    assert out0[0] == pytest.approx(0.33831, abs=1e-5)
    # last pixel: r0=0.662 > tau so W1=1 -> 4; r1=0.704 > tau so W2=0 -> 4 + 0
    assert out0[3] == pytest.approx(4.0, abs=1e-12)
    # channel 1 last pixel: W1(r1)=1 -> 8, plus W2(r0)=0 -> 8
    assert out1[3] == pytest.approx(8.0, abs=1e-12)
    expected = torch.tensor([out0, out1], dtype=torch.float64).reshape(1, 2, 2, 2)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_sru_hard_gate_is_binary_masks():
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [0.0, 8.0]]]], dtype=torch.float64)
    sru = ref.SRU(2, group_num=2, gate_treshold=0.5, gate="hard").double()
    # masks: channel 0 above tau at pixels 2,3; channel 1 above at pixel 3 only
    expected = torch.tensor(
        [[[[0 + 0, 0 + 0], [3 + 0, 4 + 0]], [[0 + 1, 0 + 2], [0 + 0, 8 + 0]]]], dtype=torch.float64
    )
    torch.testing.assert_close(sru(x), expected, rtol=0, atol=0)


def test_gate_is_strict_greater_than():
    # r == tau exactly must take the "below" branch (W1 = W2 = r).
    sru = ref.SRU(2, group_num=2, gate_treshold=0.5).double()
    x = torch.tensor([[[[0.0, 1.0]], [[3.0, 1.0]]]], dtype=torch.float64)
    with torch.no_grad():
        # gamma = [0, 1]: w_gamma = [0, 1], so channel 0 has r = sigmoid(0) = 0.5 == tau exactly
        sru.gn.weight.copy_(torch.tensor([0.0, 1.0]))
    out = sru(x)
    # channel 0 stays below the (strict) gate: W1 = W2 = 0.5; out0 = 0.5*x0 + W2(r1)*x1
    r1 = torch.sigmoid(sru.gn(x)[0, 1])
    w2_1 = torch.where(r1 > 0.5, torch.zeros_like(r1), r1)
    torch.testing.assert_close(out[0, 0], 0.5 * x[0, 0] + w2_1 * x[0, 1])


def test_groupbatchnorm_unbiased_std_eps_outside_sqrt():
    gbn = ref.GroupBatchnorm2d(4, group_num=2, eps=0.1).double()
    with torch.no_grad():
        gbn.weight.fill_(2.0)
        gbn.bias.fill_(0.5)
    x = torch.arange(16, dtype=torch.float64).reshape(1, 4, 2, 2)
    # group 0 = 0..7: mean 3.5, unbiased std sqrt(42/7) = sqrt(6)
    expected0 = (torch.arange(8, dtype=torch.float64) - 3.5) / (math.sqrt(6.0) + 0.1) * 2 + 0.5
    torch.testing.assert_close(gbn(x).reshape(-1)[:8], expected0, rtol=1e-14, atol=1e-14)


def test_cru_pairwise_softmax_by_formula():
    cru = ref.CRU(4, softmax="pairwise", group_size=1, group_kernel_size=1).double()
    x = torch.randn(1, 4, 3, 3, dtype=torch.float64)
    up, low = cru.squeeze1(x[:, :2]), cru.squeeze2(x[:, 2:])
    y1 = cru.GWC(up) + cru.PWC1(up)
    y2 = torch.cat([cru.PWC2(low), low], dim=1)
    out = cru(x)
    for c in range(4):
        s1, s2 = y1[0, c].mean().item(), y2[0, c].mean().item()
        b1 = math.exp(s1) / (math.exp(s1) + math.exp(s2))
        torch.testing.assert_close(out[0, c], b1 * y1[0, c] + (1 - b1) * y2[0, c])


def test_cru_channel_softmax_spans_all_2c_channels():
    cru = ref.CRU(8).double()
    x = torch.randn(1, 8, 3, 3, dtype=torch.float64)
    up, low = cru.squeeze1(x[:, :4]), cru.squeeze2(x[:, 4:])
    z = torch.cat([cru.GWC(up) + cru.PWC1(up), cru.PWC2(low), low], dim=1)
    m = [z[0, j].mean().item() for j in range(16)]
    tot = sum(math.exp(v) for v in m)
    a = [math.exp(v) / tot for v in m]
    expected = torch.stack([a[c] * z[0, c] + a[c + 8] * z[0, c + 8] for c in range(8)])
    torch.testing.assert_close(cru(x)[0], expected)


# ---------------------------------------------------------------------------
# Structure: state_dict, parameter counts, shapes
# ---------------------------------------------------------------------------


def test_state_dict_keys_and_shapes():
    m = ref.ScConv(32)
    sd = m.state_dict()
    assert list(sd) == [
        "SRU.gn.weight", "SRU.gn.bias", "CRU.squeeze1.weight", "CRU.squeeze2.weight",
        "CRU.GWC.weight", "CRU.GWC.bias", "CRU.PWC1.weight", "CRU.PWC2.weight",
    ]
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert shapes == {
        "SRU.gn.weight": (32,), "SRU.gn.bias": (32,),
        "CRU.squeeze1.weight": (8, 16, 1, 1), "CRU.squeeze2.weight": (8, 16, 1, 1),
        "CRU.GWC.weight": (32, 4, 3, 3), "CRU.GWC.bias": (32,),
        "CRU.PWC1.weight": (32, 8, 1, 1), "CRU.PWC2.weight": (24, 8, 1, 1),
    }


def test_parameter_counts():
    assert sum(p.numel() for p in ref.ScConv(32).parameters()) == 1952
    assert sum(p.numel() for p in torch.nn.Conv2d(32, 32, 3, padding=1, bias=False).parameters()) == 9216
    # GroupBatchnorm2d variant: same count, weight shaped (C, 1, 1)
    m = ref.SCConv(32, torch_gn=False)
    assert sum(p.numel() for p in m.parameters()) == 1952
    assert tuple(m.SRU.gn.weight.shape) == (32, 1, 1)
    # DenseNet-121 replacement 128 -> 32: PWC2 has 32 - 32 = 0 output channels
    d = ref.SCConv(128, out_channels=32)
    assert d.CRU.PWC2.weight.shape[0] == 0


def test_defaults_match_the_reference_signature():
    m = ref.ScConv(16)
    assert m.SRU.gn.num_groups == 4 and m.SRU.gate_treshold == 0.5
    assert isinstance(m.SRU.gn, torch.nn.GroupNorm) and m.SRU.gn.eps == 1e-5
    assert m.CRU.up_channel == 8 and m.CRU.low_channel == 8
    assert m.CRU.GWC.groups == 2 and m.CRU.GWC.kernel_size == (3, 3) and m.CRU.GWC.padding == (1, 1)
    assert m.CRU.GWC.bias is not None and m.CRU.PWC1.bias is None and m.CRU.squeeze1.bias is None
    assert ref.SRU(16).gn.num_groups == 16
    gbn = ref.GroupBatchnorm2d(16)
    assert gbn.group_num == 16 and gbn.eps == 1e-10


@pytest.mark.parametrize("stride,h,w", [(1, 7, 5), (2, 7, 5), (2, 8, 8), (3, 10, 4)])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_stride_output_size_equals_conv(stride, h, w, k):
    m = ref.SCConv(16, group_kernel_size=k, stride=stride, out_channels=8)
    conv = torch.nn.Conv2d(16, 8, k, stride=stride, padding=k // 2)
    x = torch.randn(1, 16, h, w)
    assert m(x).shape == conv(x).shape


def test_stride_identity_branch_is_subsampled_low():
    m = ref.CRU(8, stride=2, softmax="pairwise").double()
    x = torch.randn(1, 8, 5, 5, dtype=torch.float64)
    # applying the 1x1 paths to the subsampled input is the same thing
    low = m.squeeze2(x[:, 4:])
    y2 = torch.cat([m.PWC2(low), low[:, :, ::2, ::2]], dim=1)
    y2_alt = torch.cat([F.conv2d(low[:, :, ::2, ::2], m.PWC2.weight), low[:, :, ::2, ::2]], 1)
    torch.testing.assert_close(y2, y2_alt)
    assert m(x).shape == (1, 8, 3, 3)


def test_batch_zero_gives_empty_output():
    m = ref.SCConv(16)
    assert m(torch.randn(0, 16, 5, 5)).shape == (0, 16, 5, 5)


# ---------------------------------------------------------------------------
# Every constraint raises ValueError naming the rule
# ---------------------------------------------------------------------------

BAD = [
    (dict(op_channel=18, group_num=4), "divisible by group_num"),
    (dict(op_channel=15, group_num=5), "must be even"),
    (dict(op_channel=4, group_num=2, squeeze_radio=4), "up channels // squeeze_radio must be >= 1"),
    (dict(op_channel=8, alpha=0.875, squeeze_radio=2, group_size=1), "low channels // squeeze_radio must be >= 1"),
    (dict(op_channel=12, group_num=4, group_size=4), "divisible by group_size"),
    (dict(op_channel=16, out_channels=10, group_size=4), "out_channels (10) must be divisible by group_size"),
    (dict(op_channel=16, group_kernel_size=4), "group_kernel_size must be odd"),
    (dict(op_channel=16, gate_treshold=1.0), "0 < tau < 1"),
    (dict(op_channel=16, gate_treshold=0.0), "0 < tau < 1"),
    (dict(op_channel=16, alpha=1.0), "0 < alpha < 1"),
    (dict(op_channel=16, alpha=0.0), "0 < alpha < 1"),
    (dict(op_channel=16, stride=0), "stride must be >= 1"),
    (dict(op_channel=16, out_channels=2), "PWC2 produces out_channels - l//r"),
    (dict(op_channel=16, gate="sharp"), "gate must be one of"),
    (dict(op_channel=16, softmax="global"), "softmax must be one of"),
    (dict(op_channel=16, group_num=0), "group_num must be >= 1"),
    (dict(op_channel=16.0), "channels must be an integer"),
]


@pytest.mark.parametrize("kwargs,rule", BAD, ids=[b[1] for b in BAD])
def test_constraint_violations_raise_value_error(kwargs, rule):
    with pytest.raises(ValueError) as e:
        ref.SCConv(**kwargs)
    assert rule in str(e.value)


def test_groupbatchnorm_requires_c_at_least_groups():
    with pytest.raises(ValueError, match="must be >= group_num"):
        ref.GroupBatchnorm2d(4, group_num=8)


@pytest.mark.parametrize(
    "x,exc,msg",
    [
        (torch.randn(16, 5, 5), ValueError, "4-D input"),
        (torch.randn(1, 8, 5, 5), ValueError, "expects 16 input channels, got 8"),
        (torch.ones(1, 16, 5, 5, dtype=torch.int64), TypeError, "floating-point"),
        (torch.ones(1, 16, 5, 5, dtype=torch.bool), TypeError, "floating-point"),
        (torch.randn(1, 16, 0, 5), ValueError, "non-empty spatial size"),
        ([1.0, 2.0], TypeError, "torch.Tensor"),
    ],
)
@pytest.mark.parametrize("cls", [ref.SCConv, ref.SRU, ref.CRU])
def test_forward_validation(cls, x, exc, msg):
    m = cls(16)
    with pytest.raises(exc, match=msg):
        m(x)
