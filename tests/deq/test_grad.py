"""Gradients of the DEQ layer: implicit vs a long unrolled solve, phantom vs k damped steps, gradcheck."""

import pytest
import torch

from frontiers_fast.nn.deq import DEQFixedPoint
from frontiers_fast.ops import deq as ops

from ..conftest import assert_close
from .cells import contraction, unrolled_picard

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
    calls = []
    with torch.no_grad():
        z, _ = ops.deq(lambda z: (calls.append(1), f(z))[1], torch.randn(2, 6, dtype=torch.float64), tol=1e-8)
    assert not z.requires_grad
    n_solve = len(calls)
    z, _ = ops.deq(lambda z: (calls.append(1), f(z))[1], torch.randn(2, 6, dtype=torch.float64), tol=1e-8)
    assert z.requires_grad and len(calls) > n_solve  # the graph needs one more evaluation


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


def test_jacobian_regularizer_exact_and_statistical():
    f, _ = contraction(2, 5)
    z = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    fz = f(z)
    J = torch.autograd.functional.jacobian(f, z.detach())  # [2, 5, 2, 5]
    N = z.numel()
    exact = J.pow(2).sum() / N
    probes = (N**0.5) * torch.eye(N, dtype=torch.float64).view(N, 2, 5)
    got = ops.jacobian_regularizer(fz, z, vecs=N, probes=probes)
    assert_close(got, exact)
    assert got.requires_grad  # create_graph: trainable
    # Random probes: mean of K draws of ||v^T J||^2 has std sqrt(2 ||J J^T||_F^2 / K); 6 sigma.
    K = 2000
    est = ops.jacobian_regularizer(fz, z, vecs=K, create_graph=False) * N
    Jm = J.reshape(N, N)
    std = (2 * (Jm @ Jm.T).pow(2).sum() / K).sqrt()
    assert abs(est - exact * N) < 6 * std


def test_implicit_double_backward_is_refused():
    f, (W, *_) = contraction(2, 6, requires_grad=True)
    z, _ = ops.deq(f, torch.randn(2, 6, dtype=torch.float64), tol=1e-8)
    with pytest.raises(NotImplementedError, match="double backward"):
        torch.autograd.grad(z.sum(), W, create_graph=True)
    # The phantom gradient is plain autograd: second derivatives work.
    z, _ = ops.deq(f, torch.randn(2, 6, dtype=torch.float64), tol=1e-8, backward="phantom", pg_steps=2)
    (gW,) = torch.autograd.grad(z.sum(), W, create_graph=True)
    assert gW.requires_grad
