"""Fixed-point (deep equilibrium) ops: registration, autograd and the DEQ layer.

A Python callable ``f`` cannot be an argument of a ``torch.library`` op, so
the solver loop stays in Python (:func:`frontiers_fast.reference.deq.solve_loop`)
and what is registered under ``frontiers_fast::`` are its tensor kernels,
fused so that a step is f plus one or two kernels.  Every op is defined with
:func:`frontiers_fast._library.define_op` (the last argument, ``backend``, is
left out below); the forward ops carry autograd whose backward is itself a
registered ``*_bwd`` op (explicit formulas: an op's implementation runs below
the autograd dispatch key, so it cannot call autograd itself).  The loop's
ops (``anderson_step``, ``broyden_residual``, ``broyden_step``,
``residual_norms`` and the bookkeeping ``solver_record``, which update their
buffers in place) have C++ and Triton kernels; so do ``residual_norms_bwd``.
The other ops (the unfused pieces, kept as validated building blocks) have
their reference.

  residual_norms(fz, z) -> (abs, rel)
  residual_norms_bwd(fz, z, grad_abs, grad_rel) -> (grad_fz, grad_z)
  anderson_mix(X, F, n, lam, tau) -> (x_next, alpha)
  anderson_mix_bwd(X, F, n, lam, tau, alpha, grad_x, grad_alpha) -> (grad_X, grad_F)
  broyden_matvec(U, V, x, n, transpose) -> y
  broyden_matvec_bwd(U, V, x, n, transpose, grad_y) -> (grad_U, grad_V, grad_x)
  broyden_update(U, V, dx, dg, n) -> (u, v)
  broyden_update_bwd(U, V, dx, dg, n, grad_u, grad_v) -> (grad_U, grad_V, grad_dx, grad_dg)
  squared_norm(x) -> s   (the Hutchinson term of jacobian_regularizer)
  anderson_step(X!, F!, GG!, x, fx, i, lam, tau) -> (x_next, abs, rel)
  broyden_residual(fx, x_new, x, gx, active) -> (gx_new, dx, dg, abs, rel)
  broyden_step(U!, V!, dx, dg, gx, x, active, n, slot, n_after) -> x_next
  solver_record(best!, lowest!, blown!, nstep!, trace!, active!, diverged!, est, res_abs, res_rel, step, tol,
                stop, hold!?) -> ()
  (the last four in place where marked !; no autograd: the loop runs without a graph)

Shapes: z, fz, x, dx, dg [B, D]; X, F [B, m, D]; U, V [B, L, D]; abs, rel [B];
alpha [B, m]; s 0-dim.  See :mod:`frontiers_fast.reference.deq` for the math.

Public functions: the four solver kernels (validated wrappers),
:func:`fixed_point_solve`, :func:`deq` (the layer: implicit or
phantom-gradient backward) and :func:`jacobian_regularizer`.  Each resolves
its backend once and passes it to every op it runs, the solver loop's
included (its kernels are the ops bound to that backend), so the forward
solve and the implicit backward's adjoint solve run the backend that was
resolved.

NaN in the data (iterates, buffers, what ``f`` returns) is never refused; each
function's docstring says where it goes.  The solver marks a sample whose
residual is not finite as diverged and stops it (see :func:`fixed_point_solve`).
"""

from __future__ import annotations

import functools
import inspect
import math
from types import SimpleNamespace

import torch
from torch import Tensor

from .. import _backend
from .._checks import (
    FP32_64,
    FP32_64_WHAT,
    check_bool,
    check_choice,
    check_dims,
    check_finite,
    check_has_values,
    check_int,
    check_like,
    check_memory,
    check_real,
    check_tensor,
)
from .._library import define_op, zeros_if_none
from ..reference import deq as ref

_ops = torch.ops.frontiers_fast

SOLVERS = ref.SOLVERS
STOP_MODES = ref.STOP_MODES
BACKWARDS = ("implicit", "phantom")


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


# ---------------------------------------------------------------------------
# backward ops (kernels, no autograd)
# ---------------------------------------------------------------------------
define_op(
    "residual_norms_bwd(Tensor fz, Tensor z, Tensor grad_abs, Tensor grad_rel) -> (Tensor, Tensor)",
    fake=lambda fz, z, ga, gr, backend: (torch.empty_like(fz), torch.empty_like(z)),
    reference=_ref_residual_norms_bwd,
    triton="frontiers_fast.kernels.deq:residual_norms_bwd",
    native=("cpp",),
)
define_op(
    "anderson_mix_bwd(Tensor X, Tensor F, int n, float lam, float tau, Tensor alpha, Tensor grad_x, "
    "Tensor grad_alpha) -> (Tensor, Tensor)",
    fake=lambda X, F, n, lam, tau, alpha, gx, ga, backend: (torch.empty_like(X), torch.empty_like(F)),
    reference=_ref_anderson_mix_bwd,
)
define_op(
    "broyden_matvec_bwd(Tensor U, Tensor V, Tensor x, int n, bool transpose, Tensor grad_y) "
    "-> (Tensor, Tensor, Tensor)",
    fake=lambda U, V, x, n, t, g, backend: (torch.empty_like(U), torch.empty_like(V), torch.empty_like(x)),
    reference=_ref_broyden_matvec_bwd,
)
define_op(
    "broyden_update_bwd(Tensor U, Tensor V, Tensor dx, Tensor dg, int n, Tensor grad_u, Tensor grad_v) "
    "-> (Tensor, Tensor, Tensor, Tensor)",
    fake=lambda U, V, dx, dg, n, gu, gv, backend: (
        torch.empty_like(U),
        torch.empty_like(V),
        torch.empty_like(dx),
        torch.empty_like(dg),
    ),
    reference=_ref_broyden_update_bwd,
)


# ---------------------------------------------------------------------------
# forward ops with autograd
# ---------------------------------------------------------------------------
def _fake_residual_norms(fz, z, backend):
    torch._check(fz.dim() == 2 and z.shape == fz.shape, lambda: "fz and z must both be [B, D]")
    B = fz.shape[0]
    return fz.new_empty((B,)), fz.new_empty((B,))


def _residual_norms_setup(ctx, a, output):
    ctx.save_for_backward(a.fz, a.z)


def _residual_norms_backward(ctx, g_abs, g_rel):
    fz, z = ctx.saved_tensors
    g_abs, g_rel = zeros_if_none(g_abs, fz[:, 0]), zeros_if_none(g_rel, fz[:, 0])
    g_fz, g_z = _ops.residual_norms_bwd(fz, z, g_abs.contiguous(), g_rel.contiguous(), ctx.backend)
    return {"fz": g_fz, "z": g_z}


define_op(
    "residual_norms(Tensor fz, Tensor z) -> (Tensor, Tensor)",
    fake=_fake_residual_norms,
    reference=ref.residual_norms,
    triton="frontiers_fast.kernels.deq:residual_norms",
    native=("cpp",),
    backward=_residual_norms_backward,
    setup_context=_residual_norms_setup,
)


def _fake_anderson_mix(X, F, n, lam, tau, backend):
    torch._check(X.dim() == 3 and F.shape == X.shape, lambda: "X and F must both be [B, m, D]")
    torch._check(1 <= n <= X.shape[1], lambda: "n must be in [1, m]")
    return X.new_empty((X.shape[0], X.shape[2])), X.new_empty((X.shape[0], X.shape[1]))


def _anderson_mix_setup(ctx, a, output):
    ctx.n, ctx.lam, ctx.tau = a.n, a.lam, a.tau
    ctx.save_for_backward(a.X, a.F, output[1])


def _anderson_mix_backward(ctx, g_x, g_alpha):
    X, F, alpha = ctx.saved_tensors
    g_x, g_alpha = zeros_if_none(g_x, X[:, 0]), zeros_if_none(g_alpha, alpha)
    gX, gF = _ops.anderson_mix_bwd(
        X, F, ctx.n, ctx.lam, ctx.tau, alpha, g_x.contiguous(), g_alpha.contiguous(), ctx.backend
    )
    return {"X": gX, "F": gF}


define_op(
    "anderson_mix(Tensor X, Tensor F, int n, float lam, float tau) -> (Tensor, Tensor)",
    fake=_fake_anderson_mix,
    reference=ref.anderson_mix,
    backward=_anderson_mix_backward,
    setup_context=_anderson_mix_setup,
)


def _fake_anderson_step(X, F, GG, x, fx, i, lam, tau, backend):
    torch._check(X.dim() == 3 and F.shape == X.shape, lambda: "X and F must both be [B, m, D]")
    B, m, D = X.shape
    torch._check(GG.shape == (B, m, m), lambda: "GG must be [B, m, m]")
    torch._check(x.shape == (B, D) and fx.shape == (B, D), lambda: "x and fx must both be [B, D]")
    return x.new_empty((B, D)), x.new_empty((B,)), x.new_empty((B,))


# The solver loop's fused Anderson step (ring-buffer writes, the Gram row, the
# residual norms and the mix).  Defined without backward= on purpose: it is a
# solver-loop kernel with no gradient (the loop runs under no_grad, and the
# implicit backward is another solve with the same loop), like isect_tiles.
define_op(
    "anderson_step(Tensor(a!) X, Tensor(b!) F, Tensor(c!) GG, Tensor x, Tensor fx, int i, float lam, float tau) "
    "-> (Tensor, Tensor, Tensor)",
    fake=_fake_anderson_step,
    reference=ref.anderson_step,
    triton="frontiers_fast.kernels.deq:anderson_step",
    native=("cpp",),
)


def _fake_lowrank(U, V):
    torch._check(U.dim() == 3 and V.shape == U.shape, lambda: "U and V must both be [B, L, D]")


def _fake_broyden_matvec(U, V, x, n, transpose, backend):
    _fake_lowrank(U, V)
    torch._check(0 <= n <= U.shape[1], lambda: "n must be in [0, L]")
    return torch.empty_like(x)


def _broyden_matvec_setup(ctx, a, output):
    ctx.n, ctx.transpose = a.n, a.transpose
    ctx.save_for_backward(a.U, a.V, a.x)


def _broyden_matvec_backward(ctx, g):
    U, V, x = ctx.saved_tensors
    gU, gV, gx = _ops.broyden_matvec_bwd(U, V, x, ctx.n, ctx.transpose, g.contiguous(), ctx.backend)
    return {"U": gU, "V": gV, "x": gx}


define_op(
    "broyden_matvec(Tensor U, Tensor V, Tensor x, int n, bool transpose) -> Tensor",
    fake=_fake_broyden_matvec,
    reference=ref.broyden_matvec,
    backward=_broyden_matvec_backward,
    setup_context=_broyden_matvec_setup,
)


def _fake_broyden_update(U, V, dx, dg, n, backend):
    _fake_lowrank(U, V)
    torch._check(0 <= n <= U.shape[1], lambda: "n must be in [0, L]")
    return torch.empty_like(dx), torch.empty_like(dx)


def _broyden_update_setup(ctx, a, output):
    ctx.n = a.n
    ctx.save_for_backward(a.U, a.V, a.dx, a.dg)


def _broyden_update_backward(ctx, g_u, g_v):
    U, V, dx, dg = ctx.saved_tensors
    g_u, g_v = zeros_if_none(g_u, dx), zeros_if_none(g_v, dx)
    gU, gV, gdx, gdg = _ops.broyden_update_bwd(
        U, V, dx, dg, ctx.n, g_u.contiguous(), g_v.contiguous(), ctx.backend
    )
    return {"U": gU, "V": gV, "dx": gdx, "dg": gdg}


define_op(
    "broyden_update(Tensor U, Tensor V, Tensor dx, Tensor dg, int n) -> (Tensor, Tensor)",
    fake=_fake_broyden_update,
    reference=ref.broyden_update,
    backward=_broyden_update_backward,
    setup_context=_broyden_update_setup,
)


def _fake_broyden_step(U, V, dx, dg, gx, x, active, n, slot, n_after, backend):
    _fake_lowrank(U, V)
    torch._check(
        dx.shape == dg.shape == gx.shape == x.shape == (U.shape[0], U.shape[2]),
        lambda: "dx, dg, gx, x must be [B, D]",
    )
    torch._check(active.shape == (U.shape[0],), lambda: "active must be [B]")
    torch._check(0 <= n <= U.shape[1], lambda: "n must be in [0, L]")
    torch._check(1 <= n_after <= U.shape[1], lambda: "n_after must be in [1, L]")
    torch._check(0 <= slot < n_after, lambda: "slot must be in [0, n_after)")
    return torch.empty_like(gx)


# The solver loop's fused step (broyden_update, the write of row slot, broyden_matvec, the next estimate): a kernel
# of the loop, which runs under no_grad, so it has no autograd (U and V are written in place).
define_op(
    "broyden_step(Tensor(a!) U, Tensor(b!) V, Tensor dx, Tensor dg, Tensor gx, Tensor x, Tensor active, int n, "
    "int slot, int n_after) -> Tensor",
    fake=_fake_broyden_step,
    reference=ref.broyden_step,
    triton="frontiers_fast.kernels.deq:broyden_step",
    native=("cpp",),
)


def _fake_broyden_residual(fx, x_new, x, gx, active, backend):
    torch._check(fx.dim() == 2, lambda: "fx must be [B, D]")
    torch._check(x_new.shape == x.shape == gx.shape == fx.shape, lambda: "x_new, x, gx must have fx's shape")
    torch._check(active.shape == (fx.shape[0],), lambda: "active must be [B]")
    B = fx.shape[0]
    return (
        torch.empty_like(fx),
        torch.empty_like(fx),
        torch.empty_like(fx),
        fx.new_empty((B,)),
        fx.new_empty((B,)),
    )


# The Broyden loop's pass between f and the step (the residual, the secant pair, the norms): a
# kernel of the loop, without autograd.
define_op(
    "broyden_residual(Tensor fx, Tensor x_new, Tensor x, Tensor gx, Tensor active) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    fake=_fake_broyden_residual,
    reference=ref.broyden_residual,
    triton="frontiers_fast.kernels.deq:broyden_residual",
    native=("cpp",),  # csrc/deq/broyden_cpu.cpp
)


def _squared_norm_setup(ctx, a, output):
    ctx.save_for_backward(a.x)


def _squared_norm_backward(ctx, g):
    (x,) = ctx.saved_tensors
    # Plain tensor ops rather than a _bwd op: the regulariser is trained on,
    # so this gradient must itself stay differentiable when autograd records it.
    return {"x": g * (2 * x)}


define_op(
    "squared_norm(Tensor x) -> Tensor",
    fake=lambda x, backend: x.new_empty(()),
    reference=ref.squared_norm,
    backward=_squared_norm_backward,
    setup_context=_squared_norm_setup,
    double_backward=True,
)

# The solver loop's bookkeeping: one fused update of every sample's state per step (no autograd: the
# loop runs without a graph).
define_op(
    "solver_record(Tensor(a!) best, Tensor(b!) lowest, Tensor(c!) blown, Tensor(d!) nstep, Tensor(e!) trace, "
    "Tensor(f!) active, Tensor(g!) diverged, Tensor est, Tensor res_abs, Tensor res_rel, int step, float tol, "
    "int stop, Tensor(h!)? hold) -> ()",
    fake=lambda *args: None,
    reference=ref.solver_record,
    triton="frontiers_fast.kernels.deq:solver_record",
    native=("cpp",),  # csrc/deq/record_cpu.cpp
)

# The solver loop runs these; it needs no backward op (it runs without a graph).
_LOOP_OPS = ("solver_record", "residual_norms", "anderson_step", "broyden_step", "broyden_residual")

_backend.register_function("solver_record", ops=("solver_record",))
_backend.register_function("residual_norms", ops=("residual_norms",), grad_ops=("residual_norms_bwd",))
_backend.register_function("anderson_mix", ops=("anderson_mix",), grad_ops=("anderson_mix_bwd",))
_backend.register_function("anderson_step", ops=("anderson_step",))
_backend.register_function("broyden_matvec", ops=("broyden_matvec",), grad_ops=("broyden_matvec_bwd",))
_backend.register_function("broyden_update", ops=("broyden_update",), grad_ops=("broyden_update_bwd",))
_backend.register_function("broyden_step", ops=("broyden_step",))
_backend.register_function("broyden_residual", ops=("broyden_residual",))
_backend.register_function("fixed_point_solve", ops=_LOOP_OPS)
# The implicit backward's adjoint solve is the same loop; the phantom gradient is autograd of f.
_backend.register_function("deq", ops=_LOOP_OPS)
_backend.register_function("jacobian_regularizer", ops=("squared_norm",))


def _loop_kernels(backend: str) -> SimpleNamespace:
    """The solver loop's kernels: the registered ops, bound to the backend the public function resolved."""
    return SimpleNamespace(
        **{name: functools.partial(getattr(_ops, name), backend=backend) for name in _LOOP_OPS}
    )


# ---------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------


def _check_float_tensor(name, t, like=None, dims=None):
    """``like``: the (name, tensor) whose dtype and device ``t`` must share."""
    check_tensor(name, t, FP32_64, FP32_64_WHAT)
    if dims is not None:
        check_dims(name, t, dims)
    if like is not None:
        check_like(name, t, *like)


def _solver_options(prefix, solver, max_iter, tol, stop_mode, m, lam, tau, check_every=None, memory=None):
    max_iter = check_int(f"{prefix}max_iter", max_iter, 1)
    if memory is not None:
        memory = check_int(
            f"{prefix}memory",
            memory,
            1,
            max_iter,
            f" (Broyden's rank-one terms kept, at most {prefix}max_iter)",
        )
    return dict(
        solver=check_choice(f"{prefix}solver", solver, SOLVERS),
        max_iter=max_iter,
        tol=check_real(f"{prefix}tol", tol, 0.0),
        stop_mode=check_choice(f"{prefix}stop_mode", stop_mode, STOP_MODES),
        m=check_int(f"{prefix}m", m, 1),
        lam=check_real(f"{prefix}lam", lam, 0.0),
        tau=check_real(f"{prefix}tau", tau, 0.0, strict=True),
        check_every=None if check_every is None else check_int(f"{prefix}check_every", check_every, 1),
        memory=memory,
    )


def _check_buffers(prefix, opts, z0):
    """Refuse a ``max_iter`` whose solver buffers cannot fit, before the loop allocates them."""
    B, D = z0.shape[0], z0.numel() // z0.shape[0]
    n = opts["max_iter"]
    per_sample = 2 * n  # the abs and rel traces
    if opts["solver"] == "broyden":
        per_sample += 2 * min(opts["memory"] or n, n) * D  # U and V: one rank-one term per step kept
    elif opts["solver"] == "anderson":
        per_sample += 2 * min(opts["m"], n) * D  # the X and F ring buffers
    check_memory(f"{prefix}max_iter", z0.element_size() * B * per_sample, z0.device)


def _check_z0(z0):
    _check_float_tensor("z0", z0)
    # The solver reads the values (stopping, best iterate): a meta z0 would
    # fail deep inside a host sync instead.
    check_has_values("z0", z0)
    if z0.dim() < 1 or z0.numel() == 0:
        raise ValueError(f"z0 must be a non-empty [B, ...] tensor, got shape {tuple(z0.shape)}")
    # A NaN start is the caller's bug, not a divergence of the solve (which f's NaN is).
    check_finite("z0", z0)


def _check_cuda_graph(cuda_graph, z0):
    cuda_graph = check_bool("cuda_graph", cuda_graph)
    if cuda_graph and z0.device.type != "cuda":
        raise ValueError(
            f"cuda_graph=True captures the solver steps in CUDA graphs and needs a CUDA z0; z0 is on "
            f"{z0.device} (use cuda_graph=False)"
        )
    return cuda_graph


def _check_f(f):
    if not callable(f):
        raise TypeError(f"f must be callable, got {type(f).__name__}")


# ---------------------------------------------------------------------------
# public kernel wrappers
# ---------------------------------------------------------------------------
def residual_norms(fz: Tensor, z: Tensor, *, backend=None) -> tuple[Tensor, Tensor]:
    """Per-sample residuals ``abs = ||fz - z||`` and ``rel = abs / (||fz|| + 1e-9)``.

    Args:
        fz, z: [B, ...] (norms over the trailing dims; B = 0 or no trailing
            elements are allowed).

    Returns:
        ``abs`` [B] and ``rel`` [B].  NaN anywhere in a sample of ``fz`` or
        ``z`` makes that sample's ``abs`` and ``rel`` NaN; other samples are
        unaffected.

    Example::

        >>> a, r = residual_norms(torch.randn(4, 3, 5), torch.randn(4, 3, 5))
    """
    _check_float_tensor("fz", fz)
    _check_float_tensor("z", z, like=("fz", fz))
    if fz.shape != z.shape or fz.dim() < 1:
        raise ValueError(f"z must have fz's shape [B, ...], got fz {tuple(fz.shape)} and z {tuple(z.shape)}")
    backend = _backend.resolve(backend, fz.device, "residual_norms", _backend.records_grad(fz, z))
    # An explicit width: reshape(B, -1) cannot infer it when B = 0.
    B, D = fz.shape[0], math.prod(fz.shape[1:])
    return _ops.residual_norms(fz.reshape(B, D).contiguous(), z.reshape(B, D).contiguous(), backend)


def anderson_mix(X: Tensor, F: Tensor, n: int, lam: float = 1e-4, tau: float = 1.0, *, backend=None):
    """One Anderson step from the first ``n`` slots of the ring buffers (see the reference).

    Args:
        X, F: [B, m, D] stored iterates and their images (m >= 1); n: valid slots (1..m).
        lam: regularisation (finite, >= 0); tau: damping (finite, > 0).

    Returns:
        ``x_next`` [B, D] and ``alpha`` [B, m] (zero past slot n; sums to 1).
        NaN in a sample's first ``n`` slots of ``X`` or ``F`` makes that
        sample's ``x_next`` and ``alpha[:, :n]`` NaN (a singular system, with
        ``lam = 0``, gives non-finite weights the same way); slots past ``n``
        are never read and other samples are unaffected.

    Example::

        >>> x, alpha = anderson_mix(torch.randn(2, 6, 16), torch.randn(2, 6, 16), 4)
    """
    _check_float_tensor("X", X, dims=3)
    _check_float_tensor("F", F, like=("X", X), dims=3)
    if F.shape != X.shape:
        raise ValueError(f"F must have X's shape [B, m, D], got X {tuple(X.shape)} and F {tuple(F.shape)}")
    if X.shape[1] == 0:
        raise ValueError(f"X must hold at least one slot (m >= 1 in [B, m, D]), got shape {tuple(X.shape)}")
    n = check_int("n", n, 1, X.shape[1])
    lam = check_real("lam", lam, 0.0)
    tau = check_real("tau", tau, 0.0, strict=True)
    backend = _backend.resolve(backend, X.device, "anderson_mix", _backend.records_grad(X, F))
    return _ops.anderson_mix(X.contiguous(), F.contiguous(), n, lam, tau, backend)


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
        [B, D].  NaN in a sample's ``x`` or in its first ``n`` rows of ``U``
        or ``V`` spreads to that sample's output through the products it
        enters (``n = 0`` gives ``-x``, NaN where ``x`` is); rows past ``n``
        are never read and other samples are unaffected.

    Example::

        >>> y = broyden_matvec(torch.randn(2, 5, 8), torch.randn(2, 5, 8), torch.randn(2, 8), 3)
    """
    _check_lowrank(U, V, [("x", x)])
    n = check_int("n", n, 0, U.shape[1])
    transpose = check_bool("transpose", transpose)
    backend = _backend.resolve(backend, U.device, "broyden_matvec", _backend.records_grad(U, V, x))
    return _ops.broyden_matvec(U.contiguous(), V.contiguous(), x.contiguous(), n, transpose, backend)


def broyden_update(U: Tensor, V: Tensor, dx: Tensor, dg: Tensor, n: int, *, backend=None):
    """The good-Broyden rank-one term ``(u, v)`` for step ``dx`` and residual change ``dg``.

    Args:
        U, V: [B, L, D] with ``n`` terms in use (0..L); dx, dg: [B, D].

    Returns:
        ``u`` [B, D], ``v`` [B, D]; the caller stores them as term ``n``.
        Both are always finite: entries that are not (from NaN or inf in the
        inputs, or a zero denominator) are set to 0, so NaN in a sample's
        inputs gives zeros there, not NaN, and other samples are unaffected.

    Example::

        >>> u, v = broyden_update(torch.zeros(2, 5, 8), torch.zeros(2, 5, 8), torch.randn(2, 8), torch.randn(2, 8), 0)
    """
    _check_lowrank(U, V, [("dx", dx), ("dg", dg)])
    n = check_int("n", n, 0, U.shape[1])
    backend = _backend.resolve(backend, U.device, "broyden_update", _backend.records_grad(U, V, dx, dg))
    return _ops.broyden_update(U.contiguous(), V.contiguous(), dx.contiguous(), dg.contiguous(), n, backend)


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
    check_every: int | None = None,
    memory: int | None = None,
    cuda_graph: bool = False,
    backend=None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Solve ``z = f(z)`` per sample; returns ``(z*, info)`` with no gradient (use :func:`deq`).

    Args:
        f: callable [B, ...] -> [B, ...], same shape, dtype and device as ``z0``.
        z0: [B, ...] float32/float64 initial estimate (not meta: the solver
            reads its values); the solve runs in its dtype.
        solver: ``"anderson"``, ``"broyden"`` or ``"picard"``.
        max_iter: >= 1; tol: finite, >= 0; stop_mode: ``"abs"`` or ``"rel"``.
        m: Anderson memory (>= 1); lam: Anderson regularisation (>= 0);
        tau: damping (> 0) for Anderson mixing and Picard.  Options that do
            not apply to the chosen solver are ignored; unknown ones are an error.
        check_every: >= 1, or None: 4 for a CUDA ``z0``, 1 otherwise.
            Convergence stays on the device (per-sample masks, best
            estimates, frozen samples); the host reads it only every
            ``check_every`` steps to stop early.  The results equal reading it
            every step: a sample that converged between two reads was frozen
            at its own step.  Up to ``check_every - 1`` extra evaluations of
            ``f`` may run on frozen estimates (their results are discarded).
            On the CPU a read costs no device synchronisation, so the default
            reads every step and never pays for those extra evaluations.
        memory: Broyden only, in [1, max_iter] or None (all): the rank-one
            terms kept (limited-memory Broyden, the oldest dropped first);
            U and V take ``memory`` rows instead of ``max_iter``.
        cuda_graph: CUDA ``z0`` only (ValueError otherwise).  Each distinct
            solver step, its call of ``f`` included, is captured in a CUDA
            graph on its second use and replayed from then on (one graph for
            Picard and Broyden, whose rank-one step stays eager; ``2 m`` for
            Anderson, one per ring slot and fill).  The results equal
            ``cuda_graph=False``.  ``f`` must be capturable: no host
            synchronisation (``.item()``, printing values), no data-dependent
            shapes; its output shape is checked at every capture.  The graphs
            live for one call, so ``f`` may close over new tensors each call.
        backend: ``"reference"``, ``"cpp"`` (CPU) or ``"triton"`` (CUDA); the
            default picks per device.

    Returns:
        ``z*`` [B, ...] and ``info``: ``abs_lowest``, ``rel_lowest``, ``nstep``
        [B]; ``abs_trace``, ``rel_trace`` [B, max_iter]; ``diverged`` [B]
        bool.  Semantics (and how they relate to torchdeq) are in
        :mod:`frontiers_fast.reference.deq`.

    NaN and inf: NaN or inf in ``z0`` is refused (ValueError naming it).  A
    sample whose residual is not finite at some step (``f`` returned NaN or
    inf for it, or its iterate overflowed) is marked in ``info["diverged"]``
    and stops there.  It keeps
    its best finite estimate (``z0``, with ``nstep`` 0, if it had none), its traces hold the non-finite residual from that step on,
    and one RuntimeWarning per call says how many samples diverged.  The
    other samples are solved as they would be without them.

    Example::

        >>> W = 0.3 * torch.randn(8, 8) / 8**0.5
        >>> z, info = fixed_point_solve(lambda z: torch.tanh(z @ W + 1), torch.zeros(4, 8), solver="broyden")
    """
    _check_f(f)
    _check_z0(z0)
    opts = _solver_options("", solver, max_iter, tol, stop_mode, m, lam, tau, check_every, memory)
    opts["cuda_graph"] = _check_cuda_graph(cuda_graph, z0)
    _check_buffers("", opts, z0)
    backend = _backend.resolve(backend, z0.device, "fixed_point_solve", False)
    return ref.solve_loop(f, z0, kernels=_loop_kernels(backend), **opts)


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
    def forward(ctx, z_star, fz, f, b_opts, kernels):
        ctx.f, ctx.b_opts, ctx.kernels = f, b_opts, kernels
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

        y, _ = ref.solve_loop(
            adjoint,
            torch.zeros_like(g),
            kernels=ctx.kernels,
            caller="deq (backward, adjoint solve)",
            **ctx.b_opts,
        )
        return None, y, None, None, None


def _deq_options(
    *,
    solver: str = "anderson",
    max_iter: int = 40,
    tol: float = 1e-3,
    stop_mode: str = "abs",
    m: int = 6,
    lam: float = 1e-4,
    tau: float = 1.0,
    check_every: int | None = None,
    memory: int | None = None,
    cuda_graph: bool = False,
    backward: str = "implicit",
    b_solver: str = "anderson",
    b_max_iter: int = 40,
    b_tol: float = 1e-6,
    b_stop_mode: str = "abs",
    b_m: int = 6,
    b_lam: float = 1e-4,
    b_tau: float = 1.0,
    b_check_every: int | None = None,
    b_memory: int | None = None,
    pg_steps: int = 1,
    pg_tau: float = 1.0,
):
    """Check the layer's options; returns (forward options, backward options, backward, pg_steps, pg_tau).

    ``cuda_graph`` is checked as a bool here and against z0's device by the caller."""
    opts = _solver_options("", solver, max_iter, tol, stop_mode, m, lam, tau, check_every, memory)
    opts["cuda_graph"] = check_bool("cuda_graph", cuda_graph)
    backward = check_choice("backward", backward, BACKWARDS)
    b_opts = _solver_options(
        "b_", b_solver, b_max_iter, b_tol, b_stop_mode, b_m, b_lam, b_tau, b_check_every, b_memory
    )
    pg_steps = check_int("pg_steps", pg_steps, 1)
    pg_tau = check_real("pg_tau", pg_tau, 0.0, strict=True)
    return opts, b_opts, backward, pg_steps, pg_tau


# The options deq takes besides f and z0 (DEQFixedPoint checks its keywords against them).
DEQ_OPTIONS = (*inspect.signature(_deq_options).parameters, "backend")


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
    check_every: int | None = None,
    memory: int | None = None,
    cuda_graph: bool = False,
    backward: str = "implicit",
    b_solver: str = "anderson",
    b_max_iter: int = 40,
    b_tol: float = 1e-6,
    b_stop_mode: str = "abs",
    b_m: int = 6,
    b_lam: float = 1e-4,
    b_tau: float = 1.0,
    b_check_every: int | None = None,
    b_memory: int | None = None,
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
        f, z0, solver, max_iter, tol, stop_mode, m, lam, tau, check_every,
            memory, cuda_graph: as in :func:`fixed_point_solve` (the forward
            solve; the adjoint solve of the backward runs eagerly).
        backward: ``"implicit"`` or ``"phantom"``.
        b_solver, b_max_iter, b_tol, b_stop_mode, b_m, b_lam, b_tau,
            b_check_every, b_memory: the adjoint solve (implicit mode).
        pg_steps: >= 1; pg_tau: > 0 (phantom mode).

    Returns:
        ``z`` [B, ...] with autograd, and the forward solve's ``info``.

    NaN and inf: the forward is :func:`fixed_point_solve`'s (a diverged
    sample stops at its best finite estimate, flagged in
    ``info["diverged"]``, with a RuntimeWarning); with
    ``backward="phantom"`` the output is ``pg_steps`` steps of ``f`` from
    there, NaN where ``f`` is.  Either backward differentiates ``f`` at that
    estimate as autograd would: where ``f`` is NaN, NaN reaches the gradients
    of that sample's own inputs and of the parameters it shares (the entries
    it flows through), while the other samples' own gradients stay finite.
    An adjoint solve that diverges for a sample stops it at its best finite
    estimate (0 if none) and warns the same way.

    Example::

        >>> W = torch.nn.Parameter(0.3 * torch.randn(8, 8) / 8**0.5)
        >>> x = torch.randn(4, 8)
        >>> z, info = deq(lambda z: torch.tanh(z @ W + x), torch.zeros(4, 8))
        >>> z.sum().backward()  # W.grad via the implicit function theorem
    """
    _check_f(f)
    _check_z0(z0)
    opts, b_opts, backward, pg_steps, pg_tau = _deq_options(
        solver=solver, max_iter=max_iter, tol=tol, stop_mode=stop_mode, m=m, lam=lam, tau=tau,
        check_every=check_every, memory=memory, cuda_graph=cuda_graph, backward=backward, b_solver=b_solver,
        b_max_iter=b_max_iter,
        b_tol=b_tol, b_stop_mode=b_stop_mode, b_m=b_m, b_lam=b_lam, b_tau=b_tau, b_check_every=b_check_every,
        b_memory=b_memory, pg_steps=pg_steps, pg_tau=pg_tau,
    )  # fmt: skip
    _check_cuda_graph(opts["cuda_graph"], z0)
    _check_buffers("", opts, z0)
    grad = torch.is_grad_enabled()
    if grad and backward == "implicit":
        _check_buffers("b_", b_opts, z0)  # the adjoint state has z0's shape
    backend = _backend.resolve(backend, z0.device, "deq", grad)
    kernels = _loop_kernels(backend)
    z_star, info = ref.solve_loop(f, z0, kernels=kernels, caller="deq", **opts)
    if not grad:
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
    return _ImplicitGrad.apply(z_star, fz, f, b_opts, kernels), info


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
        z: [B, ...] the input, non-empty.
        vecs: number of Gaussian probes (>= 1), drawn as torchdeq draws them
            (float32 on the CPU from the global generator, then converted to
            ``z``'s dtype and device): the same seed gives torchdeq's value.
        create_graph: keep the graph so the estimate can be trained on.
        probes: optional [vecs, *f_z.shape] probes instead of random ones
            (``sqrt(N) e_i`` for every i gives the exact value).

    Returns:
        0-dim tensor.  NaN in the Jacobian (``f`` NaN or not differentiable
        somewhere along the graph) or in ``probes`` makes it NaN.

    Example::

        >>> z = torch.randn(4, 8, requires_grad=True)
        >>> reg = jacobian_regularizer(torch.tanh(z @ torch.randn(8, 8)), z, vecs=2)
    """
    _check_float_tensor("z", z)
    _check_float_tensor("f_z", f_z, like=("z", z))
    if z.numel() == 0:
        # The estimate is normalised by z.numel(): 0 / 0.
        raise ValueError(f"z must have at least one element, got shape {tuple(z.shape)}")
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
    backend = _backend.resolve(
        backend, z.device, "jacobian_regularizer", torch.is_grad_enabled() and create_graph
    )
    sq_norm = functools.partial(_ops.squared_norm, backend=backend)
    return ref.jacobian_regularizer(f_z, z, vecs, create_graph, probes=probes, sq_norm=sq_norm)


__all__ = [
    "BACKWARDS",
    "DEQ_OPTIONS",
    "SOLVERS",
    "STOP_MODES",
    "residual_norms",
    "anderson_mix",
    "broyden_matvec",
    "broyden_update",
    "fixed_point_solve",
    "deq",
    "jacobian_regularizer",
]
