"""Fixed-point (deep equilibrium) solvers in plain PyTorch.

Bai, Kolter & Koltun, "Deep Equilibrium Models" (NeurIPS 2019): a layer's
output is the fixed point ``z* = f(z*)``, found by a root solver rather than
by unrolling.  This module pins the semantics every later kernel is tested
against.

Tensor kernels (the pieces a GPU kernel will fuse; ``z`` flattened to [B, D]):

  residual_norms(fz, z) -> (abs, rel)                 [B], [B]
  anderson_mix(X, F, n, lam, tau) -> (x_next, alpha)  [B, D], [B, m]
  anderson_step(X!, F!, GG!, x, fx, i, lam, tau) -> (x_next, abs, rel)  [B, D], [B], [B]
  broyden_matvec(U, V, x, n, transpose) -> y          [B, D]
  broyden_update(U, V, dx, dg, n) -> (u, v)           [B, D], [B, D]
  squared_norm(x) -> s                                0-dim (jacobian_regularizer's term)

The solver loop (:func:`solve_loop`) is Python: each pass is one evaluation of
``f`` on the whole batch, and the iteration is the recurrence itself.  It takes
the kernels as arguments so the registered ops (``frontiers_fast.ops.deq``,
bound to the backend their caller resolved) and this reference share one loop.

Semantics, and where they differ from torchdeq 0.1.0 (whose Anderson and
Broyden iterates and step counts we reproduce where both definitions agree):

* Residuals are per sample over the trailing dims: ``abs = ||f(z) - z||``,
  ``rel = abs / (||f(z)|| + 1e-9)``.
* Steps are numbered as torchdeq numbers them: Anderson and Picard step ``k``
  is the ``k``-th evaluation of ``f``; Broyden step ``k`` is its ``k``-th
  update (its evaluation at ``z0`` is step 0 and is not a candidate).  The
  estimate a step proposes is ``f(x_k)`` for Anderson and Picard and ``x_k``
  for Broyden (torchdeq returns the same).
* Each sample keeps its own best estimate (lowest residual in ``stop_mode``,
  first one on ties), and a sample whose residual falls below ``tol`` stops:
  its estimate, ``nstep`` and lowest residuals no longer change, and ``f``
  is fed its frozen estimate from then on.  torchdeq stops only when every
  sample is below ``tol`` and lets converged samples keep iterating (so their
  best can still move).  The two coincide for a batch of one, when all
  samples converge at the same step, and when nothing converges (``tol=0``).
* Anderson's two Picard warm-up evaluations (``x1 = f(z0)``) are steps 1 and
  2 and are candidates for the best estimate and for stopping; torchdeq
  starts tracking at step 3.  They coincide whenever the warm-up residuals
  are above ``tol`` and above the final best (the usual case, z0 far from z*).
* The lowest residuals start at +inf (torchdeq: 1e8), so a sample always
  reports the best step it took.
* Divergence: a sample whose residual at a step is not finite (``f``
  returned NaN or inf for it, a NaN in its ``z0``, or an iterate so large
  that the norm overflows) is marked in ``info["diverged"]`` and stops
  there: its estimate stays the best finite one (``z0`` if it had none,
  ``nstep`` 0), and its traces hold that non-finite residual from the step
  on.  One RuntimeWarning per solve says how many samples diverged.  The
  other samples are unaffected.  torchdeq keeps iterating such a sample and
  returns its last iterate, NaN included.
* Picard with damping ``tau`` iterates ``x <- tau f(x) + (1 - tau) x`` and
  reports the residual of ``f`` itself (torchdeq reports the damped map's,
  ``tau`` times smaller); identical for ``tau = 1``.
* Broyden's "no progress" rule: from step 31 on, a sample whose residual is
  below ``3 tol`` stops.  torchdeq's rule reads "stop when every residual is
  below ``3 tol`` and ``max / min < 1.3`` over the last 30 steps", but its
  ratio is taken across the batch at each step (``stack(trace[-30:])`` is
  [30, B], reduced over dim 1), not over time: for a batch of one it is
  always 1, so its rule is exactly the one above, which we apply per sample.
  For larger batches torchdeq also requires the samples' residuals to be
  within 30% of each other at each of the last 30 steps; we do not.  The
  rank-one terms are zeroed where they are not finite (torchdeq zeroes NaN
  only).
* Anderson: where the mixed iterate of a sample is not finite (``lam = 0``,
  or a ``lam`` lost to rounding, with repeated iterates makes the bordered
  system singular and the weights NaN), that sample takes a plain damped
  step from the newest slot, ``tau f(x) + (1 - tau) x``, instead (torchdeq
  carries the NaN on, and the sample's iterates stay NaN).  The ring buffer
  holds ``min(m, max_iter)`` slots (the rest would never be written).
* Convergence stays on the device: the masks, best estimates and frozen
  samples are tensors, and the host reads whether any sample is still running
  only every ``check_every`` steps (and at ``max_iter``).  A sample that
  converges between two checks is frozen at its own step, so every output is
  the one checking at every step gives; only the number of evaluations of
  ``f`` (on frozen estimates, whose results are discarded) can be up to
  ``check_every - 1`` higher.  torchdeq reads the residuals on the host at
  every step.  The default is 4 steps for a CUDA ``z0`` (a read stalls the
  GPU's queue) and every step otherwise (a read of a CPU tensor costs no
  synchronisation, and the extra evaluations would be pure loss).
* Broyden ``memory=k`` (limited-memory Broyden) keeps only the last ``k``
  rank-one terms in a ring: from step ``k + 1`` on, the oldest term is
  dropped before the new one is computed with the remaining ones.  With
  ``k >= max_iter`` (or None) it is the full-memory solver, bit for bit.
  torchdeq's U and V always hold ``max_iter`` terms.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from types import SimpleNamespace

import torch
from torch import Tensor

from .._checks import check_int, check_real

SOLVERS = ("anderson", "broyden", "picard")
STOP_MODES = ("abs", "rel")
REL_EPS = 1e-9


# ---------------------------------------------------------------------------
# tensor kernels
# ---------------------------------------------------------------------------
def residual_norms(fz: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample residuals of a fixed-point estimate.

    Args:
        fz: [B, D], ``f(z)``.
        z: [B, D].

    Returns:
        ``abs = ||fz - z||`` [B] and ``rel = abs / (||fz|| + 1e-9)`` [B].

    Example::

        >>> a, r = residual_norms(torch.ones(2, 3), torch.zeros(2, 3))
    """
    a = torch.linalg.vector_norm(fz - z, dim=1)
    return a, a / (torch.linalg.vector_norm(fz, dim=1) + REL_EPS)


def anderson_mix(X: Tensor, F: Tensor, n: int, lam: float, tau: float) -> tuple[Tensor, Tensor]:
    """One Anderson-acceleration step from the first ``n`` slots of the ring buffers.

    With ``G = F - X`` (the residuals of the stored iterates) the weights
    minimise ``||alpha G||^2 + lam ||alpha||^2`` subject to ``sum(alpha) = 1``,
    i.e. solve the bordered (n+1)x(n+1) system
    ``[[0, 1^T], [1, G G^T + lam I]] [mu; alpha] = [1; 0]`` per sample.

    Args:
        X: [B, m, D] past iterates; F: [B, m, D] their images under f.
        n: number of valid slots (1 <= n <= m); slots ``n..m-1`` are ignored.
        lam: Tikhonov regularisation (>= 0).
        tau: damping; the next iterate is ``alpha (tau F + (1 - tau) X)``.

    Returns:
        ``x_next`` [B, D] and ``alpha`` [B, m] (zero past slot n).

    Example::

        >>> x, alpha = anderson_mix(torch.randn(2, 4, 8), torch.randn(2, 4, 8), 3, 1e-4, 1.0)
    """
    B, m, _ = X.shape
    Xn, Fn = X[:, :n], F[:, :n]
    G = Fn - Xn
    A = torch.bmm(G, G.transpose(1, 2)) + lam * torch.eye(n, dtype=X.dtype, device=X.device)
    ones = X.new_ones((B, 1, n))
    top = torch.cat([X.new_zeros((B, 1, 1)), ones], dim=2)
    H = torch.cat([top, torch.cat([ones.transpose(1, 2), A], dim=2)], dim=1)
    rhs = X.new_zeros((B, n + 1, 1))
    rhs[:, 0] = 1
    # solve_ex: a singular system (lam = 0 and repeated iterates) gives
    # non-finite weights for that sample instead of failing the whole batch.
    alpha = torch.linalg.solve_ex(H, rhs)[0][:, 1:, 0]
    mixed = (
        tau * torch.bmm(alpha.unsqueeze(1), Fn)[:, 0] + (1 - tau) * torch.bmm(alpha.unsqueeze(1), Xn)[:, 0]
    )
    return mixed, torch.nn.functional.pad(alpha, (0, m - n))


def anderson_step(
    X: Tensor, F: Tensor, GG: Tensor, x: Tensor, fx: Tensor, i: int, lam: float, tau: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Loop iteration ``i`` of Anderson acceleration in one call: store, Gram row, residuals, mix.

    The Anderson loop's work between two evaluations of ``f``, on the
    state it keeps: the ring buffers ``X``, ``F`` and the Gram matrix ``GG``
    of their residual rows ``R_j = F_j - X_j``, which is updated one row at a
    time instead of being rebuilt (O(m D) per sample rather than O(m^2 D)).
    With ``m = X.shape[1]`` (the caller sizes the buffers, ``min(m, max_iter)``
    slots in the loop), ``s = i % m`` and ``n = min(i + 1, m)`` valid slots:

    1. ``X[:, s] = x``, ``F[:, s] = fx``;
    2. ``GG[:, s, j] = GG[:, j, s] = <R_s, R_j>`` for ``j < n`` (entries of
       slots ``>= n`` are neither read nor written);
    3. ``abs, rel = residual_norms(fx, x)``;
    4. the iterate of loop iteration ``i + 1``: ``fx`` itself (a copy) for
       ``i = 0`` (the loop's Picard warm-up), else :func:`anderson_mix` of
       the ``n`` valid slots, and where that is not finite for a sample (a
       singular bordered system) the damped step ``tau F[:, s] + (1 - tau)
       X[:, s]`` from the newest slot.  For ``m = 1`` and ``i >= 1`` this is
       the mix with the single weight 1, i.e. the damped step, as in the loop.

    ``X``, ``F`` and ``GG`` are written in place.  No gradient: this is a
    solver-loop kernel (the loop runs without a graph, and the implicit
    backward is another solve of the same loop).

    Args:
        X, F: [B, m, D] ring buffers of iterates and their images.
        GG: [B, m, m] the Gram matrix of the valid residual rows.
        x, fx: [B, D] the iterate of loop iteration ``i`` and ``f(x)``.
        i: the 0-based loop iteration (>= 0); lam: >= 0; tau: > 0.

    Returns:
        ``x_next`` [B, D], ``abs`` [B], ``rel`` [B].

    Example::

        >>> B, m, D = 2, 3, 8
        >>> X, F, GG = torch.zeros(B, m, D), torch.zeros(B, m, D), torch.zeros(B, m, m)
        >>> x = torch.randn(B, D)
        >>> for i in range(5):
        ...     x, a, r = anderson_step(X, F, GG, x, torch.tanh(0.5 * x + 1), i, 1e-4, 1.0)
    """
    i = check_int("i", i, 0)
    lam = check_real("lam", lam, 0.0)
    tau = check_real("tau", tau, 0.0, strict=True)
    m = X.shape[1]
    s, n = i % m, min(i + 1, m)
    X[:, s], F[:, s] = x, fx
    R = F[:, :n] - X[:, :n]
    row = torch.bmm(R, R[:, s].unsqueeze(2))[:, :, 0]  # [B, n]
    GG[:, s, :n] = row
    GG[:, :n, s] = row
    a, r = residual_norms(fx, x)
    if i == 0:
        return fx.clone(), a, r
    # The loop's own arithmetic for the next iterate (_anderson), so that it
    # and this step give the same iterates bit for bit.
    mixed, _ = anderson_mix(X, F, n, lam, tau)
    ok = torch.isfinite(mixed).all(1, keepdim=True)
    return torch.where(ok, mixed, tau * F[:, s] + (1 - tau) * X[:, s]), a, r


def broyden_matvec(U: Tensor, V: Tensor, x: Tensor, n: int, transpose: bool) -> Tensor:
    """Apply the low-rank inverse-Jacobian estimate ``Jinv = -I + U_n^T V_n``.

    Args:
        U, V: [B, L, D]; row ``l`` holds the ``l``-th rank-one term ``u_l v_l^T``.
        x: [B, D].
        n: number of terms in use (0 <= n <= L).
        transpose: ``False`` gives ``Jinv x``, ``True`` gives ``Jinv^T x`` (= ``x^T Jinv``).

    Returns:
        [B, D].

    Example::

        >>> y = broyden_matvec(torch.zeros(2, 5, 8), torch.zeros(2, 5, 8), torch.ones(2, 8), 0, False)  # -x
    """
    if n == 0:
        return -x
    Un, Vn = U[:, :n], V[:, :n]
    if transpose:
        Un, Vn = Vn, Un
    coef = torch.bmm(Vn, x.unsqueeze(2))  # [B, n, 1]
    return -x + torch.bmm(Un.transpose(1, 2), coef)[:, :, 0]


def broyden_update(U: Tensor, V: Tensor, dx: Tensor, dg: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Rank-one "good Broyden" update of the inverse Jacobian, in inverse form.

    ``Jinv' = Jinv + (dx - Jinv dg) (dx^T Jinv) / (dx^T Jinv dg)``, returned as
    the new term ``u = (dx - Jinv dg) / (v . dg)``, ``v = Jinv^T dx``; entries
    that are not finite (a zero denominator) are set to 0, so the term is a
    no-op for that sample.

    Args:
        U, V: [B, L, D], the first ``n`` terms in use.
        dx: [B, D] step in z; dg: [B, D] change of the residual ``f(z) - z``.

    Returns:
        ``u`` [B, D] and ``v`` [B, D].

    Example::

        >>> u, v = broyden_update(torch.zeros(2, 5, 8), torch.zeros(2, 5, 8), torch.randn(2, 8), torch.randn(2, 8), 0)
    """
    v = broyden_matvec(U, V, dx, n, True)
    den = (v * dg).sum(1, keepdim=True)
    u = (dx - broyden_matvec(U, V, dg, n, False)) / den
    return torch.where(torch.isfinite(u), u, 0.0), torch.where(torch.isfinite(v), v, 0.0)


def check_broyden_step_rows(L: int, n: int, slot: int, n_after: int) -> None:
    """The row ranges of :func:`broyden_step`: ValueError naming the argument (the C++ kernel says the same)."""
    if not 0 <= n <= L:
        raise ValueError(f"broyden_step: n must be in [0, L={L}], got {n}")
    if not 1 <= n_after <= L:
        raise ValueError(f"broyden_step: n_after must be in [1, L={L}], got {n_after}")
    if not 0 <= slot < n_after:
        raise ValueError(f"broyden_step: slot must be in [0, n_after={n_after}), got {slot}")


def broyden_step(
    U: Tensor, V: Tensor, dx: Tensor, dg: Tensor, gx: Tensor, x: Tensor, active: Tensor, n: int, slot: int,
    n_after: int,
) -> Tensor:  # fmt: skip
    """One Broyden step: the new rank-one term, stored in place, then the next estimate.

    Exactly ``u, v = broyden_update(U, V, dx, dg, n)``, then ``U[:, slot] = u``,
    ``V[:, slot] = v``, then ``update = -broyden_matvec(U, V, gx, n_after,
    False)`` with the rows written, and the next estimate ``x + update`` for
    running (``active``) samples, ``x`` for stopped ones.  The solver loop
    passes ``n`` = terms in use before the step, ``slot`` = the row the new
    term goes to, ``n_after`` = terms in use after it; when the ring is full
    ``slot`` lies among the first ``n`` rows and the loop zeroes it first (so
    the old term adds nothing to ``(u, v)``; a row that is not zeroed is read
    as it is, then overwritten).

    Args:
        U, V: [B, L, D], modified in place (row ``slot``).
        dx, dg, gx, x: [B, D] step, change of residual, current residual, current estimate.
        active: [B] bool, the samples still running.
        n: rows in use for the term, in [0, L]; slot: in [0, n_after);
        n_after: rows in use for the update, in [1, L].

    Returns:
        the next estimate [B, D].

    Example::

        >>> U, V = torch.zeros(2, 4, 8), torch.zeros(2, 4, 8)
        >>> d, x, on = torch.randn(2, 8), torch.zeros(2, 8), torch.ones(2, dtype=torch.bool)
        >>> x_next = broyden_step(U, V, d, d, d, x, on, 0, 0, 1)
    """
    check_broyden_step_rows(U.shape[1], n, slot, n_after)
    u, v = broyden_update(U, V, dx, dg, n)
    U[:, slot], V[:, slot] = u, v
    update = -broyden_matvec(U, V, gx, n_after, False)
    return torch.where(active.unsqueeze(1), x + update, x)


def broyden_residual(
    fx: Tensor, x_new: Tensor, x: Tensor, gx: Tensor, active: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The Broyden loop's work between ``f`` and the step, for running (``active``) samples.

    ``gx_new = fx - x_new`` where ``active``, else ``gx`` (a stopped sample keeps
    its residual); ``dx = x_new - x``; ``dg = gx_new - gx``; and
    ``residual_norms(fx, x_new)``.

    Args:
        fx, x_new, x, gx: [B, D] (``fx = f(x_new)``, ``x`` and ``gx`` the previous estimate and residual);
        active: [B] bool.

    Returns:
        ``(gx_new, dx, dg, abs, rel)``: [B, D] three times, then [B] twice.

    Example::

        >>> z = torch.zeros(2, 3)
        >>> g, dx, dg, a, r = broyden_residual(torch.ones(2, 3), z, z, z, torch.ones(2, dtype=torch.bool))
    """
    gx_new = torch.where(active.unsqueeze(1), fx - x_new, gx)
    a, r = residual_norms(fx, x_new)
    return gx_new, x_new - x, gx_new - gx, a, r


def squared_norm(x: Tensor) -> Tensor:
    """``||x||^2`` over every element: one probe's term ``||v^T J||^2`` of the Hutchinson estimate.

    Example::

        >>> squared_norm(torch.ones(2, 3))  # 6
    """
    return x.pow(2).sum()


KERNELS = SimpleNamespace(
    anderson_step=anderson_step,
    residual_norms=residual_norms,
    anderson_mix=anderson_mix,
    broyden_matvec=broyden_matvec,
    broyden_update=broyden_update,
    broyden_step=broyden_step,
    broyden_residual=broyden_residual,
)


# ---------------------------------------------------------------------------
# the solver loop
# ---------------------------------------------------------------------------
def solver_record(
    best: Tensor,
    lowest: Tensor,
    blown: Tensor,
    nstep: Tensor,
    trace: Tensor,
    active: Tensor,
    diverged: Tensor,
    est: Tensor,
    res_abs: Tensor,
    res_rel: Tensor,
    step: int,
    tol: float,
    stop: int,
    hold: Tensor | None = None,
) -> None:
    """Record one solver step in the per-sample state, in place (the solver loop's bookkeeping).

    State: best [B, D] (each sample's best estimate), lowest and blown [2, B]
    (per mode, abs then rel: the lowest residual, and the non-finite one that
    stopped a diverged sample), nstep [B] int64 (the best estimate's step),
    trace [2, B, max_iter], active and diverged [B] bool.  ``est`` [B, D] is
    the estimate this step proposes, ``res_abs`` and ``res_rel`` [B] its
    residuals; ``stop`` is the stop mode's index (0 abs, 1 rel).

    For a running sample: a residual below the lowest is the new lowest (in
    the stop mode it also takes the estimate and the step); the trace gets
    the residual; a non-finite abs residual marks the sample diverged and
    stops it; a residual below ``tol`` stops it.  A stopped sample's trace
    gets what it holds (its blown residual if diverged, else its lowest),
    as torchdeq pads after it stops; nothing else of it changes.

    ``hold`` [B, D] (optional, the loop's next iterate): the rows of the
    samples stopped after this step are set to their best estimate, in
    place, so that a stopped sample's next evaluation of f sees its best
    estimate (f may couple the samples).
    """
    live = active
    res = (res_abs, res_rel)
    blown_now = live & ~torch.isfinite(res_abs)
    for mode in (0, 1):
        better = live & (res[mode] < lowest[mode])
        lowest[mode] = torch.where(better, res[mode], lowest[mode])
        if mode == stop:
            best.copy_(torch.where(better.unsqueeze(1), est, best))
            nstep.copy_(torch.where(better, step, nstep))
        held = torch.where(diverged, blown[mode], lowest[mode])
        trace[mode, :, step - 1] = torch.where(live, res[mode], held)
        blown[mode] = torch.where(blown_now, res[mode], blown[mode])
    active.copy_(live & ~(res[stop] < tol) & ~blown_now)
    diverged |= blown_now
    if hold is not None:
        hold.copy_(torch.where(active.unsqueeze(1), hold, best))


KERNELS.solver_record = solver_record


class _Tracker:
    """Per-sample best estimate, lowest residuals, step, traces and divergence (the state of
    :func:`solver_record`, which ``kernels.solver_record`` updates each step)."""

    def __init__(self, z0: Tensor, max_iter: int, tol: float, stop_mode: str, check_every: int, record):
        B = z0.shape[0]
        self.tol, self.stop_mode = tol, stop_mode
        self.stop = STOP_MODES.index(stop_mode)
        self.check_every = check_every
        self._record = record
        self.best = z0.clone()
        self.lowest = torch.full((2, B), math.inf, dtype=z0.dtype, device=z0.device)
        # What a diverged sample's trace holds from its last step on: the
        # non-finite residual that stopped it, so the trace shows the blow-up.
        self.blown = torch.full((2, B), math.inf, dtype=z0.dtype, device=z0.device)
        self.nstep = torch.zeros(B, dtype=torch.int64, device=z0.device)
        self.trace = z0.new_zeros((2, B, max_iter))
        self.active = torch.ones(B, dtype=torch.bool, device=z0.device)
        self.diverged = torch.zeros(B, dtype=torch.bool, device=z0.device)
        self.last = 0  # steps recorded so far
        self.all_active = True

    def record(self, step: int, est: Tensor, res_abs: Tensor, res_rel: Tensor, hold: Tensor | None = None):
        """``hold``: the next iterate, whose stopped samples' rows get their best estimate."""
        self._record(self.best, self.lowest, self.blown, self.nstep, self.trace, self.active, self.diverged,
                     est.contiguous(), res_abs, res_rel, step, self.tol, self.stop, hold)  # fmt: skip
        self.last = step

    def freeze(self, mask: Tensor):
        self.active &= ~mask

    def done(self, step: int) -> bool:
        # The host reads the masks every check_every steps only (the early exit
        # needs a read); a read also tells the loops when no sample is frozen,
        # so they can skip the masking until the next step.
        if step % self.check_every:
            self.all_active = False  # unknown until the next read: mask
            return False
        n = int(self.active.sum())
        self.all_active = n == self.active.shape[0]
        return n == 0

    def keep_frozen(self, new: Tensor, frozen: Tensor) -> Tensor:
        """``new`` for running samples, ``frozen`` for stopped ones."""
        return new if self.all_active else torch.where(self.active.unsqueeze(1), new, frozen)

    def info(self) -> dict[str, Tensor]:
        held = torch.where(self.diverged, self.blown, self.lowest)  # [2, B]
        self.trace[:, :, self.last :] = held.unsqueeze(2)
        return {
            "abs_lowest": self.lowest[0],
            "rel_lowest": self.lowest[1],
            "nstep": self.nstep,
            "abs_trace": self.trace[0],
            "rel_trace": self.trace[1],
            "diverged": self.diverged,
        }


def _flat_f(f, z0: Tensor):
    shape, B = z0.shape, z0.shape[0]

    def fflat(x: Tensor) -> Tensor:
        out = f(x.view(shape))
        if not isinstance(out, Tensor):
            raise TypeError(f"f must return a tensor, got {type(out).__name__}")
        if out.shape != shape:
            raise ValueError(f"f must return a tensor of z0's shape {tuple(shape)}, got {tuple(out.shape)}")
        if out.dtype != z0.dtype:
            raise TypeError(f"f returned dtype {out.dtype} but z0 has {z0.dtype}; they must match")
        if out.device != z0.device:
            raise ValueError(f"f returned a tensor on {out.device} but z0 is on {z0.device}")
        return out.reshape(B, -1)

    return fflat


class EagerSteps:
    """Runs each solver step as it comes (``cuda_graph=False``)."""

    def __call__(self, key, body, *inputs):
        return body(*inputs)

    def hold(self, out: Tensor) -> Tensor:
        """``out`` of a step, kept past the next step."""
        return out


class GraphSteps:
    """``cuda_graph=True``: each distinct solver step (``key``), the call of ``f`` included, is
    captured once in a CUDA graph and replayed after.

    ``body(*inputs)`` is one step's work between two host-side decisions; ``key`` names what its
    launches depend on besides the inputs' values (Anderson's ring slot and fill; nothing for
    Picard and Broyden), so every step with the same key is the same graph.  The first use of a
    key runs ``body`` eagerly (a warm-up: Triton compiles its kernels, libraries set up their
    handles, none of which may happen during a capture); the second captures it and every use
    from then on replays.  The graphs read their inputs from one set of static buffers, which
    each call refills from ``inputs`` (one copy each), and share one memory pool.

    A replay overwrites its outputs in place, and graphs of one pool may reuse each other's
    scratch, so the loop consumes a step's outputs before it runs the next step (it copies what
    it keeps).  The state the bodies close over (ring buffers, masks) lives at fixed addresses
    for the whole solve, which is what a graph needs.  Graphs live for one solve: a new call
    captures again, so ``f`` may close over new tensors on every call.
    """

    def __init__(self):
        self.graphs = {}  # key -> graph once captured; None after the warm-up run
        self.static = None
        self.pool = None
        self.captures = self.replays = 0

    def __call__(self, key, body, *inputs):
        if key not in self.graphs:
            self.graphs[key] = None
            return body(*inputs)
        if self.static is None:
            self.static = tuple(x.clone() for x in inputs)
        for s, x in zip(self.static, inputs):
            if s is not x:
                s.copy_(x)
        graph = self.graphs[key]
        if graph is None:
            graph = self.graphs[key] = self._capture(body)
            self.captures += 1
        self.replays += 1
        return self._replay(graph)

    def hold(self, out: Tensor) -> Tensor:
        return out.clone()  # the next replay overwrites it

    def _capture(self, body):
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                out = body(*self.static)
        except RuntimeError as e:
            raise RuntimeError(
                "cuda_graph=True: a solver step (its call of f included) could not be captured in a CUDA "
                "graph; f must run without a host synchronisation (no .item(), .cpu() or printing of "
                "values, no data-dependent shapes) and only on the current CUDA stream: " + str(e)
            ) from e
        return graph, out

    def _replay(self, graph):
        g, out = graph
        g.replay()
        return out


def _scratch(z: Tensor, shape) -> Tensor:
    """A ring buffer of the loop: uninitialised (its slots are written before they are read, so a
    zero fill would only cost a pass over it); NaN under FRONTIERS_FAST_DEBUG_POISON=1, so that a
    kernel reading a slot not yet written fails the tests."""
    t = z.new_empty(shape)
    if os.environ.get("FRONTIERS_FAST_DEBUG_POISON") == "1":
        t.fill_(math.nan)
    return t


def _anderson(f, z, t: _Tracker, k, max_iter, m, lam, tau, steps):
    B, D = z.shape
    # Step i writes slot i % m, so with m > max_iter the slots past max_iter are
    # never written (and min(i, m) never reaches them): same iterates, less memory.
    m = min(m, max_iter)
    X = _scratch(z, (B, m, D))
    F = _scratch(z, (B, m, D))
    GG = _scratch(z, (B, m, m))  # the Gram matrix of the stored residuals, one new row and column a step
    x = z

    def step(i, x):
        fx = f(x)
        # One fused step: the ring slot, the Gram row, the residual norms and the next iterate
        # (x1 = f(x0), then the Anderson mix, or the damped step where it is not finite).
        return (fx, *k.anderson_step(X, F, GG, x.contiguous(), fx.contiguous(), i, lam, tau))

    for i in range(max_iter):
        # The step depends on i through its slot i % m, its fill min(i + 1, m) and i == 0 only:
        # every i >= m acts as m + i % m does (one graph per slot once the ring is full).
        key = i if i < m else m + i % m
        fx, x_next, a, r = steps(key, functools.partial(step, key), x)
        # Stopped samples restart from their best estimate (the record writes it into x_next).
        t.record(i + 1, fx, a, r, hold=x_next)
        if t.done(i + 1):
            break
        x = x_next


def _picard(f, z, t: _Tracker, k, max_iter, tau, steps):
    def step(x):
        fx = f(x)
        a, r = k.residual_norms(fx, x)
        return fx, (fx if tau == 1.0 else tau * fx + (1 - tau) * x), a, r

    x = z
    for i in range(max_iter):
        fx, nxt, a, r = steps((), step, x)
        t.record(i + 1, fx, a, r)
        if t.done(i + 1):
            break
        x = t.keep_frozen(nxt, x)
        if x is nxt:
            x = steps.hold(x)  # the next step reads it after its replay


# torchdeq's Broyden "no progress" rule as it acts on one sample (module docstring):
# after this many steps, stop once the residual is below _STALL_TOL * tol.
_STALL_STEPS, _STALL_TOL = 30, 3.0


def _broyden(f, z, t: _Tracker, k, max_iter, memory, steps):
    B, D = z.shape
    L = max_iter if memory is None else min(memory, max_iter)  # rank-one terms kept (a ring of L)
    U = _scratch(z, (B, L, D))
    V = _scratch(z, (B, L, D))
    x = z
    gx = f(x) - x
    x_new = x + gx  # the first step, -Jinv gx with Jinv = -I; every sample runs

    def evaluate(x_new, x, gx):
        # One pass: the residual (kept for stopped samples), the secant pair and the norms.
        return k.broyden_residual(f(x_new).contiguous(), x_new, x, gx, t.active)

    for step in range(1, max_iter + 1):
        gx, dx, dg, a, r = steps((), evaluate, x_new, x, gx)
        x = x_new
        t.record(step, x, a, r)
        if step > _STALL_STEPS:
            t.freeze(t.trace[t.stop, :, step - 1] < _STALL_TOL * t.tol)
        if t.done(step):
            break
        slot = (step - 1) % L
        if step - 1 >= L:
            # The ring is full: the oldest term (in this slot) is dropped first; a zero row adds nothing.
            U[:, slot], V[:, slot] = 0, 0
        # One fused step: the new rank-one term (written to row slot), then the next estimate
        # (stopped samples keep theirs).
        x_new = k.broyden_step(U, V, dx, dg, gx, x, t.active, min(step - 1, L), slot, min(step, L))


def solve_loop(
    f,
    z0: Tensor,
    *,
    solver,
    max_iter,
    tol,
    stop_mode,
    m,
    lam,
    tau,
    check_every=1,
    memory=None,
    kernels=KERNELS,
    caller="fixed_point_solve",
    cuda_graph=False,
):
    """The solver loop shared by the reference and the registered ops.

    The options are assumed valid (the callers check them); only an unknown
    ``solver`` is caught here, so that no typo can fall through to Picard.
    ``kernels`` holds the four tensor kernels (``KERNELS``, or the registered
    ops bound to a backend); ``caller`` names the solve in the divergence
    warning.  ``cuda_graph``: run the steps through :class:`GraphSteps` (a CUDA ``z0``; the
    callers check), or an instance of it (tests substitute one that needs no GPU).
    """
    steps = cuda_graph if isinstance(cuda_graph, GraphSteps) else GraphSteps() if cuda_graph else EagerSteps()
    with torch.no_grad():
        z = z0.detach().reshape(z0.shape[0], -1)
        fflat = _flat_f(f, z0.detach())
        if check_every is None:  # a host read syncs with a GPU's queue; on the CPU it costs nothing
            check_every = 4 if z.device.type == "cuda" else 1
        t = _Tracker(z, max_iter, tol, stop_mode, check_every, kernels.solver_record)
        if solver == "anderson":
            _anderson(fflat, z, t, kernels, max_iter, m, lam, tau, steps)
        elif solver == "broyden":
            _broyden(fflat, z, t, kernels, max_iter, memory, steps)
        elif solver == "picard":
            _picard(fflat, z, t, kernels, max_iter, tau, steps)
        else:
            raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
        n_div = int(t.diverged.sum())
        if n_div:
            # Once per call: the flag in info is easy to miss, a silent z0 is worse.
            warnings.warn(
                f"{caller}: {n_div} of {z.shape[0]} samples diverged (f returned NaN or inf, or the "
                "residual overflowed); they stopped at their best finite estimate (z0 if none) and are "
                "marked in info['diverged']",
                RuntimeWarning,
                stacklevel=3,
            )
        return t.best.view(z0.shape), t.info()


def fixed_point_solve(
    f,
    z0,
    *,
    solver="anderson",
    max_iter=40,
    tol=1e-3,
    stop_mode="abs",
    m=6,
    lam=1e-4,
    tau=1.0,
    check_every=None,
    memory=None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Solve ``z = f(z)`` for every sample of a batch (no gradient; see ``ops.deq.deq``).

    Args:
        f: callable, [B, ...] -> [B, ...] (same shape, dtype and device as ``z0``).
        z0: [B, ...] initial estimate, float32 or float64; norms are over the
            trailing dims of each sample.
        solver: ``"anderson"``, ``"broyden"`` (good Broyden, inverse form) or
            ``"picard"`` (damped fixed-point iteration).
        max_iter: evaluations of ``f`` (Anderson, Picard) or updates (Broyden).
        tol: a sample stops once its ``stop_mode`` residual is below ``tol``.
        stop_mode: ``"abs"`` or ``"rel"``.
        m: Anderson ring-buffer size (capped at ``max_iter``); lam: Anderson
            regularisation (``0`` is allowed: see the module docstring);
        tau: damping (Anderson mixing and Picard).
        check_every: the host reads the convergence masks every this many
            steps (>= 1; None: 4 on a GPU, 1 on the CPU); the results are those
            of reading them every step.
        memory: Broyden's rank-one terms kept (limited memory; None: all).

    Returns:
        ``z*`` [B, ...] (each sample's best estimate) and a dict of per-sample
        tensors: ``abs_lowest`` [B], ``rel_lowest`` [B], ``nstep`` [B] int64
        (the step of the best estimate; 0 = none), ``abs_trace`` and
        ``rel_trace`` [B, max_iter] (column ``k-1`` is step ``k``),
        ``diverged`` [B] bool (the sample's residual went NaN or inf and it
        stopped at its best finite estimate; a RuntimeWarning says how
        many).  See the module docstring for the semantics and how they
        relate to torchdeq.

    Raises:
        ValueError: an unknown ``solver`` or ``stop_mode``, or a ``tol`` that
            is not a finite number >= 0 (the argument is named).

    Example::

        >>> W = 0.3 * torch.randn(8, 8) / 8**0.5
        >>> z, info = fixed_point_solve(lambda z: torch.tanh(z @ W + 1), torch.zeros(4, 8))
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if stop_mode not in STOP_MODES:
        raise ValueError(f"stop_mode must be one of {STOP_MODES}, got {stop_mode!r}")
    # A NaN tol would compare false with every residual: the solve would silently never stop.
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol >= 0):
        raise ValueError(f"tol must be a finite number >= 0, got {tol!r}")
    return solve_loop(
        f, z0, solver=solver, max_iter=max_iter, tol=tol, stop_mode=stop_mode, m=m, lam=lam, tau=tau,
        check_every=check_every, memory=memory,
    )  # fmt: skip


def jacobian_regularizer(
    f_z: Tensor, z: Tensor, vecs: int = 1, create_graph: bool = True, *, probes=None, sq_norm=squared_norm
) -> Tensor:
    """Hutchinson estimate of ``||J||_F^2 / z.numel()`` with ``J = d f_z / d z``.

    ``E_v ||v^T J||^2 = ||J||_F^2`` for ``v ~ N(0, I)``; the estimate averages
    ``vecs`` probes and divides by the number of elements of ``z`` (batch
    included), as torchdeq's ``jac_reg`` does.

    Args:
        f_z: ``f(z)`` with a graph to ``z``; z: the input (requires grad).
        vecs: number of Gaussian probes.  They are drawn exactly as torchdeq
            draws them: one at a time, in float32 on the CPU from the global
            generator, then converted to ``z``'s dtype and device; so the same
            seed gives torchdeq's probes, in either dtype, on any device.
        create_graph: keep the graph so the estimate can be trained on.
        probes: optional [vecs, *f_z.shape] probes to use instead of random
            ones (probe ``i`` is the ``grad_outputs`` of ``f_z``).
        sq_norm: the kernel for ``||v^T J||^2`` (:func:`squared_norm`, or the
            registered op bound to a backend).

    Returns:
        0-dim tensor.

    Raises:
        ValueError: ``f_z`` does not depend on ``z``.

    Example::

        >>> z = torch.randn(4, 8, requires_grad=True)
        >>> loss = jacobian_regularizer(torch.tanh(z), z, vecs=2)
    """
    total = 0.0
    for i in range(vecs):
        v = torch.randn(f_z.shape).to(z) if probes is None else probes[i]
        # allow_unused: autograd's own error for an f_z built without z names neither argument.
        (vJ,) = torch.autograd.grad(
            f_z, z, v, retain_graph=True, create_graph=create_graph, allow_unused=True
        )
        if vJ is None:
            raise ValueError("f_z does not depend on z: compute f_z from z with grad enabled")
        total = total + sq_norm(vJ)
    return total / vecs / z.numel()


__all__ = [
    "SOLVERS",
    "STOP_MODES",
    "residual_norms",
    "anderson_mix",
    "anderson_step",
    "broyden_matvec",
    "broyden_update",
    "squared_norm",
    "solve_loop",
    "fixed_point_solve",
    "jacobian_regularizer",
]
