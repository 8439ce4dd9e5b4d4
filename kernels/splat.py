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
# isect_tiles: the sorted (camera, tile, depth) keys of every Gaussian-tile overlap
# ---------------------------------------------------------------------------
# One row per Gaussian: [C * N] of them unpacked (camera = row // N), or the
# nnz packed rows with their camera in image_ids.  Four steps, as the C++
# kernel (csrc/splat/isect_cpu.cpp):
# 1. _isect_count_kernel: each row's bounding box of tiles and, with conics and
#    opacities, how many of its tiles the exact test keeps (one program per
#    ISECT_BLOCK rows, each walking its box row-major);
# 2. a cumsum of the counts gives each row its place, and M is checked
#    (ref.check_isect_count) before anything of size M is allocated;
# 3. _isect_fill_kernel walks the same boxes again and writes the kept tiles'
#    keys and row ids at the row's place, in the reference's order;
# 4. a stable sort of the keys, which has one result: the reference's.
# The exact test is a discrete decision that must match the reference tile
# for tile, so it runs in float64 whatever the input dtype (the reference
# casts to float64 too), in the reference's operation order, with every
# constant made in float64 and FMA contraction off (a fused a * b + c rounds
# once, where the reference rounds twice).  No floats are summed: the counts
# are integers.
ISECT_BLOCK = 64


@triton.jit
def _f64(v: tl.constexpr):
    """The float64 constant v (constexpr: passed as a value, a bare literal would be rounded to float32)."""
    return tl.full((), v, tl.float64)


@triton.jit
def _ln_upper(x):
    """ref.ln_upper: an upper bound of ln(max(x, 2^-20)) from frexp and the atanh series cut after s^15.

    frexp is read off the bits: above 2^-20 x is a normal float64, so x = m 2^e with m the mantissa
    under the exponent of 0.5 (m in [0.5, 1)) and e the biased exponent - 1022.  inf and NaN give NaN,
    as torch.frexp's (inf, 0) and (NaN, 0) do through (m - 1) / (m + 1)."""
    x = tl.where(x < _f64(2.0**-20), _f64(2.0**-20), x)
    bits = x.to(tl.int64, bitcast=True)
    e = ((bits >> 52) & 0x7FF) - 1022
    m = ((bits & 0xFFFFFFFFFFFFF) | (1022 << 52)).to(tl.float64, bitcast=True)
    one = _f64(1.0)
    s = (m - one) / (m + one)
    s2 = s * s
    p = x * 0.0 + _f64(1.0 / 15)
    p = p * s2 + _f64(1.0 / 13)
    p = p * s2 + _f64(1.0 / 11)
    p = p * s2 + _f64(1.0 / 9)
    p = p * s2 + _f64(1.0 / 7)
    p = p * s2 + _f64(1.0 / 5)
    p = p * s2 + _f64(1.0 / 3)
    p = p * s2 + one
    out = e.to(tl.float64) * _f64(0.6931471805599453) + _f64(2.0) * s * p
    return tl.where(x - x == 0, out, x - x)


@triton.jit
def _isect_box(m_ptr, r_ptr, row, ok, ts, tw, th):
    """ref._tile_boxes for a block of rows: the box's first tile (x0, y0) and extent (w, h), int64,
    clamped to the grid in float64; 0 x 0 where a radius is not positive."""
    zero = tl.zeros(row.shape, dtype=tl.float64)
    tsf = zero + ts
    mx = tl.load(m_ptr + row * 2, mask=ok, other=0.0).to(tl.float64) / tsf
    my = tl.load(m_ptr + row * 2 + 1, mask=ok, other=0.0).to(tl.float64) / tsf
    ri = tl.load(r_ptr + row * 2, mask=ok, other=0)
    rj = tl.load(r_ptr + row * 2 + 1, mask=ok, other=0)
    rx = ri.to(tl.float64) / tsf
    ry = rj.to(tl.float64) / tsf
    gx = zero + tw
    gy = zero + th
    x0 = tl.minimum(tl.maximum(tl.floor(mx - rx), zero), gx).to(tl.int64)
    x1 = tl.minimum(tl.maximum(tl.ceil(mx + rx), zero), gx).to(tl.int64)
    y0 = tl.minimum(tl.maximum(tl.floor(my - ry), zero), gy).to(tl.int64)
    y1 = tl.minimum(tl.maximum(tl.ceil(my + ry), zero), gy).to(tl.int64)
    visible = (ri > 0) & (rj > 0)
    return x0, y0, tl.where(visible, x1 - x0, 0), tl.where(visible, y1 - y0, 0)


@triton.jit
def _exact_conic(m_ptr, c_ptr, o_ptr, row, ok):
    """ref.exact_conics for a block of rows: the mean, the shrunk conic (a', b, c'), whether it is
    positive definite and the threshold ln_upper(255 o) + EXACT_ABS_MARGIN, all float64."""
    mx = tl.load(m_ptr + row * 2, mask=ok, other=0.0).to(tl.float64)
    my = tl.load(m_ptr + row * 2 + 1, mask=ok, other=0.0).to(tl.float64)
    a = tl.load(c_ptr + row * 3, mask=ok, other=1.0).to(tl.float64)
    b = tl.load(c_ptr + row * 3 + 1, mask=ok, other=0.0).to(tl.float64)
    c = tl.load(c_ptr + row * 3 + 2, mask=ok, other=1.0).to(tl.float64)
    o = tl.load(o_ptr + row, mask=ok, other=1.0).to(tl.float64)
    rel = _f64(1e-5)  # ref.EXACT_REL_MARGIN
    ab = tl.abs(b)
    ap = a - rel * (tl.abs(a) + ab)
    cp = c - rel * (tl.abs(c) + ab)
    pd = (ap > 0) & (ap * cp - b * b > 0)
    thr = _ln_upper(_f64(255.0) * o) + _f64(1e-3)  # ref.EXACT_ABS_MARGIN
    return mx, my, ap, b, cp, pd, thr


@triton.jit
def _quad(ap, b, cp, dx, dy):
    return _f64(0.5) * (ap * dx * dx + cp * dy * dy) + b * dx * dy


@triton.jit
def _clamp(v, lo, hi):
    # torch.clamp's order, a NaN kept (tl.minimum / tl.maximum need not propagate it)
    return tl.where(v < lo, lo, tl.where(v > hi, hi, v))


@triton.jit
def _tile_touched(mx, my, ap, b, cp, pd, thr, tx, ty, ts):
    """ref.tile_touched: whether the shrunk ellipse q(d) <= thr reaches tile (tx, ty)'s pixel centres."""
    zero = mx * 0.0
    x0 = (zero + tx * ts) + _f64(0.5)
    y0 = (zero + ty * ts) + _f64(0.5)
    ext = zero + (ts - 1)
    dx0 = x0 - mx
    dy0 = y0 - my
    dx1 = (x0 + ext) - mx
    dy1 = (y0 + ext) - my
    inside = (dx0 <= 0) & (dx1 >= 0) & (dy0 <= 0) & (dy1 >= 0)
    far = (inside == 0) | (thr < 0)
    far = far & (_quad(ap, b, cp, dx0, _clamp(-(b * dx0) / cp, dy0, dy1)) > thr)
    far = far & (_quad(ap, b, cp, dx1, _clamp(-(b * dx1) / cp, dy0, dy1)) > thr)
    far = far & (_quad(ap, b, cp, _clamp(-(b * dy0) / ap, dx0, dx1), dy0) > thr)
    far = far & (_quad(ap, b, cp, _clamp(-(b * dy1) / ap, dx0, dx1), dy1) > thr)
    return (pd == 0) | (far == 0)


@triton.jit
def _isect_count_kernel(m_ptr, r_ptr, c_ptr, o_ptr, count_ptr, n_rows, ts, tw, th, EXACT: tl.constexpr,
                        BLOCK: tl.constexpr):  # fmt: skip
    # EXACT is constexpr: without conics the count is the box, and the loop is not compiled at all.
    row = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = row < n_rows
    x0, y0, w, h = _isect_box(m_ptr, r_ptr, row, ok, ts, tw, th)
    box = w * h
    if EXACT:
        mx, my, ap, b, cp, pd, thr = _exact_conic(m_ptr, c_ptr, o_ptr, row, ok)
        wj = tl.maximum(w, 1)
        n = tl.zeros((BLOCK,), dtype=tl.int64)
        for j in range(0, tl.max(box, axis=0)):
            keep = (j < box) & _tile_touched(mx, my, ap, b, cp, pd, thr, x0 + j % wj, y0 + j // wj, ts)
            n += keep.to(tl.int64)
        box = n
    tl.store(count_ptr + row, box, mask=ok)


@triton.jit
def _isect_fill_kernel(m_ptr, r_ptr, c_ptr, o_ptr, d_ptr, img_ptr, start_ptr, keys_ptr, ids_ptr, n_rows, N, ts,
                       tw, th, EXACT: tl.constexpr, PACKED: tl.constexpr, TILE_BITS: tl.constexpr,
                       BLOCK: tl.constexpr):  # fmt: skip
    # PACKED is constexpr: the camera is image_ids[row] there and row // N unpacked.
    row = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = row < n_rows
    x0, y0, w, h = _isect_box(m_ptr, r_ptr, row, ok, ts, tw, th)
    box = w * h
    if PACKED:
        cam = tl.load(img_ptr + row, mask=ok, other=0).to(tl.int64)
    else:
        cam = row // N
    # positive float32 depths sort like their bit patterns read as integers (ref._depth_bits)
    depth = tl.load(d_ptr + row, mask=ok, other=0.0).to(tl.float32)
    high = (cam << (32 + TILE_BITS)) | (depth.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF)
    pos = tl.load(start_ptr + row, mask=ok, other=0)
    if EXACT:
        mx, my, ap, b, cp, pd, thr = _exact_conic(m_ptr, c_ptr, o_ptr, row, ok)
    wj = tl.maximum(w, 1)
    for j in range(0, tl.max(box, axis=0)):
        tx = x0 + j % wj
        ty = y0 + j // wj
        keep = j < box
        if EXACT:
            keep = keep & _tile_touched(mx, my, ap, b, cp, pd, thr, tx, ty, ts)
        tl.store(keys_ptr + pos, high | ((ty * tw + tx) << 32), mask=keep)
        tl.store(ids_ptr + pos, row.to(tl.int32), mask=keep)
        pos += keep.to(tl.int64)


def _check_isect_options(conics, opacities, max_intersections):
    # ref.isect_tiles' own refusals, with its messages, in its order (after the value checks)
    if (conics is None) != (opacities is None):
        raise ValueError(
            "conics and opacities must be given together (exact tile culling needs both) or not at all"
        )
    if max_intersections is not None and max_intersections < 0:
        raise ValueError(f"max_intersections must be >= 0 or None, got {max_intersections}")


def _check_packed_rows(image_ids, n_images, nnz, n_tiles, device):
    """Packed isect_tiles: image_ids [nnz] int32 names each row's camera, in [0, n_images) and
    non-decreasing (rows in camera-major order); the keys' camera field has bits_for_count(n_images)
    bits, and flatten_ids index the nnz rows with int32."""
    from frontiers_fast._checks import check_in_range, check_int, has_values
    from frontiers_fast.reference.splat import INT32_LIMIT, check_isect_sizes

    n_images = check_int("n_images", n_images, 0)
    if not isinstance(image_ids, torch.Tensor) or image_ids.dtype != torch.int32:
        got = image_ids.dtype if isinstance(image_ids, torch.Tensor) else type(image_ids).__name__
        raise ValueError(f"image_ids must be an int32 tensor (the camera of each packed row), got {got}")
    if tuple(image_ids.shape) != (nnz,):
        raise ValueError(
            f"image_ids must have shape [nnz] = [{nnz}] (one camera per row of means2d), "
            f"got {list(image_ids.shape)}"
        )
    if image_ids.device != device:
        raise ValueError(f"image_ids must be on means2d's device ({device}), got {image_ids.device}")
    check_isect_sizes(n_images, 1, n_tiles)  # the bits of the camera and tile fields (1: no pair count here)
    if nnz > INT32_LIMIT:
        raise ValueError(
            f"means2d has nnz = {nnz} packed rows, more than the int32 flatten_ids can index (2^31); "
            "render fewer cameras per call"
        )
    check_in_range("image_ids", image_ids, 0, n_images - 1, f" (the cameras of n_images = {n_images})")
    if has_values(image_ids) and nnz > 1:
        down = image_ids[1:] < image_ids[:-1]
        if bool(down.any()):
            k = int(torch.argmax(down.to(torch.int8)))
            raise ValueError(
                f"image_ids must be non-decreasing (packed rows in camera-major order); "
                f"image_ids[{k}] > image_ids[{k + 1}]"
            )
    return n_images


@on_device
def isect_tiles(means2d, radii, depths, tile_size, tile_width, tile_height, conics, opacities, max_intersections,
                image_ids, n_images):  # fmt: skip
    """Unpacked (image_ids None): means2d [C, N, 2], radii [C, N, 2] int32, depths [C, N], conics
    [C, N, 3] and opacities [C, N] or None; n_images is ignored.  Packed: the same per row of [nnz]
    with image_ids [nnz] int32 (non-decreasing) and n_images cameras.  Returns tiles_per_gauss
    (depths' shape) int32, isect_ids [M] int64 sorted and flatten_ids [M] int32 (row indices), equal
    to ref.isect_tiles (unpacked) bit for bit."""
    from frontiers_fast.ops.splat import _check_isect_values
    from frontiers_fast.reference.splat import bits_for_count, check_isect_count, check_isect_sizes

    n_tiles = tile_width * tile_height
    packed = image_ids is not None
    if packed:
        n_rows = means2d.shape[0]
        n_images = _check_packed_rows(image_ids, n_images, n_rows, n_tiles, means2d.device)
        N = 1
    else:
        C, N = depths.shape
        check_isect_sizes(C, N, n_tiles)
        n_rows, n_images = C * N, C
    _check_isect_values(means2d, radii, depths, conics, opacities)
    _check_isect_options(conics, opacities, max_intersections)
    dev = means2d.device
    m2d, rad, dep = means2d.detach().contiguous(), radii.contiguous(), depths.detach().contiguous()
    exact = conics is not None
    con = conics.detach().contiguous() if exact else m2d  # placeholder pointers without the exact test
    opa = opacities.detach().contiguous() if exact else m2d
    img = image_ids.contiguous() if packed else rad
    count = torch.zeros(n_rows, dtype=torch.int64, device=dev)
    grid = (triton.cdiv(n_rows, ISECT_BLOCK),)
    if n_rows:
        _isect_count_kernel[grid](
            m2d, rad, con, opa, count, n_rows, tile_size, tile_width, tile_height, EXACT=exact, BLOCK=ISECT_BLOCK,
            enable_fp_fusion=False,
        )  # fmt: skip
    end = torch.cumsum(count, 0)
    n_isects = int(end[-1]) if n_rows else 0
    check_isect_count(n_isects, max_intersections, dev)
    keys = torch.empty(n_isects, dtype=torch.int64, device=dev)
    ids = torch.empty(n_isects, dtype=torch.int32, device=dev)
    if n_isects:
        _isect_fill_kernel[grid](
            m2d, rad, con, opa, dep, img, end - count, keys, ids, n_rows, N, tile_size, tile_width, tile_height,
            EXACT=exact, PACKED=packed, TILE_BITS=bits_for_count(n_tiles), BLOCK=ISECT_BLOCK,
            enable_fp_fusion=False,
        )  # fmt: skip
    keys, order = torch.sort(keys, stable=True)
    return count.to(torch.int32).reshape(depths.shape), keys, ids[order]


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
