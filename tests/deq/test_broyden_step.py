"""The fused Broyden step (broyden_step) and the C++ residual norms, against the float64 reference.

broyden_step has no autograd (a kernel of the solver loop, which runs under
no_grad), so its cases are the forward ones: a Broyden iteration driven step
by step through the op and compared with the reference composition after each
step, the zeroing of non-finite terms, NaN staying in its sample, opcheck, the
row-range refusals and bitwise determinism across thread counts.
"""

import contextlib
import re

import pytest
import torch

from frontiers_fast.ops import deq as ops
from frontiers_fast.reference import deq as ref

from ..helpers import assert_close, backend_cases, opcheck
from .cells import contraction

tops = torch.ops.frontiers_fast
DTYPES = [torch.float32, torch.float64]
STEP_CASES = backend_cases("broyden_step", grad=False)
NORM_CASES = backend_cases("residual_norms")


def _step(U, V, dx, dg, gx, n, slot, n_after, backend):
    return tops.broyden_step(U, V, dx, dg, gx, n, slot, n_after, backend)


def _check_step(U, V, dx, dg, gx, n, slot, n_after, backend, equal_nan=False):
    """One step through the op (in place on U, V) and through the float64 reference composition."""
    dtype = U.dtype
    Uw, Vw = U.to(torch.float64, copy=True), V.to(torch.float64, copy=True)  # the op writes U and V
    u_ref, v_ref = ref.broyden_update(Uw, Vw, dx.double(), dg.double(), n)
    Uw[:, slot], Vw[:, slot] = u_ref, v_ref
    want = -ref.broyden_matvec(Uw, Vw, gx.double(), n_after, False)
    before = U.clone(), V.clone()
    got = _step(U, V, dx, dg, gx, n, slot, n_after, backend)
    assert got.dtype == dtype and got.shape == gx.shape
    assert_close(got, want, dtype, equal_nan=equal_nan)
    assert_close(U[:, slot], u_ref, dtype)
    assert_close(V[:, slot], v_ref, dtype)
    others = [j for j in range(U.shape[1]) if j != slot]  # left exactly as they were
    for new, old in zip((U, V), before):
        assert torch.equal(new[:, others], old[:, others])
    return got


@contextlib.contextmanager
def _threads(k):
    before = torch.get_num_threads()
    torch.set_num_threads(k)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------- the iteration
def _drive(backend, dtype, B, D, L, steps, tol):
    """The reference loop's Broyden recurrence (reference/deq.py _broyden), each step checked.

    A sample whose residual is below ``tol`` is frozen as the loop freezes it
    (its x and gx stay, so dx = dg = 0 and its new term is zeroed).
    """
    torch.manual_seed(B * 1000 + D)
    f, _ = contraction(B, D, dtype=dtype, lip=0.8)
    x = torch.randn(B, D, dtype=dtype)
    gx = f(x) - x
    update = gx
    U = torch.zeros(B, L, D, dtype=dtype)
    V = torch.zeros_like(U)
    for step in range(1, steps + 1):
        active = (gx.norm(dim=1, keepdim=True) >= tol) if tol > 0 else torch.ones(B, 1, dtype=torch.bool)
        x_new = torch.where(active, x + update, x)
        gx_new = torch.where(active, f(x_new) - x_new, gx)
        dx, dg = x_new - x, gx_new - gx
        x, gx = x_new, gx_new
        slot = (step - 1) % L
        if step - 1 >= L:  # the ring is full: the loop zeroes the oldest term before reusing its row
            U[:, slot], V[:, slot] = 0, 0
        update = _check_step(U, V, dx, dg, gx, min(step - 1, L), slot, min(step, L), backend)
    return gx


@pytest.mark.parametrize("device, backend", STEP_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B, D", [(1, 1), (1, 1024), (3, 17), (3, 1), (64, 17), (64, 1024)])
@pytest.mark.parametrize("L, steps", [(12, 12), (4, 11)], ids=["full", "ring"])
def test_iteration_matches_reference(device, backend, dtype, B, D, L, steps):
    # Stopped at tol = 1e-2 as a solve would be: past it the new term u grows like 1 / |dx| from
    # the cancellation in dx - Jinv dg, which a float32 composition (the reference backend's) no
    # longer resolves to float32's tolerance; the C++ kernel does (the next test).
    _drive(backend, dtype, B, D, L, steps, tol=1e-2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B, D", [(3, 1), (64, 17), (3, 1024)])
def test_cpp_iteration_to_convergence(dtype, B, D):
    # The C++ kernel accumulates in double: float32 stays within float32's tolerance of the float64
    # truth on the same inputs through the whole convergence, the steps with tiny dx included.
    gx = _drive("cpp", dtype, B, D, 12, 16, tol=0.0)
    if D < 1024:
        assert gx.norm(dim=1).max() < 1e-4


@pytest.mark.parametrize("device, backend", STEP_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_slot_not_zeroed_is_read_then_overwritten(device, backend, dtype):
    # The reference composition reads row slot as it is for (u, v), then overwrites it.
    U, V = (0.2 * torch.randn(3, 5, 37, dtype=dtype) for _ in range(2))
    dx, dg, gx = (torch.randn(3, 37, dtype=dtype) for _ in range(3))
    _check_step(U, V, dx, dg, gx, 5, 2, 5, backend)
    _check_step(U, V, dx, dg, gx, 3, 4, 5, backend)  # rows past n used by the update only


# --------------------------------------------------------------------------- non-finite values
@pytest.mark.parametrize("device, backend", STEP_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_denominator_and_non_finite_terms_are_zeroed(device, backend, dtype):
    B, L, D = 4, 6, 23
    U, V = (0.2 * torch.randn(B, L, D, dtype=dtype) for _ in range(2))
    U[:, 3:], V[:, 3:] = 0, 0
    dx, dg, gx = (torch.randn(B, D, dtype=dtype) for _ in range(3))
    dg[1] = 0  # v . dg = 0: u is 0/0 or x/0
    dg[2, 5] = float("nan")  # u NaN everywhere, v (which does not read dg) finite
    dx[3, 7] = float("inf")  # v and u non-finite
    _check_step(U, V, dx, dg, gx, 3, 3, 4, backend)
    assert torch.isfinite(U).all() and torch.isfinite(V).all()
    assert (U[1:3, 3] == 0).all()
    assert (V[1, 3] != 0).any()


@pytest.mark.parametrize("device, backend", STEP_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_in_one_sample_stays_there(device, backend, dtype):
    B, L, D = 3, 4, 600  # two chunks of D in the C++ kernel
    U, V = (0.2 * torch.randn(B, L, D, dtype=dtype) for _ in range(2))
    U[:, 2:], V[:, 2:] = 0, 0
    dx, dg, gx = (torch.randn(B, D, dtype=dtype) for _ in range(3))
    gx[1, 555] = float("nan")
    out = _check_step(U, V, dx, dg, gx, 2, 2, 3, backend, equal_nan=True)
    assert out[1].isnan().all()
    assert torch.isfinite(out[[0, 2]]).all()


# --------------------------------------------------------------------------- registration and refusals
@pytest.mark.parametrize("device, backend", STEP_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(device, backend, dtype):
    U, V = (0.2 * torch.randn(2, 4, 9, dtype=dtype) for _ in range(2))
    dx, dg, gx = (torch.randn(2, 9, dtype=dtype) for _ in range(3))
    opcheck(tops.broyden_step, (U, V, dx, dg, gx, 2, 2, 3, backend), full=False)
    opcheck(tops.broyden_step, (U, V, dx, dg, gx, 4, 1, 4, backend), full=False)


@pytest.mark.parametrize("device, backend", STEP_CASES)
@pytest.mark.parametrize(
    "n, slot, n_after, msg",
    [
        (-1, 0, 1, "n must be in [0, L=4], got -1"),
        (5, 0, 1, "n must be in [0, L=4], got 5"),
        (2, 0, 0, "n_after must be in [1, L=4], got 0"),
        (2, 0, 5, "n_after must be in [1, L=4], got 5"),
        (2, 3, 3, "slot must be in [0, n_after=3), got 3"),
        (2, -1, 3, "slot must be in [0, n_after=3), got -1"),
    ],
)
def test_row_ranges_refused(device, backend, n, slot, n_after, msg):
    U, V = torch.zeros(2, 4, 5), torch.zeros(2, 4, 5)
    dx = torch.randn(2, 5)
    with pytest.raises(ValueError, match=re.escape(f"broyden_step: {msg}")):
        _step(U, V, dx, dx, dx, n, slot, n_after, backend)


def test_cpp_refuses_bad_tensors():
    U, V = torch.zeros(2, 4, 5), torch.zeros(2, 4, 5)
    dx = torch.randn(2, 5)
    with pytest.raises(RuntimeError, match="broyden_step: V has dtype"):
        _step(U, V.double(), dx, dx, dx, 1, 1, 2, "cpp")
    with pytest.raises(RuntimeError, match="broyden_step: gx must be"):
        _step(U, V, dx, dx, dx[:, :4], 1, 1, 2, "cpp")
    with pytest.raises(RuntimeError, match="broyden_step: U must be contiguous"):
        _step(U.transpose(1, 2).contiguous().transpose(1, 2), V, dx, dx, dx, 1, 1, 2, "cpp")


# --------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("B, D", [(1, 8192), (64, 1024)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpp_bitwise_same_for_any_thread_count(B, D, dtype):
    L = 6
    U0, V0 = (0.05 * torch.randn(B, L, D, dtype=dtype) for _ in range(2))
    U0[:, 5:], V0[:, 5:] = 0, 0
    dx, dg, gx = (torch.randn(B, D, dtype=dtype) for _ in range(3))
    runs = []
    for k in (1, 2, 1, 3):
        U, V = U0.clone(), V0.clone()
        with _threads(k):
            out = _step(U, V, dx, dg, gx, 5, 5, 6, "cpp")
            a, r = tops.residual_norms(dx, gx, "cpp")
            g = tops.residual_norms_bwd(dx, gx, a, r, "cpp")
        runs.append((out, U, V, a, r, *g))
    for other in runs[1:]:
        for x, y in zip(runs[0], other):
            assert torch.equal(x, y)


# --------------------------------------------------------------------------- residual norms
@pytest.mark.parametrize("device, backend", NORM_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B, D", [(5, 37), (2, 1100), (0, 5), (3, 0), (1, 1)])
def test_residual_norms_match_reference(device, backend, dtype, B, D):
    fz, z = torch.randn(B, D, dtype=dtype), torch.randn(B, D, dtype=dtype)
    if B >= 5:
        fz[1, 3] = float("nan")
        z[2, 0] = float("nan")
        fz[3] = z[3]  # abs = 0: the zero subgradient
        fz[4], z[4] = 0, 0  # ||fz|| = 0 too
    a, r = tops.residual_norms(fz, z, backend)
    wa, wr = ref.residual_norms(fz.double(), z.double())
    assert a.dtype == r.dtype == dtype and a.shape == r.shape == (B,)
    assert_close(a, wa, dtype, equal_nan=True)
    assert_close(r, wr, dtype, equal_nan=True)
    ga, gr = torch.randn(B, dtype=dtype), torch.randn(B, dtype=dtype)
    got = tops.residual_norms_bwd(fz, z, ga, gr, backend)
    want = ops._ref_residual_norms_bwd(fz.double(), z.double(), ga.double(), gr.double())
    for g, w in zip(got, want):
        assert g.dtype == dtype and g.shape == (B, D)
        assert_close(g, w, dtype, equal_nan=True)


@pytest.mark.parametrize("device, backend", NORM_CASES)
def test_residual_norms_gradient(device, backend):
    fz, z = (torch.randn(3, 2, 7, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(lambda a, b: ops.residual_norms(a, b, backend=backend), (fz, z))
    f32 = [t.detach().float().requires_grad_() for t in (fz, z)]
    ga, gr = torch.randn(3), torch.randn(3)
    a, r = ops.residual_norms(*f32, backend=backend)
    got = torch.autograd.grad((a, r), f32, (ga, gr))
    f64 = [t.detach().double().requires_grad_() for t in (fz, z)]
    wa, wr = ref.residual_norms(*(t.flatten(1) for t in f64))
    want = torch.autograd.grad((wa, wr), f64, (ga.double(), gr.double()))
    for g, w in zip(got, want):
        assert_close(g, w, torch.float32)


@pytest.mark.parametrize("device, backend", NORM_CASES)
def test_residual_norms_opcheck(device, backend):
    fz, z = (torch.randn(4, 9, dtype=torch.float64, requires_grad=True) for _ in range(2))
    opcheck(tops.residual_norms, (fz, z, backend))
    b = torch.randn(4, dtype=torch.float64)
    opcheck(tops.residual_norms_bwd, (fz.detach(), z.detach(), b, b.clone(), backend), full=False)
