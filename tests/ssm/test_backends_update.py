"""The decoding steps on every backend against the float64 reference: causal_conv1d_update in its
1-step and L-step forms (S = width - 1 and S = width, states in their own dtype, strided states
written in place) and selective_state_update in the 3-D and multi-head forms (groups, headdim,
every option, states in float32 and bfloat16, a bigger cache addressed by state_batch_indices);
then opcheck and the state indices refused inside the C++ op.
"""

import pytest
import torch

from frontiers_fast.ops import ssm as ops
from frontiers_fast.reference import ssm as ref

from ..helpers import assert_close, backend_cases, backends_for, opcheck

CONV_CASES = backend_cases("causal_conv1d_update", grad=False)
STEP_CASES = backend_cases("selective_state_update", grad=False)
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
f64, bf16 = torch.float64, torch.bfloat16
tops = torch.ops.frontiers_fast
needs_cpp = pytest.mark.skipif(
    "cpp" not in backends_for("selective_state_update", "cpu", grad=False), reason="C++ backend not built"
)


def _acc(dtype):
    return f64 if dtype == f64 else torch.float32


# ---------------------------------------------------------------------------
# causal_conv1d_update
# ---------------------------------------------------------------------------
def _conv_step(x, state, w, b, act, dtype, state_dtype, device, backend):
    """One call on the backend (x in dtype, state in state_dtype) and on the reference (float64
    copies of the same rounded values); compares the output and the state it leaves."""
    acc = _acc(dtype)
    x = x.to(dtype)
    state_ours = state.to(state_dtype).to(device)
    state_ref = state_ours.cpu().double().clone()  # its own storage (a float64 state would be shared)
    w, b = w.to(acc), None if b is None else b.to(acc)
    y = ops.causal_conv1d_update(x.to(device), state_ours, w.to(device), None if b is None else b.to(device),
                                 act, backend=backend)  # fmt: skip
    want = ref.causal_conv1d_update(x.double(), state_ref, w.double(), None if b is None else b.double(), act)
    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y.cpu(), want, dtype)
    assert state_ours.dtype == state_dtype
    assert_close(state_ours.cpu(), state_ref, state_dtype, msg="conv_state")


@pytest.mark.parametrize("device,backend", CONV_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [1, 2, 3, 4])
@pytest.mark.parametrize("extra", [0, 1])
def test_conv_update_steps(device, backend, dtype, width, extra):
    # S = width - 1 (causal_conv1d's initial_states) and S = width (mamba's cache)
    batch, dim, S = 2, 37, width - 1 + extra
    w, b = torch.randn(dim, width, dtype=f64), torch.randn(dim, dtype=f64)
    state = torch.randn(batch, dim, S, dtype=f64)
    for t in range(3):  # a few 1-step calls, and every option
        act = "silu" if t % 2 == 0 else None
        _conv_step(torch.randn(batch, dim, dtype=f64), state, w, b if t < 2 else None, act, dtype, dtype,
                   device, backend)  # fmt: skip
    for L in (1, 2, 5, 9):  # the L-step form, L below and above S
        _conv_step(torch.randn(batch, dim, L, dtype=f64), state, w, b, "silu", dtype, dtype, device, backend)


@pytest.mark.parametrize("device,backend", CONV_CASES)
@pytest.mark.parametrize("dtype,state_dtype", [(torch.float32, bf16), (bf16, torch.float32), (f64, bf16),
                                               (torch.float16, f64)])  # fmt: skip
@pytest.mark.parametrize("L", [None, 3, 7])
def test_conv_update_state_dtype(device, backend, dtype, state_dtype, L):
    batch, dim, width = 3, 5, 4
    x = torch.randn(batch, dim, dtype=f64) if L is None else torch.randn(batch, dim, L, dtype=f64)
    _conv_step(x, torch.randn(batch, dim, width, dtype=f64), torch.randn(dim, width, dtype=f64),
               torch.randn(dim, dtype=f64), "silu", dtype, state_dtype, device, backend)  # fmt: skip


@pytest.mark.parametrize("device,backend", CONV_CASES)
@pytest.mark.parametrize("L", [None, 2, 6])
def test_conv_update_strided_state_in_place(device, backend, L):
    batch, dim, width, S = 2, 6, 4, 5
    # the state a strided view of a bigger buffer: the view is updated, the rest left alone
    big = torch.randn(batch, 2 * dim, S + 3, device=device)
    before = big.clone()
    state = big[:, 1::2, 2 : 2 + S]
    assert not state.is_contiguous()
    xs = torch.randn(batch, 2 * dim, 2 * (L or 1), device=device)[:, ::2, ::2]
    x = xs[..., 0] if L is None else xs
    w = torch.randn(dim, 2 * width, device=device)[:, ::2]
    state_ref = state.cpu().double().clone()
    y = ops.causal_conv1d_update(x, state, w, activation="silu", backend=backend)
    want = ref.causal_conv1d_update(x.cpu().double(), state_ref, w.cpu().double(), None, "silu")
    assert_close(y.cpu(), want, torch.float32)
    assert_close(big[:, 1::2, 2 : 2 + S].cpu(), state_ref, torch.float32)
    untouched = torch.ones_like(big, dtype=torch.bool)
    untouched[:, 1::2, 2 : 2 + S] = False
    assert torch.equal(big[untouched], before[untouched])


@pytest.mark.parametrize("device,backend", CONV_CASES)
@pytest.mark.parametrize("width", [2, 4])
def test_conv_update_steps_reproduce_causal_conv1d(device, backend, width):
    # stepping token by token from initial_states (S = width - 1) gives causal_conv1d and its final states
    batch, dim, L = 2, 5, 11
    x, w, b = (
        torch.randn(batch, dim, L, device=device),
        torch.randn(dim, width, device=device),
        torch.randn(dim, device=device),
    )
    h0 = torch.randn(batch, dim, width - 1, device=device)
    out, fin = ops.causal_conv1d(x, w, b, "silu", h0, return_final_states=True, backend="reference")
    state = h0.clone()
    ys = torch.stack(
        [ops.causal_conv1d_update(x[..., t], state, w, b, "silu", backend=backend) for t in range(L)], -1
    )
    assert_close(ys, out)
    assert_close(state, fin)
    state = h0.clone()
    assert_close(ops.causal_conv1d_update(x, state, w, b, "silu", backend=backend), out)
    assert_close(state, fin)


@pytest.mark.parametrize("device,backend", CONV_CASES)
def test_conv_update_empty(device, backend):
    for batch, dim in ((0, 6), (2, 0)):
        state = torch.randn(batch, dim, 4, device=device)
        y = ops.causal_conv1d_update(torch.randn(batch, dim, device=device), state,
                                     torch.randn(dim, 4, device=device), backend=backend)  # fmt: skip
        assert y.shape == (batch, dim)
    state = torch.randn(2, 6, 4, device=device)
    before = state.clone()
    y = ops.causal_conv1d_update(torch.randn(2, 6, 0, device=device), state, torch.randn(6, 4, device=device),
                                 backend=backend)  # fmt: skip
    assert y.shape == (2, 6, 0) and torch.equal(state, before)


# ---------------------------------------------------------------------------
# selective_state_update
# ---------------------------------------------------------------------------
def _heads(batch, nheads, headdim, N, groups, rows=None, D=True, z=True, dt_bias=True, softplus=True):
    """Float64 inputs of a multi-head step (state [rows, nheads, headdim, N])."""
    rows = batch if rows is None else rows
    return dict(
        state=torch.randn(rows, nheads, headdim, N, dtype=f64),
        x=torch.randn(batch, nheads, headdim, dtype=f64),
        dt=torch.randn(batch, nheads, headdim, dtype=f64)
        if softplus
        else torch.rand(batch, nheads, headdim, dtype=f64),
        A=-(torch.rand(nheads, headdim, N, dtype=f64) + 0.2),
        B=torch.randn(batch, groups, N, dtype=f64),
        C=torch.randn(batch, groups, N, dtype=f64),
        D=torch.randn(nheads, headdim, dtype=f64) if D else None,
        z=torch.randn(batch, nheads, headdim, dtype=f64) if z else None,
        dt_bias=torch.randn(nheads, headdim, dtype=f64) * 0.5 if dt_bias else None,
        dt_softplus=softplus,
    )


def _step(kw, dtype, state_dtype, device, backend, idx=None, squeeze=False):
    """The backend (activations in dtype, parameters in acc, state in state_dtype) against the
    reference on float64 copies of the same rounded values: y, and the state rows written."""
    acc = _acc(dtype)
    ours, theirs = {}, {}
    for k, v in kw.items():
        if isinstance(v, torch.Tensor):
            v = v.to(state_dtype if k == "state" else acc if k in ("A", "D", "dt_bias") else dtype)
            ours[k], theirs[k] = v.to(device), v.double().clone()  # the reference's own copies
        else:
            ours[k] = theirs[k] = v
    if squeeze:  # the 3-D form: headdim 1 squeezed away (the public function unsqueezes it again)
        for d in (ours, theirs):
            for k in ("state", "x", "dt", "z", "D", "dt_bias", "A"):
                if d.get(k) is not None:
                    d[k] = d[k].squeeze(-2 if k in ("state", "A") else -1)
    before = ours["state"].clone()
    sbi = None if idx is None else torch.tensor(idx)
    y = ops.selective_state_update(**ours, state_batch_indices=None if sbi is None else sbi.to(device),
                                   backend=backend)  # fmt: skip
    want = ref.selective_state_update(**theirs, state_batch_indices=sbi)
    assert y.dtype == dtype and y.shape == ours["x"].shape
    assert_close(y.cpu(), want, dtype)
    assert ours["state"].dtype == state_dtype
    assert_close(ours["state"].cpu(), theirs["state"], state_dtype, msg="state")
    if idx is not None:  # rows no batch entry names stay bit-identical
        keep = [r for r in range(before.shape[0]) if r not in idx]
        assert torch.equal(ours["state"][keep], before[keep])


@pytest.mark.parametrize("device,backend", STEP_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("state_dtype", [torch.float32, bf16])
@pytest.mark.parametrize("groups", [1, 2])
def test_multihead_every_dtype(device, backend, dtype, state_dtype, groups):
    # 4 heads of headdim 3, N 19 (a whole vector and a partial one)
    _step(_heads(2, 4, 3, 19, groups), dtype, state_dtype, device, backend)


@pytest.mark.parametrize("device,backend", STEP_CASES)
@pytest.mark.parametrize("drop", [None, "D", "z", "dt_bias", "softplus", "all"])
@pytest.mark.parametrize("N", [1, 16, 64])
def test_multihead_options(device, backend, drop, N):
    opts = dict(D=True, z=True, dt_bias=True, softplus=True)
    if drop == "all":
        opts = {k: False for k in opts}
    elif drop is not None:
        opts[drop] = False
    _step(_heads(3, 6, 2, N, 3, **opts), f64, f64, device, backend)
    _step(_heads(3, 6, 2, N, 3, **opts), torch.float32, torch.float32, device, backend)


@pytest.mark.parametrize("device,backend", STEP_CASES)
@pytest.mark.parametrize("dtype,state_dtype", [(torch.float32, torch.float32), (bf16, torch.float32), (bf16, bf16),
                                               (f64, f64)])  # fmt: skip
@pytest.mark.parametrize("groups", [1, 5])
def test_three_dim_form(device, backend, dtype, state_dtype, groups):
    # state [batch, dim, N], B/C [batch, G, N]: the multi-head form with headdim 1 (state3d.unsqueeze(2))
    kw = _heads(2, 10, 1, 7, groups)
    _step(kw, dtype, state_dtype, device, backend, squeeze=True)


@pytest.mark.parametrize("device,backend", STEP_CASES)
@pytest.mark.parametrize("state_dtype", [torch.float32, bf16])
@pytest.mark.parametrize("heads", [False, True])
def test_state_batch_indices_into_a_bigger_cache(device, backend, state_dtype, heads):
    # batch 3 updates rows 6, 0, 3 of a cache of 8; the other rows stay as they were
    kw = _heads(3, 4, 2 if heads else 1, 17, 2, rows=8)
    _step(kw, torch.float32, state_dtype, device, backend, idx=[6, 0, 3], squeeze=not heads)


@pytest.mark.parametrize("device,backend", STEP_CASES)
def test_strided_state_in_place(device, backend):
    kw = _heads(2, 4, 2, 9, 2)
    big = torch.randn(2, 4, 2, 20, dtype=torch.float32, device=device)
    before = big.clone()
    state = big[..., 1::2][..., :9]  # a view with a stride along N
    state_ref = state.cpu().double().clone()
    ours = {
        k: (v.float().to(device) if isinstance(v, torch.Tensor) else v) for k, v in kw.items() if k != "state"
    }
    y = ops.selective_state_update(state, **ours, backend=backend)
    want = ref.selective_state_update(state_ref, **{k: (v.cpu().double() if isinstance(v, torch.Tensor) else v)
                                                    for k, v in ours.items()})  # fmt: skip
    assert_close(y.cpu(), want, torch.float32)
    assert_close(big[..., 1::2][..., :9].cpu(), state_ref, torch.float32)
    untouched = torch.ones_like(big, dtype=torch.bool)
    untouched[..., 1:19:2] = False
    assert torch.equal(big[untouched], before[untouched])


@pytest.mark.parametrize("device,backend", STEP_CASES)
def test_steps_reproduce_the_scan(device, backend):
    # L steps from an initial state give selective_scan's output and last state (grouped B/C)
    batch, dim, N, L, G = 2, 6, 4, 5, 3
    u, delta = torch.randn(batch, dim, L, dtype=f64), torch.randn(batch, dim, L, dtype=f64)
    A, B, C = (
        -(torch.rand(dim, N, dtype=f64) + 0.2),
        torch.randn(batch, G, N, L, dtype=f64),
        torch.randn(batch, G, N, L, dtype=f64),
    )
    D, z, bias, h0 = (
        torch.randn(dim, dtype=f64),
        torch.randn(batch, dim, L, dtype=f64),
        torch.randn(dim, dtype=f64),
        torch.randn(batch, dim, N, dtype=f64),
    )
    out, last = ref.selective_scan(u, delta, A, B, C, D, z, bias, True, True, h0)
    state = h0.clone().to(device)
    dv = lambda t: t.to(device)
    ys = [ops.selective_state_update(state, dv(u[..., t]), dv(delta[..., t]), dv(A), dv(B[..., t]), dv(C[..., t]),
                                     dv(D), dv(z[..., t]), dv(bias), True, backend=backend) for t in range(L)]  # fmt: skip
    assert_close(torch.stack(ys, -1).cpu(), out)
    assert_close(state.cpu(), last)


@pytest.mark.parametrize("device,backend", STEP_CASES)
def test_state_update_empty(device, backend):
    for batch, nheads in ((0, 4), (2, 0)):
        kw = {k: (v.float().to(device) if isinstance(v, torch.Tensor) else v)
              for k, v in _heads(batch, nheads, 2, 5, 1).items()}  # fmt: skip
        if nheads == 0:
            kw["B"], kw["C"] = torch.randn(batch, 5, device=device), torch.randn(batch, 5, device=device)
        assert ops.selective_state_update(**kw, backend=backend).shape == (batch, nheads, 2)


# ---------------------------------------------------------------------------
# registration and refused state indices (C++ backend)
# ---------------------------------------------------------------------------
def _op_args(kw, idx):
    order = ("state", "x", "dt", "A", "B", "C", "D", "z", "dt_bias", "dt_softplus")
    return [kw[k].float() if isinstance(kw[k], torch.Tensor) else kw[k] for k in order] + [idx]


@needs_cpp
@pytest.mark.parametrize("state_dtype", [torch.float32, bf16])
def test_opcheck_cpp(state_dtype):
    args = _op_args(_heads(2, 4, 2, 5, 2, rows=4), torch.tensor([3, 0]))
    args[0] = args[0].to(state_dtype)
    opcheck(tops.selective_state_update, (*args, "cpp"), full=False)
    args[-1] = None
    args[0] = args[0][:2].clone()
    opcheck(tops.selective_state_update, (*args, "cpp"), full=False)
    for x in (torch.randn(2, 6), torch.randn(2, 6, 3)):
        state = torch.randn(2, 6, 4).to(state_dtype)
        opcheck(
            tops.causal_conv1d_update, (x, state, torch.randn(6, 4), torch.randn(6), True, "cpp"), full=False
        )


BAD_INDICES = [
    ([4, 0], "state_batch_indices must index the 4 rows"),
    ([-1, 0], "state_batch_indices must index the 4 rows"),
    ([2, 2], "state_batch_indices must not repeat a row"),
]


@pytest.mark.parametrize("idx,match", BAD_INDICES)
def test_bad_indices_public_function(idx, match):
    kw = {
        k: (v.float() if isinstance(v, torch.Tensor) else v) for k, v in _heads(2, 4, 2, 5, 2, rows=4).items()
    }
    with pytest.raises(ValueError, match=match):
        ops.selective_state_update(**kw, state_batch_indices=torch.tensor(idx))


@needs_cpp
@pytest.mark.parametrize("idx,match", BAD_INDICES)
def test_bad_indices_refused_by_the_cpp_op(idx, match):
    # the C++ body reads the indices and raises ValueError itself; nothing is written
    args = _op_args(_heads(2, 4, 2, 5, 2, rows=4), torch.tensor(idx))
    before = args[0].clone()
    with pytest.raises(ValueError, match=match):
        tops.selective_state_update(*args, "cpp")
    with pytest.raises(ValueError, match=match):
        torch.ops.frontiers_fast_native.selective_state_update(*args)
    assert torch.equal(args[0], before)
    # a larger batch takes the sorting path of the distinctness check
    big = _op_args(_heads(80, 2, 1, 3, 1, rows=100), torch.cat([torch.arange(79), torch.tensor([5])]))
    with pytest.raises(ValueError, match="must not repeat"):
        tops.selective_state_update(*big, "cpp")
