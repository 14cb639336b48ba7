"""The benchmark meter itself, on ops whose traffic is known by hand.

Every expectation is exact: a launch or a byte miscounted fails a test.
Triton kernels run in the interpreter on a CPU (tests/conftest.py sets it);
the byte-counting hooks only exist there, so those tests skip on a GPU.
"""

import pytest
import torch
import triton
import triton.language as tl

from _helpers import needs_interpreter
from benchmarks.meter import Launch, Meter, SavedBytes, measure_step, tensor_bytes

needs_interp = needs_interpreter("Triton byte counting hooks the interpreter's loads and stores")


@triton.jit
def _read_twice_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    off = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = off < n
    a = tl.load(x_ptr + off, mask=m, other=0.0)
    b = tl.load(x_ptr + off, mask=m, other=0.0)
    tl.store(y_ptr + off, a * b + a, mask=m)


@triton.jit
def _scalar_kernel(x_ptr, y_ptr):
    v = tl.load(x_ptr)  # unmasked scalar load: one element
    tl.store(y_ptr, v * 2)


def _launch_read_twice(x, block=256):
    y = torch.empty_like(x)
    n = x.numel()
    _read_twice_kernel[(triton.cdiv(n, block),)](x, y, n, BLOCK=block)
    return y


# ----------------------------------------------------------------------------- aten ops
def test_add_is_one_launch_three_tensors():
    a, b = torch.randn(3, 5, 7), torch.randn(3, 5, 7)
    nb = a.numel() * 4
    with Meter() as m:
        c = torch.add(a, b)
    assert m.n_launches == 1
    (r,) = m.launches
    assert (r.kind, r.name) == ("aten", "add.Tensor")
    assert (r.bytes_read, r.bytes_written) == (2 * nb, nb)
    assert m.total_bytes == 3 * nb
    assert torch.equal(c, a + b)


def test_element_size_counts():
    a = torch.randn(64, dtype=torch.float64)
    b = a.to(torch.float16)  # outside: not counted
    with Meter() as m:
        a.to(torch.float16)
        b * b
    assert [r.name for r in m.launches] == ["_to_copy.default", "mul.Tensor"]
    assert (m.launches[0].bytes_read, m.launches[0].bytes_written) == (64 * 8, 64 * 2)
    # x * x reads x once
    assert (m.launches[1].bytes_read, m.launches[1].bytes_written) == (64 * 2, 64 * 2)


def test_views_and_allocations_are_free():
    x = torch.randn(4, 6, 8)
    with Meter() as m:
        x.view(-1)
        x.reshape(24, 8)
        x.transpose(0, 2)
        x.permute(2, 0, 1)
        x[:, 1:3]
        torch.split(x, 2, dim=1)
        x.unsqueeze(0).expand(3, 4, 6, 8)
        x.t() if x.dim() == 2 else x.flatten(1)
        x.detach()
        torch.empty_like(x)
        torch.empty(10)
        x.new_empty((3, 3))
    assert m.launches == []
    assert m.total_bytes == 0


def test_reshape_that_copies_is_a_launch():
    x = torch.randn(4, 6).t()  # not contiguous: reshape must copy
    with Meter() as m:
        x.reshape(-1)
    assert m.n_launches == 1
    assert m.total_bytes == 2 * x.numel() * 4


def test_inplace_and_overwrite():
    a, b = torch.randn(100), torch.randn(100)
    nb = 400
    with Meter() as m:
        a.add_(b)  # reads a and b, writes a
        a.copy_(b)  # reads b, writes a
        a.zero_()  # writes a
    assert [(r.bytes_read, r.bytes_written) for r in m.launches] == [(2 * nb, nb), (nb, nb), (0, nb)]


def test_expanded_operand_logical_vs_memory():
    x = torch.randn(8, 16)
    v = torch.randn(16).expand(8, 16)
    with Meter() as m:
        x + v
    assert m.total_bytes == 3 * 8 * 16 * 4
    with Meter(broadcast="memory") as m2:
        x + v
    assert m2.total_bytes == (2 * 8 * 16 + 16) * 4
    assert tensor_bytes(v) == 8 * 16 * 4 and tensor_bytes(v, "memory") == 16 * 4


def test_conv_with_bias_counts_once():
    conv = torch.nn.Conv2d(4, 8, 3, padding=1, bias=True)
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad(), Meter() as m:
        conv(x)
    assert m.n_launches == 1
    (r,) = m.launches
    assert r.name == "convolution.default"
    assert r.bytes_read == (x.numel() + conv.weight.numel() + conv.bias.numel()) * 4
    assert r.bytes_written == 2 * 8 * 5 * 5 * 4


def test_meter_accumulates_and_nests():
    a = torch.randn(10)
    outer, inner = Meter(), Meter()
    with outer:
        a + a
        with inner:
            a * a
    with outer:
        a - a
    assert inner.n_launches == 1
    assert [r.name for r in outer.launches] == ["add.Tensor", "mul.Tensor", "sub.Tensor"]


def test_nothing_counted_outside():
    m = Meter()
    a = torch.randn(10)
    a + a
    with m:
        pass
    a + a
    assert m.n_launches == 0


# ----------------------------------------------------------------------------- Triton under the interpreter
@needs_interp
def test_triton_kernel_reading_input_twice():
    n = 1000  # not a power of two: the last program has 232 masked-out lanes
    x = torch.randn(n)
    with Meter() as m:
        y = _launch_read_twice(x)
    assert torch.allclose(y, x * x + x)
    assert m.n_launches == 1, m.table()
    (r,) = m.launches
    assert r.kind == "triton" and r.name == "_read_twice_kernel"
    assert r.bytes_read == 2 * n * 4  # re-read counts again; masked lanes do not
    assert r.bytes_written == n * 4
    # the grid covered 1024 lanes: counting lanes instead of active lanes would give 8192
    assert triton.cdiv(n, 256) * 256 * 4 * 2 != r.bytes_read


@needs_interp
def test_triton_dtype_and_scalar_pointer():
    x = torch.randn(37, dtype=torch.float64)
    with Meter() as m:
        y = _launch_read_twice(x, block=16)
        z = torch.empty(1, dtype=torch.float16)
        _scalar_kernel[(1,)](torch.ones(1, dtype=torch.float16), z)
    assert [(r.kind, r.bytes_read, r.bytes_written) for r in m.launches] == [
        ("triton", 2 * 37 * 8, 37 * 8),
        ("aten", 0, 2),  # torch.ones: a fill
        ("triton", 2, 2),
    ]
    assert torch.allclose(y, x * x + x)


@needs_interp
def test_interpreter_internal_copies_not_counted_and_launch_per_call():
    x = torch.randn(300)
    with Meter() as m:
        for _ in range(3):
            _launch_read_twice(x)
    assert [r.kind for r in m.launches] == ["triton"] * 3
    assert m.total_bytes == 3 * 3 * 300 * 4


@needs_interp
def test_custom_op_is_a_container():
    lib_ns = "scconv_meter_test"

    @torch.library.custom_op(f"{lib_ns}::twice_plus_one", mutates_args=())
    def twice_plus_one(x: torch.Tensor) -> torch.Tensor:
        return _launch_read_twice(x) + 1

    @twice_plus_one.register_fake
    def _(x):
        return torch.empty_like(x)

    x = torch.randn(100)
    with Meter(containers=(lib_ns,)) as m:
        y = twice_plus_one(x)
    assert torch.allclose(y, x * x + x + 1)
    assert [(r.kind, r.bytes) for r in m.launches] == [("triton", 3 * 400), ("aten", 2 * 400)]
    # without the namespace as a container it is one opaque launch (input + output)
    with Meter(containers=()) as m2:
        twice_plus_one(x)
    assert [(r.kind, r.bytes) for r in m2.launches] == [("aten", 2 * 400)]


# ----------------------------------------------------------------------------- saved bytes
def test_saved_sigmoid_saves_its_output():
    x = torch.randn(4, 8, requires_grad=True)
    with SavedBytes(input=x) as s:
        y = torch.sigmoid(x)
    assert s.bytes == y.numel() * 4
    assert s.groups["input"] == 0
    assert s.n_tensors == 1


def test_saved_mul_inputs_and_params_apart():
    x = torch.randn(4, 8, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(8))
    with SavedBytes(input=x, params=[w]) as s:
        h = torch.exp(x)  # saves h (its output)
        z = h * w  # saves h (same storage: once) and w (a parameter)
    assert s.bytes == h.numel() * 4
    assert s.groups == {"input": 0, "params": 8 * 4}
    with SavedBytes(input=x, params=[w]) as s2:
        x * w  # saves both, both apart
    assert s2.bytes == 0 and s2.groups == {"input": 32 * 4, "params": 8 * 4}
    del z


def test_saved_distinct_storages():
    x = torch.randn(4, 8, requires_grad=True)
    with SavedBytes(input=x) as s:
        y = torch.exp(x)  # saves y
        a, b = y.split(4, dim=1)
        a * b  # saves two views of y's storage: still one storage
    assert s.bytes == y.numel() * 4
    assert len(s.storages) == 1


# ----------------------------------------------------------------------------- a training step, DESIGN.md's numbers
def test_measure_step_conv_bn():
    torch.manual_seed(0)
    C = 8
    mod = torch.nn.Sequential(torch.nn.Conv2d(C, C, 3, padding=1, bias=False), torch.nn.BatchNorm2d(C))
    x = torch.randn(2, C, 6, 6)
    r = measure_step(mod, x)
    S = x.numel() * 4
    w = mod[0].weight.numel() * 4
    assert (r["fwd_launches"], r["bwd_launches"]) == (3, 2)
    # conv: reads x + weight, writes S; num_batches_tracked.add_(1) (int64, read + write);
    # batch norm: reads S + weight + bias + 2 running stats, writes S + save_mean +
    # save_invstd (its legacy schema does not mark the running stats as written)
    assert r["fwd_bytes"] == (S + w + S) + 8 * 2 + (S + 4 * C * 4) + (S + 2 * C * 4)
    assert r["saved_bytes"] == S + 2 * C * 4  # conv output + save_mean + save_invstd
    assert r["saved_input_bytes"] == S
    assert r["S"] == S


def test_reference_scconv_matches_design_table():
    """DESIGN.md: 28 / 53 S forward, 41 / 77 S backward, 8 S saved (C=64, 56x56, N=2 fp32)."""
    from scconv_triton import reference

    torch.manual_seed(0)
    mod = reference.SCConv(64)
    x = torch.randn(2, 64, 56, 56)
    r = measure_step(mod, x, warmup=0)
    assert r["fwd_launches"] == 28
    assert r["bwd_launches"] == 41
    assert r["fwd_S"] == pytest.approx(53, rel=0.05)
    assert r["bwd_S"] == pytest.approx(77, rel=0.05)
    assert r["saved_S"] == pytest.approx(8, rel=0.05)
    assert r["saved_input_bytes"] == r["S"]
