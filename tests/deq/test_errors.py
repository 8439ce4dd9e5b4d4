"""Bad inputs get a clear error that names the argument."""

import math

import pytest
import torch

from frontiers_fast.ops import deq as ops
from frontiers_fast.reference import deq as ref

F64 = dict(dtype=torch.float64)


def f_ok(z):
    return torch.tanh(0.5 * z + 1)


@pytest.fixture
def z0():
    return torch.randn(3, 4, **F64)


@pytest.mark.parametrize(
    "kwargs,exc,name",
    [
        (dict(solver="newton"), ValueError, "solver"),
        (dict(stop_mode="max"), ValueError, "stop_mode"),
        (dict(max_iter=0), ValueError, "max_iter"),
        (dict(max_iter=2.5), TypeError, "max_iter"),
        (dict(max_iter=True), TypeError, "max_iter"),
        (dict(tol=math.nan), ValueError, "tol"),
        (dict(tol=math.inf), ValueError, "tol"),
        (dict(tol=-1e-3), ValueError, "tol"),
        (dict(tol="1e-3"), TypeError, "tol"),
        (dict(m=0), ValueError, "m must"),
        (dict(lam=-1.0), ValueError, "lam"),
        (dict(lam=math.nan), ValueError, "lam"),
        (dict(tau=0.0), ValueError, "tau"),
        (dict(tau=math.inf), ValueError, "tau"),
        (dict(LBFGS_thres=10), TypeError, "LBFGS_thres"),
        (dict(indexing=[3]), TypeError, "indexing"),
        (dict(backend="gpu"), ValueError, "backend"),
    ],
)
def test_fixed_point_solve_options(z0, kwargs, exc, name):
    with pytest.raises(exc, match=name):
        ops.fixed_point_solve(f_ok, z0, **kwargs)


@pytest.mark.parametrize(
    "kwargs,exc,name",
    [
        (dict(backward="unrolled"), ValueError, "backward"),
        (dict(b_solver="lbfgs"), ValueError, "b_solver"),
        (dict(b_max_iter=0), ValueError, "b_max_iter"),
        (dict(b_tol=math.nan), ValueError, "b_tol"),
        (dict(b_stop_mode="x"), ValueError, "b_stop_mode"),
        (dict(b_m=0), ValueError, "b_m"),
        (dict(b_lam=-1), ValueError, "b_lam"),
        (dict(pg_steps=0), ValueError, "pg_steps"),
        (dict(pg_tau=math.nan), ValueError, "pg_tau"),
        (dict(pg_tau=-0.5), ValueError, "pg_tau"),
        (dict(grad=3), TypeError, "grad"),
        (dict(f_tol=1e-3), TypeError, "f_tol"),
        (dict(tol=-1), ValueError, "tol"),
    ],
)
def test_deq_options(z0, kwargs, exc, name):
    with pytest.raises(exc, match=name):
        ops.deq(f_ok, z0, **kwargs)


def test_z0_and_f(z0):
    for fn in (ops.fixed_point_solve, ops.deq):
        with pytest.raises(TypeError, match="z0"):
            fn(f_ok, torch.ones(3, 4, dtype=torch.int64))
        with pytest.raises(TypeError, match="z0"):
            fn(f_ok, torch.ones(3, 4, dtype=torch.float16))
        with pytest.raises(TypeError, match="z0"):
            fn(f_ok, [[1.0, 2.0]])
        with pytest.raises(ValueError, match="z0"):
            fn(f_ok, torch.tensor(1.0))
        with pytest.raises(ValueError, match="z0"):
            fn(f_ok, torch.ones(0, 4))
        with pytest.raises(TypeError, match="f must be callable"):
            fn("tanh", z0)
        with pytest.raises(ValueError, match="f must return a tensor of z0's shape"):
            fn(lambda z: z[:, :2], z0)
        with pytest.raises(TypeError, match="f returned dtype"):
            fn(lambda z: z.float(), z0)
        with pytest.raises(ValueError, match="f returned a tensor on meta"):
            fn(lambda z: torch.empty(z.shape, dtype=z.dtype, device="meta"), z0)
        with pytest.raises(TypeError, match="f must return a tensor"):
            fn(lambda z: 1.0, z0)


def test_kernel_wrappers():
    X, F = torch.randn(2, 4, 5, **F64), torch.randn(2, 4, 5, **F64)
    with pytest.raises(ValueError, match="X must have 3 dimensions"):
        ops.anderson_mix(X[:, 0], F, 2)
    with pytest.raises(ValueError, match="F must have X's shape"):
        ops.anderson_mix(X, F[:, :3], 2)
    with pytest.raises(TypeError, match="F has dtype"):
        ops.anderson_mix(X, F.float(), 2)
    with pytest.raises(ValueError, match="F is on meta"):
        ops.anderson_mix(X, F.to("meta"), 2)
    with pytest.raises(ValueError, match="n must be in"):
        ops.anderson_mix(X, F, 0)
    with pytest.raises(ValueError, match="n must be in"):
        ops.anderson_mix(X, F, 5)
    with pytest.raises(ValueError, match="lam"):
        ops.anderson_mix(X, F, 2, lam=-1.0)
    with pytest.raises(ValueError, match="tau"):
        ops.anderson_mix(X, F, 2, tau=math.nan)
    U, V, x = X, F, torch.randn(2, 5, **F64)
    with pytest.raises(ValueError, match=r"x must have shape \[B, D\]"):
        ops.broyden_matvec(U, V, x[:, :3], 1)
    with pytest.raises(ValueError, match="V is on meta"):
        ops.broyden_matvec(U, V.to("meta"), x, 1)
    with pytest.raises(ValueError, match="x is on meta"):
        ops.broyden_matvec(U, V, x.to("meta"), 1)
    with pytest.raises(ValueError, match="n must be in"):
        ops.broyden_matvec(U, V, x, 5)
    with pytest.raises(TypeError, match="transpose"):
        ops.broyden_matvec(U, V, x, 1, transpose=1)
    with pytest.raises(ValueError, match="dg must have shape"):
        ops.broyden_update(U, V, x, x[:1], 1)
    with pytest.raises(TypeError, match="dx has dtype"):
        ops.broyden_update(U, V, x.float(), x, 1)
    with pytest.raises(ValueError, match="z must have fz's shape"):
        ops.residual_norms(x, x[:, :2])
    with pytest.raises(ValueError, match="z is on meta"):
        ops.residual_norms(x, x.to("meta"))
    with pytest.raises(NotImplementedError, match="triton"):
        ops.broyden_matvec(U, V, x, 1, backend="triton")
    with pytest.raises(ValueError, match="'triton' runs on CUDA tensors"):
        ops.residual_norms(x, x, backend="triton")


def test_jacobian_regularizer_args():
    z = torch.randn(2, 3, **F64, requires_grad=True)
    fz = torch.tanh(z)
    with pytest.raises(ValueError, match="vecs"):
        ops.jacobian_regularizer(fz, z, vecs=0)
    with pytest.raises(ValueError, match="z must require grad"):
        ops.jacobian_regularizer(fz, z.detach())
    with pytest.raises(ValueError, match="probes must have shape"):
        ops.jacobian_regularizer(fz, z, vecs=2, probes=torch.randn(3, 2, 3, **F64))
    with pytest.raises(TypeError, match="create_graph"):
        ops.jacobian_regularizer(fz, z, create_graph=None)
    with pytest.raises(ValueError, match="f_z is on meta"):
        ops.jacobian_regularizer(fz.to("meta"), z)


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(solver="andersen"), "solver"),
        (dict(solver="Picard"), "solver"),
        (dict(stop_mode="max"), "stop_mode"),
        (dict(tol=math.nan), "tol"),
        (dict(tol=math.inf), "tol"),
        (dict(tol=-1e-3), "tol"),
        (dict(tol="1e-3"), "tol"),
    ],
)
def test_reference_fixed_point_solve_options(z0, kwargs, name):
    # The reference is called directly in tests and notebooks: no typo may fall through to Picard.
    with pytest.raises(ValueError, match=name):
        ref.fixed_point_solve(f_ok, z0, **kwargs)


def test_solve_loop_refuses_unknown_solver(z0):
    opts = dict(max_iter=3, tol=0.0, stop_mode="abs", m=2, lam=1e-4, tau=1.0)
    with pytest.raises(ValueError, match="solver must be one of"):
        ref.solve_loop(f_ok, z0, solver="andersen", **opts)
