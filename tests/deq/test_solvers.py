"""Solver semantics: convergence, per-sample best iterate and freezing, step counts, traces, shapes."""

import pytest
import torch

from frontiers_fast.ops import deq as ops
from frontiers_fast.reference import deq as ref

from ..conftest import assert_close
from .cells import contraction

SOLVERS = ["anderson", "broyden", "picard"]


def _fixed_point_64(f, z0):
    # Plain iteration of a contraction with constant 1/2: 200 steps reach float64 round-off.
    z = z0.double()
    with torch.no_grad():
        for _ in range(200):
            z = f(z)
    return z


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_converges_to_fixed_point(solver, dtype):
    f, _ = contraction(5, 24, dtype=dtype)
    z0 = torch.randn(5, 24, dtype=dtype)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    z, info = ops.fixed_point_solve(f, z0, solver=solver, tol=tol, max_iter=200, lam=1e-10)
    assert z.dtype == dtype and z.shape == z0.shape
    assert (info["abs_lowest"] < tol).all()
    # ||z - z*|| <= ||f(z') - z'|| / (1 - L) with L = 1/2 (for Anderson/Picard z = f(z'), still within the bound).
    z_star = _fixed_point_64(f, z0)
    err = torch.linalg.vector_norm(z.double() - z_star, dim=1)
    assert (err <= 2 * info["abs_lowest"].double() + 1e-12).all()


@pytest.mark.parametrize("solver", SOLVERS)
def test_reference_and_registered_ops_agree(solver):
    f, _ = contraction(4, 16)
    z0 = torch.randn(4, 16, dtype=torch.float64)
    a = ops.fixed_point_solve(f, z0, solver=solver, tol=1e-9)
    b = ref.fixed_point_solve(f, z0, solver=solver, tol=1e-9)
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
    for k in a[1]:
        torch.testing.assert_close(a[1][k], b[1][k], rtol=0, atol=0)


@pytest.mark.parametrize("solver", SOLVERS)
def test_trailing_shape_matches_flat(solver):
    f3, _ = contraction(3, 24, trailing=(2, 3, 4))
    z0 = torch.randn(3, 2, 3, 4, dtype=torch.float64)
    z, info = ops.fixed_point_solve(f3, z0, solver=solver, tol=1e-8)
    flat = lambda z: f3(z.view(3, 2, 3, 4)).reshape(3, 24)
    zf, infof = ops.fixed_point_solve(flat, z0.reshape(3, 24), solver=solver, tol=1e-8)
    assert z.shape == z0.shape
    assert_close(z.reshape(3, 24), zf)
    assert torch.equal(info["nstep"], infof["nstep"])


@pytest.mark.parametrize("solver", SOLVERS)
def test_per_sample_semantics(solver):
    """Best iterate per sample, consistent info, and converged samples frozen."""
    B, D, max_iter, tol = 6, 12, 30, 1e-6
    f, _ = contraction(B, D)
    z0 = torch.randn(B, D, dtype=torch.float64)
    # Start two samples at (nearly) their fixed point so they converge much earlier than the rest.
    z_star = _fixed_point_64(f, z0)
    z0[:2] = z_star[:2] + 1e-6 * torch.randn(2, D, dtype=torch.float64)
    calls = []

    def f_rec(z):
        calls.append(z.clone())
        return f(z)

    # lam small: with the default 1e-4 Anderson slows down once ||G||^2 drops below lam.
    z, info = ops.fixed_point_solve(f_rec, z0, solver=solver, max_iter=max_iter, tol=tol, lam=1e-10)
    nstep, abs_tr = info["nstep"], info["abs_trace"]
    assert info["abs_trace"].shape == (B, max_iter) and info["rel_trace"].shape == (B, max_iter)
    assert nstep.dtype == torch.int64 and (nstep >= 1).all()
    assert (nstep[:2] < nstep[2:].min()).all()
    # The reported lowest residuals are the minima of the traces, and the best step holds it.
    assert_close(info["abs_lowest"], abs_tr.min(1).values)
    assert_close(info["rel_lowest"], info["rel_trace"].min(1).values)
    assert_close(abs_tr.gather(1, (nstep - 1).unsqueeze(1))[:, 0], info["abs_lowest"])
    # Converged samples: residual below tol at nstep, trace constant (= lowest) afterwards.
    assert (info["abs_lowest"] < tol).all()
    for i in range(B):
        tail = abs_tr[i, nstep[i] - 1 :]
        assert torch.equal(tail, torch.full_like(tail, info["abs_lowest"][i].item()))
    # z is f(x) at the best step (Anderson, Picard) or x itself (Broyden): its residual
    # is consistent with the reported one.
    a, _ = ops.residual_norms(f(z), z)
    assert (a <= 2 * info["abs_lowest"] + 1e-12).all()
    # After a sample froze, f only ever saw its frozen estimate.
    n0 = int(nstep[0])
    offset = 0 if solver != "broyden" else 1  # Broyden evaluates f at z0 first (step 0)
    frozen_inputs = torch.stack([c[0] for c in calls[n0 + offset :]])
    if len(frozen_inputs) > 1:
        assert torch.equal(frozen_inputs, frozen_inputs[:1].expand_as(frozen_inputs))


def test_rel_stop_mode_and_max_iter_one():
    f, _ = contraction(3, 8)
    z0 = torch.randn(3, 8, dtype=torch.float64)
    z, info = ops.fixed_point_solve(f, z0, solver="anderson", stop_mode="rel", tol=1e-7, max_iter=60)
    assert (info["rel_lowest"] < 1e-7).all()
    for solver in SOLVERS:
        z, info = ops.fixed_point_solve(f, z0, solver=solver, max_iter=1)
        assert (info["nstep"] == 1).all() and info["abs_trace"].shape == (3, 1)
        if solver != "broyden":
            assert_close(z, f(z0))  # the only estimate: f(z0)


def test_no_gradient_from_solve():
    f, (W, *_) = contraction(2, 8, requires_grad=True)
    z, _ = ops.fixed_point_solve(f, torch.randn(2, 8, dtype=torch.float64, requires_grad=True))
    assert not z.requires_grad


def test_tol_zero_runs_max_iter():
    f, _ = contraction(3, 8)
    z0 = torch.randn(3, 8, dtype=torch.float64)
    calls = []
    ops.fixed_point_solve(lambda z: (calls.append(1), f(z))[1], z0, solver="picard", tol=0.0, max_iter=17)
    assert len(calls) == 17


def test_anderson_with_memory_one_is_picard():
    # With one slot the bordered system forces alpha = 1: the next iterate is f of the last one.
    f, _ = contraction(3, 8)
    z0 = torch.randn(3, 8, dtype=torch.float64)
    runs = {}
    for solver, m in (("anderson", 1), ("picard", 6)):
        calls = []
        z, info = ops.fixed_point_solve(
            lambda z: (calls.append(z.clone()), f(z))[1], z0, solver=solver, m=m, tol=0.0
        )
        runs[solver] = (z, info, calls)
    (za, ia, ca), (zp, ip, cp) = runs["anderson"], runs["picard"]
    assert len(ca) == len(cp)
    for a, b in zip(ca, cp):
        assert_close(a, b)
    assert_close(za, zp)
    assert torch.equal(ia["nstep"], ip["nstep"])
