"""Triton launchers (kernels/ssm.py) against the float64 reference.

The launchers are called directly: on CPU tensors through the Triton
interpreter (conftest sets TRITON_INTERPRET=1 when there is no GPU), and on
CUDA tensors natively when a GPU is present.  On CPU the tests run in
float32 and float64 on small shapes; on CUDA they also run in float16 and
bfloat16, and the long-sequence tests use Mamba-sized channels and states.

The interpreter evaluates ``tl.associative_scan`` one element at a time,
calling the combine function once per element of the tile, which would
make these tests take many minutes.  The ``_vector_scan`` fixture evaluates
it as a log-depth (Hillis-Steele) scan instead, calling the kernel's own
combine function on whole tiles: log2(BLOCK_L) calls per scan, in a tree
order like the compiled scan's, so the interpreter also checks that the
kernels hold their tolerances whatever order the combines associate in.
"""

import os

import numpy as np
import pytest
import torch

from frontiers_fast.ops import ssm as ops
from tests.helpers import assert_close, triton_devices, triton_params

pytest.importorskip("triton")
# imported after conftest, which has set TRITON_INTERPRET for a GPU-less machine
from frontiers_fast.kernels import ssm as K  # noqa: E402

f64 = torch.float64
SCAN_GRADS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


SWEEP = triton_params((torch.float32,))
SMALL = triton_params((torch.float32, torch.float64))


@pytest.fixture(autouse=True, scope="module")
def _vector_scan():
    if os.environ.get("TRITON_INTERPRET") != "1":
        yield
        return
    from triton.runtime import interpreter

    def generic_scan(self, input):
        # Hillis-Steele: after round k every position holds the combination of the 2^k elements
        # ending there; whole tiles go through the kernel's own combine function.
        acc = [np.asarray(arg.handle.data) for arg in input]
        n = acc[0].shape[self.axis]
        cut = lambda a, lo, hi: a[(slice(None),) * self.axis + (slice(lo, hi),)]
        k = 1
        while k < n:
            # prev[i] = acc[i - k] (the first k are placeholders, their results dropped): tiles
            # keep the kernel's power-of-two shapes
            prev = [np.concatenate([cut(a, 0, k), cut(a, 0, n - k)], axis=self.axis) for a in acc]
            with np.errstate(all="ignore"):
                ret = self.combine_fn.fn(
                    *(self.to_tensor(p, t.dtype) for p, t in zip(prev, input)),
                    *(self.to_tensor(a, t.dtype) for a, t in zip(acc, input)),
                )
            ret = ret if isinstance(ret, tuple) else (ret,)
            new = []
            for a, r in zip(acc, ret):
                a = a.copy()
                cut(a, k, n)[...] = cut(np.broadcast_to(r.handle.data, a.shape), k, n)
                new.append(a)
            acc = new
            k *= 2
        return [self.to_tensor(a, t.dtype) for a, t in zip(acc, input)]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(interpreter.ScanOps, "generic_scan", generic_scan)
        yield


def _acc(dtype):
    return f64 if dtype == f64 else torch.float32


def _randn(*shape, dtype, device, scale=1.0, shift=0.0):
    return (torch.randn(*shape, dtype=f64) * scale + shift).to(device=device, dtype=dtype)


def _f64(args):
    return [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]


def _bc(layout, batch, dim, N, L, groups, dtype, device):
    if layout == "constant":
        return _randn(dim, N, dtype=_acc(dtype), device=device)
    if layout == "variable":
        return _randn(batch, N, L, dtype=dtype, device=device)
    return _randn(batch, groups, N, L, dtype=dtype, device=device)


def scan_args(batch, dim, N, L, layout, dtype, device, *, C_layout=None, GB=2, GC=None, D=True, z=True,
              bias=True, softplus=True, h0=True, cu_seqlens=None):  # fmt: skip
    """The op's arguments (u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, cu_seqlens)."""
    acc = _acc(dtype)
    rows = batch if cu_seqlens is None else len(cu_seqlens) - 1
    if softplus:
        delta = _randn(batch, dim, L, dtype=dtype, device=device)  # raw: softplus makes it positive
    else:
        delta = (torch.rand(batch, dim, L, dtype=f64) + 0.05).to(device=device, dtype=dtype)
    return [
        _randn(batch, dim, L, dtype=dtype, device=device),
        delta,
        -(torch.rand(dim, N, dtype=f64) + 0.2).to(device=device, dtype=acc),  # decaying, as -exp(A_log)
        _bc(layout, batch, dim, N, L, GB, dtype, device),
        _bc(C_layout or layout, batch, dim, N, L, GC or GB, dtype, device),
        _randn(dim, dtype=acc, device=device) if D else None,
        _randn(batch, dim, L, dtype=dtype, device=device) if z else None,
        _randn(dim, dtype=acc, device=device, scale=0.5) if bias else None,
        softplus,
        _randn(rows, dim, N, dtype=acc, device=device) if h0 else None,
        None if cu_seqlens is None else torch.tensor(cu_seqlens, dtype=torch.int64, device=device),
    ]


def check_scan(args, grad_last=True, backward=True):
    """Forward (out, last state) and all nine gradients against the float64 reference."""
    u = args[0]
    dtype = u.dtype
    out, last = K.selective_scan_fwd(*args)
    ref_out, ref_last = ops._ref_selective_scan(*_f64(args))
    assert out.dtype == dtype and out.shape == u.shape
    assert last.dtype == _acc(dtype) and last.shape == ref_last.shape
    assert_close(out, ref_out, dtype, msg="out")
    assert_close(last, ref_last, dtype, msg="last_state")
    if not backward:
        return
    go = _randn(*u.shape, dtype=dtype, device=u.device)
    gl = _randn(*last.shape, dtype=last.dtype, device=u.device) if grad_last else None
    got = K.selective_scan_bwd(*args, go, gl)
    want = ops._ref_selective_scan_bwd(*_f64(args), go.double(), None if gl is None else gl.double())
    inputs = [args[i] for i in (0, 1, 2, 3, 4, 5, 6, 7, 9)]
    for name, g, w, like in zip(SCAN_GRADS, got, want, inputs):
        if like is None:
            assert g.numel() == 0, name
            continue
        assert g.dtype == like.dtype and g.shape == like.shape, name
        assert_close(g, w, dtype, msg=f"grad_{name}")


# ---------------------------------------------------------------------------
# selective scan
# ---------------------------------------------------------------------------
LAYOUTS = ["constant", "variable", "grouped"]


@pytest.mark.parametrize("L", [1, 2, 63, 301])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("device,dtype", SMALL)
def test_scan_lengths(device, dtype, layout, L):
    # every option on: D, z, delta_bias, softplus, initial state, last-state gradient
    check_scan(scan_args(2, 6, 3, L, layout, dtype, device, GB=3), backward=L != 301 or dtype != f64)


OPTIONS = {
    "plain": dict(D=False, z=False, bias=False, softplus=False, h0=False),
    "D": dict(z=False, bias=False, softplus=False, h0=False),
    "z": dict(D=False, bias=False, softplus=False, h0=False),
    "bias": dict(D=False, z=False, softplus=False, h0=False),
    "softplus": dict(D=False, z=False, bias=False, h0=False),
    "initial_state": dict(D=False, z=False, bias=False, softplus=False),
}


@pytest.mark.parametrize("grad_last", [False, True], ids=["no-grad-last", "grad-last"])
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("device,dtype", SWEEP)
def test_scan_options(device, dtype, option, grad_last):
    check_scan(scan_args(2, 5, 4, 70, "variable", dtype, device, **OPTIONS[option]), grad_last=grad_last)


@pytest.mark.parametrize(
    "B_layout,C_layout,GB,GC",
    [("constant", "variable", 2, 2), ("variable", "constant", 2, 2), ("grouped", "grouped", 2, 3),
     ("constant", "grouped", 3, 3)],
    ids=["const-var", "var-const", "G2-G3", "const-G3"],
)  # fmt: skip
@pytest.mark.parametrize("device,dtype", SMALL)
def test_scan_mixed_layouts(device, dtype, B_layout, C_layout, GB, GC):
    # G2-G3 on dim 6: one channel per segment, three blocks summed per group of B, two per group of C
    check_scan(scan_args(2, 6, 3, 40, B_layout, dtype, device, C_layout=C_layout, GB=GB, GC=GC))


@pytest.mark.parametrize("device,dtype", SWEEP)
def test_scan_long_forward(device, dtype):
    big = device == "cuda"
    for layout in LAYOUTS:
        args = scan_args(2 if big else 1, 64 if big else 4, 16 if big else 3, 2049, layout, dtype, device)
        check_scan(args, backward=False)


@pytest.mark.parametrize("device,dtype", SWEEP)
def test_scan_long_backward(device, dtype):
    big = device == "cuda"
    check_scan(
        scan_args(2 if big else 1, 64 if big else 4, 16 if big else 3, 2049, "variable", dtype, device)
    )


PACKS = {
    # an empty sequence, one shorter than a chunk, several crossing chunk boundaries
    "mixed": [0, 5, 5, 70, 150],
    "empty-last": [0, 33, 64, 64],
    "one": [0, 40],
}


@pytest.mark.parametrize("pack", list(PACKS))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("device,dtype", SMALL)
def test_scan_varlen(device, dtype, layout, pack):
    cu = PACKS[pack]
    check_scan(scan_args(1, 4, 3, cu[-1], layout, dtype, device, GB=2, cu_seqlens=cu))


@pytest.mark.parametrize("device", triton_devices())
def test_scan_varlen_without_states(device):
    cu = PACKS["mixed"]
    args = scan_args(1, 4, 3, cu[-1], "variable", torch.float32, device, h0=False, cu_seqlens=cu)
    check_scan(args, grad_last=False)


@pytest.mark.parametrize("device", triton_devices())
def test_scan_noncontiguous(device):
    batch, dim, N, L = 2, 6, 3, 40

    def spread(t):
        # t's values in every other element of a NaN buffer: no unit stride, and a stray read is NaN
        buf = torch.full((*t.shape[:-1], 2 * t.shape[-1]), float("nan"), device=device)
        buf[..., ::2] = t
        return buf[..., ::2]

    r = lambda *shape: torch.randn(*shape, device=device)
    u, dt, z = spread(r(batch, dim, L)), spread(r(batch, dim, L).abs() + 0.05), spread(r(batch, dim, L))
    A = spread(-(torch.rand(N, dim, device=device) + 0.2)).t()  # [dim, N]
    B = spread(r(batch, 2, N, L))
    C = spread(r(batch, N, L))
    D, bias = spread(r(dim)), spread(r(dim))
    h0 = spread(r(batch, dim, N))
    args = [u, dt, A, B, C, D, z, bias, True, h0, None]
    assert not any(a.is_contiguous() for a in args if isinstance(a, torch.Tensor))
    check_scan(args)
    # and non-contiguous output gradients
    out, last = K.selective_scan_fwd(*args)
    go = spread(r(*u.shape))
    gl = spread(r(*last.shape))
    got = K.selective_scan_bwd(*args, go, gl)
    want = ops._ref_selective_scan_bwd(*_f64(args), go.double(), gl.double())
    for name, g, w in zip(SCAN_GRADS, got, want):
        assert_close(g, w, torch.float32, msg=name)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("device", triton_devices())
def test_scan_bwd_deterministic(device, layout):
    # dim 40 in segments of 40 (or 20 per group): several channel blocks per group, whose partial
    # sums of grad_B and grad_C are reduced afterwards in a fixed order
    cu = [0, 7, 7, 20]
    args = scan_args(1, 40, 2, 20, layout, torch.float32, device, GB=2, cu_seqlens=cu)
    out, last = K.selective_scan_fwd(*args)
    go, gl = torch.randn_like(out), torch.randn_like(last)
    first, again = K.selective_scan_bwd(*args, go, gl), K.selective_scan_bwd(*args, go, gl)
    want = ops._ref_selective_scan_bwd(*_f64(args), go.double(), gl.double())
    for name, a, b, w in zip(SCAN_GRADS, first, again, want):
        assert torch.equal(a, b), (
            f"grad_{name}: the backward has no atomics, so it must be bitwise reproducible"
        )
        assert_close(a, w, torch.float32, msg=name)


@pytest.mark.parametrize("device", triton_devices())
def test_scan_empty_dims(device):
    # N = 0: no state, out = D u silu(z); batch = 0 and dim = 0: empty results
    check_scan(scan_args(2, 4, 0, 9, "variable", torch.float32, device))
    check_scan(scan_args(2, 4, 0, 9, "constant", torch.float32, device))
    for batch, dim in ((0, 4), (2, 0)):
        args = scan_args(batch, dim, 3, 9, "variable", torch.float32, device)
        out, last = K.selective_scan_fwd(*args)
        assert out.shape == (batch, dim, 9) and last.shape == (batch, dim, 3)
        grads = K.selective_scan_bwd(*args, torch.zeros_like(out), None)
        for g, a in zip(grads, [args[i] for i in (0, 1, 2, 3, 4, 5, 6, 7, 9)]):
            assert g.shape == a.shape and not g.isnan().any()


@pytest.mark.parametrize("device", triton_devices())
def test_scan_checks_offsets(device):
    args = scan_args(1, 4, 3, 10, "variable", torch.float32, device, h0=False, cu_seqlens=[0, 6, 4, 10])
    with pytest.raises(ValueError, match="cu_seqlens"):
        K.selective_scan_fwd(*args)
    with pytest.raises(ValueError, match="cu_seqlens"):
        K.selective_scan_bwd(*args, torch.zeros_like(args[0]), None)
    args[-1] = torch.tensor([0, 4, 9], device=device)
    with pytest.raises(ValueError, match="cu_seqlens"):
        K.selective_scan_fwd(*args)


# ---------------------------------------------------------------------------
# causal conv1d
# ---------------------------------------------------------------------------
def conv_args(batch, dim, L, W, dtype, device, *, bias=True, init=True, silu=True, cu_seqlens=None):
    acc = _acc(dtype)
    rows = batch if cu_seqlens is None else len(cu_seqlens) - 1
    return [
        _randn(batch, dim, L, dtype=dtype, device=device),
        _randn(dim, W, dtype=acc, device=device, scale=0.5),
        _randn(dim, dtype=acc, device=device) if bias else None,
        _randn(rows, dim, W - 1, dtype=dtype, device=device) if init else None,
        silu,
        None if cu_seqlens is None else torch.tensor(cu_seqlens, dtype=torch.int64, device=device),
    ]


def check_conv(args, grad_final=True):
    x = args[0]
    dtype = x.dtype
    out, final = K.causal_conv1d_fwd(*args)
    ref_out, ref_final = ops._ref_causal_conv1d(*_f64(args))
    assert out.dtype == dtype and out.shape == x.shape
    assert final.dtype == dtype and final.shape == ref_final.shape
    assert_close(out, ref_out, msg="out")
    assert_close(final, ref_final, msg="final_states")
    go = _randn(*x.shape, dtype=dtype, device=x.device)
    gf = _randn(*final.shape, dtype=dtype, device=x.device) if grad_final else None
    got = K.causal_conv1d_bwd(*args, go, gf)
    want = ops._ref_causal_conv1d_bwd(*_f64(args), go.double(), None if gf is None else gf.double())
    for name, g, w, like in zip(("x", "weight", "bias", "initial_states"), got, want, args[:4]):
        if like is None:
            assert g.numel() == 0, name
            continue
        assert g.dtype == like.dtype and g.shape == like.shape, name
        assert_close(g, w, dtype, msg=f"grad_{name}")


CONV_LENGTHS = [pytest.param(*p.values, L, id=f"{p.id}-{L}") for L in (1, 63) for p in SMALL]
CONV_LENGTHS += [pytest.param(*p.values, L, id=f"{p.id}-{L}") for L in (2, 301) for p in SWEEP]


@pytest.mark.parametrize("W,silu", [(1, False), (2, True), (4, False), (4, True)])
@pytest.mark.parametrize("device,dtype,L", CONV_LENGTHS)
def test_conv_lengths(device, dtype, L, W, silu):
    check_conv(conv_args(2, 5, L, W, dtype, device, silu=silu))


@pytest.mark.parametrize(
    "bias,init,grad_final", [(False, False, False), (True, False, True), (False, True, False)]
)
@pytest.mark.parametrize("device,dtype", SWEEP)
def test_conv_options(device, dtype, bias, init, grad_final):
    check_conv(conv_args(2, 6, 40, 4, dtype, device, bias=bias, init=init), grad_final=grad_final)


@pytest.mark.parametrize(
    "pack", [[0, 2, 2, 3, 40, 41], [0, 1, 140], [0, 0, 5]], ids=["short", "long", "empty-first"]
)
@pytest.mark.parametrize("W", [2, 4])
@pytest.mark.parametrize("device,dtype", SMALL)
def test_conv_varlen(device, dtype, W, pack):
    # sequences shorter than width - 1 keep initial states in their final states
    check_conv(conv_args(1, 5, pack[-1], W, dtype, device, cu_seqlens=pack))


@pytest.mark.parametrize("device", triton_devices())
def test_conv_varlen_without_states(device):
    check_conv(conv_args(1, 5, 41, 4, torch.float32, device, init=False, cu_seqlens=[0, 2, 2, 3, 40, 41]))


@pytest.mark.parametrize("device", triton_devices())
def test_conv_noncontiguous_and_deterministic(device):
    dim, L, W = 6, 150, 4
    x = torch.randn(2, L, 2 * dim, device=device)[..., ::2].transpose(1, 2)  # [2, dim, L], dim stride 2
    w = torch.randn(W, dim, device=device).t()
    b = torch.randn(2 * dim, device=device)[::2]
    init = torch.randn(2, W - 1, dim, device=device).transpose(1, 2)
    args = [x, w, b, init, True, None]
    assert not any(a.is_contiguous() for a in args[:4])
    check_conv(args)
    go = torch.randn(2, L, dim, device=device).transpose(1, 2)
    gf = torch.randn(2, W - 1, dim, device=device).transpose(1, 2)
    first, again = K.causal_conv1d_bwd(*args, go, gf), K.causal_conv1d_bwd(*args, go, gf)
    want = ops._ref_causal_conv1d_bwd(*_f64(args), go.double(), gf.double())
    for a, b_, r in zip(first, again, want):
        assert torch.equal(a, b_), "the backward has no atomics, so it must be bitwise reproducible"
        assert_close(a, r)


@pytest.mark.parametrize("device", triton_devices())
def test_conv_checks_offsets(device):
    args = conv_args(1, 4, 10, 4, torch.float32, device, cu_seqlens=[0, 6, 4, 10])
    with pytest.raises(ValueError, match="cu_seqlens"):
        K.causal_conv1d_fwd(*args)
    with pytest.raises(ValueError, match="cu_seqlens"):
        K.causal_conv1d_bwd(*args, torch.zeros_like(args[0]), None)


# ---------------------------------------------------------------------------
# decoding steps
# ---------------------------------------------------------------------------
def ssu_args(batch, nheads, headdim, N, ngroups, dtype, device, *, rows=None, state_dtype=None, D=True, z=True,
             dt_bias=True, softplus=True, idx=None):  # fmt: skip
    acc = _acc(dtype)
    chan = (batch, nheads, headdim)
    state = _randn(rows or batch, nheads, headdim, N, dtype=state_dtype or dtype, device=device)
    return [
        state,
        _randn(*chan, dtype=dtype, device=device),
        _randn(*chan, dtype=dtype, device=device)
        if softplus
        else _randn(*chan, dtype=dtype, device=device).abs(),
        -(torch.rand(nheads, headdim, N, dtype=f64) + 0.2).to(device=device, dtype=acc),
        _randn(batch, ngroups, N, dtype=dtype, device=device),
        _randn(batch, ngroups, N, dtype=dtype, device=device),
        _randn(nheads, headdim, dtype=acc, device=device) if D else None,
        _randn(*chan, dtype=dtype, device=device) if z else None,
        _randn(nheads, headdim, dtype=acc, device=device, scale=0.5) if dt_bias else None,
        softplus,
        None if idx is None else torch.tensor(idx, dtype=torch.int64, device=device),
    ]


def check_ssu(args):
    state = args[0]
    before = state.clone()
    want_state = before.double()
    want = ops._ref_selective_state_update(want_state, *_f64(args[1:]))
    y = K.selective_state_update_fwd(*args)
    assert y.dtype == args[1].dtype and y.shape == args[1].shape
    assert_close(y, want, args[1].dtype, msg="y")
    assert state.dtype == before.dtype
    # the state may be wider than x: it holds what was computed in x's accumulate dtype
    assert_close(state, want_state, args[1].dtype if state.dtype == f64 else state.dtype, msg="state")
    idx = args[-1]
    if idx is not None:
        untouched = torch.ones(state.shape[0], dtype=torch.bool, device=state.device)
        untouched[idx] = False
        assert torch.equal(state[untouched], before[untouched]), (
            "rows outside state_batch_indices must not change"
        )


@pytest.mark.parametrize(
    "nheads,headdim,N,ngroups",
    [(6, 1, 4, 1), (6, 1, 3, 3), (4, 3, 4, 2), (4, 5, 3, 4)],
    ids=["3d", "3d-grouped", "heads", "heads-g4"],
)
@pytest.mark.parametrize("device,dtype", SMALL)
def test_selective_state_update(device, dtype, nheads, headdim, N, ngroups):
    check_ssu(ssu_args(3, nheads, headdim, N, ngroups, dtype, device))
    # a bigger cache: batch entries update rows 4, 0 and 2 of 6
    check_ssu(ssu_args(3, nheads, headdim, N, ngroups, dtype, device, rows=6, idx=[4, 0, 2]))


@pytest.mark.parametrize("options", [dict(D=False, z=False, dt_bias=False, softplus=False), dict(z=False)])
@pytest.mark.parametrize("device,dtype", SWEEP)
def test_selective_state_update_options(device, dtype, options):
    check_ssu(ssu_args(2, 4, 3, 4, 2, dtype, device, **options))


@pytest.mark.parametrize("device", triton_devices())
def test_selective_state_update_views_and_dtypes(device):
    # the state is a strided view of a bigger float64 cache (its own dtype), updated in place
    cache = torch.randn(5, 4, 6, 3, 2, dtype=f64, device=device)
    state = cache[..., 0].transpose(1, 2)  # [rows 5, nheads 6, headdim 4, N 3]
    args = ssu_args(2, 6, 4, 3, 3, torch.float32, device, rows=5, idx=[3, 1])
    args[0] = state
    assert not state.is_contiguous()
    other = cache[..., 1].clone()
    check_ssu(args)
    assert torch.equal(cache[..., 1], other), "the view's neighbours must not change"


@pytest.mark.parametrize("device", triton_devices())
def test_selective_state_update_checks_indices(device):
    args = ssu_args(3, 4, 1, 3, 1, torch.float32, device, rows=6, idx=[4, 0, 4])
    with pytest.raises(ValueError, match="state_batch_indices"):
        K.selective_state_update_fwd(*args)
    args[-1] = torch.tensor([0, 1, 6], device=device)
    with pytest.raises(ValueError, match="state_batch_indices"):
        K.selective_state_update_fwd(*args)


def check_conv_update(x, conv_state, weight, bias, silu):
    want_state = conv_state.double().clone()
    want = ops._ref_causal_conv1d_update(x.double(), want_state, weight.double(), _f64([bias])[0], silu)
    out = K.causal_conv1d_update_fwd(x, conv_state, weight, bias, silu)
    assert out.dtype == x.dtype and out.shape == x.shape
    assert_close(out, want, x.dtype)
    # the new state is a shifted copy of inputs: exact
    assert torch.equal(conv_state.double(), want_state)


@pytest.mark.parametrize("steps", [None, 1, 3, 9], ids=["2d", "L1", "L3", "L9"])
@pytest.mark.parametrize("W,S", [(4, 3), (4, 4), (3, 6), (1, 2)])
@pytest.mark.parametrize("device,dtype", SMALL)
def test_causal_conv1d_update(device, dtype, W, S, steps):
    batch, dim = 2, 5
    x = (
        _randn(batch, dim, dtype=dtype, device=device)
        if steps is None
        else _randn(batch, dim, steps, dtype=dtype, device=device)
    )
    state = _randn(batch, dim, S, dtype=dtype, device=device)
    w = _randn(dim, W, dtype=_acc(dtype), device=device)
    b = _randn(dim, dtype=_acc(dtype), device=device)
    check_conv_update(x, state, w, b, True)
    check_conv_update(x, _randn(batch, dim, S, dtype=dtype, device=device), w, None, False)


@pytest.mark.parametrize("device", triton_devices())
def test_causal_conv1d_update_view_and_steps(device):
    # a strided conv_state view, and stepping token by token reproduces causal_conv1d
    batch, dim, W, L = 2, 5, 4, 7
    cache = torch.randn(batch, W - 1, 2 * dim, device=device)
    state = cache[..., ::2].transpose(1, 2)  # [batch, dim, W-1], no unit stride
    other = cache[..., 1::2].clone()
    x = torch.randn(batch, dim, L, device=device)
    w, b = torch.randn(dim, W, device=device), torch.randn(dim, device=device)
    want, want_final = K.causal_conv1d_fwd(x, w, b, state.clone(), True, None)
    outs = [K.causal_conv1d_update_fwd(x[..., t], state, w, b, True) for t in range(L)]
    assert_close(torch.stack(outs, -1), want)
    assert torch.equal(state, want_final)
    assert torch.equal(cache[..., 1::2], other)
