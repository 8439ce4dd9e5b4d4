"""Fixed-point (deep equilibrium) ops: registration, autograd and the DEQ layer.

A Python callable ``f`` cannot be an argument of a ``torch.library`` op, so
the solver loop stays in Python (:func:`frontiers_fast.reference.deq.solve_loop`)
and what is registered under ``frontiers_fast::`` are its tensor kernels,
the pieces a GPU kernel will fuse.  Each has a fake kernel and registered
autograd whose backward is itself a registered ``*_bwd`` op (explicit
formulas: an op's implementation runs below the autograd dispatch key, so it
cannot call autograd itself).  Only the reference backend exists today.

  residual_norms(fz, z) -> (abs, rel)
  residual_norms_bwd(fz, z, grad_abs, grad_rel) -> (grad_fz, grad_z)
  anderson_mix(X, F, n, lam, tau) -> (x_next, alpha)
  anderson_mix_bwd(X, F, n, lam, tau, alpha, grad_x, grad_alpha) -> (grad_X, grad_F)
  broyden_matvec(U, V, x, n, transpose) -> y
  broyden_matvec_bwd(U, V, x, n, transpose, grad_y) -> (grad_U, grad_V, grad_x)
  broyden_update(U, V, dx, dg, n) -> (u, v)
  broyden_update_bwd(U, V, dx, dg, n, grad_u, grad_v) -> (grad_U, grad_V, grad_dx, grad_dg)

Shapes: z, fz, x, dx, dg [B, D]; X, F [B, m, D]; U, V [B, L, D]; abs, rel [B];
alpha [B, m].  See :mod:`frontiers_fast.reference.deq` for the math.

Public functions: the four kernels (validated wrappers), :func:`fixed_point_solve`,
:func:`deq` (the layer: implicit or phantom-gradient backward) and
:func:`jacobian_regularizer`.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import Tensor

from .. import _backend
from .._checks import (
    check_bool,
    check_choice,
    check_dims,
    check_int,
    check_real,
    check_same_device,
    check_same_dtype,
    check_tensor,
)
from ..reference import deq as ref

NS = "frontiers_fast"
_lib = torch.library.Library(NS, "FRAGMENT")
_ops = torch.ops.frontiers_fast

SOLVERS = ref.SOLVERS
STOP_MODES = ref.STOP_MODES
BACKWARDS = ("implicit", "phantom")
_IMPLEMENTED = ("reference",)

_BWD_SCHEMAS = {
    "residual_norms_bwd": "residual_norms_bwd(Tensor fz, Tensor z, Tensor grad_abs, Tensor grad_rel) -> (Tensor, Tensor)",
    "anderson_mix_bwd": (
        "anderson_mix_bwd(Tensor X, Tensor F, int n, float lam, float tau, Tensor alpha, Tensor grad_x, "
        "Tensor grad_alpha) -> (Tensor, Tensor)"
    ),
    "broyden_matvec_bwd": (
        "broyden_matvec_bwd(Tensor U, Tensor V, Tensor x, int n, bool transpose, Tensor grad_y) "
        "-> (Tensor, Tensor, Tensor)"
    ),
    "broyden_update_bwd": (
        "broyden_update_bwd(Tensor U, Tensor V, Tensor dx, Tensor dg, int n, Tensor grad_u, Tensor grad_v) "
        "-> (Tensor, Tensor, Tensor, Tensor)"
    ),
}
for _schema in _BWD_SCHEMAS.values():
    _lib.define(_schema)


# ---------------------------------------------------------------------------
# backward formulas (reference implementations of the *_bwd ops)
# ---------------------------------------------------------------------------
def _ref_residual_norms_bwd(fz, z, grad_abs, grad_rel):
    r = fz - z
    a = torch.linalg.vector_norm(r, dim=1, keepdim=True)
    s = torch.linalg.vector_norm(fz, dim=1, keepdim=True)
    den = s + ref.REL_EPS
    g_a = grad_abs.unsqueeze(1) + grad_rel.unsqueeze(1) / den
    g_s = -grad_rel.unsqueeze(1) * a / den**2
    # d||r|| / dr = r / ||r||, taken as 0 at r = 0 (the subgradient torch uses).
    unit_r = torch.where(a > 0, r / torch.where(a > 0, a, 1.0), 0.0)
    unit_f = torch.where(s > 0, fz / torch.where(s > 0, s, 1.0), 0.0)
    gr = g_a * unit_r
    return gr + g_s * unit_f, -gr


def _ref_anderson_mix_bwd(X, F, n, lam, tau, alpha, grad_x, grad_alpha):
    B, m, D = X.shape
    Xn, Fn = X[:, :n], F[:, :n]
    G = Fn - Xn
    an = alpha[:, :n]
    P = tau * Fn + (1 - tau) * Xn
    # x = alpha P: gradient to the weights and to the stored rows.
    g_alpha = grad_alpha[:, :n] + torch.bmm(P, grad_x.unsqueeze(2))[:, :, 0]
    g_P = an.unsqueeze(2) * grad_x.unsqueeze(1)
    # s = H^-1 e0 with symmetric H: g_H = -(H^-1 g_s) s^T; only the G G^T block depends on the inputs.
    A = torch.bmm(G, G.transpose(1, 2)) + lam * torch.eye(n, dtype=X.dtype, device=X.device)
    ones = X.new_ones((B, 1, n))
    H = torch.cat([torch.cat([X.new_zeros((B, 1, 1)), ones], 2), torch.cat([ones.transpose(1, 2), A], 2)], 1)
    g_s = torch.nn.functional.pad(g_alpha, (1, 0))
    w = torch.linalg.solve_ex(H, g_s.unsqueeze(2))[0][:, :, 0]
    g_A = -w[:, 1:].unsqueeze(2) * an.unsqueeze(1)
    g_G = torch.bmm(g_A + g_A.transpose(1, 2), G)
    gX = X.new_zeros((B, m, D))
    gF = X.new_zeros((B, m, D))
    gX[:, :n] = (1 - tau) * g_P - g_G
    gF[:, :n] = tau * g_P + g_G
    return gX, gF


def _ref_broyden_matvec_bwd(U, V, x, n, transpose, grad_y):
    gU, gV = torch.zeros_like(U), torch.zeros_like(V)
    if n == 0:
        return gU, gV, -grad_y
    # y = -x + A^T (B x) with (A, B) = (U_n, V_n), swapped for the transpose.
    A, Bm = (V[:, :n], U[:, :n]) if transpose else (U[:, :n], V[:, :n])
    coef = torch.bmm(Bm, x.unsqueeze(2))[:, :, 0]  # [B, n]
    Ag = torch.bmm(A, grad_y.unsqueeze(2))[:, :, 0]  # [B, n]
    gA = coef.unsqueeze(2) * grad_y.unsqueeze(1)
    gB = Ag.unsqueeze(2) * x.unsqueeze(1)
    gx = -grad_y + torch.bmm(Bm.transpose(1, 2), Ag.unsqueeze(2))[:, :, 0]
    if transpose:
        gV[:, :n], gU[:, :n] = gA, gB
    else:
        gU[:, :n], gV[:, :n] = gA, gB
    return gU, gV, gx


def _ref_broyden_update_bwd(U, V, dx, dg, n, grad_u, grad_v):
    v = ref.broyden_matvec(U, V, dx, n, True)
    w = ref.broyden_matvec(U, V, dg, n, False)
    den = (v * dg).sum(1, keepdim=True)
    num = dx - w
    u = num / den
    ok_u = torch.isfinite(u).all(1, keepdim=True)
    gu = torch.where(ok_u, grad_u, 0.0)
    gv = torch.where(torch.isfinite(v), grad_v, 0.0)
    safe_den = torch.where(ok_u, den, 1.0)
    g_num = gu / safe_den
    g_den = -torch.where(ok_u, (gu * u).sum(1, keepdim=True) / safe_den, 0.0)
    gv = gv + g_den * dg
    g_dg = g_den * v
    g_dx = g_num
    # num = dx - Jinv dg
    gU1, gV1, gdg1 = _ref_broyden_matvec_bwd(U, V, dg, n, False, -g_num)
    # v = Jinv^T dx
    gU2, gV2, gdx2 = _ref_broyden_matvec_bwd(U, V, dx, n, True, gv)
    return gU1 + gU2, gV1 + gV2, g_dx + gdx2, g_dg + gdg1


_BWD_REF = {
    "residual_norms_bwd": _ref_residual_norms_bwd,
    "anderson_mix_bwd": _ref_anderson_mix_bwd,
    "broyden_matvec_bwd": _ref_broyden_matvec_bwd,
    "broyden_update_bwd": _ref_broyden_update_bwd,
}
for _name, _fn in _BWD_REF.items():
    # No device key: the reference serves every device until kernels exist.
    torch.library.impl(f"{NS}::{_name}", "CompositeExplicitAutograd", lib=_lib)(_fn)

torch.library.register_fake(
    f"{NS}::residual_norms_bwd", lambda fz, z, ga, gr: (torch.empty_like(fz), torch.empty_like(z)), lib=_lib
)
torch.library.register_fake(
    f"{NS}::anderson_mix_bwd",
    lambda X, F, n, lam, tau, alpha, gx, ga: (torch.empty_like(X), torch.empty_like(F)),
    lib=_lib,
)
torch.library.register_fake(
    f"{NS}::broyden_matvec_bwd",
    lambda U, V, x, n, t, g: (torch.empty_like(U), torch.empty_like(V), torch.empty_like(x)),
    lib=_lib,
)
torch.library.register_fake(
    f"{NS}::broyden_update_bwd",
    lambda U, V, dx, dg, n, gu, gv: (
        torch.empty_like(U),
        torch.empty_like(V),
        torch.empty_like(dx),
        torch.empty_like(dg),
    ),
    lib=_lib,
)


# ---------------------------------------------------------------------------
# forward ops with autograd
# ---------------------------------------------------------------------------
@torch.library.custom_op(f"{NS}::residual_norms", mutates_args=(), device_types=None)
def _residual_norms_op(fz: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
    return ref.residual_norms(fz, z)


@_residual_norms_op.register_fake
def _(fz, z):
    torch._check(fz.dim() == 2 and z.shape == fz.shape, lambda: "fz and z must both be [B, D]")
    B = fz.shape[0]
    return fz.new_empty((B,)), fz.new_empty((B,))


def _residual_norms_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _residual_norms_backward(ctx, g_abs, g_rel):
    fz, z = ctx.saved_tensors
    g_abs = torch.zeros_like(fz[:, 0]) if g_abs is None else g_abs
    g_rel = torch.zeros_like(fz[:, 0]) if g_rel is None else g_rel
    return _ops.residual_norms_bwd(fz, z, g_abs.contiguous(), g_rel.contiguous())


_residual_norms_op.register_autograd(_residual_norms_backward, setup_context=_residual_norms_setup)


@torch.library.custom_op(f"{NS}::anderson_mix", mutates_args=(), device_types=None)
def _anderson_mix_op(X: Tensor, F: Tensor, n: int, lam: float, tau: float) -> tuple[Tensor, Tensor]:
    return ref.anderson_mix(X, F, n, lam, tau)


@_anderson_mix_op.register_fake
def _(X, F, n, lam, tau):
    torch._check(X.dim() == 3 and F.shape == X.shape, lambda: "X and F must both be [B, m, D]")
    torch._check(1 <= n <= X.shape[1], lambda: "n must be in [1, m]")
    return X.new_empty((X.shape[0], X.shape[2])), X.new_empty((X.shape[0], X.shape[1]))


def _anderson_mix_setup(ctx, inputs, output):
    X, F, n, lam, tau = inputs
    ctx.n, ctx.lam, ctx.tau = n, lam, tau
    ctx.save_for_backward(X, F, output[1])


def _anderson_mix_backward(ctx, g_x, g_alpha):
    X, F, alpha = ctx.saved_tensors
    g_x = torch.zeros_like(X[:, 0]) if g_x is None else g_x
    g_alpha = torch.zeros_like(alpha) if g_alpha is None else g_alpha
    gX, gF = _ops.anderson_mix_bwd(
        X, F, ctx.n, ctx.lam, ctx.tau, alpha, g_x.contiguous(), g_alpha.contiguous()
    )
    return gX, gF, None, None, None


_anderson_mix_op.register_autograd(_anderson_mix_backward, setup_context=_anderson_mix_setup)


@torch.library.custom_op(f"{NS}::broyden_matvec", mutates_args=(), device_types=None)
def _broyden_matvec_op(U: Tensor, V: Tensor, x: Tensor, n: int, transpose: bool) -> Tensor:
    return ref.broyden_matvec(U, V, x, n, transpose)


@_broyden_matvec_op.register_fake
def _(U, V, x, n, transpose):
    torch._check(U.dim() == 3 and V.shape == U.shape, lambda: "U and V must both be [B, L, D]")
    torch._check(0 <= n <= U.shape[1], lambda: "n must be in [0, L]")
    return torch.empty_like(x)


def _broyden_matvec_setup(ctx, inputs, output):
    U, V, x, n, transpose = inputs
    ctx.n, ctx.transpose = n, transpose
    ctx.save_for_backward(U, V, x)


def _broyden_matvec_backward(ctx, g):
    U, V, x = ctx.saved_tensors
    gU, gV, gx = _ops.broyden_matvec_bwd(U, V, x, ctx.n, ctx.transpose, g.contiguous())
    return gU, gV, gx, None, None


_broyden_matvec_op.register_autograd(_broyden_matvec_backward, setup_context=_broyden_matvec_setup)


@torch.library.custom_op(f"{NS}::broyden_update", mutates_args=(), device_types=None)
def _broyden_update_op(U: Tensor, V: Tensor, dx: Tensor, dg: Tensor, n: int) -> tuple[Tensor, Tensor]:
    return ref.broyden_update(U, V, dx, dg, n)


@_broyden_update_op.register_fake
def _(U, V, dx, dg, n):
    torch._check(U.dim() == 3 and V.shape == U.shape, lambda: "U and V must both be [B, L, D]")
    torch._check(0 <= n <= U.shape[1], lambda: "n must be in [0, L]")
    return torch.empty_like(dx), torch.empty_like(dx)


def _broyden_update_setup(ctx, inputs, output):
    U, V, dx, dg, n = inputs
    ctx.n = n
    ctx.save_for_backward(U, V, dx, dg)


def _broyden_update_backward(ctx, g_u, g_v):
    U, V, dx, dg = ctx.saved_tensors
    g_u = torch.zeros_like(dx) if g_u is None else g_u
    g_v = torch.zeros_like(dx) if g_v is None else g_v
    gU, gV, gdx, gdg = _ops.broyden_update_bwd(U, V, dx, dg, ctx.n, g_u.contiguous(), g_v.contiguous())
    return gU, gV, gdx, gdg, None


_broyden_update_op.register_autograd(_broyden_update_backward, setup_context=_broyden_update_setup)

# The solver loop calls the registered ops directly (arguments checked once, up front).
_OP_KERNELS = SimpleNamespace(
    residual_norms=_ops.residual_norms,
    anderson_mix=_ops.anderson_mix,
    broyden_matvec=_ops.broyden_matvec,
    broyden_update=_ops.broyden_update,
)


# ---------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------
_FLOATS = (torch.float32, torch.float64)


def _check_float_tensor(name, t, like=None, dims=None):
    """``like``: the (name, tensor) whose dtype and device ``t`` must share."""
    check_tensor(name, t, _FLOATS, "float32 or float64")
    if dims is not None:
        check_dims(name, t, dims)
    if like is not None:
        check_same_dtype(name, t, like[0], like[1].dtype)
        check_same_device(name, t, like[0], like[1].device)


def _solver_options(prefix, solver, max_iter, tol, stop_mode, m, lam, tau):
    return dict(
        solver=check_choice(f"{prefix}solver", solver, SOLVERS),
        max_iter=check_int(f"{prefix}max_iter", max_iter, 1),
        tol=check_real(f"{prefix}tol", tol, 0.0),
        stop_mode=check_choice(f"{prefix}stop_mode", stop_mode, STOP_MODES),
        m=check_int(f"{prefix}m", m, 1),
        lam=check_real(f"{prefix}lam", lam, 0.0),
        tau=check_real(f"{prefix}tau", tau, 0.0, strict=True),
    )


def _check_z0(z0):
    _check_float_tensor("z0", z0)
    if z0.dim() < 1 or z0.numel() == 0:
        raise ValueError(f"z0 must be a non-empty [B, ...] tensor, got shape {tuple(z0.shape)}")


def _check_f(f):
    if not callable(f):
        raise TypeError(f"f must be callable, got {type(f).__name__}")


def _resolve(backend, device, op):
    return _backend.resolve(backend, device, op, implemented=_IMPLEMENTED)


# ---------------------------------------------------------------------------
# public kernel wrappers
# ---------------------------------------------------------------------------
def residual_norms(fz: Tensor, z: Tensor, *, backend=None) -> tuple[Tensor, Tensor]:
    """Per-sample residuals ``abs = ||fz - z||`` and ``rel = abs / (||fz|| + 1e-9)``.

    Args:
        fz, z: [B, ...] (norms over the trailing dims).

    Returns:
        ``abs`` [B] and ``rel`` [B].

    Example::

        >>> a, r = residual_norms(torch.randn(4, 3, 5), torch.randn(4, 3, 5))
    """
    _check_float_tensor("fz", fz)
    _check_float_tensor("z", z, like=("fz", fz))
    if fz.shape != z.shape or fz.dim() < 1:
        raise ValueError(f"z must have fz's shape [B, ...], got fz {tuple(fz.shape)} and z {tuple(z.shape)}")
    _resolve(backend, fz.device, "residual_norms")
    B = fz.shape[0]
    return _ops.residual_norms(fz.reshape(B, -1).contiguous(), z.reshape(B, -1).contiguous())


def anderson_mix(X: Tensor, F: Tensor, n: int, lam: float = 1e-4, tau: float = 1.0, *, backend=None):
    """One Anderson step from the first ``n`` slots of the ring buffers (see the reference).

    Args:
        X, F: [B, m, D] stored iterates and their images; n: valid slots (1..m).
        lam: regularisation (>= 0); tau: damping (> 0).

    Returns:
        ``x_next`` [B, D] and ``alpha`` [B, m] (zero past slot n; sums to 1).

    Example::

        >>> x, alpha = anderson_mix(torch.randn(2, 6, 16), torch.randn(2, 6, 16), 4)
    """
    _check_float_tensor("X", X, dims=3)
    _check_float_tensor("F", F, like=("X", X), dims=3)
    if F.shape != X.shape:
        raise ValueError(f"F must have X's shape [B, m, D], got X {tuple(X.shape)} and F {tuple(F.shape)}")
    n = check_int("n", n, 1, X.shape[1])
    lam = check_real("lam", lam, 0.0)
    tau = check_real("tau", tau, 0.0, strict=True)
    _resolve(backend, X.device, "anderson_mix")
    return _ops.anderson_mix(X.contiguous(), F.contiguous(), n, lam, tau)


def _check_lowrank(U, V, vecs):
    _check_float_tensor("U", U, dims=3)
    _check_float_tensor("V", V, like=("U", U), dims=3)
    if V.shape != U.shape:
        raise ValueError(f"V must have U's shape [B, L, D], got U {tuple(U.shape)} and V {tuple(V.shape)}")
    B, _, D = U.shape
    for name, t in vecs:
        _check_float_tensor(name, t, like=("U", U), dims=2)
        if t.shape != (B, D):
            raise ValueError(f"{name} must have shape [B, D]=[{B}, {D}], got {tuple(t.shape)}")


def broyden_matvec(
    U: Tensor, V: Tensor, x: Tensor, n: int, transpose: bool = False, *, backend=None
) -> Tensor:
    """``Jinv x`` (or ``Jinv^T x``) with ``Jinv = -I + U_n^T V_n``, the first ``n`` rank-one terms.

    Args:
        U, V: [B, L, D]; x: [B, D]; n: terms in use (0..L).

    Returns:
        [B, D].

    Example::

        >>> y = broyden_matvec(torch.randn(2, 5, 8), torch.randn(2, 5, 8), torch.randn(2, 8), 3)
    """
    _check_lowrank(U, V, [("x", x)])
    n = check_int("n", n, 0, U.shape[1])
    transpose = check_bool("transpose", transpose)
    _resolve(backend, U.device, "broyden_matvec")
    return _ops.broyden_matvec(U.contiguous(), V.contiguous(), x.contiguous(), n, transpose)


def broyden_update(U: Tensor, V: Tensor, dx: Tensor, dg: Tensor, n: int, *, backend=None):
    """The good-Broyden rank-one term ``(u, v)`` for step ``dx`` and residual change ``dg``.

    Args:
        U, V: [B, L, D] with ``n`` terms in use; dx, dg: [B, D].

    Returns:
        ``u`` [B, D], ``v`` [B, D]; the caller stores them as term ``n``.

    Example::

        >>> u, v = broyden_update(torch.zeros(2, 5, 8), torch.zeros(2, 5, 8), torch.randn(2, 8), torch.randn(2, 8), 0)
    """
    _check_lowrank(U, V, [("dx", dx), ("dg", dg)])
    n = check_int("n", n, 0, U.shape[1])
    _resolve(backend, U.device, "broyden_update")
    return _ops.broyden_update(U.contiguous(), V.contiguous(), dx.contiguous(), dg.contiguous(), n)


# ---------------------------------------------------------------------------
# solver, layer, regulariser
# ---------------------------------------------------------------------------
def fixed_point_solve(
    f,
    z0: Tensor,
    *,
    solver: str = "anderson",
    max_iter: int = 40,
    tol: float = 1e-3,
    stop_mode: str = "abs",
    m: int = 6,
    lam: float = 1e-4,
    tau: float = 1.0,
    backend=None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Solve ``z = f(z)`` per sample; returns ``(z*, info)`` with no gradient (use :func:`deq`).

    Args:
        f: callable [B, ...] -> [B, ...], same shape, dtype and device as ``z0``.
        z0: [B, ...] float32/float64 initial estimate; the solve runs in its dtype.
        solver: ``"anderson"``, ``"broyden"`` or ``"picard"``.
        max_iter: >= 1; tol: finite, >= 0; stop_mode: ``"abs"`` or ``"rel"``.
        m: Anderson memory (>= 1); lam: Anderson regularisation (>= 0);
        tau: damping (> 0) for Anderson mixing and Picard.  Options that do
            not apply to the chosen solver are ignored; unknown ones are an error.
        backend: only ``"reference"`` exists for this family today.

    Returns:
        ``z*`` [B, ...] and ``info``: ``abs_lowest``, ``rel_lowest``, ``nstep``
        [B]; ``abs_trace``, ``rel_trace`` [B, max_iter].  Semantics (and how
        they relate to torchdeq) are in :mod:`frontiers_fast.reference.deq`.

    Example::

        >>> W = 0.3 * torch.randn(8, 8) / 8**0.5
        >>> z, info = fixed_point_solve(lambda z: torch.tanh(z @ W + 1), torch.zeros(4, 8), solver="broyden")
    """
    _check_f(f)
    _check_z0(z0)
    opts = _solver_options("", solver, max_iter, tol, stop_mode, m, lam, tau)
    _resolve(backend, z0.device, "fixed_point_solve")
    return ref.solve_loop(f, z0, kernels=_OP_KERNELS, **opts)


class _ImplicitGrad(torch.autograd.Function):
    """Value ``z*``; the gradient reaching it is mapped through ``(I - J)^-1``.

    ``fz = f(z*)`` (computed outside, with its graph to the parameters of f)
    is the input that receives the gradient: for an upstream gradient ``g``
    the backward solves the adjoint fixed point ``y = y J + g``
    (``J = df/dz`` at ``z*``) and hands ``y`` to ``fz``, whose graph turns it
    into ``y df/dtheta``, the implicit-function-theorem gradient.

    A Function (rather than a tensor hook) keeps the backward free of
    hook-removal state and works when the output is used more than once; the
    price is one extra evaluation of f in the backward, to rebuild J's graph.
    """

    @staticmethod
    def forward(ctx, z_star, fz, f, b_opts):
        ctx.f, ctx.b_opts = f, b_opts
        ctx.save_for_backward(z_star)
        return z_star.clone()

    @staticmethod
    def backward(ctx, g):
        if torch.is_grad_enabled():
            # Grad mode is on in a backward only under create_graph=True; the adjoint
            # solve has no graph, so a second derivative would be silently wrong.
            raise NotImplementedError(
                "deq: double backward (create_graph=True) through the implicit gradient is not supported; "
                "use backward='phantom'"
            )
        (z_star,) = ctx.saved_tensors
        with torch.enable_grad():
            h = z_star.detach().requires_grad_()
            fh = ctx.f(h)

        def adjoint(y):
            (yJ,) = torch.autograd.grad(fh, h, y, retain_graph=True)
            return yJ + g

        y, _ = ref.solve_loop(adjoint, torch.zeros_like(g), kernels=_OP_KERNELS, **ctx.b_opts)
        return None, y, None, None


def _deq_options(
    *,
    solver: str = "anderson",
    max_iter: int = 40,
    tol: float = 1e-3,
    stop_mode: str = "abs",
    m: int = 6,
    lam: float = 1e-4,
    tau: float = 1.0,
    backward: str = "implicit",
    b_solver: str = "anderson",
    b_max_iter: int = 40,
    b_tol: float = 1e-6,
    b_stop_mode: str = "abs",
    b_m: int = 6,
    b_lam: float = 1e-4,
    b_tau: float = 1.0,
    pg_steps: int = 1,
    pg_tau: float = 1.0,
):
    """Check the layer's options; returns (forward options, backward options, backward, pg_steps, pg_tau)."""
    opts = _solver_options("", solver, max_iter, tol, stop_mode, m, lam, tau)
    backward = check_choice("backward", backward, BACKWARDS)
    b_opts = _solver_options("b_", b_solver, b_max_iter, b_tol, b_stop_mode, b_m, b_lam, b_tau)
    pg_steps = check_int("pg_steps", pg_steps, 1)
    pg_tau = check_real("pg_tau", pg_tau, 0.0, strict=True)
    return opts, b_opts, backward, pg_steps, pg_tau


def deq(
    f,
    z0: Tensor,
    *,
    solver: str = "anderson",
    max_iter: int = 40,
    tol: float = 1e-3,
    stop_mode: str = "abs",
    m: int = 6,
    lam: float = 1e-4,
    tau: float = 1.0,
    backward: str = "implicit",
    b_solver: str = "anderson",
    b_max_iter: int = 40,
    b_tol: float = 1e-6,
    b_stop_mode: str = "abs",
    b_m: int = 6,
    b_lam: float = 1e-4,
    b_tau: float = 1.0,
    pg_steps: int = 1,
    pg_tau: float = 1.0,
    backend=None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """A deep-equilibrium layer: solve ``z* = f(z*)`` and differentiate through it.

    The forward solve is :func:`fixed_point_solve` (no graph).  Gradients reach
    the tensors ``f`` closes over (an ``nn.Module``'s parameters, an input
    injection ``x``), never ``z0``:

    * ``backward="implicit"``: the output is ``z*``; its backward solves the
      adjoint fixed point ``y = y J_f(z*) + g`` with ``b_solver`` and the
      ``b_*`` options, then propagates ``y`` through one evaluation ``f(z*)``.
      Costs one extra f in the forward and one in the backward (to rebuild J).
      Double backward (``create_graph=True``) through it raises NotImplementedError.
    * ``backward="phantom"``: the output is ``pg_steps`` damped steps
      ``z <- pg_tau f(z) + (1 - pg_tau) z`` from ``z*``, differentiated by
      ordinary autograd (the phantom gradient; torchdeq's ``grad=k, tau``).

    Outside grad mode it only solves.  torchdeq's implicit mode returns
    ``f(z*)`` instead of ``z*``; the two differ by the forward residual.

    Args:
        f, z0, solver, max_iter, tol, stop_mode, m, lam, tau: as in
            :func:`fixed_point_solve` (forward).
        backward: ``"implicit"`` or ``"phantom"``.
        b_solver, b_max_iter, b_tol, b_stop_mode, b_m, b_lam, b_tau: the
            adjoint solve (implicit mode).
        pg_steps: >= 1; pg_tau: > 0 (phantom mode).

    Returns:
        ``z`` [B, ...] with autograd, and the forward solve's ``info``.

    Example::

        >>> W = torch.nn.Parameter(0.3 * torch.randn(8, 8) / 8**0.5)
        >>> x = torch.randn(4, 8)
        >>> z, info = deq(lambda z: torch.tanh(z @ W + x), torch.zeros(4, 8))
        >>> z.sum().backward()  # W.grad via the implicit function theorem
    """
    _check_f(f)
    _check_z0(z0)
    opts, b_opts, backward, pg_steps, pg_tau = _deq_options(
        solver=solver, max_iter=max_iter, tol=tol, stop_mode=stop_mode, m=m, lam=lam, tau=tau, backward=backward,
        b_solver=b_solver, b_max_iter=b_max_iter, b_tol=b_tol, b_stop_mode=b_stop_mode, b_m=b_m, b_lam=b_lam,
        b_tau=b_tau, pg_steps=pg_steps, pg_tau=pg_tau,
    )  # fmt: skip
    _resolve(backend, z0.device, "deq")
    z_star, info = ref.solve_loop(f, z0, kernels=_OP_KERNELS, **opts)
    if not torch.is_grad_enabled():
        return z_star, info
    if backward == "phantom":
        z = z_star
        for _ in range(pg_steps):
            fz = f(z)
            z = fz if pg_tau == 1.0 else pg_tau * fz + (1 - pg_tau) * z
        return z, info
    fz = f(z_star)
    if not fz.requires_grad:
        return z_star, info
    return _ImplicitGrad.apply(z_star, fz, f, b_opts), info


def jacobian_regularizer(
    f_z: Tensor,
    z: Tensor,
    vecs: int = 1,
    create_graph: bool = True,
    *,
    probes: Tensor | None = None,
    backend=None,
) -> Tensor:
    """Hutchinson estimate of ``||df_z/dz||_F^2 / z.numel()`` (torchdeq's ``jac_reg`` normalisation).

    Args:
        f_z: ``f(z)`` [B, ...] with a graph to ``z`` (requires grad).
        vecs: number of Gaussian probes (>= 1), drawn as torchdeq draws them
            (float32 on the CPU from the global generator, then converted to
            ``z``'s dtype and device): the same seed gives torchdeq's value.
        create_graph: keep the graph so the estimate can be trained on.
        probes: optional [vecs, *f_z.shape] probes instead of random ones
            (``sqrt(N) e_i`` for every i gives the exact value).

    Returns:
        0-dim tensor.

    Example::

        >>> z = torch.randn(4, 8, requires_grad=True)
        >>> reg = jacobian_regularizer(torch.tanh(z @ torch.randn(8, 8)), z, vecs=2)
    """
    _check_float_tensor("z", z)
    _check_float_tensor("f_z", f_z, like=("z", z))
    if not z.requires_grad:
        raise ValueError("z must require grad (f_z must be computed from it)")
    if not f_z.requires_grad:
        raise ValueError("f_z must be computed from z with grad enabled")
    vecs = check_int("vecs", vecs, 1)
    create_graph = check_bool("create_graph", create_graph)
    if probes is not None:
        _check_float_tensor("probes", probes, like=("z", z))
        if probes.shape != (vecs, *f_z.shape):
            raise ValueError(
                f"probes must have shape [vecs, *f_z.shape]={[vecs, *f_z.shape]}, got {list(probes.shape)}"
            )
    _resolve(backend, z.device, "jacobian_regularizer")
    return ref.jacobian_regularizer(f_z, z, vecs, create_graph, probes=probes)


__all__ = [
    "residual_norms",
    "anderson_mix",
    "broyden_matvec",
    "broyden_update",
    "fixed_point_solve",
    "deq",
    "jacobian_regularizer",
]
