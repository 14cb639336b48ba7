"""Every upstream revision of SPEC.md's "Upstream revisions" table, reference and fused.

The independent implementations below are written from the table (explicit group loops
for the normalisation, per-channel loops for the gate, shifted einsums for the
convolutions), as modules shaped like the upstream files (``SRU.gn`` with the
revision's parameter names, ``CRU``/``GRU`` with the five convolutions), so that they
serve both as the expected math and as the "upstream" models ``from_upstream`` sees.
"""

import pytest
import torch
import torch.nn as nn

import scconv_triton
from scconv_triton import from_upstream, identify_revision
from scconv_triton import reference as ref
from scconv_triton._config import MASKS, OPERANDS, WEIGHTINGS, SRUMath
from test_reference import spec_conv as loop_conv  # k x k conv as explicit shifted einsums

# revision -> (GroupNorm kind, parameter names, w, mask rule, operand, default group_num)
TABLE = {
    "2023-10": ("torch", ("weight", "bias"), "sum", "soft", "x", 4),
    "2023-09": ("gbn", ("weight", "bias"), "sum", "ge", "gn", 4),
    "2023-07-27": ("gbn", ("gamma", "beta"), "sum", "ge", "x", 16),
    "2023-07-22": ("gbn", ("gamma", "beta"), "softmax", "channel", "rx", 16),
}
REVS = list(TABLE)


# ---------------------------------------------------------------------------
# Independent implementations, written from the table
# ---------------------------------------------------------------------------
def loop_groupnorm(x, gamma, beta, groups, eps, torch_gn):
    n, c = x.shape[:2]
    cg = c // groups
    rows = []
    for i in range(n):
        blocks = []
        for g in range(groups):
            blk = x[i, g * cg:(g + 1) * cg]
            d = blk - blk.sum() / blk.numel()
            if torch_gn:
                blocks.append(d / torch.sqrt((d * d).sum() / blk.numel() + eps))
            else:
                blocks.append(d / (torch.sqrt((d * d).sum() / (blk.numel() - 1)) + eps))
        rows.append(torch.cat(blocks))
    return torch.stack(rows) * gamma.reshape(1, c, 1, 1) + beta.reshape(1, c, 1, 1)


class LoopGN(nn.Module):
    """GroupBatchnorm2d ((C, 1, 1) parameters under the revision's names) or nn.GroupNorm-like."""

    def __init__(self, c, groups, names, torch_gn):
        super().__init__()
        shape = (c,) if torch_gn else (c, 1, 1)
        self.names, self.torch_gn, self.eps = names, torch_gn, 1e-5 if torch_gn else 1e-10
        self.group_num = groups
        setattr(self, names[0], nn.Parameter(torch.rand(shape, dtype=torch.float64) + 0.5))
        setattr(self, names[1], nn.Parameter(torch.randn(shape, dtype=torch.float64) * 0.2))

    def forward(self, x):
        return loop_groupnorm(x, *self.affine(), self.group_num, self.eps, self.torch_gn)

    def affine(self):
        return getattr(self, self.names[0]), getattr(self, self.names[1])


class LoopTorchGN(nn.GroupNorm):
    """An nn.GroupNorm (as upstream 2023-10 has) whose forward is the explicit loop."""

    def forward(self, x):
        return loop_groupnorm(x, self.weight, self.bias, self.num_groups, self.eps, True)


class LoopSRU(nn.Module):
    def __init__(self, c, groups, tau, revision, *, mask=None, operand=None, weighting=None):
        super().__init__()
        kind, names, w, m, o, _ = TABLE[revision]
        self.weighting, self.mask, self.operand = weighting or w, mask or m, operand or o
        if kind == "torch":
            self.gn = LoopTorchGN(groups, c).double()
            with torch.no_grad():
                self.gn.weight.copy_(torch.rand(c, dtype=torch.float64) + 0.5)
                self.gn.bias.copy_(torch.randn(c, dtype=torch.float64) * 0.2)
        else:
            self.gn = LoopGN(c, groups, names, False)
        self.gate_treshold = tau

    def gamma(self):
        gn = self.gn
        return (gn.weight if isinstance(gn, nn.GroupNorm) else gn.affine()[0]).reshape(-1)

    def forward(self, x):
        c, h, tau = x.shape[1], x.shape[1] // 2, self.gate_treshold
        g = self.gn(x)
        gamma = self.gamma()
        if self.weighting == "sum":
            w = gamma / gamma.sum()
        else:
            e = torch.exp(gamma - gamma.max())
            w = e / e.sum()
        r = 1 / (1 + torch.exp(-(g * w.reshape(1, c, 1, 1))))
        a, b = [], []  # x1, x2 per channel
        for ch in range(c):
            rc, xc = r[:, ch], x[:, ch]
            if self.mask == "soft":
                a.append(torch.where(rc > tau, xc, rc * xc))
                b.append(torch.where(rc > tau, torch.zeros_like(xc), rc * xc))
                continue
            if self.mask == "ge":
                m1 = (rc >= tau).to(x.dtype)
            elif self.mask == "gt":
                m1 = (rc > tau).to(x.dtype)
            else:  # per channel, from w
                m1 = torch.full_like(xc, 1.0 if w[ch] > tau else 0.0)
            op = {"x": xc, "gn": g[:, ch], "rx": rc * xc}[self.operand]
            a.append(m1 * op)
            b.append((1 - m1) * op)
        out = [a[ch] + b[ch + h] for ch in range(h)] + [a[ch + h] + b[ch] for ch in range(h)]
        return torch.stack(out, dim=1)


class LoopCRU(nn.Module):
    def __init__(self, c, cout, alpha, r, gsize, k, stride):
        super().__init__()
        u = int(alpha * c)
        low = c - u
        self.u, self.stride = u, stride
        self.squeeze1 = nn.Conv2d(u, u // r, 1, bias=False)
        self.squeeze2 = nn.Conv2d(low, low // r, 1, bias=False)
        self.GWC = nn.Conv2d(u // r, cout, k, stride=stride, padding=k // 2, groups=gsize)
        self.PWC1 = nn.Conv2d(u // r, cout, 1, stride=stride, bias=False)
        self.PWC2 = nn.Conv2d(low // r, cout - low // r, 1, stride=stride, bias=False)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                with torch.no_grad():
                    m.weight.normal_(0, 0.3)
        self.double()

    def forward(self, x):
        s = self.stride
        up = loop_conv(x[:, :self.u], self.squeeze1.weight, None, 1, 1)
        low = loop_conv(x[:, self.u:], self.squeeze2.weight, None, 1, 1)
        y1 = loop_conv(up, self.GWC.weight, self.GWC.bias, s, self.GWC.groups) + loop_conv(up, self.PWC1.weight, None, s, 1)
        y2 = torch.cat([loop_conv(low, self.PWC2.weight, None, s, 1), low[:, :, ::s, ::s]], dim=1)
        z = torch.cat([y1, y2], dim=1)
        e = torch.exp(z.mean(dim=(2, 3), keepdim=True))
        a = e / e.sum(dim=1, keepdim=True)
        cout = y1.shape[1]
        return a[:, :cout] * y1 + a[:, cout:] * y2


class LoopScConv(nn.Module):
    """Upstream-shaped ScConv of ``revision``; ``cru_name`` = "GRU" for the 2023-07-22 spelling."""

    def __init__(self, c, revision, *, group_num=None, tau=0.5, cout=None, stride=1, alpha=0.5, r=2, gsize=2, k=3,
                 cru_name="CRU", **sru_overrides):
        super().__init__()
        groups = group_num or TABLE[revision][5]
        self.SRU = LoopSRU(c, groups, tau, revision, **sru_overrides)
        setattr(self, cru_name, LoopCRU(c, cout or c, alpha, r, gsize, k, stride))
        self.cru_name = cru_name

    def forward(self, x):
        return getattr(self, self.cru_name)(self.SRU(x))


def make_loop(c, revision, **kw):
    m = LoopScConv(c, revision, **kw)
    if revision == "2023-07-22":  # softmax(gamma) rarely passes tau: make two channels dominate
        with torch.no_grad():
            m.SRU.gn.gamma[0] += 6.0
            m.SRU.gn.gamma[3] += 6.5
    return m


def ours_like(loop, revision, cls=ref.SCConv, **kw):
    cru = getattr(loop, loop.cru_name)
    c = loop.SRU.gamma().numel()
    m = cls(
        c, loop.SRU.gn.group_num if hasattr(loop.SRU.gn, "group_num") else loop.SRU.gn.num_groups,
        loop.SRU.gate_treshold, alpha=cru.u / c, squeeze_radio=cru.squeeze1.in_channels // cru.squeeze1.out_channels,
        group_size=cru.GWC.groups, group_kernel_size=cru.GWC.kernel_size[0], out_channels=cru.GWC.out_channels,
        stride=cru.stride, revision=revision, **kw,
    ).double()
    m.load_state_dict(loop.state_dict())  # strict: the revision's keys and shapes, unchanged
    return m


def grads(module, x, seed=1):
    x = x.detach().clone().requires_grad_(True)
    out = module(x)
    g = torch.Generator().manual_seed(seed)
    dout = torch.randn(out.shape, generator=g, dtype=out.dtype).to(out.device)
    names = [n for n, _ in module.named_parameters()]
    gs = torch.autograd.grad(out, [x, *module.parameters()], dout, allow_unused=True)
    return out.detach(), dict(zip(["x", *names], gs))


def both_branches(sru, x):
    """The probe exercises both sides of the gate (else a test could not tell the rules apart)."""
    with torch.no_grad():
        w = sru.channel_weights()
        r = torch.sigmoid(sru.gn(x) * w)
        above = (w > sru.gate_treshold).expand_as(r) if sru.math.mask == "channel" else r > sru.gate_treshold
    assert 0 < above.double().mean().item() < 1


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def assert_all_close(got, want, tol, what):
    out_g, g_g = got
    out_w, g_w = want
    assert out_g.shape == out_w.shape
    assert rel(out_g, out_w) < tol, (what, "output", rel(out_g, out_w))
    for name, gw in g_w.items():
        key = name.replace("GRU.", "CRU.")
        gg = g_g[key]
        if gw is None or not gw.abs().sum():
            # no gradient reaches it in this revision: ours must give none or zeros too
            assert gg is None or not gg.abs().sum(), (what, name)
            continue
        assert gg is not None, (what, name, "missing gradient")
        assert rel(gg.reshape(gw.shape), gw) < tol, (what, name, rel(gg.reshape(gw.shape), gw))


# configs: c, cout, group_num, tau, stride, H, W, channels_last
CONFIGS = [
    (16, None, 4, 0.5, 1, 5, 6, False),
    (16, 12, 4, 0.45, 2, 7, 6, True),
    (8, None, 2, 0.55, 1, 6, 6, True),
    (24, 8, 8, 0.5, 2, 5, 7, False),
]
ids = [f"c{c[0]}-o{c[1]}-g{c[2]}-s{c[4]}-{'cl' if c[7] else 'nchw'}" for c in CONFIGS]


def _input(c, h, w, cl, device="cpu", seed=2):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(2, c, h, w, generator=g, dtype=torch.float64) * 1.3 + 0.2).to(device)
    return x.to(memory_format=torch.channels_last) if cl else x


# ---------------------------------------------------------------------------
# the switches and the construction rules
# ---------------------------------------------------------------------------
def test_revision_table_maps_to_switches():
    for name, (kind, names, w, m, o, groups) in TABLE.items():
        sc = ref.SCConv(32, revision=name)
        assert (sc.SRU.math.weighting, sc.SRU.math.mask, sc.SRU.math.operand) == (w, m, o)
        assert sc.SRU.group_num == groups and sc.SRU.torch_gn == (kind == "torch")
        keys = [k for k in sc.state_dict() if k.startswith("SRU.")]
        assert keys == [f"SRU.gn.{names[0]}", f"SRU.gn.{names[1]}"]
        shape = (32,) if kind == "torch" else (32, 1, 1)
        assert all(tuple(v.shape) == shape for k, v in sc.state_dict().items() if k.startswith("SRU."))
    assert ref.SCConv(32).SRU.revision == "2023-10"
    codes = {SRUMath(w, m, o).code for w in WEIGHTINGS for m in MASKS for o in OPERANDS if m != "soft" or o == "x"}
    assert len(codes) == 2 * (1 + 3 * 3)
    for code in codes:
        assert SRUMath.from_code(code).code == code
    assert SRUMath().code == 0 and SRUMath(mask="gt").code == 1  # legacy hard=False/True


@pytest.mark.parametrize("kw,rule", [
    (dict(revision="2023-11"), "revision must be one of"),
    (dict(revision="2023-09", gate="hard"), "gate applies to revision 2023-10 only"),
    (dict(revision="2023-07-27", torch_gn=True), "torch_gn=True is not available"),
    (dict(revision="2023-07-22", group_num=5), "divisible by group_num"),
    (dict(revision="2023-07-22", op_channel=40), "divisible by group_num \\(16\\)"),
])
def test_bad_revision_arguments_raise(kw, rule):
    with pytest.raises(ValueError, match=rule):
        scconv_triton.SCConv(**{"op_channel": 48, **kw})


# ---------------------------------------------------------------------------
# reference against the table, every gradient, 1e-12
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("rev", REVS)
@pytest.mark.parametrize("cfg", CONFIGS[:2], ids=ids[:2])
def test_reference_matches_table(rev, cfg):
    c, cout, g, tau, s, h, w, cl = cfg
    loop = make_loop(c, rev, group_num=g, tau=tau, cout=cout, stride=s,
                     cru_name="GRU" if rev == "2023-07-22" else "CRU")
    ours = ours_like(loop, rev)
    x = _input(c, h, w, cl)
    both_branches(ours.SRU, x)
    assert_all_close(grads(ours, x), grads(loop, x), 1e-12, rev)


def test_revisions_differ_on_the_same_weights():
    # The table's forms are different functions: none reproduces another (else the tests above are vacuous).
    x = _input(16, 5, 5, False)
    outs = {}
    for rev in REVS:
        torch.manual_seed(5)  # the same weights for every revision, under its own names
        outs[rev] = ours_like(LoopScConv(16, rev, group_num=4), rev)(x)
    for i, a in enumerate(REVS):
        for b in REVS[i + 1:]:
            assert rel(outs[a], outs[b]) > 1e-3, (a, b)


# ---------------------------------------------------------------------------
# from_upstream: find, identify, replace
# ---------------------------------------------------------------------------
class Net(nn.Module):
    def __init__(self, *blocks):
        super().__init__()
        self.stem = nn.Conv2d(3, blocks[0].SRU.gamma().numel(), 3, padding=1).double()
        self.body = nn.Sequential(*blocks)
        self.head = nn.Conv2d(getattr(blocks[-1], blocks[-1].cru_name).GWC.out_channels, 4, 1).double()

    def forward(self, x):
        return self.head(torch.relu(self.body(self.stem(x))))


@pytest.mark.parametrize("rev", REVS)
def test_from_upstream_identifies_each_revision(rev):
    net = Net(make_loop(16, rev, group_num=4, cru_name="GRU" if rev == "2023-07-22" else "CRU"),
              make_loop(16, rev, group_num=8, cout=8, stride=2, tau=0.45))
    x = torch.randn(2, 3, 9, 8, dtype=torch.float64)
    want = net(x)
    rep = from_upstream(net, fused=False)
    assert [(r.name, r.revision) for r in rep.replaced] == [("body.0", rev), ("body.1", rev)], str(rep)
    assert not rep.skipped
    assert all(type(m) is ref.SCConv and m.revision == rev for m in rep.model.body)
    assert type(net.body[0]) is LoopScConv  # inplace=False converted a copy
    assert rel(rep.model(x), want) < 1e-12
    assert identify_revision(net.body[1]) == rev


def test_from_upstream_mixed_revisions_and_report():
    a = make_loop(16, "2023-09", group_num=4)
    b = make_loop(16, "2023-07-22", cru_name="GRU", cout=8, stride=2)
    net = Net(a, b)
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    want = net(x)
    rep = from_upstream(net, fused=False, inplace=True)
    assert rep.model is net
    assert {r.name: r.revision for r in rep.replaced} == {"body.0": "2023-09", "body.1": "2023-07-22"}
    text = str(rep)
    assert "from_upstream: replaced 2 module(s)" in text and "2023-09" in text and "2023-07-22" in text
    assert rel(net(x), want) < 1e-12
    # every parameter was copied: a gradient step on the replacement sees the same loss surface
    assert rep.params_before == rep.params_after


def test_from_upstream_refuses_math_of_no_revision():
    # Right structure and names, but math of no revision: the 2023-09 names with binary
    # r > tau masks on x, and the 2023-07-22 names with gamma / sum(gamma) weighting.
    odd1 = make_loop(16, "2023-09", group_num=4, mask="gt", operand="x")
    odd2 = make_loop(16, "2023-07-22", weighting="sum")
    good = make_loop(16, "2023-07-27")
    net = Net(odd1, good, odd2)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    want = net(x)
    rep = from_upstream(net, fused=False)
    assert [r.name for r in rep.replaced] == ["body.1"] and rep.replaced[0].revision == "2023-07-27"
    assert [s.name for s in rep.skipped] == ["body.0", "body.2"]
    assert all("matches no known upstream revision" in s.reason for s in rep.skipped)
    assert type(rep.model.body[0]) is LoopScConv and type(rep.model.body[2]) is LoopScConv
    assert rel(rep.model(x), want) < 1e-12
    with pytest.raises(ValueError, match="matches no known upstream revision"):
        identify_revision(odd1)


def test_from_upstream_shared_module_and_own_modules():
    blk = make_loop(16, "2023-10")
    mine = ref.SCConv(16, revision="2023-09").double()
    net = nn.Sequential(blk, blk, mine)
    rep = from_upstream(net, fused=False)
    assert [r.name for r in rep.replaced] == ["0"] and rep.unselected == ["2"]
    assert rep.model[0] is rep.model[1] and rep.model[2] is not mine
    top = from_upstream(blk, fused=False)  # the model is itself one upstream ScConv
    assert isinstance(top.model, ref.SCConv) and top.replaced[0].name == "(model)"


# ---------------------------------------------------------------------------
# the fused path, every revision, against the reference and the table (1e-10, float64)
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("rev", REVS)
@pytest.mark.parametrize("cfg", CONFIGS, ids=ids)
def test_fused_matches_reference_every_gradient(rev, cfg, device):
    c, cout, g, tau, s, h, w, cl = cfg
    loop = make_loop(c, rev, group_num=g, tau=tau, cout=cout, stride=s)
    want_ref = ours_like(loop, rev).to(device)
    fused = ours_like(loop, rev, cls=scconv_triton.SCConv, backend="triton").to(device)
    x = _input(c, h, w, cl, device)
    both_branches(want_ref.SRU, x)
    got = grads(fused, x)
    assert_all_close(got, grads(want_ref, x), 1e-10, f"{rev} fused vs reference")
    assert_all_close(got, grads(loop.to(device), x), 1e-10, f"{rev} fused vs table")


@pytest.mark.parametrize("rev", REVS)
def test_fused_sru_module_every_gradient(rev, device):
    loop = make_loop(16, rev, group_num=4, tau=0.45)
    sru = scconv_triton.SRU(16, 4, 0.45, revision=rev, backend="triton").double().to(device)
    sru.load_state_dict(loop.SRU.state_dict())
    x = _input(16, 5, 6, True, device)
    both_branches(sru, x)
    assert_all_close(grads(sru, x), grads(loop.SRU.to(device), x), 1e-10, rev)


def test_from_upstream_fused_default(device):
    net = Net(make_loop(16, "2023-09", group_num=4), make_loop(16, "2023-07-27", cout=8, stride=2)).to(device)
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64, device=device)
    want = net(x)
    rep = from_upstream(net, backend="triton", recompute=True)
    assert all(type(m) is scconv_triton.SCConv and m.recompute for m in rep.model.body)
    assert [r.revision for r in rep.replaced] == ["2023-09", "2023-07-27"]
    assert next(rep.model.body[0].parameters()).device.type == torch.device(device).type
    assert rel(rep.model(x), want) < 1e-10


def test_every_revision_costs_what_the_default_costs(device):
    # Counted by benchmarks.meter (interpreter bytes on a CPU): the revisions are constexpr
    # switches of the same kernels, so each forward stays within one launch and 1 S of the
    # default's (benchmarks/revisions.py prints the same at 64@56).
    from benchmarks.meter import measure_step

    res = {}
    for rev in REVS:
        layer = scconv_triton.SCConv(16, revision=rev, backend="triton").to(device)
        res[rev] = measure_step(layer, torch.randn(1, 16, 8, 8, device=device))
    base = res["2023-10"]
    for rev, r in res.items():
        assert r["fwd_triton_launches"] == base["fwd_triton_launches"], rev
        assert abs(r["fwd_launches"] - base["fwd_launches"]) <= 1, rev
        assert abs(r["fwd_S"] - base["fwd_S"]) <= 1.0, (rev, r["fwd_S"], base["fwd_S"])
        assert r["saved_S"] <= base["saved_S"] + 0.25, rev
    # 2023-07-27's masks on x pass no gradient into the GroupNorm: its backward skips that pass
    assert res["2023-07-27"]["bwd_triton_launches"] < base["bwd_triton_launches"]
