"""Bad and edge inputs thrown at every public DEQ function and the layer, one class per row.

Each row names the exception and a fragment of its message: the argument at
fault must be named.  The NaN tests check what each docstring says about NaN
in the data (parameters are refused; data may hold NaN).
"""

import math
import warnings

import numpy as np
import pytest
import torch

import frontiers_fast as ff
from frontiers_fast.nn.deq import DEQFixedPoint
from frontiers_fast.ops import deq as ops
from frontiers_fast.reference import deq as ref

from ..helpers import assert_close, backend_cases

META = torch.device("meta")
F64 = dict(dtype=torch.float64)
NAN, INF = math.nan, math.inf


def t(*shape, dtype=torch.float64, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device)


def f_ok(z):
    return torch.tanh(0.5 * z + 1)


def _jr(fz_fn=torch.tanh, z=None, **kw):
    z = t(2, 3).requires_grad_(True) if z is None else z
    return ops.jacobian_regularizer(fz_fn(z), z, **kw)


def _layer(**opts):
    return DEQFixedPoint(lambda z, x: torch.tanh(0.5 * z + x), **opts)


# (id, callable, exception, message fragment)
CASES = [
    # residual_norms
    ("rn-type", lambda: ops.residual_norms([1.0, 2.0], t(2)), TypeError, "fz must be a torch.Tensor"),
    ("rn-int", lambda: ops.residual_norms(torch.ones(2, 3, dtype=torch.long), t(2, 3)), TypeError, "fz must be float32"),
    ("rn-bool", lambda: ops.residual_norms(t(2, 3), torch.ones(2, 3, dtype=torch.bool)), TypeError, "z must be float32"),
    ("rn-complex", lambda: ops.residual_norms(t(2, 3, dtype=torch.cdouble), t(2, 3)), TypeError, "fz must be float32"),
    ("rn-half", lambda: ops.residual_norms(t(2, 3, dtype=torch.float16), t(2, 3)), TypeError, "fz must be float32"),
    ("rn-dtype-mix", lambda: ops.residual_norms(t(2, 3), t(2, 3, dtype=torch.float32)), TypeError, "z has dtype"),
    ("rn-0dim", lambda: ops.residual_norms(torch.tensor(1.0, **F64), torch.tensor(1.0, **F64)), ValueError, r"z must have fz's shape \[B, ...\]"),
    ("rn-sizes", lambda: ops.residual_norms(t(2, 3), t(2, 4)), ValueError, "z must have fz's shape"),
    ("rn-meta", lambda: ops.residual_norms(t(2, 3), t(2, 3, device=META)), ValueError, "z is on meta"),
    # anderson_mix
    ("am-type", lambda: ops.anderson_mix(None, t(2, 3, 4), 1), TypeError, "X must be a torch.Tensor"),
    ("am-int", lambda: ops.anderson_mix(torch.ones(2, 3, 4, dtype=torch.int32), t(2, 3, 4), 1), TypeError, "X must be float32"),
    ("am-complex", lambda: ops.anderson_mix(t(2, 3, 4), t(2, 3, 4, dtype=torch.cdouble), 1), TypeError, "F must be float32"),
    ("am-dims", lambda: ops.anderson_mix(t(2, 4), t(2, 4), 1), ValueError, "X must have 3 dimensions"),
    ("am-sizes", lambda: ops.anderson_mix(t(2, 3, 4), t(2, 3, 5), 1), ValueError, "F must have X's shape"),
    ("am-no-slot", lambda: ops.anderson_mix(t(2, 0, 4), t(2, 0, 4), 1), ValueError, "X must hold at least one slot"),
    ("am-meta", lambda: ops.anderson_mix(t(2, 3, 4), t(2, 3, 4, device=META), 1), ValueError, "F is on meta"),
    ("am-n-low", lambda: ops.anderson_mix(t(2, 3, 4), t(2, 3, 4), 0), ValueError, r"n must be in \[1, 3\]"),
    ("am-n-high", lambda: ops.anderson_mix(t(2, 3, 4), t(2, 3, 4), 4), ValueError, r"n must be in \[1, 3\]"),
    ("am-n-float", lambda: ops.anderson_mix(t(2, 3, 4), t(2, 3, 4), 2.0), TypeError, "n must be an int"),
    ("am-n-bool", lambda: ops.anderson_mix(t(2, 3, 4), t(2, 3, 4), True), TypeError, "n must be an int"),
    ("am-lam-nan", lambda: ops.anderson_mix(t(2, 3, 4), t(2, 3, 4), 2, lam=NAN), ValueError, "lam must be finite"),
    ("am-lam-neg", lambda: ops.anderson_mix(t(2, 3, 4), t(2, 3, 4), 2, lam=-1e-3), ValueError, "lam must be >="),
    ("am-tau-zero", lambda: ops.anderson_mix(t(2, 3, 4), t(2, 3, 4), 2, tau=0.0), ValueError, "tau must be >"),
    ("am-tau-inf", lambda: ops.anderson_mix(t(2, 3, 4), t(2, 3, 4), 2, tau=INF), ValueError, "tau must be finite"),
    ("am-tau-str", lambda: ops.anderson_mix(t(2, 3, 4), t(2, 3, 4), 2, tau="1"), TypeError, "tau must be a real"),
    # broyden_matvec
    ("bm-type", lambda: ops.broyden_matvec(t(2, 3, 4), t(2, 3, 4), np.ones((2, 4)), 1), TypeError, "x must be a torch.Tensor"),
    ("bm-bool", lambda: ops.broyden_matvec(torch.ones(2, 3, 4, dtype=torch.bool), t(2, 3, 4), t(2, 4), 1), TypeError, "U must be float32"),
    ("bm-dims", lambda: ops.broyden_matvec(t(2, 3, 4), t(2, 3, 4), t(2, 1, 4), 1), ValueError, "x must have 2 dimensions"),
    ("bm-sizes", lambda: ops.broyden_matvec(t(2, 3, 4), t(2, 3, 4), t(3, 4), 1), ValueError, r"x must have shape \[B, D\]=\[2, 4\]"),
    ("bm-V-sizes", lambda: ops.broyden_matvec(t(2, 3, 4), t(2, 2, 4), t(2, 4), 1), ValueError, "V must have U's shape"),
    ("bm-meta", lambda: ops.broyden_matvec(t(2, 3, 4, device=META), t(2, 3, 4), t(2, 4), 1), ValueError, "V is on cpu but U is on meta"),
    ("bm-n-high", lambda: ops.broyden_matvec(t(2, 3, 4), t(2, 3, 4), t(2, 4), 4), ValueError, r"n must be in \[0, 3\]"),
    ("bm-n-neg", lambda: ops.broyden_matvec(t(2, 3, 4), t(2, 3, 4), t(2, 4), -1), ValueError, r"n must be in \[0, 3\]"),
    ("bm-transpose", lambda: ops.broyden_matvec(t(2, 3, 4), t(2, 3, 4), t(2, 4), 1, "yes"), TypeError, "transpose must be a bool"),
    # broyden_update
    ("bu-int", lambda: ops.broyden_update(t(2, 3, 4), t(2, 3, 4), torch.ones(2, 4, dtype=torch.long), t(2, 4), 1), TypeError, "dx must be float32"),
    ("bu-complex", lambda: ops.broyden_update(t(2, 3, 4), t(2, 3, 4), t(2, 4), t(2, 4, dtype=torch.cdouble), 1), TypeError, "dg must be float32"),
    ("bu-sizes", lambda: ops.broyden_update(t(2, 3, 4), t(2, 3, 4), t(2, 4), t(2, 5), 1), ValueError, r"dg must have shape \[B, D\]"),
    ("bu-dims", lambda: ops.broyden_update(t(3, 4), t(3, 4), t(2, 4), t(2, 4), 1), ValueError, "U must have 3 dimensions"),
    ("bu-meta", lambda: ops.broyden_update(t(2, 3, 4), t(2, 3, 4), t(2, 4, device=META), t(2, 4), 1), ValueError, "dx is on meta"),
    ("bu-n-high", lambda: ops.broyden_update(t(2, 3, 4), t(2, 3, 4), t(2, 4), t(2, 4), 5), ValueError, r"n must be in \[0, 3\]"),
    ("bu-n-float", lambda: ops.broyden_update(t(2, 3, 4), t(2, 3, 4), t(2, 4), t(2, 4), 1.5), TypeError, "n must be an int"),
    # fixed_point_solve
    ("fps-f", lambda: ops.fixed_point_solve(3, t(2, 3)), TypeError, "f must be callable"),
    ("fps-z0-type", lambda: ops.fixed_point_solve(f_ok, [[0.0, 1.0]]), TypeError, "z0 must be a torch.Tensor"),
    ("fps-z0-int", lambda: ops.fixed_point_solve(f_ok, torch.zeros(2, 3, dtype=torch.long)), TypeError, "z0 must be float32"),
    ("fps-z0-bool", lambda: ops.fixed_point_solve(f_ok, torch.zeros(2, 3, dtype=torch.bool)), TypeError, "z0 must be float32"),
    ("fps-z0-complex", lambda: ops.fixed_point_solve(f_ok, t(2, 3, dtype=torch.cfloat)), TypeError, "z0 must be float32"),
    ("fps-z0-0dim", lambda: ops.fixed_point_solve(f_ok, torch.tensor(0.0, **F64)), ValueError, r"z0 must be a non-empty \[B, ...\]"),
    ("fps-z0-empty-B", lambda: ops.fixed_point_solve(f_ok, t(0, 3)), ValueError, "z0 must be a non-empty"),
    ("fps-z0-empty-D", lambda: ops.fixed_point_solve(f_ok, t(2, 0)), ValueError, "z0 must be a non-empty"),
    ("fps-z0-meta", lambda: ops.fixed_point_solve(f_ok, t(2, 3, device=META)), ValueError, "z0 is a meta tensor"),
    ("fps-f-meta", lambda: ops.fixed_point_solve(lambda z: z.to(META), t(2, 3)), ValueError, "f returned a tensor on meta"),
    ("fps-f-shape", lambda: ops.fixed_point_solve(lambda z: z[:1], t(2, 3)), ValueError, "f must return a tensor of z0's shape"),
    ("fps-f-dtype", lambda: ops.fixed_point_solve(lambda z: z.float(), t(2, 3)), TypeError, "f returned dtype"),
    ("fps-solver", lambda: ops.fixed_point_solve(f_ok, t(2, 3), solver="lbfgs"), ValueError, "solver must be one of"),
    ("fps-solver-type", lambda: ops.fixed_point_solve(f_ok, t(2, 3), solver=1), ValueError, "solver must be one of"),
    ("fps-stop-mode", lambda: ops.fixed_point_solve(f_ok, t(2, 3), stop_mode="max"), ValueError, "stop_mode must be one of"),
    ("fps-max-iter", lambda: ops.fixed_point_solve(f_ok, t(2, 3), max_iter=0), ValueError, "max_iter must be >= 1"),
    ("fps-max-iter-str", lambda: ops.fixed_point_solve(f_ok, t(2, 3), max_iter="5"), TypeError, "max_iter must be an int"),
    ("fps-max-iter-huge", lambda: ops.fixed_point_solve(f_ok, t(2, 3), max_iter=10**14), ValueError, "max_iter is too large"),
    ("fps-tol-nan", lambda: ops.fixed_point_solve(f_ok, t(2, 3), tol=NAN), ValueError, "tol must be finite"),
    ("fps-tol-neg", lambda: ops.fixed_point_solve(f_ok, t(2, 3), tol=-1.0), ValueError, "tol must be >="),
    ("fps-m", lambda: ops.fixed_point_solve(f_ok, t(2, 3), m=0), ValueError, "m must be >= 1"),
    ("fps-lam-inf", lambda: ops.fixed_point_solve(f_ok, t(2, 3), lam=INF), ValueError, "lam must be finite"),
    ("fps-tau-neg", lambda: ops.fixed_point_solve(f_ok, t(2, 3), tau=-0.5), ValueError, "tau must be >"),
    ("fps-option", lambda: ops.fixed_point_solve(f_ok, t(2, 3), f_tol=1e-3), TypeError, "f_tol"),
    ("fps-backend", lambda: ops.fixed_point_solve(f_ok, t(2, 3), backend="gpu"), ValueError, "backend must be one of"),
    ("fps-backend-cuda", lambda: ops.fixed_point_solve(f_ok, t(2, 3), backend="cuda"), NotImplementedError, "fixed_point_solve: backend 'cuda'"),
    ("ref-fps-solver", lambda: ref.fixed_point_solve(f_ok, t(2, 3), solver="Picard"), ValueError, "solver must be one of"),
    ("ref-fps-tol", lambda: ref.fixed_point_solve(f_ok, t(2, 3), tol=NAN), ValueError, "tol must be"),
    # deq
    ("deq-f", lambda: ff.deq(None, t(2, 3)), TypeError, "f must be callable"),
    ("deq-z0-int", lambda: ff.deq(f_ok, torch.zeros(2, 3, dtype=torch.int8)), TypeError, "z0 must be float32"),
    ("deq-z0-meta", lambda: ff.deq(f_ok, t(2, 3, device=META)), ValueError, "z0 is a meta tensor"),
    ("deq-z0-empty", lambda: ff.deq(f_ok, t(0, 3)), ValueError, "z0 must be a non-empty"),
    ("deq-backward", lambda: ff.deq(f_ok, t(2, 3), backward="unrolled"), ValueError, "backward must be one of"),
    ("deq-b-solver", lambda: ff.deq(f_ok, t(2, 3), b_solver="newton"), ValueError, "b_solver must be one of"),
    ("deq-b-tol-inf", lambda: ff.deq(f_ok, t(2, 3), b_tol=INF), ValueError, "b_tol must be finite"),
    ("deq-b-max-iter-huge", lambda: ff.deq(f_ok, t(2, 3), b_max_iter=10**14), ValueError, "b_max_iter is too large"),
    ("deq-b-m", lambda: ff.deq(f_ok, t(2, 3), b_m=True), TypeError, "b_m must be an int"),
    ("deq-pg-steps", lambda: ff.deq(f_ok, t(2, 3), pg_steps=0), ValueError, "pg_steps must be >= 1"),
    ("deq-pg-tau-nan", lambda: ff.deq(f_ok, t(2, 3), pg_tau=NAN), ValueError, "pg_tau must be finite"),
    ("deq-option", lambda: ff.deq(f_ok, t(2, 3), indexing=[1]), TypeError, "indexing"),
    ("deq-backend-cuda", lambda: ff.deq(f_ok, t(2, 3), backend="cuda"), NotImplementedError, "deq: backend 'cuda'"),
    # jacobian_regularizer
    ("jr-z-type", lambda: ops.jacobian_regularizer(t(2, 3), [1.0]), TypeError, "z must be a torch.Tensor"),
    ("jr-z-int", lambda: ops.jacobian_regularizer(t(2, 3), torch.ones(2, 3, dtype=torch.long)), TypeError, "z must be float32"),
    ("jr-fz-dtype", lambda: _jr(lambda z: torch.tanh(z).float()), TypeError, "f_z has dtype"),
    ("jr-fz-meta", lambda: _jr(lambda z: torch.tanh(z).to(META)), ValueError, "f_z is on meta"),
    ("jr-z-empty", lambda: _jr(z=t(0, 3).requires_grad_(True)), ValueError, "z must have at least one element"),
    ("jr-z-no-grad", lambda: ops.jacobian_regularizer(t(2, 3), t(2, 3)), ValueError, "z must require grad"),
    ("jr-fz-no-grad", lambda: _jr(lambda z: torch.tanh(z.detach())), ValueError, "f_z must be computed from z"),
    ("jr-fz-unrelated", lambda: _jr(lambda z: torch.tanh(t(2, 3).requires_grad_(True))), ValueError, "f_z does not depend on z"),
    ("jr-vecs", lambda: _jr(vecs=0), ValueError, "vecs must be >= 1"),
    ("jr-vecs-float", lambda: _jr(vecs=2.0), TypeError, "vecs must be an int"),
    ("jr-create-graph", lambda: _jr(create_graph="no"), TypeError, "create_graph must be a bool"),
    ("jr-probes-shape", lambda: _jr(vecs=2, probes=t(1, 2, 3)), ValueError, r"probes must have shape \[vecs, \*f_z.shape\]"),
    ("jr-probes-int", lambda: _jr(probes=torch.ones(1, 2, 3, dtype=torch.long)), TypeError, "probes must be float32"),
    ("jr-probes-meta", lambda: _jr(probes=t(1, 2, 3, device=META)), ValueError, "probes is on meta"),
    ("jr-backend-cpp", lambda: _jr(backend="cpp"), NotImplementedError, "jacobian_regularizer: backend 'cpp'"),
    # DEQFixedPoint: construction
    ("layer-cell-int", lambda: DEQFixedPoint(3), TypeError, "cell must be an nn.Module or a callable"),
    ("layer-cell-none", lambda: DEQFixedPoint(None), TypeError, "cell must be an nn.Module or a callable"),
    ("layer-option", lambda: _layer(solverr="anderson"), TypeError, "unknown option 'solverr'"),
    ("layer-options", lambda: _layer(core="indexing", n_states=2), TypeError, "unknown options 'core', 'n_states'"),
    ("layer-tol-nan", lambda: _layer(tol=NAN), ValueError, "tol must be finite"),
    ("layer-f-tol-nan", lambda: _layer(f_tol=NAN), ValueError, "tol must be finite"),
    ("layer-max-iter", lambda: _layer(f_max_iter=-1), ValueError, "max_iter must be >= 1"),
    ("layer-backward", lambda: _layer(backward="exact"), ValueError, "backward must be one of"),
    ("layer-grad-list", lambda: _layer(grad=[1, 2], ift=False), TypeError, "grad must be an int"),
    ("layer-backend", lambda: _layer(backend="gpu"), ValueError, "backend must be one of"),
    # DEQFixedPoint: forward
    ("layer-x-type", lambda: _layer()([[1.0, 2.0]]), TypeError, "x must be a torch.Tensor"),
    ("layer-x-int", lambda: _layer()(torch.ones(2, 3, dtype=torch.long)), TypeError, "x must be float32"),
    ("layer-x-meta", lambda: _layer()(t(2, 3, device=META)), ValueError, "x is a meta tensor"),
    ("layer-x-empty", lambda: _layer()(t(0, 3)), ValueError, "z0 must be a non-empty"),
    ("layer-z0-meta", lambda: _layer()(t(2, 3), t(2, 3, device=META)), ValueError, "z0 is a meta tensor"),
    ("layer-z0-half", lambda: _layer()(t(2, 3), t(2, 3, dtype=torch.float16)), TypeError, "z0 must be float32"),
    ("layer-cell-shape", lambda: DEQFixedPoint(lambda z, x: z[:, :1])(t(2, 3)), ValueError, "f must return a tensor of z0's shape"),
    ("layer-backend-triton", lambda: _layer(backend="triton")(t(2, 3)), ValueError, "deq: backend 'triton' runs on CUDA tensors"),
]  # fmt: skip


@pytest.mark.parametrize("fn,exc,match", [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_bad_input(fn, exc, match):
    with pytest.raises(exc, match=match):
        fn()


def test_scalars_of_numpy_types_are_accepted():
    z, info = ops.fixed_point_solve(f_ok, t(2, 3), max_iter=np.int64(5), tol=np.float32(1e-3), m=np.int32(2))
    assert info["abs_trace"].shape == (2, 5)
    x, alpha = ops.anderson_mix(t(2, 3, 4), t(2, 3, 4), np.int64(2), np.float64(1e-3), np.float32(0.5))
    assert alpha.shape == (2, 3)
    assert ops.broyden_matvec(t(2, 3, 4), t(2, 3, 4), t(2, 4), np.int16(3), np.bool_(True)).shape == (2, 4)


def test_empty_sizes_work():
    # Kernels take empty batches and empty states; the solver refuses them (see the table).
    a, r = ops.residual_norms(t(0, 5), t(0, 5))
    assert a.shape == r.shape == (0,)
    a, r = ops.residual_norms(t(3, 0), t(3, 0))
    assert torch.equal(a, torch.zeros(3, **F64)) and torch.equal(r, torch.zeros(3, **F64))
    x, alpha = ops.anderson_mix(t(0, 3, 4), t(0, 3, 4), 2)
    assert x.shape == (0, 4) and alpha.shape == (0, 3)
    x = t(2, 4)
    assert torch.equal(ops.broyden_matvec(t(2, 0, 4), t(2, 0, 4), x, 0), -x)
    assert ops.broyden_matvec(t(0, 3, 4), t(0, 3, 4), t(0, 4), 2).shape == (0, 4)
    u, v = ops.broyden_update(t(2, 3, 0), t(2, 3, 0), t(2, 0), t(2, 0), 2)
    assert u.shape == v.shape == (2, 0)
    # A batch of one sample with one element is the smallest solve.
    z, info = ops.fixed_point_solve(f_ok, t(1, 1), tol=1e-10, max_iter=100)
    assert info["abs_lowest"] < 1e-10 and not info["diverged"].any()


def test_meta_inputs_give_meta_outputs():
    # The kernels read no values: on meta tensors the fakes answer with shapes.
    X, F = t(2, 3, 4, device=META), t(2, 3, 4, device=META)
    U, V, x = X, F, t(2, 4, device=META)
    a, r = ops.residual_norms(x, x)
    assert a.device.type == "meta" and a.shape == (2,)
    xn, alpha = ops.anderson_mix(X, F, 2)
    assert xn.shape == (2, 4) and alpha.shape == (2, 3) and alpha.device.type == "meta"
    assert ops.broyden_matvec(U, V, x, 2).device.type == "meta"
    u, v = ops.broyden_update(U, V, x, x, 2)
    assert u.shape == v.shape == (2, 4) and u.device.type == "meta"
    z = t(2, 3, device=META).requires_grad_(True)
    assert ops.jacobian_regularizer(torch.tanh(z), z).device.type == "meta"


# ---------------------------------------------------------------------------
# NaN in the data: where each docstring says it goes
# ---------------------------------------------------------------------------
def _same_but(a, b, row):
    """a and b are equal except, possibly, in sample ``row``."""
    keep = [i for i in range(a.shape[0]) if i != row]
    return torch.equal(a[keep], b[keep])


@pytest.mark.parametrize("device,backend", backend_cases("residual_norms"))
def test_nan_residual_norms(device, backend):
    fz, z = t(3, 2, 4, device=device), t(3, 2, 4, device=device)
    clean = ops.residual_norms(fz, z, backend=backend)
    for which in (fz, z):
        bad_fz, bad_z = fz.clone(), z.clone()
        (bad_fz if which is fz else bad_z)[1, 0, 2] = NAN
        got = ops.residual_norms(bad_fz, bad_z, backend=backend)
        for g, c, w in zip(got, clean, ref.residual_norms(bad_fz.flatten(1), bad_z.flatten(1))):
            assert g[1].isnan() and _same_but(g, c, 1)
            assert_close(g, w, equal_nan=True)


@pytest.mark.parametrize("device,backend", backend_cases("anderson_mix"))
@pytest.mark.parametrize("lam", [1e-3, 0.0])
def test_nan_anderson_mix(device, backend, lam):
    X, F = t(3, 5, 7, device=device), t(3, 5, 7, device=device)
    n = 3
    clean = ops.anderson_mix(X, F, n, lam, 0.8, backend=backend)
    bad = X.clone()
    bad[1, 1, 3] = NAN  # a slot in use
    x, alpha = ops.anderson_mix(bad, F, n, lam, 0.8, backend=backend)
    assert x[1].isnan().all() and alpha[1, :n].isnan().all() and (alpha[:, n:] == 0).all()
    assert _same_but(x, clean[0], 1) and _same_but(alpha, clean[1], 1)
    want = ref.anderson_mix(bad, F, n, lam, 0.8)
    assert_close(x, want[0], equal_nan=True)
    assert_close(alpha, want[1], equal_nan=True)
    # A slot past n is never read.
    unused = F.clone()
    unused[1, 4] = NAN
    got = ops.anderson_mix(X, unused, n, lam, 0.8, backend=backend)
    assert torch.equal(got[0], clean[0]) and torch.equal(got[1], clean[1])


@pytest.mark.parametrize("device,backend", backend_cases("broyden_matvec"))
@pytest.mark.parametrize("transpose", [False, True])
def test_nan_broyden_matvec(device, backend, transpose):
    U, V, x = t(3, 4, 6, device=device), t(3, 4, 6, device=device), t(3, 6, device=device)
    n = 2
    clean = ops.broyden_matvec(U, V, x, n, transpose, backend=backend)
    for name in ("U", "V", "x"):
        args = {"U": U.clone(), "V": V.clone(), "x": x.clone()}
        if name == "x":
            args["x"][1, 4] = NAN
        else:
            args[name][1, 1, 4] = NAN  # a term in use
        y = ops.broyden_matvec(args["U"], args["V"], args["x"], n, transpose, backend=backend)
        assert y[1].isnan().any() and _same_but(y, clean, 1)
        assert_close(y, ref.broyden_matvec(args["U"], args["V"], args["x"], n, transpose), equal_nan=True)
    # n = 0 is -x: NaN exactly where x has it.  Terms past n are never read.
    bad_x = x.clone()
    bad_x[1, 4] = NAN
    y0 = ops.broyden_matvec(U, V, bad_x, 0, transpose, backend=backend)
    assert torch.equal(y0.isnan(), bad_x.isnan())
    unused = U.clone()
    unused[1, n:] = NAN
    assert torch.equal(ops.broyden_matvec(unused, V, x, n, transpose, backend=backend), clean)


@pytest.mark.parametrize("device,backend", backend_cases("broyden_update"))
def test_nan_broyden_update_gives_a_zero_term(device, backend):
    U, V = 0.3 * t(3, 4, 6, device=device), 0.3 * t(3, 4, 6, device=device)
    dx, dg = t(3, 6, device=device), t(3, 6, device=device)
    n = 2
    clean = ops.broyden_update(U, V, dx, dg, n, backend=backend)
    for name in ("U", "V", "dx", "dg"):
        args = {"U": U.clone(), "V": V.clone(), "dx": dx.clone(), "dg": dg.clone()}
        if args[name].dim() == 3:
            args[name][1, 0, 2] = NAN
        else:
            args[name][1, 2] = NAN
        u, v = ops.broyden_update(*args.values(), n, backend=backend)
        assert torch.isfinite(u).all() and torch.isfinite(v).all()
        assert (u[1] == 0).any() or (v[1] == 0).any()
        assert _same_but(u, clean[0], 1) and _same_but(v, clean[1], 1)
        want = ref.broyden_update(*args.values(), n)
        assert torch.equal(u, want[0]) and torch.equal(v, want[1])


@pytest.mark.parametrize("solver", ["anderson", "broyden", "picard"])
def test_nan_fixed_point_solve_flags_the_sample(solver):
    W = 0.5 * torch.linalg.qr(t(6, 6))[0]
    c = t(3, 6)
    f = lambda z: torch.tanh(z @ W.T + c)
    z0 = t(3, 6)
    clean_z, clean = ops.fixed_point_solve(f, z0, solver=solver, tol=1e-9)
    c[2, 0] = NAN
    with pytest.warns(RuntimeWarning, match=r"fixed_point_solve: 1 of 3 samples diverged") as rec:
        z, info = ops.fixed_point_solve(f, z0, solver=solver, tol=1e-9)
    assert len(rec) == 1
    assert info["diverged"].dtype == torch.bool and info["diverged"].tolist() == [False, False, True]
    assert torch.equal(z[2], z0[2]) and int(info["nstep"][2]) == 0  # no finite step: z0
    assert_close(z[:2], clean_z[:2])
    assert torch.equal(info["nstep"][:2], clean["nstep"][:2])
    # A clean solve warns about nothing.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.fixed_point_solve(lambda z: torch.tanh(z @ W.T), z0, solver=solver)


@pytest.mark.parametrize("backward", ["implicit", "phantom"])
def test_nan_deq_gradients(backward):
    D = 6
    W = (0.5 * torch.linalg.qr(t(D, D))[0]).requires_grad_(True)
    x = t(3, D)
    x[1, 2] = NAN
    x.requires_grad_(True)
    layer = DEQFixedPoint(lambda z, x: torch.tanh(z @ W.T + x), backward=backward, tol=1e-9)
    with pytest.warns(RuntimeWarning, match="1 of 3 samples diverged"):
        z, info = layer(x)
        gW, gx = torch.autograd.grad(z.sum(), [W, x])
    assert info["diverged"].tolist() == [False, True, False]
    # implicit: the output is the estimate (z0 = 0 here); phantom: one step of f from it, NaN where f is.
    assert torch.isfinite(z[[0, 2]]).all()
    assert torch.isfinite(z[1]).all() if backward == "implicit" else z[1].isnan().any()
    assert gx[1].isnan().any() and torch.isfinite(gx[[0, 2]]).all() and gW.isnan().any()


def test_nan_jacobian_regularizer():
    z = t(2, 3).requires_grad_(True)
    fz = torch.tanh(z)
    probes = t(1, 2, 3)
    probes[0, 1, 1] = NAN
    assert ops.jacobian_regularizer(fz, z, probes=probes).isnan()
    assert ops.jacobian_regularizer(fz * NAN, z).isnan()
    assert torch.isfinite(ops.jacobian_regularizer(fz, z))
