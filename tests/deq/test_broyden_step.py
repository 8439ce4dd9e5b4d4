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

from frontiers_fast import _backend
from frontiers_fast.ops import deq as ops
from frontiers_fast.reference import deq as ref

from ..helpers import assert_close, backend_cases, opcheck, triton_devices
from .cells import contraction

tops = torch.ops.frontiers_fast
DTYPES = [torch.float32, torch.float64]
STEP_CASES = backend_cases("broyden_step", grad=False)
NORM_CASES = backend_cases("residual_norms")


def _step(U, V, dx, dg, gx, n, slot, n_after, backend, x=None, active=None):
    """The op; without ``x`` and ``active`` it returns the update itself (x = 0, every sample running)."""
    x = torch.zeros_like(gx) if x is None else x
    active = torch.ones(gx.shape[0], dtype=torch.bool) if active is None else active
    return tops.broyden_step(U, V, dx, dg, gx, x, active, n, slot, n_after, backend)


def _check_step(U, V, dx, dg, gx, n, slot, n_after, backend, equal_nan=False, x=None, active=None):
    """One step through the op (in place on U, V) and through the float64 reference composition.

    Returns the op's next estimate (the update when ``x`` is None)."""
    dtype = U.dtype
    Uw, Vw = U.to(torch.float64, copy=True), V.to(torch.float64, copy=True)  # the op writes U and V
    u_ref, v_ref = ref.broyden_update(Uw, Vw, dx.double(), dg.double(), n)
    Uw[:, slot], Vw[:, slot] = u_ref, v_ref
    want = -ref.broyden_matvec(Uw, Vw, gx.double(), n_after, False)
    if x is not None:
        want = torch.where(active.unsqueeze(1), x.double() + want, x.double())
    before = U.clone(), V.clone()
    got = _step(U, V, dx, dg, gx, n, slot, n_after, backend, x, active)
    assert got.dtype == dtype and got.shape == gx.shape
    assert_close(got, want, dtype, equal_nan=equal_nan)
    if x is not None:  # a stopped sample keeps its estimate exactly
        assert torch.equal(got[~active], x[~active])
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
    running = lambda gx: (gx.norm(dim=1) >= tol) if tol > 0 else torch.ones(B, dtype=torch.bool)  # noqa: E731
    active = running(gx)
    x_new = torch.where(active.unsqueeze(1), x + gx, x)
    U = torch.zeros(B, L, D, dtype=dtype)
    V = torch.zeros_like(U)
    for step in range(1, steps + 1):
        gx_new = torch.where(active.unsqueeze(1), f(x_new) - x_new, gx)
        dx, dg = x_new - x, gx_new - gx
        x, gx = x_new, gx_new
        active = running(gx)  # the mask of the next step, which the op applies to its estimate
        slot = (step - 1) % L
        if step - 1 >= L:  # the ring is full: the loop zeroes the oldest term before reusing its row
            U[:, slot], V[:, slot] = 0, 0
        x_new = _check_step(
            U, V, dx, dg, gx, min(step - 1, L), slot, min(step, L), backend, x=x, active=active
        )
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
    x, on = torch.randn(2, 9, dtype=dtype), torch.tensor([True, False])
    opcheck(tops.broyden_step, (U, V, dx, dg, gx, x, on, 2, 2, 3, backend), full=False)
    opcheck(tops.broyden_step, (U, V, dx, dg, gx, x, on, 4, 1, 4, backend), full=False)


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
    with pytest.raises(RuntimeError, match="broyden_step: x has dtype"):
        _step(U, V, dx, dx, dx, 1, 1, 2, "cpp", x=dx.double())
    with pytest.raises(ValueError, match="broyden_step: active must be bool"):
        _step(U, V, dx, dx, dx, 1, 1, 2, "cpp", active=torch.ones(2))
    with pytest.raises(RuntimeError, match="broyden_step: active must"):
        _step(U, V, dx, dx, dx, 1, 1, 2, "cpp", active=torch.ones(3, dtype=torch.bool))


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
            out = _step(U, V, dx, dg, gx, 5, 5, 6, "cpp", x=dg, active=torch.arange(B) % 3 > 0)
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


# --------------------------------------------------------------------------- broyden_residual
def _residual_cases():
    """The op's backends that run here, and the Triton launcher on CPU tensors under the interpreter."""
    out = list(backend_cases("broyden_residual", grad=False))
    if "cpu" in triton_devices():
        out.append(pytest.param("cpu", "triton", id="cpu-triton-interpreted"))
    return out


@pytest.fixture
def residual_backend(monkeypatch):
    def use(backend):
        if backend == "triton":
            monkeypatch.setitem(_backend._DEVICE, "triton", "cpu")
        return lambda *a: tops.broyden_residual(*a, backend)

    return use


@pytest.mark.parametrize("device, backend", _residual_cases())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B, D", [(5, 37), (3, 1100), (1, 1), (0, 4), (2, 0)])
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf / inf, meant
def test_broyden_residual_matches_reference(device, backend, dtype, B, D, residual_backend):
    op = residual_backend(backend)
    fx, x_new, x, gx = (torch.randn(B, D, dtype=dtype, device=device) for _ in range(4))
    active = torch.rand(B, device=device) < 0.6
    if B >= 3 and D:
        active[:2] = torch.tensor([True, False])
        gx[1, 0] = float("nan")  # a stopped sample's NaN residual is kept, and its dg is NaN there
        fx[2, 0] = float("inf")  # a running sample's inf: its norms are inf, no other sample's
    got = op(fx, x_new, x, gx, active)
    want = ref.broyden_residual(fx, x_new, x, gx, active)
    # The three differences are single roundings in the dtype: equal to the tensor ops bit for bit.
    for g, w in zip(got[:3], want[:3]):
        assert g.dtype == dtype and g.shape == (B, D)
        torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True)
    a64, r64 = ref.residual_norms(fx.double(), x_new.double())
    assert_close(got[3], a64, dtype, equal_nan=True)
    assert_close(got[4], r64, dtype, equal_nan=True)
    if B >= 3 and D:
        assert torch.isinf(got[3][2]) and torch.isfinite(got[3][torch.arange(B) != 2]).all()


def test_broyden_residual_is_the_loop_composition():
    # The Broyden loop's pass with a stopped sample, as three tensor ops and residual_norms.
    fx, x_new, x, gx = (torch.randn(4, 9, dtype=torch.float64) for _ in range(4))
    active = torch.tensor([True, False, True, False])
    g, dx, dg, a, r = ref.broyden_residual(fx, x_new, x, gx, active)
    assert torch.equal(g[0], fx[0] - x_new[0]) and torch.equal(g[1], gx[1])
    assert torch.equal(dx, x_new - x) and torch.equal(dg, g - gx) and (dg[1] == 0).all()
    assert torch.equal(a, torch.linalg.vector_norm(fx - x_new, dim=1))


@pytest.mark.parametrize("device, backend", backend_cases("broyden_residual", grad=False))
def test_broyden_residual_opcheck(device, backend):
    fx, x_new, x, gx = (torch.randn(3, 7, dtype=torch.float64) for _ in range(4))
    opcheck(tops.broyden_residual, (fx, x_new, x, gx, torch.tensor([True, False, True]), backend), full=False)


def test_broyden_residual_cpp_refuses_bad_tensors():
    fx = torch.randn(3, 5)
    act = torch.ones(3, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="broyden_residual: gx has dtype"):
        tops.broyden_residual(fx, fx, fx, fx.double(), act, "cpp")
    with pytest.raises(RuntimeError, match="broyden_residual: x_new must"):
        tops.broyden_residual(fx, fx[:, :4], fx, fx, act, "cpp")
    with pytest.raises(ValueError, match="broyden_residual: active must be bool"):
        tops.broyden_residual(fx, fx, fx, fx, act.float(), "cpp")
    with pytest.raises(RuntimeError, match="broyden_residual: active must"):
        tops.broyden_residual(fx, fx, fx, fx, act[:2], "cpp")
