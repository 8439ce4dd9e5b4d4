"""causal_conv1d on every backend against the float64 reference: output, final states and every
gradient (x, weight, bias, initial_states, with a gradient of the final states), for odd lengths,
every width Mamba uses, each option, odd dims, strided inputs, packed sequences and every dtype;
then the backward's bitwise determinism, opcheck and the offsets refused inside the C++ op.

Outputs are NaN-poisoned (conftest for torch.empty, FRONTIERS_FAST_DEBUG_POISON for the C++
kernels), so an element a kernel forgets to write fails the comparison.
"""

import pytest
import torch

from frontiers_fast.ops import ssm as ops
from frontiers_fast.reference import ssm as ref

from ..helpers import assert_close, backend_cases, backends_for, opcheck

CASES = backend_cases("causal_conv1d")
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
LENGTHS = [1, 2, 63, 301, 2049]
f64 = torch.float64
tops = torch.ops.frontiers_fast
needs_cpp = pytest.mark.skipif(
    "cpp" not in backends_for("causal_conv1d", "cpu"), reason="C++ backend not built"
)


def _acc(dtype):
    return f64 if dtype == f64 else torch.float32


def _inputs(batch, dim, L, width, bias=True, init=True, rows=None):
    """Fresh float64 inputs: x [batch, dim, L], weight [dim, width], bias [dim], initial_states [rows, dim, width-1]."""
    rows = batch if rows is None else rows
    return dict(
        x=torch.randn(batch, dim, L, dtype=f64),
        weight=torch.randn(dim, width, dtype=f64) / width**0.5,
        bias=torch.randn(dim, dtype=f64) if bias else None,
        initial_states=torch.randn(rows, dim, width - 1, dtype=f64) if init else None,
    )


def _compare(kw, dtype, device, backend, silu=True, cu_seqlens=None, grad_final=True):
    """The backend in ``dtype`` (weight and bias in its accumulate dtype) against the float64
    reference on the same rounded values: out, final states and the gradient of every input."""
    acc = _acc(dtype)
    ours, theirs = {}, {}
    for k, v in kw.items():
        if v is None:
            ours[k] = theirs[k] = None
            continue
        v = v.to(acc if k in ("weight", "bias") else dtype)
        ours[k] = v.to(device).requires_grad_(True)
        theirs[k] = v.detach().double().requires_grad_(True)
    act = "silu" if silu else None
    cu = None if cu_seqlens is None else torch.tensor(cu_seqlens, dtype=torch.int64)
    out, fin = ops.causal_conv1d(**ours, activation=act, return_final_states=True,
                                 cu_seqlens=None if cu is None else cu.to(device), backend=backend)  # fmt: skip
    want, want_fin = ref.causal_conv1d(**theirs, activation=act, return_final_states=True, cu_seqlens=cu)
    assert out.dtype == dtype and fin.dtype == dtype
    assert out.shape == want.shape and fin.shape == want_fin.shape
    assert_close(out.cpu(), want, dtype)
    assert_close(fin.cpu(), want_fin, dtype)
    names = [k for k, v in ours.items() if v is not None]
    g = torch.randn_like(want).to(dtype)
    outs, seeds, ref_outs = [out], [g.to(device)], [want]
    if grad_final and want_fin.numel() > 0:
        gf = torch.randn_like(want_fin).to(dtype)
        outs.append(fin)
        seeds.append(gf.to(device))
        ref_outs.append(want_fin)
    got = torch.autograd.grad(outs, [ours[k] for k in names], seeds, allow_unused=True)
    expect = torch.autograd.grad(ref_outs, [theirs[k] for k in names], [s.cpu().double() for s in seeds],
                                 allow_unused=True)  # fmt: skip
    for name, a, b in zip(names, got, expect):
        a = torch.zeros_like(ours[name]) if a is None else a
        b = torch.zeros_like(theirs[name]) if b is None else b
        assert a.dtype == ours[name].dtype and a.shape == ours[name].shape, name
        assert_close(a.cpu(), b, a.dtype, msg=f"grad of {name}")


# ---------------------------------------------------------------------------
# the reference, everywhere
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("width", [1, 2, 3, 4])
@pytest.mark.parametrize("L", LENGTHS)
def test_every_length_and_width(device, backend, L, width):
    _compare(_inputs(2, 37, L, width), torch.float32, device, backend)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [2, 4])
def test_every_dtype(device, backend, dtype, width):
    # dim 5 (odd), L 301: tiles of whole vectors and a partial one in every dtype
    _compare(_inputs(3, 5, 301, width), dtype, device, backend)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("init", [False, True])
@pytest.mark.parametrize("grad_final", [False, True])
def test_options(device, backend, silu, bias, init, grad_final):
    _compare(
        _inputs(2, 6, 77, 4, bias=bias, init=init), f64, device, backend, silu=silu, grad_final=grad_final
    )


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("width", [5, 7])
def test_wide_filters(device, backend, width):
    # widths past Mamba's 2..4 take the C++ kernel's generic path
    _compare(_inputs(2, 5, 130, width), torch.float32, device, backend)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_noncontiguous_inputs(device, backend, dtype):
    batch, dim, L, width = 2, 5, 150, 4
    kw = _inputs(batch, dim, L, width)
    # every tensor a strided view of a bigger one: x with a stride along L, the states transposed
    kw["x"] = torch.randn(batch, 2 * dim, 3 * L, dtype=f64)[:, ::2, 1::3]
    kw["weight"] = torch.randn(dim, 2 * width, dtype=f64)[:, ::2]
    kw["bias"] = torch.randn(2 * dim, dtype=f64)[1::2]
    kw["initial_states"] = torch.randn(batch, width - 1, dim, dtype=f64).transpose(1, 2)
    assert not any(v.is_contiguous() for v in kw.values())
    _compare(kw, dtype, device, backend)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("init", [False, True])
@pytest.mark.parametrize("width", [2, 4])
def test_packed_sequences(device, backend, dtype, init, width):
    # an empty sequence first and in the middle, sequences of 1 and 2 steps (shorter than width - 1),
    # and a long one across the C++ kernel's 1024-step tiles
    cu = [0, 0, 1, 3, 40, 40, 1300, 1302]
    kw = _inputs(1, 6, cu[-1], width, init=init, rows=len(cu) - 1)
    _compare(kw, dtype, device, backend, cu_seqlens=cu)


@pytest.mark.parametrize("device,backend", CASES)
def test_packed_equals_separate_calls(device, backend):
    cu = [0, 2, 50, 51, 120]
    kw = {k: v.float().to(device) for k, v in _inputs(1, 7, cu[-1], 4, rows=4).items()}
    out, fin = ops.causal_conv1d(**kw, activation="silu", return_final_states=True,
                                 cu_seqlens=torch.tensor(cu, device=device), backend=backend)  # fmt: skip
    for s in range(len(cu) - 1):
        piece = dict(kw, x=kw["x"][..., cu[s] : cu[s + 1]], initial_states=kw["initial_states"][s : s + 1])
        o, f = ops.causal_conv1d(**piece, activation="silu", return_final_states=True, backend=backend)
        # a sequence never sees its neighbour's tail
        assert_close(out[..., cu[s] : cu[s + 1]], o)
        assert_close(fin[s : s + 1], f)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("packed", [False, True])
def test_backward_op_directly(device, backend, packed):
    # the op itself: every gradient, absent placeholders for None inputs, no grad of the final states
    width = 3
    cu = torch.tensor([0, 1, 1, 60]) if packed else None
    rows = 3 if packed else 2
    kw = _inputs(1 if packed else 2, 5, 60, width, rows=rows)
    x, w, b, h0 = (kw[k] for k in ("x", "weight", "bias", "initial_states"))
    g, gf = torch.randn(x.shape, dtype=f64), torch.randn(rows, 5, width - 1, dtype=f64)
    dev = lambda t: None if t is None else t.to(device)
    for bias, init, g_fin in ((b, h0, gf), (None, None, None), (b, None, gf), (None, h0, None)):
        got = tops.causal_conv1d_bwd(dev(x), dev(w), dev(bias), dev(init), True, dev(cu), dev(g), dev(g_fin),
                                     backend)  # fmt: skip
        want = ref.causal_conv1d_bwd(x, w, bias, "silu", init, g, g_fin, cu)
        for name, a, e in zip(("x", "weight", "bias", "initial_states"), got, want):
            if e is None:
                assert a.shape == (0,), name
            else:
                assert_close(a.cpu(), e, msg=f"grad of {name}")


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("batch,dim", [(0, 6), (2, 0)])
def test_empty_sizes(device, backend, batch, dim):
    x = torch.randn(batch, dim, 9, dtype=f64, device=device, requires_grad=True)
    w = torch.randn(dim, 4, dtype=f64, device=device, requires_grad=True)
    b = torch.randn(dim, dtype=f64, device=device, requires_grad=True)
    h0 = torch.randn(batch, dim, 3, dtype=f64, device=device, requires_grad=True)
    out, fin = ops.causal_conv1d(x, w, b, "silu", h0, return_final_states=True, backend=backend)
    assert out.shape == (batch, dim, 9) and fin.shape == (batch, dim, 3)
    grads = torch.autograd.grad((out.sum() + fin.sum()), [x, w, b, h0], allow_unused=True)
    for g, t in zip(grads, (x, w, b, h0)):
        assert g is None or (g.shape == t.shape and not g.any())


# ---------------------------------------------------------------------------
# the backward is bitwise deterministic
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("backend", backends_for("causal_conv1d", "cpu"))
@pytest.mark.parametrize("packed", [False, True])
def test_backward_is_deterministic(backend, packed):
    # enough rows for both threads, and rows of several tiles
    batch, dim, L = (1, 40, 3000) if packed else (3, 40, 3000)
    cu = torch.tensor([0, 1000, 1003, 3000]) if packed else None
    kw = {k: v.float() for k, v in _inputs(batch, dim, L, 4, rows=3 if packed else batch).items()}
    x, w, b, h0 = (kw[k] for k in ("x", "weight", "bias", "initial_states"))
    g, gf = torch.randn(x.shape), torch.randn(h0.shape)
    run = lambda: tops.causal_conv1d_bwd(x, w, b, h0, True, cu, g, gf, backend)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        first, second = run(), run()
        torch.set_num_threads(1)
        single = run()
    finally:
        torch.set_num_threads(threads)
    for a, c, s in zip(first, second, single):
        assert torch.equal(a, c) and torch.equal(a, s)


# ---------------------------------------------------------------------------
# registration and refused offsets (C++ backend)
# ---------------------------------------------------------------------------
@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, f64, torch.bfloat16])
@pytest.mark.parametrize("packed", [False, True])
def test_opcheck_cpp(dtype, packed):
    acc = _acc(dtype)
    kw = _inputs(1 if packed else 2, 3, 7, 4, rows=2)
    x, h0 = kw["x"].to(dtype), kw["initial_states"].to(dtype)
    w, b = kw["weight"].to(acc), kw["bias"].to(acc)
    cu = torch.tensor([0, 2, 7]) if packed else None
    args = (x, w, b, h0, True, cu, "cpp")
    grad_args = tuple(t.clone().requires_grad_(True) if isinstance(t, torch.Tensor) and t.is_floating_point()
                      else t for t in args)  # fmt: skip
    opcheck(tops.causal_conv1d, grad_args, full=dtype != torch.bfloat16)
    out, fin = tops.causal_conv1d(*args)
    opcheck(
        tops.causal_conv1d_bwd, (*args[:-1], torch.randn_like(out), torch.randn_like(fin), "cpp"), full=False
    )
    opcheck(
        tops.causal_conv1d_bwd, (x, w, None, None, False, cu, torch.randn_like(out), None, "cpp"), full=False
    )


BAD_OFFSETS = [
    ([1, 4, 4, 10], "cu_seqlens must start at 0 and end at"),
    ([0, 4, 4, 9], "cu_seqlens must start at 0 and end at"),
    ([0, 5, 4, 10], "cu_seqlens must not decrease"),
]


@pytest.mark.parametrize("cu,match", BAD_OFFSETS)
def test_bad_offsets_public_function(cu, match):
    x, w = torch.randn(1, 6, 10), torch.randn(6, 4)
    with pytest.raises(ValueError, match=match):
        ops.causal_conv1d(x, w, cu_seqlens=torch.tensor(cu))


@needs_cpp
@pytest.mark.parametrize("cu,match", BAD_OFFSETS)
def test_bad_offsets_refused_by_the_cpp_op(cu, match):
    # the C++ body reads the offsets and raises ValueError itself (compiled graphs skip the Python checks)
    x, w, b = torch.randn(1, 6, 10), torch.randn(6, 4), torch.randn(6)
    h0 = torch.randn(3, 6, 3)
    cu = torch.tensor(cu)
    with pytest.raises(ValueError, match=match):
        tops.causal_conv1d(x, w, b, h0, True, cu, "cpp")
    with pytest.raises(ValueError, match=match):
        torch.ops.frontiers_fast_native.causal_conv1d(x, w, b, h0, True, cu)
    with pytest.raises(ValueError, match=match):
        tops.causal_conv1d_bwd(x, w, b, h0, True, cu, torch.randn(1, 6, 10), None, "cpp")
