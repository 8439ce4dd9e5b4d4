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
def _residual_norms_kernel(fz_ptr, z_ptr, abs_ptr, rel_ptr, D, REL_EPS: tl.constexpr, ACC: tl.constexpr,
                           BLOCK: tl.constexpr):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
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
    a = tl.sqrt(tl.sum(acc_r, 0))
    s = tl.sqrt(tl.sum(acc_f, 0))
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
    a = tl.sqrt(tl.sum(acc_r, 0))
    s = tl.sqrt(tl.sum(acc_f, 0))
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
def _solver_record_kernel(best_ptr, lowest_ptr, blown_ptr, nstep_ptr, trace_ptr, active_ptr, diverged_ptr,
                          est_ptr, abs_ptr, rel_ptr, tol_ptr, B, D, T, step, STOP: tl.constexpr,
                          BLOCK: tl.constexpr):  # fmt: skip
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
    tl.store(active_ptr + b, (live & ~(r_stop < tol) & ~blown_now).to(tl.int1))
    tl.store(diverged_ptr + b, (div | blown_now).to(tl.int1))
    if copy_row:
        for d0 in range(0, D, BLOCK):
            d = d0 + tl.arange(0, BLOCK)
            m = d < D
            tl.store(best_ptr + b * D + d, tl.load(est_ptr + b * D + d, mask=m), mask=m)


@on_device
def solver_record(
    best, lowest, blown, nstep, trace, active, diverged, est, res_abs, res_rel, step, tol, stop
):
    B, D = best.shape
    if B == 0:
        return None
    for name, t in (("best", best), ("lowest", lowest), ("blown", blown), ("nstep", nstep), ("trace", trace),
                    ("active", active), ("diverged", diverged)):  # fmt: skip
        if not t.is_contiguous():
            raise ValueError(f"solver_record: {name} must be contiguous (it is updated in place)")
    block = min(BLOCK_D, triton.next_power_of_2(max(D, 1)))
    # tol in the residuals' dtype, as the reference compares it (a float argument would be float32).
    tol_t = torch.full((1,), tol, dtype=res_abs.dtype, device=best.device)
    _solver_record_kernel[(B,)](best, lowest, blown, nstep, trace, active, diverged, est.contiguous(), res_abs,
                                res_rel, tol_t, B, D, trace.shape[2], step, STOP=stop, BLOCK=block)  # fmt: skip
    return None
