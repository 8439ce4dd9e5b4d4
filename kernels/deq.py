"""Triton kernels of the fixed-point (DEQ) family (launchers named after their ops).

Semantics: frontiers_fast/reference/deq.py; the same formulas as the C++
kernels (csrc/deq/*_cpu.cpp).

residual_norms: one program per sample; the sums of squares run over the
sample's D entries in blocks, in a fixed order (deterministic), in float32
for float32 inputs and float64 for float64:

    abs = ||fz - z||,  rel = abs / (||fz|| + 1e-9)
    backward: r = fz - z, s = ||fz||, den = s + 1e-9, ga = g_abs + g_rel / den, gs = -g_rel abs / den^2;
        grad_fz = ga r / abs + gs fz / s,  grad_z = -ga r / abs   (the r / abs and fz / s terms 0 at 0)

solver_record: one program per sample updates its state in place (lowest
residuals, best estimate and its step, this step's trace column, the
diverged and running flags), copying the estimate's row only where it
improved.  Nothing is summed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import acc_type, on_device

BLOCK_D = 1024


@triton.jit
def _norms(fz_ptr, z_ptr, b, D, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """(||fz[b] - z[b]||, ||fz[b]||), the sums of squares over D in blocks, in a fixed order."""
    acc_r = tl.zeros((BLOCK,), ACC)
    acc_f = tl.zeros((BLOCK,), ACC)
    for d0 in range(0, D, BLOCK):
        d = d0 + tl.arange(0, BLOCK)
        m = d < D
        f = tl.load(fz_ptr + b * D + d, mask=m, other=0.0).to(ACC)
        z = tl.load(z_ptr + b * D + d, mask=m, other=0.0).to(ACC)
        r = f - z
        acc_r += r * r
        acc_f += f * f
    return tl.sqrt(tl.sum(acc_r, 0)), tl.sqrt(tl.sum(acc_f, 0))


@triton.jit
def _residual_norms_kernel(fz_ptr, z_ptr, abs_ptr, rel_ptr, D, REL_EPS: tl.constexpr, ACC: tl.constexpr,
                           BLOCK: tl.constexpr):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    a, s = _norms(fz_ptr, z_ptr, b, D, ACC, BLOCK)
    tl.store(abs_ptr + b, a.to(abs_ptr.dtype.element_ty))
    tl.store(rel_ptr + b, (a / (s + REL_EPS)).to(rel_ptr.dtype.element_ty))


@on_device
def residual_norms(fz, z):
    from frontiers_fast.reference.deq import REL_EPS

    B, D = fz.shape
    fz, z = fz.contiguous(), z.contiguous()
    out_abs = torch.empty(B, dtype=fz.dtype, device=fz.device)
    out_rel = torch.empty(B, dtype=fz.dtype, device=fz.device)
    if B:
        block = min(BLOCK_D, triton.next_power_of_2(max(D, 1)))
        _residual_norms_kernel[(B,)](fz, z, out_abs, out_rel, D, REL_EPS=REL_EPS, ACC=acc_type(fz.dtype),
                                     BLOCK=block)  # fmt: skip
    return out_abs, out_rel


@triton.jit
def _residual_norms_bwd_kernel(fz_ptr, z_ptr, ga_ptr, gr_ptr, gfz_ptr, gz_ptr, D, REL_EPS: tl.constexpr,
                               ACC: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    a, s = _norms(fz_ptr, z_ptr, b, D, ACC, BLOCK)
    den = s + REL_EPS
    g_abs = tl.load(ga_ptr + b).to(ACC)
    g_rel = tl.load(gr_ptr + b).to(ACC)
    ga = g_abs + g_rel / den
    gs = -g_rel * a / (den * den)
    # d||r|| / dr = r / ||r||, 0 at r = 0 (torch's subgradient); likewise fz / ||fz||.
    inv_a = tl.where(a > 0, 1.0 / tl.where(a > 0, a, 1.0), 0.0)
    inv_s = tl.where(s > 0, 1.0 / tl.where(s > 0, s, 1.0), 0.0)
    for d0 in range(0, D, BLOCK):
        d = d0 + tl.arange(0, BLOCK)
        m = d < D
        f = tl.load(fz_ptr + b * D + d, mask=m, other=0.0).to(ACC)
        z = tl.load(z_ptr + b * D + d, mask=m, other=0.0).to(ACC)
        gr = ga * ((f - z) * inv_a)
        tl.store(gfz_ptr + b * D + d, (gr + gs * (f * inv_s)).to(gfz_ptr.dtype.element_ty), mask=m)
        tl.store(gz_ptr + b * D + d, (-gr).to(gz_ptr.dtype.element_ty), mask=m)


@on_device
def residual_norms_bwd(fz, z, grad_abs, grad_rel):
    from frontiers_fast.reference.deq import REL_EPS

    B, D = fz.shape
    fz, z = fz.contiguous(), z.contiguous()
    g_fz, g_z = torch.empty_like(fz), torch.empty_like(z)
    if B and D:
        block = min(BLOCK_D, triton.next_power_of_2(max(D, 1)))
        _residual_norms_bwd_kernel[(B,)](fz, z, grad_abs.contiguous(), grad_rel.contiguous(), g_fz, g_z, D,
                                         REL_EPS=REL_EPS, ACC=acc_type(fz.dtype), BLOCK=block)  # fmt: skip
    return g_fz, g_z


@triton.jit
def _broyden_residual_kernel(fx_ptr, xn_ptr, x_ptr, gx_ptr, act_ptr, gn_ptr, dx_ptr, dg_ptr, abs_ptr, rel_ptr, D,
                             REL_EPS: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """Program b: gx_new = active ? fx - x_new : gx, dx = x_new - x, dg = gx_new - gx (in the dtype,
    as the tensor ops round them), and the norms of (fx, x_new) in the order of ``_norms``."""
    b = tl.program_id(0).to(tl.int64)
    live = tl.load(act_ptr + b) != 0
    acc_r = tl.zeros((BLOCK,), ACC)
    acc_f = tl.zeros((BLOCK,), ACC)
    for d0 in range(0, D, BLOCK):
        d = d0 + tl.arange(0, BLOCK)
        m = d < D
        f = tl.load(fx_ptr + b * D + d, mask=m, other=0.0)
        xn = tl.load(xn_ptr + b * D + d, mask=m, other=0.0)
        xo = tl.load(x_ptr + b * D + d, mask=m, other=0.0)
        g = tl.load(gx_ptr + b * D + d, mask=m, other=0.0)
        gn = tl.where(live, f - xn, g)
        tl.store(gn_ptr + b * D + d, gn, mask=m)
        tl.store(dx_ptr + b * D + d, xn - xo, mask=m)
        tl.store(dg_ptr + b * D + d, gn - g, mask=m)
        fa = f.to(ACC)
        r = fa - xn.to(ACC)
        acc_r += r * r
        acc_f += fa * fa
    a = tl.sqrt(tl.sum(acc_r, 0))
    s = tl.sqrt(tl.sum(acc_f, 0))
    tl.store(abs_ptr + b, a.to(abs_ptr.dtype.element_ty))
    tl.store(rel_ptr + b, (a / (s + REL_EPS)).to(rel_ptr.dtype.element_ty))


@on_device
def broyden_residual(fx, x_new, x, gx, active):
    from frontiers_fast.reference.deq import REL_EPS

    B, D = fx.shape
    fx, x_new, x, gx = fx.contiguous(), x_new.contiguous(), x.contiguous(), gx.contiguous()
    gn, dx, dg = torch.empty_like(fx), torch.empty_like(fx), torch.empty_like(fx)
    out_abs = torch.empty(B, dtype=fx.dtype, device=fx.device)
    out_rel = torch.empty(B, dtype=fx.dtype, device=fx.device)
    if B:
        block = min(BLOCK_D, triton.next_power_of_2(max(D, 1)))
        _broyden_residual_kernel[(B,)](fx, x_new, x, gx, active.contiguous(), gn, dx, dg, out_abs, out_rel, D,
                                       REL_EPS=REL_EPS, ACC=acc_type(fx.dtype), BLOCK=block)  # fmt: skip
    return gn, dx, dg, out_abs, out_rel


@triton.jit
def _solver_record_kernel(best_ptr, lowest_ptr, blown_ptr, nstep_ptr, trace_ptr, active_ptr, diverged_ptr,
                          est_ptr, abs_ptr, rel_ptr, tol_ptr, hold_ptr, B, D, T, step, STOP: tl.constexpr,
                          HOLD: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    live = tl.load(active_ptr + b) != 0
    div = tl.load(diverged_ptr + b) != 0
    r_abs = tl.load(abs_ptr + b)
    r_rel = tl.load(rel_ptr + b)
    # not finite: |x| < inf is false for NaN and for +-inf.
    blown_now = live & ~(tl.abs(r_abs) < float("inf"))
    copy_row = False
    for mode in tl.static_range(2):
        r = r_abs if mode == 0 else r_rel
        low = tl.load(lowest_ptr + mode * B + b)
        better = live & (r < low)
        low = tl.where(better, r, low)
        tl.store(lowest_ptr + mode * B + b, low)
        if mode == STOP:
            copy_row = better
            n_old = tl.load(nstep_ptr + b)
            tl.store(nstep_ptr + b, tl.where(better, step, n_old))
        blown = tl.load(blown_ptr + mode * B + b)
        held = tl.where(div, blown, low)
        tl.store(trace_ptr + (mode * B + b) * T + (step - 1), tl.where(live, r, held))
        tl.store(blown_ptr + mode * B + b, tl.where(blown_now, r, blown))
    r_stop = r_abs if STOP == 0 else r_rel
    tol = tl.load(tol_ptr)
    still = live & ~(r_stop < tol) & ~blown_now
    tl.store(active_ptr + b, still.to(tl.int1))
    tl.store(diverged_ptr + b, (div | blown_now).to(tl.int1))
    if copy_row:
        for d0 in range(0, D, BLOCK):
            d = d0 + tl.arange(0, BLOCK)
            m = d < D
            tl.store(best_ptr + b * D + d, tl.load(est_ptr + b * D + d, mask=m), mask=m)
    if HOLD:
        if not still:
            # The stopped sample's next iterate is its best estimate: est where this step improved it
            # (the best row just written holds the same values), the stored best otherwise.
            for d0 in range(0, D, BLOCK):
                d = d0 + tl.arange(0, BLOCK)
                m = d < D
                v = tl.where(
                    copy_row, tl.load(est_ptr + b * D + d, mask=m), tl.load(best_ptr + b * D + d, mask=m)
                )
                tl.store(hold_ptr + b * D + d, v, mask=m)


@on_device
def solver_record(
    best, lowest, blown, nstep, trace, active, diverged, est, res_abs, res_rel, step, tol, stop, hold=None
):
    B, D = best.shape
    if B == 0:
        return None
    for name, t in (("best", best), ("lowest", lowest), ("blown", blown), ("nstep", nstep), ("trace", trace),
                    ("active", active), ("diverged", diverged), ("hold", hold)):  # fmt: skip
        if t is not None and not t.is_contiguous():
            raise ValueError(f"solver_record: {name} must be contiguous (it is updated in place)")
    block = min(BLOCK_D, triton.next_power_of_2(max(D, 1)))
    # tol in the residuals' dtype, as the reference compares it (a float argument would be float32).
    tol_t = torch.full((1,), tol, dtype=res_abs.dtype, device=best.device)
    _solver_record_kernel[(B,)](best, lowest, blown, nstep, trace, active, diverged, est.contiguous(), res_abs,
                                res_rel, tol_t, best if hold is None else hold, B, D, trace.shape[2], step,
                                STOP=stop, HOLD=hold is not None, BLOCK=block)  # fmt: skip
    return None


# ---------------------------------------------------------------------------
# Anderson: one fused step (buffers, the Gram matrix's new row and column, the norms), the small
# bordered solves (batched, by torch), then the mix
# ---------------------------------------------------------------------------
@triton.jit
def _anderson_store_kernel(X_ptr, F_ptr, GG_ptr, x_ptr, fx_ptr, abs_ptr, rel_ptr, s, n, m, D,
                           REL_EPS: tl.constexpr, ACC: tl.constexpr, MB: tl.constexpr,
                           BLOCK: tl.constexpr):  # fmt: skip
    """Program b: X[b, s] = x[b], F[b, s] = fx[b]; GG[b, s, j] = GG[b, j, s] = <R_s, R_j> for j < n
    (R = F - X, R_s = fx - x read from the inputs); the residual norms of (fx, x)."""
    b = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, MB)
    jm = (j < n) & (j != s)
    dots = tl.zeros((MB,), ACC)
    acc_r = tl.zeros((BLOCK,), ACC)
    acc_f = tl.zeros((BLOCK,), ACC)
    for d0 in range(0, D, BLOCK):
        d = d0 + tl.arange(0, BLOCK)
        dm = d < D
        xv = tl.load(x_ptr + b * D + d, mask=dm, other=0.0)
        fv = tl.load(fx_ptr + b * D + d, mask=dm, other=0.0)
        tl.store(X_ptr + (b * m + s) * D + d, xv, mask=dm)
        tl.store(F_ptr + (b * m + s) * D + d, fv, mask=dm)
        r = fv.to(ACC) - xv.to(ACC)
        acc_r += r * r
        acc_f += fv.to(ACC) * fv.to(ACC)
        rows = (b * m + j[:, None]) * D + d[None, :]
        tm = jm[:, None] & dm[None, :]
        Rj = tl.load(F_ptr + rows, mask=tm, other=0.0).to(ACC) - tl.load(X_ptr + rows, mask=tm, other=0.0).to(
            ACC
        )
        Rj = tl.where((j == s)[:, None], r[None, :], Rj)
        dots += tl.sum(Rj * r[None, :], 1)
    a = tl.sqrt(tl.sum(acc_r, 0))
    sf = tl.sqrt(tl.sum(acc_f, 0))
    tl.store(abs_ptr + b, a.to(abs_ptr.dtype.element_ty))
    tl.store(rel_ptr + b, (a / (sf + REL_EPS)).to(rel_ptr.dtype.element_ty))
    ok = j < n
    g = dots.to(GG_ptr.dtype.element_ty)
    tl.store(GG_ptr + (b * m + s) * m + j, g, mask=ok)
    tl.store(GG_ptr + (b * m + j) * m + s, g, mask=ok)


@triton.jit
def _anderson_mix_kernel(X_ptr, F_ptr, alpha_ptr, out_ptr, s, n, m, D, tau_ptr, ACC: tl.constexpr,
                         MB: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """Program b: out[b] = alpha[b] (tau F + (1 - tau) X) over the n slots; where that is not finite,
    the damped step from the newest slot s, tau F[b, s] + (1 - tau) X[b, s]."""
    b = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, MB)
    jm = j < n
    tau = tl.load(tau_ptr).to(ACC)
    al = tl.load(alpha_ptr + b * n + j, mask=jm, other=0.0).to(ACC)
    bad = tl.zeros((BLOCK,), tl.int32)
    for d0 in range(0, D, BLOCK):
        d = d0 + tl.arange(0, BLOCK)
        dm = d < D
        rows = (b * m + j[:, None]) * D + d[None, :]
        tm = jm[:, None] & dm[None, :]
        Fj = tl.load(F_ptr + rows, mask=tm, other=0.0).to(ACC)
        Xj = tl.load(X_ptr + rows, mask=tm, other=0.0).to(ACC)
        mixed = tau * tl.sum(al[:, None] * Fj, 0) + (1 - tau) * tl.sum(al[:, None] * Xj, 0)
        bad += (dm & ~(tl.abs(mixed) < float("inf"))).to(tl.int32)
        tl.store(out_ptr + b * D + d, mixed.to(out_ptr.dtype.element_ty), mask=dm)
    if tl.sum(bad, 0) > 0:
        for d0 in range(0, D, BLOCK):
            d = d0 + tl.arange(0, BLOCK)
            dm = d < D
            fs = tl.load(F_ptr + (b * m + s) * D + d, mask=dm, other=0.0).to(ACC)
            xs = tl.load(X_ptr + (b * m + s) * D + d, mask=dm, other=0.0).to(ACC)
            tl.store(out_ptr + b * D + d, (tau * fs + (1 - tau) * xs).to(out_ptr.dtype.element_ty), mask=dm)


def _d_block(D, rows):
    """Columns per tile next to ``rows`` stored rows: a [rows, columns] tile of about 4096 elements."""
    return max(16, min(triton.next_power_of_2(max(D, 1)), 4096 // rows))


@on_device
def anderson_step(X, F, GG, x, fx, i, lam, tau):
    from frontiers_fast.reference.deq import REL_EPS

    B, m, D = X.shape
    n, s = min(i + 1, m), i % m
    x, fx = x.contiguous(), fx.contiguous()
    out_abs = torch.empty(B, dtype=x.dtype, device=x.device)
    out_rel = torch.empty(B, dtype=x.dtype, device=x.device)
    if B == 0:
        return torch.empty_like(x), out_abs, out_rel
    MB = triton.next_power_of_2(m)
    block = _d_block(D, MB)
    acc = acc_type(x.dtype)
    _anderson_store_kernel[(B,)](X, F, GG, x, fx, out_abs, out_rel, s, n, m, D, REL_EPS=REL_EPS, ACC=acc, MB=MB,
                                 BLOCK=block)  # fmt: skip
    if i == 0:  # the first step is a plain one, x1 = f(x0) (with m = 1 later steps still mix, with damping)
        return fx.clone(), out_abs, out_rel
    # The bordered (n+1) x (n+1) systems [[0, 1^T], [1, GG_n + lam I]] [mu; alpha] = [1; 0], batched.
    H = X.new_zeros((B, n + 1, n + 1))
    H[:, 0, 1:] = 1
    H[:, 1:, 0] = 1
    H[:, 1:, 1:] = GG[:, :n, :n] + lam * torch.eye(n, dtype=X.dtype, device=X.device)
    rhs = X.new_zeros((B, n + 1, 1))
    rhs[:, 0] = 1
    alpha = torch.linalg.solve_ex(H, rhs)[0][:, 1:, 0].contiguous()  # singular: non-finite, then the fallback
    out = torch.empty_like(x)
    tau_t = torch.full(
        (1,), tau, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32, device=x.device
    )
    _anderson_mix_kernel[(B,)](X, F, alpha, out, s, n, m, D, tau_t, ACC=acc, MB=MB, BLOCK=block)
    return out, out_abs, out_rel


# ---------------------------------------------------------------------------
# Broyden: the rank-one update and the next step, fused per sample
# ---------------------------------------------------------------------------
# The tiles are [RB rows, BLOCK columns] with BLOCK set by D alone and the rows taken RB at a time up
# to the rows in use, so the order of every sum depends on D and on the rows in use, never on L: a
# ring of L rows gives the full-memory solver's bits until it wraps, and a large max_iter does not
# widen the tile.
_BROYDEN_RB = 16


@triton.jit
def _rows_dot(M_ptr, b, L, D, v_ptr, nrows, C_ptr, ACC: tl.constexpr, RB: tl.constexpr, BLOCK: tl.constexpr):
    """C[b, l] = M[b, l] . v[b] for l < nrows."""
    for r0 in range(0, nrows, RB):
        l = r0 + tl.arange(0, RB)
        lm = l < nrows
        acc = tl.zeros((RB,), ACC)
        for d0 in range(0, D, BLOCK):
            d = d0 + tl.arange(0, BLOCK)
            dm = d < D
            v = tl.load(v_ptr + b * D + d, mask=dm, other=0.0).to(ACC)
            rows = tl.load(
                M_ptr + (b * L + l[:, None]) * D + d[None, :], mask=lm[:, None] & dm[None, :], other=0.0
            )
            acc += tl.sum(rows.to(ACC) * v[None, :], 1)
        tl.store(C_ptr + b * L + l, acc, mask=lm)


@triton.jit
def _rows_combine(
    M_ptr, b, L, D, d, dm, C_ptr, nrows, ACC: tl.constexpr, RB: tl.constexpr, BLOCK: tl.constexpr
):
    """[BLOCK]: sum over l < nrows of C[b, l] M[b, l, d], RB rows at a time."""
    out = tl.zeros((BLOCK,), ACC)
    for r0 in range(0, nrows, RB):
        l = r0 + tl.arange(0, RB)
        lm = l < nrows
        c = tl.load(C_ptr + b * L + l, mask=lm, other=0.0)
        rows = tl.load(
            M_ptr + (b * L + l[:, None]) * D + d[None, :], mask=lm[:, None] & dm[None, :], other=0.0
        )
        out += tl.sum(rows.to(ACC) * c[:, None], 0)
    return out


@triton.jit
def _broyden_step_kernel(U_ptr, V_ptr, dx_ptr, dg_ptr, gx_ptr, x_ptr, act_ptr, out_ptr, C1_ptr, C2_ptr, L, D, n,
                         slot, n_after,
                         ACC: tl.constexpr, RB: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """Program b.  With Jinv = -I + U^T V over rows [0, n): v = Jinv^T dx, w = Jinv dg,
    u = (dx - w) / (v . dg), non-finite entries of u and v set to 0, stored as row ``slot``; then
    update = -Jinv' gx over rows [0, n_after) = gx - U^T (V gx), and out = x + update if active[b],
    else x (the update rounded to the dtype first, as the tensor ops round it).  C1 and C2 [B, L]:
    the coefficients."""
    b = tl.program_id(0).to(tl.int64)
    live = tl.load(act_ptr + b) != 0
    _rows_dot(U_ptr, b, L, D, dx_ptr, n, C1_ptr, ACC, RB, BLOCK)  # U dx
    _rows_dot(V_ptr, b, L, D, dg_ptr, n, C2_ptr, ACC, RB, BLOCK)  # V dg
    # pass 2: v and w blockwise; v . dg.  v goes to V[slot] now, w to out (both rewritten below).
    den = tl.zeros((BLOCK,), ACC)
    for d0 in range(0, D, BLOCK):
        d = d0 + tl.arange(0, BLOCK)
        dm = d < D
        dxv = tl.load(dx_ptr + b * D + d, mask=dm, other=0.0).to(ACC)
        dgv = tl.load(dg_ptr + b * D + d, mask=dm, other=0.0).to(ACC)
        v = -dxv + _rows_combine(V_ptr, b, L, D, d, dm, C1_ptr, n, ACC, RB, BLOCK)
        w = -dgv + _rows_combine(U_ptr, b, L, D, d, dm, C2_ptr, n, ACC, RB, BLOCK)
        den += tl.where(dm, v * dgv, 0.0)
        tl.store(out_ptr + b * D + d, w.to(out_ptr.dtype.element_ty), mask=dm)  # w, for pass 3
        tl.store(V_ptr + (b * L + slot) * D + d, v.to(V_ptr.dtype.element_ty), mask=dm)
    dsum = tl.sum(den, 0)
    # pass 3: u = (dx - w) / den, the non-finite entries of u and v zeroed
    for d0 in range(0, D, BLOCK):
        d = d0 + tl.arange(0, BLOCK)
        dm = d < D
        dxv = tl.load(dx_ptr + b * D + d, mask=dm, other=0.0).to(ACC)
        w = tl.load(out_ptr + b * D + d, mask=dm, other=0.0).to(ACC)
        v = tl.load(V_ptr + (b * L + slot) * D + d, mask=dm, other=0.0).to(ACC)
        u = (dxv - w) / dsum
        u = tl.where(tl.abs(u) < float("inf"), u, 0.0)
        v = tl.where(tl.abs(v) < float("inf"), v, 0.0)
        tl.store(U_ptr + (b * L + slot) * D + d, u.to(U_ptr.dtype.element_ty), mask=dm)
        tl.store(V_ptr + (b * L + slot) * D + d, v.to(V_ptr.dtype.element_ty), mask=dm)
    # passes 4 and 5: C1 = V gx over the rows now in use, out = gx - U^T C1
    _rows_dot(V_ptr, b, L, D, gx_ptr, n_after, C1_ptr, ACC, RB, BLOCK)
    for d0 in range(0, D, BLOCK):
        d = d0 + tl.arange(0, BLOCK)
        dm = d < D
        gxv = tl.load(gx_ptr + b * D + d, mask=dm, other=0.0).to(ACC)
        y = (gxv - _rows_combine(U_ptr, b, L, D, d, dm, C1_ptr, n_after, ACC, RB, BLOCK)).to(
            out_ptr.dtype.element_ty
        )
        xv = tl.load(x_ptr + b * D + d, mask=dm, other=0.0)
        tl.store(out_ptr + b * D + d, tl.where(live, xv + y, xv), mask=dm)


@on_device
def broyden_step(U, V, dx, dg, gx, x, active, n, slot, n_after):
    B, L, D = U.shape
    out = torch.empty_like(gx)
    if B == 0:
        return out
    wide = torch.float64 if U.dtype == torch.float64 else torch.float32  # acc_type's torch twin
    c1 = torch.empty((B, L), dtype=wide, device=U.device)
    c2 = torch.empty((B, L), dtype=wide, device=U.device)
    RB = _BROYDEN_RB
    _broyden_step_kernel[(B,)](U, V, dx.contiguous(), dg.contiguous(), gx.contiguous(), x.contiguous(),
                               active.contiguous(), out, c1, c2, L, D, n, slot, n_after, ACC=acc_type(U.dtype),
                               RB=RB, BLOCK=_d_block(D, RB))  # fmt: skip
    return out
