"""Gradients of the DEQ layer: implicit vs a long unrolled solve, phantom vs k damped steps, gradcheck."""

import pytest
import torch

from frontiers_fast.nn.deq import DEQFixedPoint
from frontiers_fast.ops import deq as ops

from ..helpers import assert_close
from .cells import contraction, unrolled_picard

pytestmark = pytest.mark.usefixtures("solve_backend")

LIP = 0.5


def _grads(out, params, seed):
    return torch.autograd.grad(out, params, seed)


@pytest.mark.parametrize(
    "solver,b_solver", [("anderson", "anderson"), ("broyden", "broyden"), ("picard", "picard")]
)
def test_implicit_matches_long_unrolled_solve(solver, b_solver):
    B, D = 3, 10
    f, params = contraction(B, D, lip=LIP, requires_grad=True)
    z0 = torch.randn(B, D, dtype=torch.float64)
    seed = torch.randn(B, D, dtype=torch.float64)
    # 200 Picard steps of a 1/2-contraction: the unrolled map and its derivative are exact to round-off.
    want = _grads(unrolled_picard(f, z0, 200), params, seed)
    tol = 1e-12
    z, info = ops.deq(
        f, z0, solver=solver, tol=tol, max_iter=200, lam=1e-12,
        b_solver=b_solver, b_tol=tol, b_max_iter=200, b_lam=1e-12,
    )  # fmt: skip
    got = _grads(z, params, seed)
    # Forward and adjoint residuals below tol = 1e-12 put z and the adjoint y within
    # tol / (1 - L) = 2e-12 of their exact values; through f's O(1) derivatives and the O(1)
    # gradients that is up to ~1e-11 absolute, so the bound is atol 1e-10 (the float64
    # table's 1e-12 is for a closed-form op, not a solve stopped at a tolerance).
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("pg_steps,pg_tau", [(1, 1.0), (3, 0.6)])
def test_phantom_gradient_is_k_damped_steps(pg_steps, pg_tau):
    B, D = 3, 10
    f, params = contraction(B, D, lip=LIP, requires_grad=True)
    z0 = torch.randn(B, D, dtype=torch.float64)
    seed = torch.randn(B, D, dtype=torch.float64)
    z, _ = ops.deq(f, z0, backward="phantom", pg_steps=pg_steps, pg_tau=pg_tau, tol=1e-8)
    z_star, _ = ops.fixed_point_solve(f, z0, tol=1e-8)
    zk = z_star
    for _ in range(pg_steps):
        zk = pg_tau * f(zk) + (1 - pg_tau) * zk
    assert_close(z, zk)
    for a, b in zip(_grads(z, params, seed), _grads(zk, params, seed)):
        assert_close(a, b)


@pytest.mark.gradcheck
@pytest.mark.parametrize("solver", ["anderson", "broyden"])
def test_gradcheck_deq(solver):
    B, D = 2, 4
    f0, params = contraction(B, D, lip=LIP, requires_grad=True)
    z0 = torch.randn(B, D, dtype=torch.float64)

    def layer(W, U, b, x):
        f = lambda z: f0(z, W, U, b, x)
        opts = dict(tol=1e-13, max_iter=200, lam=1e-12, b_tol=1e-13, b_max_iter=200, b_lam=1e-12)
        return ops.deq(f, z0, solver=solver, b_solver=solver, **opts)[0]

    # fast_mode: one random projection per input keeps the ~100 tight solves cheap.
    assert torch.autograd.gradcheck(layer, tuple(params), fast_mode=True)


def test_no_grad_mode_only_solves():
    f, params = contraction(2, 6, requires_grad=True)
    z0 = torch.randn(2, 6, dtype=torch.float64)
    calls = []
    f_rec = lambda z: (calls.append(1), f(z))[1]
    with torch.no_grad():
        z, _ = ops.deq(f_rec, z0, tol=1e-8)
    assert not z.requires_grad
    n_solve = len(calls)
    calls.clear()
    z, _ = ops.deq(f_rec, z0, tol=1e-8)
    # The same solve, plus exactly one evaluation f(z*) for the implicit gradient's graph.
    assert z.requires_grad and len(calls) == n_solve + 1


def test_float32_implicit_gradient_matches_float64_unrolled():
    # f(z) = tanh(W z + U x + b), ||W||_2 = L.  With w = tanh'(a) * y (a: pre-activation at z,
    # y: adjoint, y = J^T y + s) the gradients are g_b = w, g_x = U^T w, g_U = w x^T, g_W = w z^T.
    # Error sources, each a bound that follows from the setup:
    #   dz <= tol' / (1 - L)  (forward residual below tol, + float32 round-off of the residual);
    #   dy <= b_tol' / (1 - L) + ||J(z) - J(z*)|| ||y*|| / (1 - L), with ||J(z) - J(z*)|| <=
    #        c L^2 dz, c = max|tanh''| = 4 / (3 sqrt 3), and ||y*|| <= ||s|| / (1 - L);
    #   dw <= dy + c L dz ||y||;  then ||dg_b|| <= dw, ||dg_x|| <= ||U|| dw,
    #   ||dg_U|| <= dw ||x||, ||dg_W|| <= dw ||z|| + ||y|| dz;
    # plus float32 round-off of the gradient formulas themselves, a few D eps32 relative.
    B, D, L = 1, 8, LIP
    f, params = contraction(B, D, dtype=torch.float32, lip=L, requires_grad=True)
    W, U, b, x = params
    z0 = torch.zeros(B, D)
    seed = torch.randn(B, D)
    seed = seed / torch.linalg.vector_norm(seed)
    tol = b_tol = 1e-4  # far above the float32 floor (~1e-6 here), so both solves reach them
    z, info = ops.deq(f, z0, tol=tol, b_tol=b_tol, max_iter=100, b_max_iter=100)
    assert (info["abs_lowest"] < tol).all()
    got = _grads(z, params, seed)

    leaves = [p.detach().double().requires_grad_(True) for p in params]
    f64 = lambda z: f(z, *leaves)
    # 200 Picard steps of a 1/2-contraction: the float64 map and its derivative at round-off.
    z64 = unrolled_picard(f64, z0.double(), 200)
    want = torch.autograd.grad(z64, leaves, seed.double())

    eps32, c = torch.finfo(torch.float32).eps, 4 / (3 * 3**0.5)
    rounding = 4 * D * eps32 * (z64.norm() + 1)  # float32 residuals of O(1) vectors, over-estimated
    dz = (tol + rounding) / (1 - L)
    y_norm = seed.norm() / (1 - L)
    dy = (b_tol + rounding) / (1 - L) + c * L**2 * dz * y_norm / (1 - L)
    dw = dy + c * L * dz * y_norm
    U64, x64, z_norm = leaves[1].detach(), leaves[3].detach(), z64.detach().norm()
    bounds = {
        "W": dw * z_norm + y_norm * dz,
        "U": dw * x64.norm(),
        "b": dw,
        "x": dw * torch.linalg.matrix_norm(U64, 2),
    }
    for name, g, w in zip("WUbx", got, want):
        err = (g.double() - w).norm()
        bound = bounds[name] + 4 * D * eps32 * w.norm()
        assert err <= bound, f"grad {name}: error {err:.3e} > bound {bound:.3e}"
    # The bound is tight enough to mean something: an adjoint solve cut to one step (y = s, J^T
    # ignored) breaks it on every input.  Two steps would not always: Anderson's second step can
    # land within a few percent, on 134 of 200 seeds here.
    z, _ = ops.deq(f, z0, tol=tol, b_tol=b_tol, b_max_iter=1)
    g_bad = _grads(z, params, seed)
    assert any((g.double() - w).norm() > bounds[n] for n, g, w in zip("WUbx", g_bad, want))


def test_implicit_output_is_the_solution_and_reusable():
    f, params = contraction(2, 6, requires_grad=True)
    z0 = torch.randn(2, 6, dtype=torch.float64)
    z, _ = ops.deq(f, z0, tol=1e-9)
    zs, _ = ops.fixed_point_solve(f, z0, tol=1e-9)
    torch.testing.assert_close(z.detach(), zs, rtol=0, atol=0)
    # The output may feed several consumers; their gradients add as usual.
    g1 = torch.autograd.grad((z * 2).sum() + z.pow(2).sum(), params[0])[0]
    z, _ = ops.deq(f, z0, tol=1e-9)
    g2 = torch.autograd.grad(z.sum(), params[0], retain_graph=True)[0] * 2
    g3 = torch.autograd.grad(z.pow(2).sum(), params[0])[0]
    # Each backward is an adjoint solve stopped at b_tol = 1e-6 (default); the sums agree to that.
    torch.testing.assert_close(g1, g2 + g3, rtol=1e-5, atol=1e-6)


def test_module_matches_functional_and_trains():
    torch.manual_seed(0)

    class Cell(torch.nn.Module):
        def __init__(self, d):
            super().__init__()
            self.lin = torch.nn.Linear(d, d, dtype=torch.float64)
            with torch.no_grad():
                self.lin.weight.mul_(LIP / torch.linalg.matrix_norm(self.lin.weight, 2))

        def forward(self, z, x):
            return torch.tanh(self.lin(z) + x)

    cell = Cell(8)
    layer = DEQFixedPoint(cell, solver="broyden", tol=1e-10, b_solver="broyden", b_tol=1e-10)
    x = torch.randn(4, 8, dtype=torch.float64)
    z, info = layer(x)
    assert layer.info is info and (info["abs_lowest"] < 1e-10).all()
    zf, _ = ops.deq(lambda z: cell(z, x), torch.zeros_like(x), solver="broyden", tol=1e-10)
    torch.testing.assert_close(z, zf, rtol=0, atol=0)
    z.sum().backward()
    want = torch.autograd.grad(
        unrolled_picard(lambda z: cell(z, x), torch.zeros_like(x), 200).sum(), cell.lin.weight
    )[0]
    torch.testing.assert_close(cell.lin.weight.grad, want, rtol=1e-8, atol=1e-9)
    with pytest.raises(TypeError, match="solverr"):
        DEQFixedPoint(cell, solverr="anderson")
    with pytest.raises(ValueError, match="b_tol"):
        DEQFixedPoint(cell, b_tol=float("nan"))


def test_layer_matches_torchdeq_get_deq():
    torchdeq = pytest.importorskip("torchdeq")
    f, params = contraction(3, 12, lip=LIP, requires_grad=True)
    z0 = torch.zeros(3, 12, dtype=torch.float64)
    seed = torch.randn(3, 12, dtype=torch.float64)
    tol = 1e-11
    # Phantom gradient: the same solver iterates, then the same k damped steps: equal to round-off.
    theirs = torchdeq.get_deq(core="indexing", f_solver="anderson", f_max_iter=60, f_tol=tol, grad=2, tau=0.7)
    zt = theirs(f, z0)[0][-1]
    z, _ = ops.deq(f, z0, solver="anderson", max_iter=60, tol=tol, backward="phantom", pg_steps=2, pg_tau=0.7)
    assert_close(z, zt)
    for a, b in zip(_grads(z, params, seed), _grads(zt, params, seed)):
        assert_close(a, b)
    # Implicit: torchdeq returns f(z*) and takes J at f(z*), we return z* and take J at z*;
    # with residuals below 1e-11 the gradients agree to ~tol / (1 - L).
    theirs = torchdeq.get_deq(
        core="indexing", ift=True, f_solver="broyden", b_solver="broyden",
        f_max_iter=60, b_max_iter=60, f_tol=tol, b_tol=tol,
    )  # fmt: skip
    zt = theirs(f, z0)[0][-1]
    z, _ = ops.deq(
        f, z0, solver="broyden", b_solver="broyden", max_iter=60, b_max_iter=60, tol=tol, b_tol=tol
    )
    torch.testing.assert_close(z, zt, rtol=0, atol=4 * tol)
    for a, b in zip(_grads(z, params, seed), _grads(zt, params, seed)):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9)


def test_implicit_double_backward_is_refused():
    f, (W, *_) = contraction(2, 6, requires_grad=True)
    z, _ = ops.deq(f, torch.randn(2, 6, dtype=torch.float64), tol=1e-8)
    with pytest.raises(NotImplementedError, match="double backward"):
        torch.autograd.grad(z.sum(), W, create_graph=True)
    # The phantom gradient is plain autograd: second derivatives work.
    z, _ = ops.deq(f, torch.randn(2, 6, dtype=torch.float64), tol=1e-8, backward="phantom", pg_steps=2)
    (gW,) = torch.autograd.grad(z.sum(), W, create_graph=True)
    assert gW.requires_grad


def test_module_accepts_torchdeq_names():
    f, params = contraction(3, 8, lip=LIP, requires_grad=True)
    cell = lambda z, x: f(z)
    x = torch.randn(3, 8, dtype=torch.float64)
    theirs = DEQFixedPoint(
        cell, f_solver="broyden", f_max_iter=30, f_tol=1e-9, f_stop_mode="rel", b_solver="picard", ift=True
    )
    ours = DEQFixedPoint(
        cell, solver="broyden", max_iter=30, tol=1e-9, stop_mode="rel", b_solver="picard", backward="implicit"
    )
    assert theirs.options == ours.options
    z, info = theirs(x)
    zo, infoo = ours(x)
    torch.testing.assert_close(z, zo, rtol=0, atol=0)
    assert torch.equal(info["nstep"], infoo["nstep"])
    phantom = DEQFixedPoint(cell, f_solver="anderson", grad=3, ift=False, pg_tau=0.6)
    assert phantom.options == dict(solver="anderson", pg_steps=3, backward="phantom", pg_tau=0.6)
    assert "pg_steps=3" in repr(phantom)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(f_tol=1e-3, tol=1e-4), TypeError, "both 'f_tol'.*'tol'"),
        (dict(ift=True, backward="phantom"), TypeError, "both 'ift'"),
        (dict(grad=2), ValueError, "grad .* without the backward mode"),
        (dict(grad=2, ift=False, tau=0.7), ValueError, "tau is ambiguous"),
        (dict(f_solver="anderson", tau=0.7), ValueError, "tau is ambiguous"),
        (dict(grad=[1, 2], ift=False), TypeError, "grad"),
        (dict(grad=0, backward="phantom"), ValueError, "grad"),
        (dict(ift=1), TypeError, "ift"),
        (dict(f_solver="newton"), ValueError, "solver"),
        (dict(core="indexing"), TypeError, "core"),
    ],
)
def test_module_torchdeq_names_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        DEQFixedPoint(lambda z, x: z, **kwargs)


def test_module_differentiates_in_eval_mode_under_grad():
    # Documented choice: the backward follows grad mode, not self.training (torchdeq's switch).
    f, (W, *_) = contraction(2, 6, lip=LIP, requires_grad=True)
    layer = DEQFixedPoint(lambda z, x: f(z), tol=1e-8).eval()
    x = torch.randn(2, 6, dtype=torch.float64)
    z, _ = layer(x)
    assert z.requires_grad and torch.autograd.grad(z.sum(), W)[0].abs().sum() > 0
    with torch.no_grad():
        z, _ = layer(x)
    assert not z.requires_grad
