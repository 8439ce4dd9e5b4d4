"""The registered kernel ops: math, explicit backward formulas, opcheck, gradcheck, torch.compile."""

import pytest
import torch

from frontiers_fast import _backend
from frontiers_fast.nn.deq import DEQFixedPoint
from frontiers_fast.ops import deq as ops
from frontiers_fast.reference import deq as ref

from ..helpers import assert_close, check_compiled, first_cpu_backend, opcheck, spy_backends, triton_devices
from .cells import contraction

tops = torch.ops.frontiers_fast
F64 = dict(dtype=torch.float64)
# Each op runs the default CPU backend of the public function it belongs to.
BK = {
    "residual_norms": first_cpu_backend("residual_norms"),
    "anderson_mix": first_cpu_backend("anderson_mix"),
    "broyden_matvec": first_cpu_backend("broyden_matvec"),
    "broyden_update": first_cpu_backend("broyden_update"),
    "squared_norm": first_cpu_backend("jacobian_regularizer"),
}


def _buffers(B=3, m=5, D=7, L=6):
    X, F = torch.randn(B, m, D, **F64), torch.randn(B, m, D, **F64)
    U, V = 0.3 * torch.randn(B, L, D, **F64), 0.3 * torch.randn(B, L, D, **F64)
    return X, F, U, V


# --------------------------------------------------------------------------- math
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_residual_norms(dtype):
    fz, z = torch.randn(4, 3, 5, dtype=dtype), torch.randn(4, 3, 5, dtype=dtype)
    a, r = ops.residual_norms(fz, z)
    want = (fz - z).double().flatten(1).pow(2).sum(1).sqrt()
    assert_close(a, want, dtype)
    assert_close(r, want / (fz.double().flatten(1).pow(2).sum(1).sqrt() + 1e-9), dtype)


@pytest.mark.parametrize("n", [1, 3, 5])
def test_anderson_weights_solve_the_constrained_least_squares(n):
    X, F, _, _ = _buffers()
    lam, tau = 1e-3, 0.8
    x, alpha = ops.anderson_mix(X, F, n, lam, tau)
    assert (alpha[:, n:] == 0).all()
    # Closed form of min ||alpha G||^2 + lam ||alpha||^2 s.t. sum(alpha) = 1: A^-1 1 / (1^T A^-1 1).
    G = F[:, :n] - X[:, :n]
    A = G @ G.transpose(1, 2) + lam * torch.eye(n, **F64)
    w = torch.linalg.solve(A, torch.ones(3, n, 1, **F64))[:, :, 0]
    want = w / w.sum(1, keepdim=True)
    assert_close(alpha[:, :n], want)
    assert_close(x, torch.einsum("bn,bnd->bd", want, tau * F[:, :n] + (1 - tau) * X[:, :n]))


@pytest.mark.parametrize("n", [0, 2, 6])
def test_broyden_matvec_is_the_dense_product(n):
    _, _, U, V = _buffers()
    x = torch.randn(3, 7, **F64)
    J = -torch.eye(7, **F64) + U[:, :n].transpose(1, 2) @ V[:, :n]  # [B, D, D]
    assert_close(ops.broyden_matvec(U, V, x, n), (J @ x.unsqueeze(2))[:, :, 0])
    assert_close(ops.broyden_matvec(U, V, x, n, True), (J.transpose(1, 2) @ x.unsqueeze(2))[:, :, 0])


@pytest.mark.parametrize("n", [0, 3])
def test_broyden_update_satisfies_the_secant_condition(n):
    _, _, U, V = _buffers()
    dx, dg = torch.randn(3, 7, **F64), torch.randn(3, 7, **F64)
    u, v = ops.broyden_update(U, V, dx, dg, n)
    U2, V2 = U.clone(), V.clone()
    U2[:, n], V2[:, n] = u, v
    # The updated inverse Jacobian maps the change of residual to the step: Jinv' dg = dx.
    assert_close(ops.broyden_matvec(U2, V2, dg, n + 1), dx)
    # A zero denominator (dg = 0) makes the term a no-op instead of NaN.
    u0, v0 = ops.broyden_update(U, V, dx, torch.zeros_like(dg), n)
    assert torch.isfinite(u0).all() and (u0 == 0).all()


# --------------------------------------------------------------------------- backward formulas
def _compare_grads(op_fn, ref_fn, inputs, n_out):
    inputs = [t.clone().requires_grad_(True) for t in inputs]
    outs = op_fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    seeds = [torch.randn_like(o) for o in outs]
    got = torch.autograd.grad(outs, inputs, seeds)
    wouts = ref_fn(*inputs)
    wouts = wouts if isinstance(wouts, tuple) else (wouts,)
    want = torch.autograd.grad(wouts, inputs, seeds)
    for a, b in zip(got, want):
        assert_close(a, b)


@pytest.mark.parametrize("n", [1, 4, 5])
def test_backward_formulas_match_autograd_of_reference(n):
    X, F, U, V = _buffers()
    x, dx, dg = (torch.randn(3, 7, **F64) for _ in range(3))
    _compare_grads(lambda a, b: ops.residual_norms(a, b), ref.residual_norms, [X[:, 0], F[:, 0]], 2)
    _compare_grads(lambda a, b: ops.anderson_mix(a, b, n, 1e-3, 0.7), lambda a, b: ref.anderson_mix(a, b, n, 1e-3, 0.7),
                   [X, F], 2)  # fmt: skip
    for t in (False, True):
        _compare_grads(
            lambda *a: ops.broyden_matvec(*a, n, t), lambda *a: ref.broyden_matvec(*a, n, t), [U, V, x], 1
        )
    _compare_grads(
        lambda *a: ops.broyden_update(*a, n), lambda *a: ref.broyden_update(*a, n), [U, V, dx, dg], 2
    )
    _compare_grads(lambda a: tops.squared_norm(a, BK["squared_norm"]), ref.squared_norm, [X], 1)


@pytest.mark.gradcheck
def test_gradcheck_ops():
    X, F, U, V = _buffers(B=2, m=4, D=5, L=4)
    x, dx, dg = (torch.randn(2, 5, **F64) for _ in range(3))
    req = lambda *ts: tuple(t.clone().requires_grad_(True) for t in ts)
    assert torch.autograd.gradcheck(lambda a, b: ops.residual_norms(a, b), req(X[:, 0], F[:, 0]))
    assert torch.autograd.gradcheck(lambda a, b: ops.anderson_mix(a, b, 3, 1e-2, 0.9), req(X, F))
    assert torch.autograd.gradcheck(lambda a, b: ops.anderson_mix(a, b, 4, 0.0, 1.0), req(X, F))
    assert torch.autograd.gradcheck(lambda *a: ops.broyden_matvec(*a, 3), req(U, V, x))
    assert torch.autograd.gradcheck(lambda *a: ops.broyden_matvec(*a, 2, True), req(U, V, x))
    assert torch.autograd.gradcheck(lambda *a: ops.broyden_update(*a, 3), req(U, V, dx, dg))


def test_reference_gradcheck():
    X, F, _, _ = _buffers(B=2, m=3, D=4)
    assert torch.autograd.gradcheck(
        lambda a, b: ref.anderson_mix(a, b, 3, 1e-2, 0.5), (X.requires_grad_(), F.requires_grad_())
    )


# --------------------------------------------------------------------------- registration
def test_opcheck_public_ops():
    X, F, U, V = _buffers()
    x, dx, dg = (torch.randn(3, 7, **F64) for _ in range(3))
    rg = lambda t: t.clone().requires_grad_(True)
    opcheck(tops.residual_norms, (rg(X[:, 0]), rg(F[:, 0]), BK["residual_norms"]))
    opcheck(tops.anderson_mix, (rg(X), rg(F), 4, 1e-3, 0.8, BK["anderson_mix"]))
    opcheck(tops.broyden_matvec, (rg(U), rg(V), rg(x), 4, False, BK["broyden_matvec"]))
    opcheck(tops.broyden_matvec, (rg(U), rg(V), rg(x), 0, True, BK["broyden_matvec"]))
    opcheck(tops.broyden_update, (rg(U), rg(V), rg(dx), rg(dg), 3, BK["broyden_update"]))
    opcheck(tops.squared_norm, (rg(X), BK["squared_norm"]))


def test_opcheck_bwd_ops():
    X, F, U, V = _buffers()
    x, dx, dg, g1, g2 = (torch.randn(3, 7, **F64) for _ in range(5))
    b = torch.randn(3, **F64)
    opcheck(tops.residual_norms_bwd, (X[:, 0], F[:, 0], b, b.clone(), BK["residual_norms"]), full=False)
    _, alpha = tops.anderson_mix(X, F, 4, 1e-3, 0.8, BK["anderson_mix"])
    opcheck(
        tops.anderson_mix_bwd,
        (X, F, 4, 1e-3, 0.8, alpha, g1, torch.randn_like(alpha), BK["anderson_mix"]),
        full=False,
    )
    opcheck(tops.broyden_matvec_bwd, (U, V, x, 4, True, g1, BK["broyden_matvec"]), full=False)
    opcheck(tops.broyden_update_bwd, (U, V, dx, dg, 3, g1, g2, BK["broyden_update"]), full=False)


def test_compile_fullgraph():
    X, F, U, V = _buffers()
    X.requires_grad_(True)
    x = torch.randn(3, 7, **F64)

    def step(X, F, U, V, x):
        mixed, alpha = ops.anderson_mix(X, F, 4, 1e-3, 0.9)
        y = ops.broyden_matvec(U, V, mixed, 3)
        u, v = ops.broyden_update(U, V, y, mixed, 2)
        a, r = ops.residual_norms(y + u + v, x)
        return a.sum() + r.sum() + alpha.pow(2).sum()

    check_compiled(step, [X, F, U, V, x])


def test_compile_squared_norm():
    # jacobian_regularizer calls autograd.grad, which fullgraph cannot trace; its kernel op compiles.
    x = torch.randn(4, 6, **F64, requires_grad=True)
    check_compiled(lambda x: tops.squared_norm(x, BK["squared_norm"]), [x])


def _deq_call(backend):
    f, _ = contraction(2, 4, requires_grad=True)
    return ops.deq(f, torch.zeros(2, 4, **F64), tol=1e-8, backend=backend)


def _public_calls():
    X, F, U, V = _buffers(B=2, m=3, D=4, L=3)
    x = torch.randn(2, 4, **F64)
    z = torch.randn(2, 4, **F64, requires_grad=True)
    fz = torch.tanh(z)
    return {
        "residual_norms": lambda b: ops.residual_norms(x, x, backend=b),
        "anderson_mix": lambda b: ops.anderson_mix(X, F, 2, backend=b),
        "broyden_matvec": lambda b: ops.broyden_matvec(U, V, x, 2, backend=b),
        "broyden_update": lambda b: ops.broyden_update(U, V, x, x, 2, backend=b),
        "fixed_point_solve": lambda b: ops.fixed_point_solve(lambda t: torch.tanh(t), x, backend=b),
        "deq": _deq_call,
        "jacobian_regularizer": lambda b: ops.jacobian_regularizer(fz, z, backend=b),
    }


@pytest.mark.parametrize("name", list(_public_calls()))
def test_backend_choice(name):
    call = _public_calls()[name]
    assert name in _backend.FUNCTIONS
    call("reference")
    if "cpp" in _backend.FUNCTIONS[name].implemented(grad=False):
        call("cpp")  # the norms and the solver loop have C++ kernels
    else:
        with pytest.raises(
            NotImplementedError, match=rf"frontiers_fast\.{name}: backend 'cpp' is not implemented"
        ):
            call("cpp")
    with pytest.raises(ValueError, match="backend must be one of"):
        call("gpu")


def test_layer_backend_choice():
    f, _ = contraction(2, 4, requires_grad=True)
    x = torch.zeros(2, 4, **F64)
    want = DEQFixedPoint(lambda z, x: f(z), backend="reference")(x)[0]
    assert_close(DEQFixedPoint(lambda z, x: f(z), backend="cpp")(x)[0], want)
    with pytest.raises(ValueError, match="'triton' runs on CUDA tensors"):
        DEQFixedPoint(lambda z, x: f(z), backend="triton")(x)


@pytest.mark.parametrize("backward", ["implicit", "phantom"])
def test_solves_run_the_resolved_backend(backward):
    # The forward solve and the implicit backward's adjoint solve both go through the registered
    # ops with the backend the call resolved (the loop's fused step and its bookkeeping).
    f, (W, *_) = contraction(3, 6, requires_grad=True)
    z0 = torch.zeros(3, 6, **F64)
    b = _backend.resolve(None, z0.device, "deq", True)
    with spy_backends() as calls:
        z, _ = ops.deq(f, z0, tol=1e-8, backward=backward)
        fwd = dict(calls)
        torch.autograd.grad(z.sum(), W)
        bwd = {k: v - fwd.get(k, 0) for k, v in calls.items()}
    assert fwd[("anderson_step", b)] > 0 and fwd[("solver_record", b)] > 0
    assert {used for _, used in calls} == {b}
    if backward == "implicit":
        assert bwd[("anderson_step", b)] > 0 and bwd[("solver_record", b)] > 0
    else:
        assert not any(bwd.values())


def _loop_state(B=3, m=4, D=9, L=5, T=6):
    g = torch.Generator().manual_seed(4)
    r = lambda *s: torch.randn(*s, generator=g, **F64)
    X, F = r(B, m, D), r(B, m, D)
    R = F - X
    GG = R @ R.transpose(1, 2)  # the Gram matrix of the stored residuals, as the loop keeps it
    U, V = 0.2 * r(B, L, D), 0.2 * r(B, L, D)
    x, fx = r(B, D), r(B, D)
    best = r(B, D)
    lowest = torch.full((2, B), 10.0, **F64)
    blown = torch.full((2, B), torch.inf, **F64)
    nstep = torch.zeros(B, dtype=torch.int64)
    trace = torch.zeros(2, B, T, **F64)
    active = torch.tensor([True, False, True])
    diverged = torch.zeros(B, dtype=torch.bool)
    return [X, F, GG, U, V, x, fx, best, lowest, blown, nstep, trace, active, diverged]


@pytest.mark.parametrize("backend", ops._backend.FUNCTIONS["fixed_point_solve"].implemented(False))
def test_compile_loop_ops(backend, monkeypatch):
    # One step of each solver-loop op (in-place buffers included) under torch.compile(fullgraph=True):
    # the same outputs and the same buffer contents as eager, bit for bit.
    if backend == "triton":
        if "cpu" not in triton_devices():
            pytest.skip("Triton runs on CPU tensors only under the interpreter")
        monkeypatch.setitem(_backend._DEVICE, "triton", "cpu")
    elif not ops._backend.FUNCTIONS["fixed_point_solve"].available(backend, False)[0]:
        pytest.skip(f"{backend} is not available here")

    def step(X, F, GG, U, V, x, fx, best, lowest, blown, nstep, trace, active, diverged):
        x1, a, r = tops.anderson_step(X, F, GG, x, fx, 3, 1e-4, 1.0, backend)
        tops.solver_record(
            best, lowest, blown, nstep, trace, active, diverged, fx, a, r, 2, 1e-6, 0, x1, backend
        )
        g, dx, dg, a2, r2 = tops.broyden_residual(fx, x1, x, fx - x, active, backend)
        xn = tops.broyden_step(U, V, dx, dg, g, x1, active, 2, 2, 3, backend)
        a3, r3 = tops.residual_norms(xn, x1, backend)
        return x1, xn, a, r, a2, r2, a3, r3

    eager_in, compiled_in = _loop_state(), _loop_state()
    torch._dynamo.reset()
    want = step(*eager_in)
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(*compiled_in)
    for a, b in zip((*got, *compiled_in), (*want, *eager_in)):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    assert not bool(eager_in[12][1])  # the stopped sample stays stopped, and its hold row is its best
    torch.testing.assert_close(want[0][1], eager_in[7][1], rtol=0, atol=0)
