"""Numerics of the selective-scan family: the registered ops against the
reference, identities that pin each option's meaning, state carry, decoding
steps against the full scan, and the written-out backward against autograd."""

import pytest
import torch
import torch.nn.functional as F

from frontiers_fast.ops import ssm as ops
from frontiers_fast.reference import ssm as ref

from ..helpers import assert_close
from .inputs import LAYOUTS, scan_inputs

f64 = torch.float64


# ---------------------------------------------------------------------------
# selective_scan: what each option means
# ---------------------------------------------------------------------------
def test_single_step_closed_form():
    kw = scan_inputs(L=1, layout="variable", options=False)
    h0 = torch.randn(2, 6, 3, dtype=f64)
    u, dt, A, B, C = (kw[k] for k in ("u", "delta", "A", "B", "C"))
    h = torch.exp(dt[..., 0, None] * A) * h0 + dt[..., 0, None] * B[:, None, :, 0] * u[..., 0, None]
    want = (h * C[:, None, :, 0]).sum(-1, keepdim=True)
    out, last = ops.selective_scan(**kw, initial_state=h0, return_last_state=True)
    assert_close(out, want)
    assert_close(last, h)


def test_two_steps_closed_form_constant_bc():
    kw = scan_inputs(L=2, layout="constant", options=False)
    u, dt, A, B, C = (kw[k] for k in ("u", "delta", "A", "B", "C"))
    h1 = dt[..., 0, None] * B * u[..., 0, None]
    h2 = torch.exp(dt[..., 1, None] * A) * h1 + dt[..., 1, None] * B * u[..., 1, None]
    want = torch.stack([(h1 * C).sum(-1), (h2 * C).sum(-1)], -1)
    assert_close(ops.selective_scan(**kw), want)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_options_compose(layout):
    kw = scan_inputs(layout=layout, options=True)
    out, last = ops.selective_scan(**kw, return_last_state=True)
    u, D, z, bias = kw["u"], kw["D"], kw["z"], kw["delta_bias"]
    # softplus(delta + bias) is the same as passing that delta plainly
    dt = F.softplus(kw["delta"] + bias[:, None])
    base, base_last = ops.selective_scan(
        u, dt, kw["A"], kw["B"], kw["C"], initial_state=kw["initial_state"], return_last_state=True
    )
    assert_close(out, (base + D[:, None] * u) * F.silu(z))
    assert_close(last, base_last)


def test_layouts_agree():
    batch, dim, N, L = 2, 6, 3, 7
    kw = scan_inputs(batch, dim, N, L, layout="variable", options=True)
    # variable == grouped with one group
    grouped = dict(kw, B=kw["B"].unsqueeze(1), C=kw["C"].unsqueeze(1))
    assert_close(ops.selective_scan(**grouped), ops.selective_scan(**kw))
    # constant == grouped with one group per channel, repeated over batch and time
    Bc, Cc = torch.randn(dim, N, dtype=f64), torch.randn(dim, N, dtype=f64)
    const = dict(kw, B=Bc, C=Cc)
    per_channel = dict(
        kw,
        B=Bc[None, :, :, None].expand(batch, dim, N, L),
        C=Cc[None, :, :, None].expand(batch, dim, N, L),
    )
    assert_close(ops.selective_scan(**const), ops.selective_scan(**per_channel))
    # grouped: channel d reads group d // (dim // G)
    G = 3
    Bg, Cg = torch.randn(batch, G, N, L, dtype=f64), torch.randn(batch, G, N, L, dtype=f64)
    got = ops.selective_scan(**dict(kw, B=Bg, C=Cg))
    for d in range(dim):
        g = d // (dim // G)
        one = {
            k: (v[:, d : d + 1] if k in ("u", "delta", "z", "initial_state") else v) for k, v in kw.items()
        }
        one.update(A=kw["A"][d : d + 1], D=kw["D"][d : d + 1], delta_bias=kw["delta_bias"][d : d + 1])
        one.update(B=Bg[:, g], C=Cg[:, g])
        assert_close(got[:, d : d + 1], ops.selective_scan(**one))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_op_matches_reference_noncontiguous(layout, dtype):
    kw = scan_inputs(batch=3, dim=8, N=4, L=19, layout=layout, dtype=dtype, groups=2)
    # Slices of bigger tensors: every input strided.
    strided = {}
    for k, v in kw.items():
        if isinstance(v, torch.Tensor):
            big = torch.randn(*[2 * s for s in v.shape], dtype=dtype)
            sl = big[tuple(slice(None, None, 2) for _ in v.shape)]
            sl.copy_(v)
            strided[k] = sl
        else:
            strided[k] = v
    out, last = ops.selective_scan(**strided, return_last_state=True)
    want, want_last = ref.selective_scan(**{k: v.double() if isinstance(v, torch.Tensor) else v
                                            for k, v in kw.items()}, return_last_state=True)  # fmt: skip
    assert out.dtype == dtype and last.dtype == dtype
    assert_close(out, want, dtype)
    assert_close(last, want_last, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(dtype):
    kw = scan_inputs(dim=8, N=4, L=33, layout="grouped", dtype=torch.float32, groups=2)
    half = {k: (v.to(dtype) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    # Mamba's usual mix: half activations, float32 parameters.
    half["A"], half["D"], half["delta_bias"] = kw["A"], kw["D"], kw["delta_bias"]
    out, last = ops.selective_scan(**half, return_last_state=True)
    assert out.dtype == dtype and last.dtype == torch.float32
    want, want_last = ref.selective_scan(
        **{k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in half.items()},
        return_last_state=True,
    )
    # The math runs in float32 on the rounded inputs: only the output rounding is half.
    assert_close(out, want.to(dtype), dtype)
    assert_close(last, want_last, torch.float32)
    # The backward hands each gradient back in its input's dtype.
    leaves = {k: v.clone().requires_grad_(True) for k, v in half.items() if isinstance(v, torch.Tensor)}
    grads = torch.autograd.grad(
        ops.selective_scan(**dict(half, **leaves)).float().sum(), list(leaves.values())
    )
    for (k, v), g in zip(leaves.items(), grads):
        assert g.dtype == v.dtype and g.shape == v.shape and torch.isfinite(g).all(), k


@pytest.mark.parametrize("layout", LAYOUTS)
def test_split_halves_carry_state(layout):
    kw = scan_inputs(L=12, layout=layout)
    full, full_last = ops.selective_scan(**kw, return_last_state=True)

    def part(sl, h0):
        p = dict(kw, initial_state=h0)
        for k in ("u", "delta", "z"):
            p[k] = kw[k][..., sl]
        for k in ("B", "C"):
            if kw[k].dim() > 2:
                p[k] = kw[k][..., sl]
        return ops.selective_scan(**p, return_last_state=True)

    first, h = part(slice(0, 5), kw["initial_state"])
    second, last = part(slice(5, 12), h)
    assert_close(torch.cat([first, second], -1), full)
    assert_close(last, full_last)


# ---------------------------------------------------------------------------
# the written-out backward against autograd through the forward reference
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("options", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_scan_bwd_matches_autograd(layout, options):
    kw = scan_inputs(layout=layout, options=options)
    names = [k for k, v in kw.items() if isinstance(v, torch.Tensor)]
    leaves = {k: kw[k].clone().requires_grad_(True) for k in names}
    out, last = ref.selective_scan(**dict(kw, **leaves), return_last_state=True)
    g_out, g_last = torch.randn_like(out), torch.randn_like(last)
    want = dict(zip(names, torch.autograd.grad((out, last), [leaves[k] for k in names], (g_out, g_last))))
    order = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"]
    args = [kw.get(k) for k in order[:8]] + [kw.get("delta_softplus", False), kw.get("initial_state")]
    got = dict(zip(order, ref.selective_scan_bwd(*args, g_out, g_last)))
    for k in order:
        if k in want:
            assert_close(got[k], want[k], msg=f"grad of {k}")
        else:
            assert got[k] is None


@pytest.mark.parametrize("L", [0, 1, 2, 9])
def test_conv_bwd_matches_autograd(L):
    # L = 0 and L < width - 1 included: the reference backward handles them
    # (the public function refuses L = 0, as selective_scan does).
    for width in (1, 3, 4):
        x, w, b = torch.randn(2, 5, L, dtype=f64), torch.randn(5, width, dtype=f64), torch.randn(5, dtype=f64)
        init = torch.randn(2, 5, width - 1, dtype=f64)
        leaves = [t.clone().requires_grad_(True) for t in (x, w, b, init)]
        out, final = ref.causal_conv1d(*leaves[:3], "silu", leaves[3], return_final_states=True)
        g, gf = torch.randn_like(out), torch.randn_like(final)
        want = torch.autograd.grad((out, final), leaves, (g, gf), allow_unused=True)
        got = ref.causal_conv1d_bwd(x, w, b, "silu", init, g, gf)
        for a, e in zip(got, want):
            assert_close(a, torch.zeros_like(a) if e is None else e)


# ---------------------------------------------------------------------------
# selective_state_update: L decoding steps reproduce the scan
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["variable", "grouped"])
def test_state_update_steps_reproduce_scan(layout, dtype):
    kw = scan_inputs(L=9, layout=layout, dtype=dtype)
    out, last = ops.selective_scan(**kw, return_last_state=True)
    state = kw["initial_state"].clone()
    ys = []
    for t in range(9):
        ys.append(
            ops.selective_state_update(
                state,
                kw["u"][..., t],
                kw["delta"][..., t],
                kw["A"],
                kw["B"][..., t],
                kw["C"][..., t],
                D=kw["D"],
                z=kw["z"][..., t],
                dt_bias=kw["delta_bias"],
                dt_softplus=True,
            )  # fmt: skip
        )
    assert_close(torch.stack(ys, -1), out)
    assert_close(state, last)


def test_state_update_keeps_state_dtype_and_no_grad():
    kw = scan_inputs(L=1, layout="variable", dtype=torch.float32)
    state = torch.randn(2, 6, 3, dtype=torch.bfloat16)
    # activations in float16, parameters in float32, the state in bfloat16
    x, dt, B, C = (
        t.to(torch.float16) for t in (kw["u"][..., 0], kw["delta"][..., 0], kw["B"][..., 0], kw["C"][..., 0])
    )
    want_state = state.clone()
    want = ref.selective_state_update(want_state, x, dt, kw["A"].requires_grad_(True), B, C, kw["D"], None,
                                      kw["delta_bias"], True)  # fmt: skip
    y = ops.selective_state_update(
        state, x, dt, kw["A"], B, C, kw["D"], dt_bias=kw["delta_bias"], dt_softplus=True
    )
    assert state.dtype == torch.bfloat16 and y.dtype == torch.float16 and not y.requires_grad
    # the kernels' exp and softplus may differ from torch's by an ulp of float32, which can flip a
    # bfloat16 rounding: compared at the state's dtype's tolerance
    assert_close(state, want_state)
    assert_close(y, want.detach())


# ---------------------------------------------------------------------------
# causal_conv1d
# ---------------------------------------------------------------------------
def _naive_conv(x, weight, bias, silu, init):
    width = weight.shape[1]
    past = init if init is not None else torch.zeros(*x.shape[:2], width - 1, dtype=x.dtype)
    xp = torch.cat([past, x], -1)
    L = x.shape[-1]
    out = sum(weight[:, k, None] * xp[..., k : k + L] for k in range(width))
    if bias is not None:
        out = out + bias[:, None]
    return F.silu(out) if silu else out


@pytest.mark.parametrize("width", [1, 2, 4])
@pytest.mark.parametrize("L", [1, 3, 17])
@pytest.mark.parametrize("with_extras", [False, True])
def test_conv_matches_naive(width, L, with_extras):
    x, w = torch.randn(2, 5, L, dtype=f64), torch.randn(5, width, dtype=f64)
    b = torch.randn(5, dtype=f64) if with_extras else None
    init = torch.randn(2, 5, width - 1, dtype=f64) if with_extras else None
    act = "silu" if with_extras else None
    out, final = ops.causal_conv1d(x, w, b, act, init, return_final_states=True)
    assert_close(out, _naive_conv(x, w, b, with_extras, init))
    past = init if init is not None else torch.zeros(2, 5, width - 1, dtype=f64)
    assert_close(final, torch.cat([past, x], -1)[..., L : L + width - 1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_conv_dtypes(dtype):
    x, w, b = torch.randn(2, 6, 20, dtype=dtype), torch.randn(6, 4), torch.randn(6)
    out = ops.causal_conv1d(x, w, b, activation="swish")
    assert out.dtype == dtype
    assert_close(out, _naive_conv(x.double(), w.double(), b.double(), True, None).to(dtype), dtype)


def test_conv_split_halves():
    x, w, b = torch.randn(2, 5, 13, dtype=f64), torch.randn(5, 4, dtype=f64), torch.randn(5, dtype=f64)
    full = ops.causal_conv1d(x, w, b, "silu")
    first, state = ops.causal_conv1d(x[..., :2], w, b, "silu", return_final_states=True)
    second = ops.causal_conv1d(x[..., 2:], w, b, "silu", initial_states=state)
    assert_close(torch.cat([first, second], -1), full)


@pytest.mark.parametrize("extra", [0, 1, 3])
def test_conv_update_steps_reproduce_conv(extra):
    # extra = 0: the state is initial_states itself; 1: mamba's width-sized cache.
    width, L = 4, 11
    x, w, b = torch.randn(2, 5, L, dtype=f64), torch.randn(5, width, dtype=f64), torch.randn(5, dtype=f64)
    init = torch.randn(2, 5, width - 1 + extra, dtype=f64)
    out, final = ops.causal_conv1d(x, w, b, "silu", init[..., extra:], return_final_states=True)
    state = init.clone()
    ys = [ops.causal_conv1d_update(x[..., t], state, w, b, "silu") for t in range(L)]
    assert_close(torch.stack(ys, -1), out)
    assert_close(state, torch.cat([init, x], -1)[..., L:])
    assert_close(state[..., extra:], final)
    # several steps in one call
    state2 = init.clone()
    y3 = torch.cat([ops.causal_conv1d_update(x[..., :5], state2, w, b, "silu"),
                    ops.causal_conv1d_update(x[..., 5:], state2, w, b, "silu")], -1)  # fmt: skip
    assert_close(y3, out)
    assert_close(state2, state)


# ---------------------------------------------------------------------------
# gradcheck of the public ops (float64, small)
# ---------------------------------------------------------------------------
@pytest.mark.gradcheck
@pytest.mark.parametrize("options", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradcheck_selective_scan(layout, options):
    kw = scan_inputs(batch=2, dim=4, N=2, L=5, layout=layout, options=options, groups=2)
    names = [k for k, v in kw.items() if isinstance(v, torch.Tensor)]
    leaves = [kw[k].clone().requires_grad_(True) for k in names]

    def f(*ts):
        return ops.selective_scan(**dict(kw, **dict(zip(names, ts))), return_last_state=True)

    assert torch.autograd.gradcheck(f, leaves)


@pytest.mark.gradcheck
def test_gradcheck_causal_conv1d():
    x, w, b = torch.randn(2, 3, 6, dtype=f64), torch.randn(3, 4, dtype=f64), torch.randn(3, dtype=f64)
    init = torch.randn(2, 3, 3, dtype=f64)
    leaves = [t.requires_grad_(True) for t in (x, w, b, init)]
    f = lambda x, w, b, i: ops.causal_conv1d(x, w, b, "silu", i, return_final_states=True)
    assert torch.autograd.gradcheck(f, leaves)
    g = lambda x, w: ops.causal_conv1d(x, w)
    assert torch.autograd.gradcheck(g, leaves[:2])


@pytest.mark.gradcheck
@pytest.mark.parametrize("L,width", [(1, 4), (2, 4), (1, 3), (3, 4), (1, 2)])
def test_gradcheck_causal_conv1d_short(L, width):
    # Sequences no longer than the filter's memory: the final states mix
    # initial_states and x, and every output reads initial_states.
    x, w, b = torch.randn(2, 3, L, dtype=f64), torch.randn(3, width, dtype=f64), torch.randn(3, dtype=f64)
    init = torch.randn(2, 3, width - 1, dtype=f64)
    leaves = [t.requires_grad_(True) for t in (x, w, b, init)]
    f = lambda x, w, b, i: ops.causal_conv1d(x, w, b, "silu", i, return_final_states=True)
    assert torch.autograd.gradcheck(f, leaves)
    out, final = f(*leaves)
    assert out.shape == (2, 3, L) and final.shape == (2, 3, width - 1)
    assert_close(final, torch.cat([init, x], -1)[..., L:])
    # without initial_states the final states are zero-padded x
    g = lambda x, w: ops.causal_conv1d(x, w, return_final_states=True)
    assert torch.autograd.gradcheck(g, leaves[:2])
