"""The fused Anderson step: every backend against the loop's own pieces, in float64, step by step.

Each test drives an Anderson iteration with the op and checks, at every step,
the op's outputs and buffers against the same step done with the existing
kernels (``ref.anderson_mix`` on the buffers, ``ref.residual_norms``, the
loop's fallback) in float64 from the op's state before the step; GG against
the full Gram matrix of the valid slots.  The buffers start as NaN, so a
read of a slot that is not valid yet, or an output left unwritten, fails.
"""

import pytest
import torch

from frontiers_fast.reference import deq as ref

from ..helpers import assert_close, backend_cases, opcheck
from .cells import contraction

op = torch.ops.frontiers_fast.anderson_step
CASES = backend_cases("anderson_step", grad=False)
DTYPES = [torch.float32, torch.float64]


def _buffers(B, m, D, dtype):
    nan = float("nan")
    return (
        torch.full((B, m, D), nan, dtype=dtype),
        torch.full((B, m, D), nan, dtype=dtype),
        torch.full((B, m, m), nan, dtype=dtype),
    )


def _expected(X, F, x, fx, i, lam, tau):
    """Loop iteration i in float64 with the loop's pieces; X, F are copies of the state before the step."""
    X, F, x, fx = X.double(), F.double(), x.double(), fx.double()
    m = X.shape[1]
    s, n = i % m, min(i + 1, m)
    X[:, s], F[:, s] = x, fx
    a, r = ref.residual_norms(fx, x)
    if i == 0:
        x_next, took_fallback = fx.clone(), torch.zeros(x.shape[0], dtype=torch.bool)
    else:
        mixed, _ = ref.anderson_mix(X, F, n, lam, tau)
        ok = torch.isfinite(mixed).all(1, keepdim=True)
        x_next = torch.where(ok, mixed, tau * F[:, s] + (1 - tau) * X[:, s])
        took_fallback = ~ok[:, 0]
    G = F[:, :n] - X[:, :n]
    return x_next, a, r, X, F, G @ G.transpose(1, 2), took_fallback


def _drive(f, z0, m, lam, tau, steps, backend, check=True):
    """``steps`` iterations with the op; returns the fallback flags of every step and the last state."""
    B, D = z0.shape
    X, F, GG = _buffers(B, m, D, z0.dtype)
    x, fallbacks, outs = z0, [], []
    for i in range(steps):
        fx = f(x)
        n = min(i + 1, m)
        if check:
            want = _expected(X.clone(), F.clone(), x, fx, i, lam, tau)
        x_next, a, r = op(X, F, GG, x, fx, i, lam, tau, backend)
        outs.append((x_next, a, r))
        if check:
            wx, wa, wr, wX, wF, wGG, fb = want
            dt = z0.dtype
            assert x_next.dtype == a.dtype == r.dtype == dt
            assert_close(x_next, wx, dt, msg=f"x_next at step {i}")
            assert_close(a, wa, dt, msg=f"abs at step {i}")
            assert_close(r, wr, dt, msg=f"rel at step {i}")
            assert_close(X[:, :n], wX[:, :n], dt, msg=f"X at step {i}")
            assert_close(F[:, :n], wF[:, :n], dt, msg=f"F at step {i}")
            assert_close(GG[:, :n, :n], wGG, dt, msg=f"GG at step {i}")
            fallbacks.append(fb)
        x = x_next
    return fallbacks, outs, (X, F, GG)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lam,tau", [(0.0, 1.0), (1e-4, 0.7), (1e-4, 1.0)])
@pytest.mark.parametrize("m", [1, 2, 5])
@pytest.mark.parametrize("B,D", [(1, 1), (3, 17), (64, 1024), (1, 1024)])
def test_matches_the_loop_pieces(device, backend, dtype, lam, tau, m, B, D):
    if lam == 0 and D < m - 1:
        # GG_n has rank <= D, so with n - 1 > D slots the unregularised bordered system is
        # singular in exact arithmetic and rounding alone decides what the weights are
        # (the exactly singular case, which both must catch, is tested below).
        pytest.skip("lam = 0 with more slots than D + 1: singular up to rounding")
    f, _ = contraction(B, D, dtype=dtype, lip=0.7)
    z0 = torch.randn(B, D, dtype=dtype)
    # More steps than slots, so the ring wraps (twice for m = 1, 2).
    _drive(f, z0, m, lam, tau, m + 4, backend)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_singular_system_takes_the_loops_fallback(device, backend, dtype):
    # Sample 1 has a constant f: from step 1 on its residuals are exactly 0, so with
    # lam = 0 the bordered system is singular once three slots are valid.
    B, D, m = 3, 17, 5
    g, _ = contraction(B, D, dtype=dtype, lip=0.7)
    c = torch.randn(D, dtype=dtype)

    def f(z):
        out = g(z)
        out[1] = c
        return out

    z0 = torch.randn(B, D, dtype=dtype)
    fallbacks, outs, _ = _drive(f, z0, m, 0.0, 1.0, 8, backend)
    took = torch.stack(fallbacks)  # [steps, B]
    assert took[2:, 1].all() and not took[:, [0, 2]].any()
    for x_next, _, _ in outs[2:]:
        assert torch.equal(x_next[1], c)
        assert torch.isfinite(x_next).all()


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_stays_in_its_sample(device, backend, dtype):
    # f gives NaN for sample 0 at step 3: its residuals and Gram entries are NaN from then on
    # and its iterate takes the fallback (NaN where f was); the other samples are untouched.
    B, D, m = 3, 17, 4
    g, _ = contraction(B, D, dtype=dtype, lip=0.7)
    X, F, GG = _buffers(B, m, D, dtype)
    x = torch.randn(B, D, dtype=dtype)
    for i in range(7):
        fx = g(x)
        if i == 3:
            fx[0, 5] = float("nan")
        wx, wa, wr, wX, wF, wGG, _ = _expected(X.clone(), F.clone(), x, fx, i, 1e-4, 1.0)
        x, a, r = op(X, F, GG, x, fx, i, 1e-4, 1.0, backend)
        n = min(i + 1, m)
        for got, want in [(x, wx), (a, wa), (r, wr), (GG[:, :n, :n], wGG), (F[:, :n], wF[:, :n])]:
            assert_close(got, want, dtype, equal_nan=True)
        if i >= 3:
            assert a[0].isnan() and x[0].isnan().any()
        assert torch.isfinite(x[1:]).all() and torch.isfinite(a[1:]).all()


@pytest.mark.parametrize("device,backend", CASES)
def test_reproduces_the_solver_loop(device, backend):
    # The loop run with the registered pieces and the iterates of the fused step: the
    # evaluations of f see the same iterates (bit for bit with the reference, which
    # mirrors the loop's arithmetic).
    B, D, m, max_iter, lam, tau = 3, 17, 4, 9, 1e-4, 0.8
    f, _ = contraction(B, D, lip=0.7)
    z0 = torch.randn(B, D, dtype=torch.float64)
    seen = []
    ref.solve_loop(
        lambda z: seen.append(z.clone()) or f(z), z0, solver="anderson", max_iter=max_iter, tol=0.0,
        stop_mode="abs", m=m, lam=lam, tau=tau,
    )  # fmt: skip
    X, F, GG = _buffers(B, m, D, torch.float64)
    x = z0
    for i in range(max_iter):
        if backend == "reference":
            assert torch.equal(x, seen[i])
        else:
            assert_close(x, seen[i])
        x, _, _ = op(X, F, GG, x, f(x), i, lam, tau, backend)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("B,D", [(1, 4096), (64, 1024)])
def test_bitwise_deterministic_across_thread_counts(device, backend, B, D):
    # An elementwise contraction (a matmul in f would itself depend on the thread count).
    c = torch.randn(B, D)

    def f(z):
        return torch.tanh(0.6 * z.roll(1, 1) + c)

    z0 = torch.randn(B, D)
    runs = []
    threads = torch.get_num_threads()
    try:
        for nt in (1, 2, 1):
            torch.set_num_threads(nt)
            _, outs, state = _drive(f, z0, 5, 1e-4, 1.0, 7, backend, check=False)
            runs.append([t for o in outs for t in o] + list(state))
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(device, backend, dtype):
    B, m, D = 3, 4, 9
    X, F, GG = (
        torch.randn(B, m, D, dtype=dtype),
        torch.randn(B, m, D, dtype=dtype),
        torch.randn(B, m, m, dtype=dtype),
    )
    x, fx = torch.randn(B, D, dtype=dtype), torch.randn(B, D, dtype=dtype)
    for i in (0, 5):
        opcheck(op.default, (X, F, GG, x, fx, i, 1e-4, 0.9, backend), full=False)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize(
    "i,lam,tau,match",
    [
        (-1, 0.0, 1.0, "i must be >= 0"),
        (0, -1.0, 1.0, "lam must be >= 0"),
        (0, float("nan"), 1.0, "lam must be finite"),
        (0, float("inf"), 1.0, "lam must be finite"),
        (0, 0.0, 0.0, "tau must be > 0"),
        (0, 0.0, -0.5, "tau must be > 0"),
        (0, 0.0, float("nan"), "tau must be finite"),
    ],
)
def test_bad_values(device, backend, i, lam, tau, match):
    X, F, GG = _buffers(2, 3, 4, torch.float64)
    x = torch.randn(2, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=match):
        op(X, F, GG, x, x.clone(), i, lam, tau, backend)


@pytest.mark.parametrize(
    "change,name",
    [
        (lambda a: {**a, "X": a["X"].half()}, "X must be float32 or float64"),
        (lambda a: {**a, "F": a["F"][:, :2]}, "F must be"),
        (lambda a: {**a, "GG": a["GG"].float()}, "GG has dtype"),
        (lambda a: {**a, "GG": a["GG"][:, :, :2]}, "GG must be"),
        (lambda a: {**a, "X": a["X"].transpose(0, 1).contiguous().transpose(0, 1)}, "X must be contiguous"),
        (lambda a: {**a, "x": a["x"][:1]}, "x must be"),
        (lambda a: {**a, "fx": a["fx"].float()}, "fx has dtype"),
        (lambda a: {**a, "X": a["X"].int()}, "X must be float32 or float64"),
        (lambda a: {**a, "X": torch.randn(2, 300, 4, dtype=torch.float64)}, "ring slots"),
    ],
)
def test_cpp_refuses_bad_tensors_naming_them(change, name):
    if "cpp" not in [c.values[1] for c in CASES]:
        pytest.skip("the C++ extension is not built")
    X, F, GG = _buffers(2, 3, 4, torch.float64)
    a = dict(
        X=X, F=F, GG=GG, x=torch.randn(2, 4, dtype=torch.float64), fx=torch.randn(2, 4, dtype=torch.float64)
    )
    a = change(a)
    with pytest.raises(RuntimeError, match=name):
        op(a["X"], a["F"], a["GG"], a["x"], a["fx"], 0, 0.0, 1.0, "cpp")


@pytest.mark.parametrize("device,backend", CASES)
def test_fake_shapes(device, backend):
    X, F, GG = (t.to("meta") for t in _buffers(2, 3, 4, torch.float32))
    x = torch.empty(2, 4, device="meta")
    x_next, a, r = op(X, F, GG, x, x, 1, 1e-4, 1.0, backend)
    assert x_next.shape == (2, 4) and a.shape == r.shape == (2,)
