"""Triton kernels of the splatting family (launchers named after their ops).

Spherical harmonics: one program per ``BLOCK`` entries, each entry
independent (the basis and, backward, its gradient in registers), so the
backward is deterministic.  Semantics: frontiers_fast/reference/splat.py
(``sh_basis``, ``spherical_harmonics``), the same formulas as the C++
kernel (csrc/splat/sh_cpu.cpp):

    v = dirs / max(|dirs|, 1e-12);  colour = mask * sum_{b < (degree+1)^2} Y_b(v) coeffs[b]
    grad coeffs[b] = mask Y_b(v) g;  grad v = mask sum_b dY_b/dv (coeffs[b] . g)
    grad dirs = (grad v - v (v . grad v)) / |dirs|   (|dirs| > 1e-12; grad v / 1e-12 otherwise)

NaN or inf in dirs or coeffs is refused before the launch, as the reference
entry does (one reduction and a host read per call).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from frontiers_fast._checks import check_finite

from ._utils import on_device

SH_BLOCK = 128


@triton.jit
def _basis(b: tl.constexpr, x, y, z):
    """Y_b(x, y, z) and its gradient (dY/dx, dY/dy, dY/dz), for a constant basis index b.

    The constants are made in x's dtype (a bare float literal would be a float32 constant)."""
    zero = x * 0.0
    if b == 0:
        return zero + tl.full((), 0.28209479177387814, x.dtype), zero, zero, zero
    elif b == 1:
        return (
            tl.full((), -0.4886025119029199, x.dtype) * y,
            zero,
            zero - tl.full((), 0.4886025119029199, x.dtype),
            zero,
        )
    elif b == 2:
        return (
            tl.full((), 0.4886025119029199, x.dtype) * z,
            zero,
            zero,
            zero + tl.full((), 0.4886025119029199, x.dtype),
        )
    elif b == 3:
        return (
            tl.full((), -0.4886025119029199, x.dtype) * x,
            zero - tl.full((), 0.4886025119029199, x.dtype),
            zero,
            zero,
        )
    elif b == 4:
        a = tl.full((), 1.0925484305920792, x.dtype)
        return a * x * y, a * y, a * x, zero
    elif b == 5:
        a = tl.full((), -1.0925484305920792, x.dtype)
        return a * y * z, zero, a * z, a * y
    elif b == 6:
        a = tl.full((), 0.31539156525252005, x.dtype)
        return a * (2.0 * z * z - x * x - y * y), -2.0 * a * x, -2.0 * a * y, 4.0 * a * z
    elif b == 7:
        a = tl.full((), -1.0925484305920792, x.dtype)
        return a * x * z, a * z, zero, a * x
    elif b == 8:
        a = tl.full((), 0.5462742152960396, x.dtype)
        return a * (x * x - y * y), 2.0 * a * x, -2.0 * a * y, zero
    elif b == 9:
        a = tl.full((), -0.5900435899266435, x.dtype)
        return a * y * (3.0 * x * x - y * y), 6.0 * a * x * y, 3.0 * a * (x * x - y * y), zero
    elif b == 10:
        a = tl.full((), 2.890611442640554, x.dtype)
        return a * x * y * z, a * y * z, a * x * z, a * x * y
    elif b == 11:
        a = tl.full((), -0.4570457994644658, x.dtype)
        return (
            a * y * (4.0 * z * z - x * x - y * y),
            -2.0 * a * x * y,
            a * (4.0 * z * z - x * x - 3.0 * y * y),
            8.0 * a * y * z,
        )
    elif b == 12:
        a = tl.full((), 0.3731763325901154, x.dtype)
        return (
            a * z * (2.0 * z * z - 3.0 * x * x - 3.0 * y * y),
            -6.0 * a * x * z,
            -6.0 * a * y * z,
            a * (6.0 * z * z - 3.0 * x * x - 3.0 * y * y),
        )
    elif b == 13:
        a = tl.full((), -0.4570457994644658, x.dtype)
        return (
            a * x * (4.0 * z * z - x * x - y * y),
            a * (4.0 * z * z - 3.0 * x * x - y * y),
            -2.0 * a * x * y,
            8.0 * a * x * z,
        )
    elif b == 14:
        a = tl.full((), 1.445305721320277, x.dtype)
        return a * z * (x * x - y * y), 2.0 * a * x * z, -2.0 * a * y * z, a * (x * x - y * y)
    else:
        a = tl.full((), -0.5900435899266435, x.dtype)
        return a * x * (x * x - 3.0 * y * y), 3.0 * a * (x * x - y * y), -6.0 * a * x * y, zero


@triton.jit
def _unit(dirs_ptr, i, ok):
    dx = tl.load(dirs_ptr + i * 3, mask=ok, other=0.0)
    dy = tl.load(dirs_ptr + i * 3 + 1, mask=ok, other=0.0)
    dz = tl.load(dirs_ptr + i * 3 + 2, mask=ok, other=0.0)
    n = tl.sqrt(dx * dx + dy * dy + dz * dz)
    s = tl.maximum(n, tl.full((), 1e-12, n.dtype))
    return dx / s, dy / s, dz / s, n


@triton.jit
def _sh_fwd_kernel(dirs_ptr, coeffs_ptr, masks_ptr, out_ptr, n, K, NB: tl.constexpr, HAS_MASK: tl.constexpr,
                   BLOCK: tl.constexpr):  # fmt: skip
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n
    x, y, z, _ = _unit(dirs_ptr, i, ok)
    r = x * 0.0
    g = x * 0.0
    b = x * 0.0
    for k in tl.static_range(NB):
        Y, _, _, _ = _basis(k, x, y, z)
        c = coeffs_ptr + (i * K + k) * 3
        r += Y * tl.load(c, mask=ok, other=0.0)
        g += Y * tl.load(c + 1, mask=ok, other=0.0)
        b += Y * tl.load(c + 2, mask=ok, other=0.0)
    if HAS_MASK:
        on = tl.load(masks_ptr + i, mask=ok, other=0) != 0
        r = tl.where(on, r, 0.0)
        g = tl.where(on, g, 0.0)
        b = tl.where(on, b, 0.0)
    tl.store(out_ptr + i * 3, r, mask=ok)
    tl.store(out_ptr + i * 3 + 1, g, mask=ok)
    tl.store(out_ptr + i * 3 + 2, b, mask=ok)


@triton.jit
def _sh_bwd_kernel(dirs_ptr, coeffs_ptr, masks_ptr, g_ptr, gd_ptr, gc_ptr, n, K, NB: tl.constexpr,
                   HAS_MASK: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n
    x, y, z, nrm = _unit(dirs_ptr, i, ok)
    g0 = tl.load(g_ptr + i * 3, mask=ok, other=0.0)
    g1 = tl.load(g_ptr + i * 3 + 1, mask=ok, other=0.0)
    g2 = tl.load(g_ptr + i * 3 + 2, mask=ok, other=0.0)
    if HAS_MASK:
        on = tl.load(masks_ptr + i, mask=ok, other=0) != 0
        g0 = tl.where(on, g0, 0.0)
        g1 = tl.where(on, g1, 0.0)
        g2 = tl.where(on, g2, 0.0)
    vx = x * 0.0
    vy = x * 0.0
    vz = x * 0.0
    for k in tl.static_range(NB):
        Y, dX, dY, dZ = _basis(k, x, y, z)
        c = coeffs_ptr + (i * K + k) * 3
        s = tl.load(c, mask=ok, other=0.0) * g0 + tl.load(c + 1, mask=ok, other=0.0) * g1
        s += tl.load(c + 2, mask=ok, other=0.0) * g2
        gc = gc_ptr + (i * K + k) * 3
        tl.store(gc, Y * g0, mask=ok)
        tl.store(gc + 1, Y * g1, mask=ok)
        tl.store(gc + 2, Y * g2, mask=ok)
        vx += dX * s
        vy += dY * s
        vz += dZ * s
    vg = x * vx + y * vy + z * vz
    eps = tl.full((), 1e-12, nrm.dtype)
    big = nrm > eps
    ox = tl.where(big, (vx - x * vg) / tl.where(big, nrm, 1.0), vx / eps)
    oy = tl.where(big, (vy - y * vg) / tl.where(big, nrm, 1.0), vy / eps)
    oz = tl.where(big, (vz - z * vg) / tl.where(big, nrm, 1.0), vz / eps)
    tl.store(gd_ptr + i * 3, ox, mask=ok)
    tl.store(gd_ptr + i * 3 + 1, oy, mask=ok)
    tl.store(gd_ptr + i * 3 + 2, oz, mask=ok)


def _sh_args(dirs, coeffs, masks):
    dirs, coeffs = dirs.contiguous(), coeffs.contiguous()
    n = dirs.numel() // 3
    m = masks.contiguous() if masks is not None else dirs  # a placeholder pointer when there is no mask
    return dirs, coeffs, m, n, coeffs.shape[-2]


@on_device
def spherical_harmonics(degree, dirs, coeffs, masks):
    check_finite("dirs", dirs)
    check_finite("coeffs", coeffs)
    dirs, coeffs, m, n, K = _sh_args(dirs, coeffs, masks)
    out = torch.empty(dirs.shape, dtype=dirs.dtype, device=dirs.device)
    if n:
        _sh_fwd_kernel[(triton.cdiv(n, SH_BLOCK),)](
            dirs, coeffs, m, out, n, K, NB=(degree + 1) ** 2, HAS_MASK=masks is not None, BLOCK=SH_BLOCK
        )
    return out


@on_device
def spherical_harmonics_bwd(degree, dirs, coeffs, masks, grad_colors):
    dirs, coeffs, m, n, K = _sh_args(dirs, coeffs, masks)
    g = grad_colors.contiguous()
    gd = torch.empty(dirs.shape, dtype=dirs.dtype, device=dirs.device)
    gc = torch.zeros(coeffs.shape, dtype=coeffs.dtype, device=coeffs.device)  # bases past the degree get 0
    if n:
        _sh_bwd_kernel[(triton.cdiv(n, SH_BLOCK),)](
            dirs, coeffs, m, g, gd, gc, n, K, NB=(degree + 1) ** 2, HAS_MASK=masks is not None, BLOCK=SH_BLOCK
        )
    return gd, gc


# ---------------------------------------------------------------------------
# isect_offset_encode: the start of each (camera, tile) run in the sorted keys
# ---------------------------------------------------------------------------
# Each program binary-searches BLOCK targets at once: target t's offset is the
# number of keys whose linear (camera, tile) index is below t, the
# reference's searchsorted (left).  A fixed number of halvings, STEPS =
# bit_length(M) + 1, reaches it for every target.
ENCODE_BLOCK = 256


@triton.jit
def _offset_encode_kernel(ids_ptr, out_ptr, M, n_targets, n_tiles, TILE_BITS: tl.constexpr, STEPS: tl.constexpr,
                          BLOCK: tl.constexpr):  # fmt: skip
    t = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = t < n_targets
    target = t.to(tl.int64)
    lo = tl.zeros((BLOCK,), dtype=tl.int64)
    hi = tl.zeros((BLOCK,), dtype=tl.int64) + M
    for _ in tl.static_range(STEPS):
        mid = (lo + hi) // 2
        live = lo < hi
        key = tl.load(ids_ptr + mid, mask=live & ok & (mid < M), other=0)
        top = key >> 32
        linear = (top >> TILE_BITS) * n_tiles + (top & ((1 << TILE_BITS) - 1))
        below = linear < target
        lo = tl.where(live & below, mid + 1, lo)
        hi = tl.where(live & ~below, mid, hi)
    tl.store(out_ptr + t, lo.to(tl.int32), mask=ok)


@on_device
def isect_offset_encode(isect_ids, n_images, tile_width, tile_height):
    from frontiers_fast.ops.splat import _check_isect_ids
    from frontiers_fast.reference.splat import bits_for_count

    _check_isect_ids(isect_ids, n_images, tile_width, tile_height)
    ids = isect_ids.contiguous()
    n_tiles = tile_width * tile_height
    n_targets = n_images * n_tiles
    out = torch.empty((n_images, tile_height, tile_width), dtype=torch.int32, device=ids.device)
    M = ids.numel()
    if n_targets:
        _offset_encode_kernel[(triton.cdiv(n_targets, ENCODE_BLOCK),)](
            ids, out, M, n_targets, n_tiles, TILE_BITS=bits_for_count(n_tiles), STEPS=max(M, 1).bit_length() + 1,
            BLOCK=ENCODE_BLOCK,
        )  # fmt: skip
    return out
